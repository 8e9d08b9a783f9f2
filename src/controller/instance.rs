//! The instance reconciler: resolve the capacity, share it among the bindings
//! (the budget), write the instance's status, and send bindings whose grant
//! moved back to the binding reconciler.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{instrument, warn};

use super::operators::{HOLD_OFF, Stance, conflict_message};
use super::{Context, Error};
use crate::api::{
    CapacityStatus, CloudSqlInstance, CloudSqlInstanceStatus, Conditions, Discovery, FIELD_MANAGER,
    Reason, condition, condition_type, conditions_equivalent, find_condition,
};
use crate::budget::CapacityResolution;
use crate::index::{Eligibility, binding_key};
use crate::telemetry::InstanceLabel;

#[instrument(skip_all, fields(instance = %instance.name_any()))]
pub async fn reconcile(
    instance: Arc<CloudSqlInstance>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // The budget counts bindings: never compute it from a half-filled cache.
    crate::index::store_ready(&ctx.stores.bindings).await;
    let name = instance.name_any();
    // An operator limited to some namespaces manages only the instances its
    // namespaces bind to (another operator manages the rest).
    if !ctx.options.namespaces.is_empty()
        && !ctx
            .stores
            .bindings_of_any_order(&name)
            .iter()
            .any(|b| ctx.watches_namespace(&b.namespace().unwrap_or_default()))
    {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_timer("instance");
    let generation = instance.metadata.generation;
    let now = Timestamp::now();
    let previous = instance.status.clone().unwrap_or_default();
    let prev = &previous.conditions;
    let me = ctx.options.identity.as_str();
    let uid = instance.metadata.uid.as_deref();
    let stance = ctx
        .operators
        .stance(me, uid, previous.reconciled_by.as_deref());
    let conflict = match &stance {
        Stance::Sole => None,
        Stance::StandBack { other, newly } => {
            // Another installation keeps this instance: write nothing, say so once.
            if *newly {
                let note = conflict_message("CloudSqlInstance", me, other, false);
                warn!(instance = %name, "{note}");
                publish(&ctx, &instance, Reason::AnotherOperator.as_str(), note).await;
            }
            return Ok(Action::requeue(HOLD_OFF));
        }
        Stance::Keep { other, newly } => {
            let message = conflict_message("CloudSqlInstance", me, other, true);
            if *newly {
                warn!(instance = %name, "{message}");
                publish(
                    &ctx,
                    &instance,
                    Reason::AnotherOperator.as_str(),
                    message.clone(),
                )
                .await;
            }
            Some(condition(
                prev,
                condition_type::OPERATOR_CONFLICT,
                true,
                Reason::AnotherOperator.as_str(),
                message,
                generation,
                now,
            ))
        }
    };

    // Discovery: ask the Admin API when the answer is stale or the spec changed.
    let mut discovered_condition = None;
    let mut requeue = Duration::from_secs(30 * 60);
    if instance.spec.discovery == Discovery::AdminApi {
        let connection_name = instance.spec.connection_name.clone();
        match &ctx.options.discovery {
            None => {
                discovered_condition = Some(condition(
                    prev,
                    condition_type::DISCOVERED,
                    false,
                    "AdminAPIUnavailable",
                    "the operator has no Cloud SQL Admin API client (no Application Default Credentials: \
                     run with Workload Identity or --sqladmin-credentials); the capacity comes from the spec \
                     (set spec.discovery: None to silence this)",
                    generation,
                    now,
                ));
            }
            Some(discovery) => {
                let spec_changed = previous.observed_generation != generation;
                let result = if spec_changed {
                    discovery.refresh(&connection_name).await
                } else {
                    discovery
                        .refresh_if_stale(&connection_name, ctx.options.discovery_refresh)
                        .await
                };
                requeue = ctx.options.discovery_refresh;
                discovered_condition = Some(match result {
                    Ok(found) => condition(
                        prev,
                        condition_type::DISCOVERED,
                        true,
                        "AdminAPI",
                        format!(
                            "instances.get: {} {} ({})",
                            found.database_version,
                            found.tier,
                            found.state.as_str()
                        ),
                        generation,
                        now,
                    ),
                    Err(err) => {
                        requeue = Duration::from_secs(30);
                        let kept = if discovery.discovered(&connection_name).is_some() {
                            "the last known capacity is kept"
                        } else {
                            "the capacity comes from the spec"
                        };
                        condition(
                            prev,
                            condition_type::DISCOVERED,
                            false,
                            err.reason(),
                            format!("{err}; {kept}"),
                            generation,
                            now,
                        )
                    }
                });
            }
        }
    }
    let discovered = ctx.stores.discovered(&instance);
    let capacity = ctx.stores.capacity(&instance, discovered.clone());
    let budget = ctx.stores.budget(&instance, &capacity);
    let bindings = ctx.stores.bindings_of_any_order(&name);
    let view = InstanceView {
        name: name.clone(),
        generation,
        previous: &previous,
        identity: me.to_owned(),
        database_version: discovered
            .as_ref()
            .map(|d| d.database_version.clone())
            .or_else(|| instance.spec.database_version.clone()),
        tier: discovered
            .as_ref()
            .map(|d| d.tier.clone())
            .or_else(|| instance.spec.capacity.tier.clone()),
        bindings: bindings.len(),
        capacity: &capacity,
        budget: &budget,
        leading: conflict.into_iter().chain(discovered_condition).collect(),
    };
    let (status, warning) = instance_status(&view, now);
    if let Ok(CapacityResolution::Known(c)) = &capacity {
        ctx.metrics
            .usable
            .get_or_create(&InstanceLabel {
                instance: name.clone(),
            })
            .set(i64::from(c.usable()));
    }
    if let Some(a) = &budget.allocation {
        ctx.metrics
            .allocated
            .get_or_create(&InstanceLabel {
                instance: name.clone(),
            })
            .set(i64::try_from(a.allocated).unwrap_or(i64::MAX));
    }

    if !status_equivalent(&previous, &status) {
        let api: Api<CloudSqlInstance> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": "cloudsql.dev/v1alpha1",
            "kind": "CloudSqlInstance",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: format!("writing the status of instance {name}"),
            source,
        })?;
        ctx.metrics.write("instance", "apply_status");
        ctx.operators.wrote(uid);
        if let Some((reason, note)) = warning {
            publish(&ctx, &instance, reason.as_str(), note).await;
        }
    }

    // Bindings whose grant moved (or that have not seen this instance yet) go
    // back to the binding reconciler, which re-injects and rolls them.
    if let Some(a) = &budget.allocation {
        for binding in &bindings {
            if !matches!(ctx.stores.eligibility(binding), Eligibility::Eligible(_)) {
                continue;
            }
            let key = binding_key(binding);
            let granted = binding
                .status
                .as_ref()
                .and_then(|s| s.pool.as_ref())
                .map(|p| p.granted_per_pod);
            let want = a.grants.get(&key).map(|g| i64::from(*g));
            if want.is_some() && granted != want {
                let _ = ctx.binding_trigger.send(ObjectRef::from_obj(&**binding));
            }
        }
    }
    if let Ok(mut seen) = ctx.instance_seen.lock() {
        seen.insert(
            name,
            super::InstanceSeen {
                bindings: bindings.len(),
                budget,
            },
        );
    }
    Ok(Action::requeue(requeue))
}

