//! The connection budget: how many connections an instance accepts, how many
//! pods of a workload can hold connections at once, and how the usable
//! connections are shared among bindings.
//!
//! Everything here is pure: no I/O, no Kubernetes client, no async. The
//! controller gathers the inputs (instance spec and Admin API answer, workload
//! objects, bindings) and turns the outputs into status and conditions.
//!
//! - [`capacity`]: `max_connections` from spec, Admin API flags, or the tier
//!   table, minus what is reserved and used outside the cluster.
//! - [`max_pods`]: the most pods of a workload alive at once, rollouts and
//!   autoscaling included.
//! - [`allocate`](mod@allocate): weighted max-min fair per-pod pools in whole connections.

pub mod allocate;
pub mod capacity;
pub mod max_pods;

pub use allocate::{Allocation, AllocationError, PoolRequest, allocate};
pub use capacity::{
    Capacity, CapacityError, CapacityInputs, CapacityResolution, CapacitySource,
    DiscoveredInstance, Engine, Tier, UnknownCapacity, max_connections_from_flags,
    resolve_capacity, tier_default,
};
pub use max_pods::MaxPods;
