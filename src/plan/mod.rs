//! What a binding injects into a pod template, and how it is merged in and
//! taken out again.
//!
//! Everything here is pure: no Kubernetes client, no I/O. The controller, the
//! admission webhook and `cloudsql-binder render` all go through the same three
//! steps:
//!
//! 1. [`InjectionPlan::new`]: one binding + its instance + the granted pool →
//!    the env items, the proxy sidecar (or none), the socket volume (or none)
//!    and the Cloud Run annotation value. Independent of any pod.
//! 2. [`PodInjection::new`]: every plan of the bindings that select one pod
//!    template, sorted by binding key.
//! 3. [`PodInjection::apply`] / [`PodInjection::apply_for`] (admission, render)
//!    or [`PodInjection::ssa_partial`] (the controller's server-side apply):
//!    merge into a concrete pod spec, choosing container/volume names and
//!    health ports that do not collide with what the user wrote, and refusing
//!    (with every [`Conflict`]) rather than overwriting user data.
//!
//! What we own is recorded on the template in the annotation
//! [`INJECTED_ANNOTATION`], so [`remove`] takes out exactly that and a
//! re-apply first takes out the previous injection: applying twice equals
//! applying once, and removing after applying restores the template exactly.

mod conflict;
mod injection;
mod pod;
mod proxy;
mod record;
mod ssa;

#[cfg(test)]
mod tests;

pub use conflict::{Conflict, ConflictKind, ExistingEnv};
pub use injection::{
    BindingKey, EnvItem, Grant, InjectionMode, InjectionPlan, Listener, PlanError, ProxySidecar,
    SocketVolume, TargetCapabilities,
};
pub use pod::{Platform, PodInjection, remove, remove_for};
pub use proxy::{ProxyPorts, default_proxy_resources};

pub use crate::api::CONFIG_HASH_ANNOTATION;

/// The proxy image used when a binding does not name one: the version this
/// operator is tested with.
pub const DEFAULT_PROXY_IMAGE: &str = "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.28.0";

/// Name of the proxy container when one binding selects the pod (with several:
/// `cloud-sql-proxy-<binding name>`).
pub const PROXY_CONTAINER_NAME: &str = "cloud-sql-proxy";

/// Name of the shared in-memory volume holding the proxy's Unix sockets.
pub const SOCKET_VOLUME_NAME: &str = "cloudsql";

/// Where the socket volume is mounted, in the proxy and in the app containers.
/// Cloud Run mounts its own sockets at the same path.
pub const SOCKET_DIR: &str = "/cloudsql";

/// Default port of the proxy's health server (`--http-port`). Not the proxy's
/// own default 9090, which is a popular application metrics port.
pub const DEFAULT_HTTP_PORT: u16 = 9801;

/// Default port of the proxy's localhost-only admin server (`--admin-port`),
/// used for `/quitquitquit` when the proxy runs as a regular container.
pub const DEFAULT_ADMIN_PORT: u16 = 9091;

/// The uid of the distroless `nonroot` user the proxy image runs as.
pub const PROXY_UID: i64 = 65532;

/// Revision-template annotation through which Cloud Run mounts
/// `/cloudsql/<connection name>` itself (comma-separated connection names).
pub const CLOUD_RUN_INSTANCES_ANNOTATION: &str = "run.googleapis.com/cloudsql-instances";

/// Pod-template annotation recording what the operator injected (compact JSON),
/// so that removing and re-applying touch nothing else.
pub const INJECTED_ANNOTATION: &str = "cloudsql.dev/injected";

/// Pod label opting a pod out of injection (`"false"`); the webhook
/// configuration's object selector keeps such pods from even reaching us.
pub const INJECT_LABEL: &str = "cloudsql.dev/inject";
/// Pod annotation the webhook writes: the bindings (names, in the pod's
/// namespace) whose admission it handled, injected or refused. A bound pod
/// without it was created while the webhook was unreachable.
pub const ADMITTED_ANNOTATION: &str = "cloudsql.dev/admitted";

/// Whether the pod opted out of injection (`cloudsql.dev/inject: "false"`).
pub fn opted_out(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == "false")
}