pub fn error_policy(instance: Arc<CloudSqlInstance>, _err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&crate::telemetry::ControllerLabel {
            controller: "instance".into(),
        })
        .inc();
    Action::requeue(
        ctx.backoff
            .failed(&format!("instance {}", instance.name_any())),
    )
}

fn status_equivalent(a: &CloudSqlInstanceStatus, b: &CloudSqlInstanceStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.reconciled_by == b.reconciled_by
        && a.database_version == b.database_version
        && a.tier == b.tier
        && a.capacity == b.capacity
        && a.allocated == b.allocated
        && a.bindings == b.bindings
        && conditions_equivalent(&a.conditions, &b.conditions)
}

/// Publishes a Warning Event on the instance.
async fn publish(ctx: &Context, instance: &CloudSqlInstance, reason: &str, note: String) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Budget".into(),
        secondary: None,
    };
    if ctx
        .recorder
        .publish(&event, &instance.object_ref(&()))
        .await
        .is_ok()
    {
        ctx.metrics.write("instance", "event");
    }
}

/// What an instance's status is computed from.
pub(super) struct InstanceView<'a> {
    /// The instance's name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status the store holds.
    pub previous: &'a CloudSqlInstanceStatus,
    /// This installation (`status.reconciledBy`).
    pub identity: String,
    /// Database version in use (discovered, else the spec's).
    pub database_version: Option<String>,
    /// Machine tier in use (discovered, else the spec's).
    pub tier: Option<String>,
    /// Bindings that name the instance.
    pub bindings: usize,
    /// The resolved capacity.
    pub capacity: &'a crate::index::CapacityResolutionOrError,
    /// The budget over its bindings.
    pub budget: &'a crate::index::Budget,
    /// Conditions computed before (OperatorConflict, Discovered), first.
    pub leading: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// The instance's status and, when something is wrong, the Warning to
