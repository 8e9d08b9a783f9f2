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
use super::world::{Eligibility, binding_key};
use super::{Context, Error};
use crate::api::{
    CapacityStatus, CloudSqlInstance, CloudSqlInstanceStatus, Discovery, FIELD_MANAGER, Reason,
    condition, condition_type, conditions_equivalent, find_condition,
};
use crate::budget::CapacityResolution;
use crate::telemetry::InstanceLabel;

#[instrument(skip_all, fields(instance = %instance.name_any()))]
pub async fn reconcile(
    instance: Arc<CloudSqlInstance>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // The budget counts bindings: never compute it from a half-filled cache.
    super::store_ready(&ctx.stores.bindings).await;
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

    let mut status = CloudSqlInstanceStatus {
        observed_generation: generation,
        reconciled_by: Some(me.to_owned()),
        database_version: discovered
            .as_ref()
            .map(|d| d.database_version.clone())
            .or_else(|| instance.spec.database_version.clone()),
        tier: discovered
            .as_ref()
            .map(|d| d.tier.clone())
            .or_else(|| instance.spec.capacity.tier.clone()),
        bindings: i32::try_from(bindings.len()).unwrap_or(i32::MAX),
        ..Default::default()
    };
    let mut conditions: Vec<_> = conflict.into_iter().chain(discovered_condition).collect();
    let mut warning = None;
    match &capacity {
        Ok(CapacityResolution::Known(c)) => {
            status.capacity = Some(CapacityStatus {
                max_connections: i64::from(c.max_connections),
                source: c.source.as_str().to_string(),
                usable: i64::from(c.usable()),
            });
            conditions.push(condition(
                prev,
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
                generation,
                now,
            ));
            ctx.metrics
                .usable
                .get_or_create(&InstanceLabel {
                    instance: name.clone(),
                })
                .set(i64::from(c.usable()));
        }
        Ok(CapacityResolution::Unknown(why)) => {
            let message = format!("{why}; bindings are granted their minPerPod");
            conditions.push(condition(
                prev,
                condition_type::CAPACITY_KNOWN,
                false,
                why.reason(),
                &message,
                generation,
                now,
            ));
            warning = Some(("CapacityUnknown", message));
        }
        Err(why) => {
            let message = format!("{why}; bindings are granted their minPerPod");
            conditions.push(condition(
                prev,
                condition_type::CAPACITY_KNOWN,
                false,
                "InvalidCapacity",
                &message,
                generation,
                now,
            ));
            warning = Some(("CapacityUnknown", message));
        }
    }
    if let Some(a) = &budget.allocation {
        status.allocated = Some(i64::try_from(a.allocated).unwrap_or(i64::MAX));
        ctx.metrics
            .allocated
            .get_or_create(&InstanceLabel {
                instance: name.clone(),
            })
            .set(i64::try_from(a.allocated).unwrap_or(i64::MAX));
        if a.fits {
            conditions.push(condition(
                prev,
                condition_type::BUDGET_FITS,
                true,
                if a.requested <= u64::from(a.usable) { "Fits" } else { "Shared" },
                format!(
                    "{} bindings request {} connections at their maximum pools; {} allocated of {} usable",
                    budget.requests.len(),
                    a.requested,
                    a.allocated,
                    a.usable
                ),
                generation,
                now,
            ));
        } else {
            let message = format!(
                "minimum pools need {} connections; {name} has {} usable",
                a.needed_min, a.usable
            );
            conditions.push(condition(
                prev,
                condition_type::BUDGET_FITS,
                false,
                "Overcommitted",
                &message,
                generation,
                now,
            ));
            warning = Some(("Overcommitted", message));
        }
    }
    let capacity_ok = matches!(capacity, Ok(CapacityResolution::Known(_)));
    let fits = budget.allocation.as_ref().is_some_and(|a| a.fits);
    let (ready, reason, message) = match (capacity_ok, fits) {
        (true, true) => (true, "Ready", format!("{} bindings", status.bindings)),
        (false, _) => (
            false,
            "CapacityUnknown",
            "the capacity is unknown".to_string(),
        ),
        (true, false) => (
            false,
            "Overcommitted",
            "the minimum pools of the bindings do not fit".to_string(),
        ),
    };
    conditions.push(condition(
        prev,
        condition_type::READY,
        ready,
        reason,
        message,
        generation,
        now,
    ));
    status.conditions = conditions;

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
        let reason_of = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            find_condition(cs, condition_type::READY).map(|c| c.reason.clone())
        };
        if let Some((reason, note)) = warning
            && reason_of(prev) != reason_of(&status.conditions)
        {
            publish(&ctx, &instance, reason, note).await;
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
