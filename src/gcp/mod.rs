//! The Cloud SQL Admin API: what an instance really is (engine, tier, flags,
//! state), fetched with `instances.get` and kept through API outages.
//!
//! - [`AdminApi`]: one `GET {endpoint}/v1/projects/{project}/instances/{instance}`
//!   per call, authenticated with `google-cloud-auth` (Application Default
//!   Credentials, or an explicit service-account key file), over `reqwest` with
//!   rustls on the process's aws-lc-rs provider. The endpoint and an extra
//!   trusted root CA are configurable so tests (and private endpoints) can
//!   stand in for `https://sqladmin.googleapis.com`.
//! - [`CapacityDiscovery`]: retries retryable failures with exponential backoff
//!   and remembers, per connection name, the last answer, when it came and the
//!   latest error, so callers keep the last known capacity while the API fails.
//! - [`GcpError`]: what went wrong, whether retrying can help
//!   ([`GcpError::is_retryable`]), the HTTP status and Google's own message, and
//!   what the user should do about it (its `Display`).
//!
//! Authentication: with a service-account key, `google-cloud-auth` signs a JWT
//! locally (claims `iss`/`sub` = the account, `scope` = [`SQLADMIN_SCOPE`]) and
//! sends it as the bearer token itself; it never calls the key's `token_uri`.
//! On GKE with Workload Identity (no key file) it asks the metadata server.

mod client;
mod connection_name;
mod discovery;
mod error;
mod instance;

pub use client::{AdminApi, DEFAULT_ENDPOINT, SQLADMIN_SCOPE};
pub use connection_name::ConnectionName;
pub use discovery::{CapacityDiscovery, Observation, RetryPolicy};
pub use error::{Cause, GcpError, GoogleError};
pub use instance::{DatabaseInstance, InstanceState, IpAddress};