/// publish (reason and message) if its Ready reason moved. Pure.
pub(super) fn instance_status(
    view: &InstanceView<'_>,
    now: Timestamp,
) -> (CloudSqlInstanceStatus, Option<(Reason, String)>) {
    let name = &view.name;
    let mut status = CloudSqlInstanceStatus {
        observed_generation: view.generation,
        reconciled_by: Some(view.identity.clone()),
        database_version: view.database_version.clone(),
        tier: view.tier.clone(),
        bindings: i32::try_from(view.bindings).unwrap_or(i32::MAX),
        ..Default::default()
    };
    let mut conditions = Conditions::new(&view.previous.conditions, view.generation, now);
    conditions.extend(view.leading.iter().cloned());
    let mut warning = None;
    match view.capacity {
        Ok(CapacityResolution::Known(c)) => {
            status.capacity = Some(CapacityStatus {
                max_connections: i64::from(c.max_connections),
                source: c.source.as_str().to_string(),
                usable: i64::from(c.usable()),
            });
            conditions.set_from(
                condition_type::CAPACITY_KNOWN,
                true,
                c.source.as_str(),
                format!(
                    "max_connections {} ({}) - reserved {} - external {} = {} usable",
                    c.max_connections,
                    c.source,
                    c.reserved,
                    c.external,
                    c.usable()
                ),
            );
        }
        Ok(CapacityResolution::Unknown(why)) => {
            let message = format!("{why}; bindings are granted their minPerPod");
            conditions.set_from(
                condition_type::CAPACITY_KNOWN,
                false,
                why.reason(),
                &message,
            );
            warning = Some((Reason::CapacityUnknown, message));
        }
        Err(why) => {
            let message = format!("{why}; bindings are granted their minPerPod");
            conditions.set(
                condition_type::CAPACITY_KNOWN,
                false,
                Reason::InvalidCapacity,
                &message,
            );
            warning = Some((Reason::CapacityUnknown, message));
        }
    }
    if let Some(a) = &view.budget.allocation {
        status.allocated = Some(i64::try_from(a.allocated).unwrap_or(i64::MAX));
        if a.fits {
            conditions.set(
                condition_type::BUDGET_FITS,
                true,
                if a.requested <= u64::from(a.usable) {
                    Reason::Fits
                } else {
                    Reason::Shared
                },
                format!(
                    "{} bindings request {} connections at their maximum pools; {} allocated of {} usable",
                    view.budget.requests.len(),
                    a.requested,
                    a.allocated,
                    a.usable
                ),
            );
        } else {
            let message = format!(
                "minimum pools need {} connections; {name} has {} usable",
                a.needed_min, a.usable
            );
            conditions.set(
                condition_type::BUDGET_FITS,
                false,
                Reason::Overcommitted,
                &message,
            );
            warning = Some((Reason::Overcommitted, message));
        }
    }
    let capacity_ok = matches!(view.capacity, Ok(CapacityResolution::Known(_)));
    let fits = view.budget.allocation.as_ref().is_some_and(|a| a.fits);
    let (ready, reason, message) = match (capacity_ok, fits) {
        (true, true) => (true, Reason::Ready, format!("{} bindings", status.bindings)),
        (false, _) => (
            false,
            Reason::CapacityUnknown,
            "the capacity is unknown".to_string(),
        ),
        (true, false) => (
            false,
            Reason::Overcommitted,
            "the minimum pools of the bindings do not fit".to_string(),
        ),
    };
    conditions.set(condition_type::READY, ready, reason, message);
    status.conditions = conditions.build();
    // Told once: when the Ready reason moves.
    let reason_of = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        find_condition(cs, condition_type::READY).map(|c| c.reason.clone())
    };
    let warning =
        warning.filter(|_| reason_of(&view.previous.conditions) != reason_of(&status.conditions));
    (status, warning)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Capacity, CapacitySource};

    fn budget(allocation: Option<crate::budget::Allocation>) -> crate::index::Budget {
        crate::index::Budget {
            requests: Vec::new(),
            max_pods: Default::default(),
            allocation,
        }
    }

    fn allocation(
        fits: bool,
        requested: u64,
        allocated: u64,
        needed_min: u64,
    ) -> crate::budget::Allocation {
        crate::budget::Allocation {
            grants: Default::default(),
            connections: Default::default(),
            fits,
            needed_min,
            requested,
            allocated,
            usable: 374,
        }
    }

    fn known() -> crate::index::CapacityResolutionOrError {
        Ok(CapacityResolution::Known(Capacity {
            max_connections: 400,
            source: CapacitySource::Spec,
            reserved: 6,
            external: 20,
        }))
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("a time")
    }

    #[test]
    fn a_known_capacity_that_fits_is_ready_with_the_arithmetic() {
        let previous = CloudSqlInstanceStatus::default();
        let (capacity, budget) = (known(), budget(Some(allocation(true, 300, 300, 40))));
        let view = InstanceView {
            name: "orders".into(),
            generation: Some(2),
            previous: &previous,
            identity: "me".into(),
            database_version: Some("POSTGRES_16".into()),
            tier: None,
            bindings: 4,
            capacity: &capacity,
            budget: &budget,
            leading: Vec::new(),
        };
        let (status, warning) = instance_status(&view, now());
        assert!(warning.is_none());
        assert_eq!(status.allocated, Some(300));
        assert_eq!(status.capacity.as_ref().map(|c| c.usable), Some(374));
        let capacity = find_condition(&status.conditions, condition_type::CAPACITY_KNOWN)
            .expect("CapacityKnown");
        assert_eq!(
            capacity.message,
            "max_connections 400 (Spec) - reserved 6 - external 20 = 374 usable"
        );
        let ready = find_condition(&status.conditions, condition_type::READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("True", "4 bindings")
        );
    }

    #[test]
    fn overcommitted_minimums_warn_once() {
        let previous = CloudSqlInstanceStatus::default();
        let (capacity, budget) = (known(), budget(Some(allocation(false, 900, 500, 500))));
        let mut view = InstanceView {
            name: "orders".into(),
            generation: Some(2),
            previous: &previous,
            identity: "me".into(),
            database_version: None,
            tier: None,
            bindings: 9,
            capacity: &capacity,
            budget: &budget,
            leading: Vec::new(),
        };
        let (status, warning) = instance_status(&view, now());
        assert_eq!(
            warning,
            Some((
                Reason::Overcommitted,
                "minimum pools need 500 connections; orders has 374 usable".to_string()
            ))
        );
        view.previous = &status;
        let (_, again) = instance_status(&view, now());
        assert_eq!(again, None, "the same state is not told twice");
    }

    #[test]
    fn an_invalid_capacity_is_not_ready() {
        let previous = CloudSqlInstanceStatus::default();
        let capacity: crate::index::CapacityResolutionOrError =
            Err("spec.capacity.reservedConnections exceeds maxConnections".into());
        let budget = budget(None);
        let view = InstanceView {
            name: "orders".into(),
            generation: Some(1),
            previous: &previous,
            identity: "me".into(),
            database_version: None,
            tier: None,
            bindings: 0,
            capacity: &capacity,
            budget: &budget,
            leading: Vec::new(),
        };
        let (status, warning) = instance_status(&view, now());
        let c = find_condition(&status.conditions, condition_type::CAPACITY_KNOWN)
            .expect("CapacityKnown");
        assert_eq!(c.reason, "InvalidCapacity");
        assert_eq!(warning.map(|w| w.0), Some(Reason::CapacityUnknown));
        let ready = find_condition(&status.conditions, condition_type::READY).expect("Ready");
        assert_eq!(ready.reason, "CapacityUnknown");
    }
}
