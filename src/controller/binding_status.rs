//! The status step of the binding reconcile, pure: from what the reconcile
//! read (a [`BindingView`]) and what applying did (the workloads' entries, the
//! missed-injection report), the binding's status and the Events to publish.

use kube::runtime::events::EventType;

use crate::api::{
    BoundInstance, CloudSqlBindingStatus, Conditions, PoolStatus, Reason, WorkloadStatus,
    condition_type, find_condition,
};

/// What the status is computed from, read by the dereference step.
#[derive(Clone, Debug)]
pub struct BindingView {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status the store holds.
    pub previous: CloudSqlBindingStatus,
    /// This installation (`status.reconciledBy`).
    pub identity: String,
    /// The message naming another installation that writes this binding too,
    /// when this one keeps it.
    pub operator_conflict: Option<String>,
    /// `spec.instanceRef.name`.
    pub instance_name: String,
    /// The binding's namespace.
    pub namespace: String,
    /// `spec.pool.maxPerPod`.
    pub requested_per_pod: i64,
    /// The instance as resolved.
    pub resolution: Resolution,
}

/// How the binding's instance resolved.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// It does not exist.
    InstanceMissing,
    /// Its `allowedNamespaces` refuses the binding's namespace.
    NamespaceNotAllowed,
    /// It exists and admits the binding.
    Eligible(Pool),
}

/// The binding's share of its instance.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The instance's bound identity.
    pub instance: BoundInstance,
    /// Connections per pod granted.
    pub grant: u32,
    /// Pods the binding's workloads can run at once.
    pub max_pods: u32,
    /// The instance's budget.
    pub budget: Budget,
}

/// The instance's budget, as far as a binding's status tells it.
#[derive(Clone, Debug)]
pub enum Budget {
    /// Every minimum pool fits the usable capacity.
    Fits {
        /// Usable connections of the instance.
        usable: u32,
    },
    /// The minimum pools need more than the usable capacity.
    Overcommitted {
        /// What the minimum pools need.
        needed_min: u64,
        /// Usable connections of the instance.
        usable: u32,
    },
    /// The capacity is unknown; the message says why.
    Unknown(String),
    /// The capacity is known but the bindings could not be allocated.
    NotAllocated,
    /// The capacity could not be resolved; the message says why.
    Invalid(String),
}

/// An Event to publish on the binding.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// Normal or Warning.
    pub type_: EventType,
    /// Its reason.
    pub reason: Reason,
    /// Its message.
    pub note: String,
}

