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

/// The reasons our conditions and Events carry (CamelCase, as Kubernetes
/// reasons are). One enum, so a reason is never a string compared with `==`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The binding's instance exists and admits its namespace.
    Resolved,
    /// The binding's instance does not exist.
    InstanceNotFound,
    /// The instance's `allowedNamespaces` refuses the binding's namespace.
    NamespaceNotAllowed,
    /// Every binding gets its maximum pool.
    Fits,
    /// The capacity is shared below the maximum pools.
    Shared,
    /// Even the minimum pools do not fit.
    Overcommitted,
    /// The capacity is not known.
    CapacityUnknown,
    /// The spec's capacity cannot be used.
    InvalidCapacity,
    /// No workload matches the binding.
    NoWorkloads,
    /// The binding's injection collides with another binding's.
    Conflict,
    /// Pods came without the injection the webhook should have added.
    InjectionMissed,
    /// The workload needs the admission webhook and none serves it.
    NeedsAdmission,
    /// A workload is not injected (see its entry).
    NotInjected,
    /// Pods are injected at creation by the admission webhook.
    Admission,
    /// Every matched workload is injected.
    Injected,
    /// The injection was taken out of a workload.
    Cleaned,
    /// The binding is ready.
    Bound,
    /// The instance is ready.
    Ready,
    /// Another operator installation writes the same object.
    AnotherOperator,
    /// A workload the binding lists does not exist.
    NotFound,
    /// The injection could not be planned (the message says why).
    PlanFailed,
}

impl Reason {
    /// The reason as written in conditions and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Resolved => "Resolved",
            Reason::InstanceNotFound => "InstanceNotFound",
            Reason::NamespaceNotAllowed => "NamespaceNotAllowed",
            Reason::Fits => "Fits",
            Reason::Shared => "Shared",
            Reason::Overcommitted => "Overcommitted",
            Reason::CapacityUnknown => "CapacityUnknown",
            Reason::InvalidCapacity => "InvalidCapacity",
            Reason::NoWorkloads => "NoWorkloads",
            Reason::Conflict => "Conflict",
            Reason::InjectionMissed => "InjectionMissed",
            Reason::NeedsAdmission => "NeedsAdmission",
            Reason::NotInjected => "NotInjected",
            Reason::Admission => "Admission",
            Reason::Injected => "Injected",
            Reason::Cleaned => "Cleaned",
            Reason::Bound => "Bound",
            Reason::Ready => "Ready",
            Reason::AnotherOperator => "AnotherOperator",
            Reason::NotFound => "NotFound",
            Reason::PlanFailed => "PlanFailed",
        }
    }

    /// The reason named `text`, if it is one of ours.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Every reason.
    pub const ALL: [Reason; 21] = [
        Reason::Resolved,
        Reason::InstanceNotFound,
        Reason::NamespaceNotAllowed,
        Reason::Fits,
        Reason::Shared,
        Reason::Overcommitted,
        Reason::CapacityUnknown,
        Reason::InvalidCapacity,
        Reason::NoWorkloads,
        Reason::Conflict,
        Reason::InjectionMissed,
        Reason::NeedsAdmission,
        Reason::NotInjected,
        Reason::Admission,
        Reason::Injected,
        Reason::Cleaned,
        Reason::Bound,
        Reason::Ready,
        Reason::AnotherOperator,
        Reason::NotFound,
        Reason::PlanFailed,
    ];
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds a status' conditions in order, carrying `lastTransitionTime` over
/// from the previous conditions (see [`condition`]).
pub struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
    built: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    /// A builder over the previous status' conditions.
    pub fn new(previous: &'a [Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Conditions {
            previous,
            generation,
            now,
            built: Vec::new(),
        }
    }

    /// Adds condition `type_`.
    pub fn set(
        &mut self,
        type_: &str,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) -> &mut Self {
        self.built.push(condition(
            self.previous,
            type_,
            status,
            reason.as_str(),
            message,
            self.generation,
            self.now,
        ));
        self
    }

    /// Adds condition `type_` whose reason comes from another typed source
    /// (a capacity source, a Google API error kind).
    pub fn set_from(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> &mut Self {
        self.built.push(condition(
            self.previous,
            type_,
            status,
            reason,
            message,
            self.generation,
            self.now,
        ));
        self
    }

    /// Adds conditions built elsewhere, in order.
    pub fn extend(&mut self, built: impl IntoIterator<Item = Condition>) -> &mut Self {
        self.built.extend(built);
        self
    }

    /// The conditions built.
    pub fn build(self) -> Vec<Condition> {
        self.built
    }
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_and_is_camel_case() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert!(
                r.as_str().starts_with(|c: char| c.is_ascii_uppercase()),
                "{r}"
            );
            assert!(r.as_str().chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
        }
        assert_eq!(Reason::parse("Unknown"), None);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let t0 = Timestamp::from_second(1_000).expect("a time");
        let t1 = Timestamp::from_second(2_000).expect("a time");
        let mut first = Conditions::new(&[], Some(1), t0);
        first.set(condition_type::READY, false, Reason::NoWorkloads, "none");
        let first = first.build();
        let mut again = Conditions::new(&first, Some(2), t1);
        again.set(condition_type::READY, false, Reason::NotInjected, "later");
        let again = again.build();
        assert_eq!(again[0].last_transition_time.0, t0);
        assert_eq!(again[0].observed_generation, Some(2));
        let mut flipped = Conditions::new(&again, Some(2), t1);
        flipped.set(condition_type::READY, true, Reason::Bound, "ok");
        assert_eq!(flipped.build()[0].last_transition_time.0, t1);
    }
}
