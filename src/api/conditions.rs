//! Status conditions shared by both kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types used in statuses.
pub mod condition_type {
    /// Everything the object asks for is in place.
    pub const READY: &str = "Ready";
    /// The instance's capacity is known (spec, Admin API or tier table).
    pub const CAPACITY_KNOWN: &str = "CapacityKnown";
    /// The minimum pools of every binding fit the instance's usable capacity.
    pub const BUDGET_FITS: &str = "BudgetFits";
    /// The Cloud SQL Admin API answered `instances.get` for the instance.
    pub const DISCOVERED: &str = "Discovered";
    /// The binding's instance exists and admits the binding's namespace.
    pub const INSTANCE_RESOLVED: &str = "InstanceResolved";
    /// Every matched workload carries the injection.
    pub const WORKLOADS_BOUND: &str = "WorkloadsBound";
    /// Present (True) only while another operator installation writes the
    /// same object: the message names both and says which one stands back.
    pub const OPERATOR_CONFLICT: &str = "OperatorConflict";
}

/// Builds a condition with `lastTransitionTime` carried over from `previous`
/// when the status did not change, so the time moves only on a real transition.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time,
    }
}

/// Whether two condition lists say the same thing, ignoring timestamps.
pub fn conditions_equivalent(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("valid time");
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().expect("valid time");
        let first = condition(&[], "Ready", true, "Bound", "ok", Some(1), t0);
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Bound",
            "still ok",
            Some(2),
            t1,
        );
        assert_eq!(again.last_transition_time, first.last_transition_time);
        let flipped = condition(
            &[first],
            "Ready",
            false,
            "InstanceNotFound",
            "gone",
            Some(2),
            t1,
        );
        assert_eq!(flipped.last_transition_time, Time(t1));
    }
}