/// The binding's status and its Events. Events are returned only when what
/// they report is new: the Ready condition's (status, reason, message) moved
/// (for `Conflict`, `InjectionMissed`, the instance problems), or the
/// `BudgetFits` reason moved (for `Overcommitted`): an idle cluster sees none.
pub fn binding_status(
    view: &BindingView,
    workloads: Vec<WorkloadStatus>,
    missed: Option<&super::missed::MissedReport>,
    now: k8s_openapi::jiff::Timestamp,
) -> (CloudSqlBindingStatus, Vec<Note>) {
    let BindingView {
        generation,
        previous,
        identity,
        operator_conflict,
        instance_name,
        namespace,
        requested_per_pod,
        resolution,
    } = view;
    let injected = workloads.iter().filter(|w| w.injected).count();
    let matched = workloads.len();
    let mut status = CloudSqlBindingStatus {
        observed_generation: *generation,
        reconciled_by: Some(identity.clone()),
        workloads_summary: Some(format!("{injected}/{matched}")),
        ..Default::default()
    };
    let mut conditions = Conditions::new(&previous.conditions, *generation, now);
    let mut notes: Vec<Note> = Vec::new();
    let warn = |reason: Reason, note: String| Note {
        type_: EventType::Warning,
        reason,
        note,
    };
    if let Some(message) = operator_conflict {
        conditions.set(
            condition_type::OPERATOR_CONFLICT,
            true,
            Reason::AnotherOperator,
            message.clone(),
        );
    }

    match resolution {
        Resolution::InstanceMissing => {
            let message = format!(
                "CloudSqlInstance {instance_name:?} does not exist; workloads are left as they are until it does"
            );
            status.instance = previous.instance.clone();
            status.pool = previous.pool.clone();
            conditions
                .set(
                    condition_type::READY,
                    false,
                    Reason::InstanceNotFound,
                    &message,
                )
                .set(
                    condition_type::INSTANCE_RESOLVED,
                    false,
                    Reason::InstanceNotFound,
                    &message,
                );
            notes.push(warn(Reason::InstanceNotFound, message));
        }
        Resolution::NamespaceNotAllowed => {
            let message = format!(
                "CloudSqlInstance {instance_name:?} does not allow bindings from namespace {namespace:?} (spec.allowedNamespaces); nothing is injected"
            );
            conditions
                .set(
                    condition_type::READY,
                    false,
                    Reason::NamespaceNotAllowed,
                    &message,
                )
                .set(
                    condition_type::INSTANCE_RESOLVED,
                    false,
                    Reason::NamespaceNotAllowed,
                    &message,
                );
            notes.push(warn(Reason::NamespaceNotAllowed, message));
        }
        Resolution::Eligible(pool) => {
            let Pool {
                instance,
                grant,
                max_pods,
                budget,
            } = pool;
            let (grant, max_pods) = (*grant, *max_pods);
            conditions.set(
                condition_type::INSTANCE_RESOLVED,
                true,
                Reason::Resolved,
                format!("bound to {} ({})", instance_name, instance.connection_name),
            );
            status.instance = Some(instance.clone());
            status.pool = Some(PoolStatus {
                requested_per_pod: *requested_per_pod,
                granted_per_pod: i64::from(grant),
                max_pods: i64::from(max_pods),
                connections: i64::from(grant) * i64::from(max_pods),
                summary: format!("{grant}/{requested_per_pod}"),
            });
            let (fits, reason, message) = match budget {
                Budget::Fits { usable } => {
                    let connections = u64::from(grant) * u64::from(max_pods);
                    let reason = if i64::from(grant) >= *requested_per_pod {
                        Reason::Fits
                    } else {
                        Reason::Shared
                    };
                    // Only this binding's arithmetic and the capacity: the
                    // instance-wide total allocated (on the instance's status)
                    // moves with every other binding, and would rewrite the
                    // status of every binding on the instance when one changes.
                    let message = format!(
                        "{grant} connections per pod x {max_pods} pods = {connections} of the {usable} usable on {instance_name}"
                    );
                    (true, reason, message)
                }
                Budget::Overcommitted { needed_min, usable } => {
                    let message = format!(
                        "minimum pools need {needed_min} connections; {instance_name} has {usable} usable; granted minPerPod {grant}"
                    );
                    notes.push(warn(Reason::Overcommitted, message.clone()));
                    (false, Reason::Overcommitted, message)
                }
                Budget::Unknown(why) => (
                    false,
                    Reason::CapacityUnknown,
                    format!("{why}; granted minPerPod {grant}"),
                ),
                Budget::NotAllocated => (
                    false,
                    Reason::CapacityUnknown,
                    format!(
                        "the bindings of {instance_name} could not be allocated; granted minPerPod {grant}"
                    ),
                ),
                Budget::Invalid(why) => (
                    false,
                    Reason::CapacityUnknown,
                    format!(
                        "the capacity of {instance_name} could not be resolved: {why}; granted minPerPod {grant}"
                    ),
                ),
            };
            conditions.set(condition_type::BUDGET_FITS, fits, reason, message);

            // Workloads.
            let problems: Vec<&WorkloadStatus> = workloads.iter().filter(|w| !w.injected).collect();
            let reason_of = |w: &WorkloadStatus| w.reason.as_deref().and_then(Reason::parse);
            let conflict = problems
                .iter()
                .find(|w| reason_of(w) == Some(Reason::Conflict));
            let describe = |w: &WorkloadStatus| {
                format!(
                    "{} {}: {}",
                    w.kind,
                    w.name,
                    w.message.clone().unwrap_or_default()
                )
            };
            let (bound, reason, message) = if matched == 0 {
                (
                    false,
                    Reason::NoWorkloads,
                    "no workload matches spec.workloads in this namespace".to_string(),
                )
            } else if let Some(w) = conflict {
                (false, Reason::Conflict, describe(w))
            } else if let Some(report) = missed {
                (false, Reason::InjectionMissed, report.message.clone())
            } else if let Some(w) = problems.first() {
                let reason = if reason_of(w) == Some(Reason::NeedsAdmission) {
                    Reason::NeedsAdmission
                } else {
                    Reason::NotInjected
                };
                (false, reason, describe(w))
            } else {
                (
                    true,
                    Reason::Injected,
                    format!("{injected} of {matched} workloads injected"),
                )
            };
            if matches!(reason, Reason::Conflict | Reason::InjectionMissed) {
                notes.push(warn(reason, message.clone()));
            }
            conditions.set(condition_type::WORKLOADS_BOUND, bound, reason, &message);
            if bound {
                conditions.set(
                    condition_type::READY,
                    true,
                    Reason::Bound,
                    format!("{injected} workloads injected; {grant} connections per pod"),
                );
            } else {
                conditions.set(condition_type::READY, false, reason, message);
            }
        }
    }
    status.workloads = super::binding::listed(workloads);
    status.conditions = conditions.build();

    // Only what is new.
    let ready = |s: &CloudSqlBindingStatus| {
        find_condition(&s.conditions, condition_type::READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let budget = |s: &CloudSqlBindingStatus| {
        find_condition(&s.conditions, condition_type::BUDGET_FITS).map(|c| c.reason.clone())
    };
    notes.retain(|n| {
        if n.reason == Reason::Overcommitted {
            budget(previous) != budget(&status)
        } else {
            ready(previous) != ready(&status)
        }
    });
    (status, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn view(resolution: Resolution) -> BindingView {
        BindingView {
            generation: Some(3),
            previous: CloudSqlBindingStatus::default(),
            identity: "cloudsql-binder/cloudsql-binder@0.1.0+abcd".into(),
            operator_conflict: None,
            instance_name: "orders".into(),
            namespace: "shop".into(),
            requested_per_pod: 10,
            resolution,
        }
    }

    fn eligible(grant: u32, max_pods: u32, budget: Budget) -> Resolution {
        Resolution::Eligible(Pool {
            instance: BoundInstance {
                connection_name: "p:r:orders".into(),
                database_version: Some("POSTGRES_16".into()),
            },
            grant,
            max_pods,
            budget,
        })
    }

    fn injected(name: &str) -> WorkloadStatus {
        WorkloadStatus {
            kind: "Deployment".into(),
            name: name.into(),
            injected: true,
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("a time")
    }

    fn reason(s: &CloudSqlBindingStatus, type_: &str) -> Option<(String, String)> {
        find_condition(&s.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
    }

    #[test]
    fn a_fitting_binding_is_ready_with_its_arithmetic_and_no_event() {
        let v = view(eligible(10, 12, Budget::Fits { usable: 374 }));
        let (status, notes) = binding_status(&v, vec![injected("api")], None, now());
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.reconciled_by.as_deref(), Some(v.identity.as_str()));
        assert_eq!(status.workloads_summary.as_deref(), Some("1/1"));
        let pool = status.pool.clone().expect("a pool");
        assert_eq!(
            (pool.granted_per_pod, pool.max_pods, pool.connections),
            (10, 12, 120)
        );
        assert_eq!(pool.summary, "10/10");
        assert_eq!(
            reason(&status, condition_type::READY),
            Some(("True".into(), "Bound".into()))
        );
        let budget =
            find_condition(&status.conditions, condition_type::BUDGET_FITS).expect("BudgetFits");
        assert_eq!(budget.reason, "Fits");
        assert_eq!(
            budget.message,
            "10 connections per pod x 12 pods = 120 of the 374 usable on orders"
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn a_missing_instance_keeps_the_last_pool_and_warns_once() {
        let mut v = view(Resolution::InstanceMissing);
        v.previous.pool = Some(PoolStatus {
            granted_per_pod: 4,
            ..Default::default()
        });
        let (status, notes) = binding_status(&v, vec![injected("api")], None, now());
        assert_eq!(status.pool, v.previous.pool);
        assert_eq!(
            reason(&status, condition_type::READY),
            Some(("False".into(), "InstanceNotFound".into()))
        );
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].reason, Reason::InstanceNotFound);
        // The same again: nothing new to tell.
        v.previous = status;
        let (_, notes) = binding_status(&v, vec![injected("api")], None, now());
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn overcommitted_minimums_warn_with_the_numbers() {
        let v = view(eligible(
            2,
            50,
            Budget::Overcommitted {
                needed_min: 100,
                usable: 80,
            },
        ));
        let (status, notes) = binding_status(&v, vec![injected("api")], None, now());
        let budget =
            find_condition(&status.conditions, condition_type::BUDGET_FITS).expect("BudgetFits");
        assert_eq!(budget.status, "False");
        assert_eq!(
            budget.message,
            "minimum pools need 100 connections; orders has 80 usable; granted minPerPod 2"
        );
        assert_eq!(
            notes.iter().map(|n| n.reason).collect::<Vec<_>>(),
            [Reason::Overcommitted]
        );
    }

    #[test]
    fn a_conflicting_workload_makes_the_binding_not_ready_and_names_it() {
        let v = view(eligible(10, 2, Budget::Fits { usable: 100 }));
        let conflicted = WorkloadStatus {
            kind: "Deployment".into(),
            name: "web".into(),
            injected: false,
            reason: Some("Conflict".into()),
            message: Some("env DB_USER differs from binding shop/other".into()),
            ..Default::default()
        };
        let (status, notes) = binding_status(&v, vec![injected("api"), conflicted], None, now());
        let ready = find_condition(&status.conditions, condition_type::READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Conflict")
        );
        assert!(
            ready.message.starts_with("Deployment web: env DB_USER"),
            "{}",
            ready.message
        );
        assert_eq!(status.workloads_summary.as_deref(), Some("1/2"));
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].reason, Reason::Conflict);
    }

    #[test]
    fn no_workload_and_needs_admission_are_told_apart() {
        let v = view(eligible(10, 0, Budget::Fits { usable: 100 }));
        let (status, _) = binding_status(&v, vec![], None, now());
        assert_eq!(
            reason(&status, condition_type::READY),
            Some(("False".into(), "NoWorkloads".into()))
        );
        let job = WorkloadStatus {
            kind: "Job".into(),
            name: "migrate".into(),
            reason: Some("NeedsAdmission".into()),
            message: Some("needs the webhook".into()),
            ..Default::default()
        };
        let (status, _) = binding_status(&v, vec![job], None, now());
        assert_eq!(
            reason(&status, condition_type::READY),
            Some(("False".into(), "NeedsAdmission".into()))
        );
    }

    #[test]
    fn a_kept_contest_is_a_condition_naming_both_installations() {
        let mut v = view(eligible(10, 1, Budget::Fits { usable: 100 }));
        v.operator_conflict = Some("two installations: \"a\" and \"b\"".into());
        let (status, _) = binding_status(&v, vec![injected("api")], None, now());
        let c = find_condition(&status.conditions, condition_type::OPERATOR_CONFLICT)
            .expect("OperatorConflict");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "AnotherOperator")
        );
        assert!(c.message.contains("\"a\"") && c.message.contains("\"b\""));
        // Ready stays what the binding is.
        assert_eq!(
            reason(&status, condition_type::READY),
            Some(("True".into(), "Bound".into()))
        );
    }

    #[test]
    fn a_namespace_not_allowed_injects_nothing_and_says_which_field() {
        let v = view(Resolution::NamespaceNotAllowed);
        let (status, notes) = binding_status(&v, vec![], None, now());
        let ready = find_condition(&status.conditions, condition_type::READY).expect("Ready");
        assert_eq!(ready.reason, "NamespaceNotAllowed");
        assert!(ready.message.contains("spec.allowedNamespaces"));
        assert!(status.pool.is_none());
        assert_eq!(notes.len(), 1);
    }
}
