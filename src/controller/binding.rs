//! The binding reconciler: dereference (instance, selected workloads) →
//! validate (eligibility) → plan (one injection per workload, every binding on
//! it together) → apply (server-side apply of only our fields, when they
//! differ) → status (conditions, pool arithmetic, per-workload entries).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use super::operators::{HOLD_OFF, Stance, conflict_message};
use super::subset;
use super::world::{ADMISSION_HASH_ANNOTATION, Eligibility, Outcome, WorkloadId, binding_key};
use super::{Context, Error};
use crate::api::{
    BoundInstance, CloudSqlBinding, CloudSqlBindingStatus, FIELD_MANAGER, PoolStatus, WorkloadKind,
    WorkloadStatus, condition, condition_type, conditions_equivalent,
};
use crate::budget::CapacityResolution;
use crate::plan::INJECTED_ANNOTATION;

/// The finalizer versions before 0.2 put on every binding. This version adds
/// none and takes it out: with the operator stopped it held namespaces in
/// `Terminating` forever.
pub const LEGACY_FINALIZER: &str = "cloudsql.dev/cleanup";

/// The reason of condition `OperatorConflict` and of its Events.
pub const OPERATOR_CONFLICT_REASON: &str = "AnotherOperator";

/// How often a binding whose workloads are injected at admission looks for
/// pods that missed the webhook.
const ADMISSION_RESYNC: Duration = Duration::from_secs(30);

/// How many workloads of one binding are applied at once.
const WORKLOAD_CONCURRENCY: usize = 16;

#[instrument(skip_all, fields(namespace = %binding.namespace().unwrap_or_default(), binding = %binding.name_any()))]
pub async fn reconcile(binding: Arc<CloudSqlBinding>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = binding.namespace().unwrap_or_default();
    if !ctx.watches_namespace(&ns) {
        return Ok(Action::await_change());
    }
    // Eligibility and grants read the instances: wait for their cache.
    super::store_ready(&ctx.stores.instances).await;
    let _timer = ctx.metrics.reconcile_timer("binding");
    if binding.finalizers().iter().any(|f| f == LEGACY_FINALIZER) {
        // Added by versions before 0.2; this version needs none (removal is
        // level-triggered from the workloads). A binding being deleted with
        // it gets its injection taken out first, as those versions promised.
        if binding.metadata.deletion_timestamp.is_some() {
            cleanup(binding.clone(), &ctx).await?;
        }
        let api: Api<CloudSqlBinding> = Api::namespaced(ctx.client.clone(), &ns);
        remove_finalizer(&api, &binding).await?;
        ctx.metrics.write("binding", "finalizer");
        if binding.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
    }
    if binding.metadata.deletion_timestamp.is_some() {
        // Another finalizer holds it: its workloads are the sweeper's once it is gone.
        return Ok(Action::await_change());
    }
    apply(binding, &ctx).await
}

/// Takes our finalizer out: a JSON patch that tests the entry it removes, so
/// a list changed by someone else meanwhile is never clobbered (the patch
/// fails and the reconcile retries on the fresh object). A JSON patch rather
/// than an apply because the entry may have been added by an older version
/// of the operator under another field manager.
async fn remove_finalizer(
    api: &Api<CloudSqlBinding>,
    binding: &CloudSqlBinding,
) -> Result<(), Error> {
    let name = binding.name_any();
    let Some(index) = binding
        .finalizers()
        .iter()
        .position(|f| f == LEGACY_FINALIZER)
    else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": LEGACY_FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .map_err(|source| Error::Patch {
        object: format!("CloudSqlBinding {name}"),
        source,
    })?;
    match api
        .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing holds it.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("removing finalizer {LEGACY_FINALIZER} from CloudSqlBinding {name}"),
            source,
        }),
    }
}

pub fn error_policy(binding: Arc<CloudSqlBinding>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&crate::telemetry::ControllerLabel {
            controller: "binding".into(),
        })
        .inc();
    let key = binding_key(&binding);
    let wait = ctx.backoff.failed(&key);
    debug!(binding = %key, error = %err, retry_in = ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// What happened to one workload for this binding.
struct WorkloadResult {
    id: WorkloadId,
    selected: bool,
    status: WorkloadStatus,
}

/// The workloads to look at: those selected now, and those listed in status
/// (which may need their injection taken out).
fn workloads_to_sync(
    binding: &CloudSqlBinding,
    ctx: &Context,
) -> (BTreeSet<WorkloadId>, BTreeSet<WorkloadId>) {
    let ns = binding.namespace().unwrap_or_default();
    let selected: BTreeSet<WorkloadId> = ctx.stores.selected(binding).into_iter().collect();
    let mut all = selected.clone();
    for w in binding.status.iter().flat_map(|s| s.workloads.iter()) {
        if let Some(kind) = WorkloadKind::ALL.into_iter().find(|k| k.as_str() == w.kind) {
            all.insert(WorkloadId {
                kind,
                namespace: ns.clone(),
                name: w.name.clone(),
            });
        }
    }
    (selected, all)
}

fn api_resource(kind: WorkloadKind) -> ApiResource {
    let (group, version) = match kind.api_version().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", kind.api_version()),
    };
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind.object_kind()))
}

fn object_reference(id: &WorkloadId) -> ObjectReference {
    ObjectReference {
        api_version: Some(id.kind.api_version().to_string()),
        kind: Some(id.kind.object_kind().to_string()),
        name: Some(id.name.clone()),
        namespace: Some(id.namespace.clone()),
        ..Default::default()
    }
}

/// Brings one workload's template to what every binding on it wants, and
/// reports what that means for `key` (the binding being reconciled; empty
/// for the sweeper).
pub(super) async fn sync_workload(
    id: WorkloadId,
    key: &str,
    exclude: Option<&str>,
    ctx: &Context,
) -> Result<WorkloadStatus, Error> {
    let mut status = WorkloadStatus {
        kind: id.kind.as_str().to_string(),
        name: id.name.clone(),
        ..Default::default()
    };
    let admission = crate::webhook::serves_namespace(&id.namespace);
    if !id.kind.has_mutable_template() {
        if admission {
            status.injected = true;
            status.reason = Some("Admission".into());
            status.message = Some("pods are injected at creation by the admission webhook".into());
        } else {
            status.reason = Some("NeedsAdmission".into());
            status.message = Some(format!(
                "a {}'s pod template cannot be changed after creation; it needs the admission webhook",
                id.kind
            ));
        }
        return Ok(status);
    }
    let computed = ctx.stores.with_template(&id, |meta, template, current| {
        let desire = ctx
            .stores
            .desire(&id, meta.labels.as_ref(), template, ctx.caps, exclude);
        // Bindings injecting at admission leave the template alone but for
        // the hash of what the webhook injects, so their pods roll with it.
        let injection = desire.template_injection();
        let admission_injection = desire.admission_injection();
        let admission_hash =
            (!admission_injection.is_empty()).then(|| admission_injection.config_hash_for(id.kind));
        let mut spec = template.spec.clone();
        let mut annotations = template.annotations.cloned();
        let applied = injection.apply_for(id.kind, &mut spec, &mut annotations);
        let hash = annotations
            .as_ref()
            .and_then(|a| a.get(crate::api::CONFIG_HASH_ANNOTATION).cloned());
        let partial = injection
            .ssa_partial(
                id.kind,
                &id.name,
                &id.namespace,
                template.spec,
                &template.annotations.cloned().unwrap_or_default(),
            )
            .map(|mut partial| {
                set_admission_hash(id.kind, &mut partial, admission_hash.as_deref());
                partial
            });
        // Unchanged when what we would apply is already there (server
        // defaults aside) and our record of what we own is the same.
        let annotation =
            |a: Option<&BTreeMap<String, String>>, key: &str| a.and_then(|a| a.get(key).cloned());
        let unchanged = applied.is_ok()
            && annotation(annotations.as_ref(), INJECTED_ANNOTATION)
                == annotation(template.annotations, INJECTED_ANNOTATION)
            && annotation(template.annotations, ADMISSION_HASH_ANNOTATION) == admission_hash
            && partial
                .as_ref()
                .is_ok_and(|p| subset::contains(&current, p));
        let had_injection = desire_is_empty_removal(template.annotations);
        let hashes = WorkloadHashes {
            template: hash,
            admission: admission_hash,
        };
        (
            desire,
            (!unchanged).then_some(partial),
            hashes,
            had_injection,
        )
    });
    let Some((desire, partial, hashes, had_injection)) = computed else {
        status.reason = Some("NotFound".into());
        status.message = Some(format!("{id} does not exist"));
        return Ok(status);
    };
    if let Some(partial) = partial {
        let partial = partial.map_err(|conflicts| {
            Error::CleanupPending(format!(
                "{id}: {}",
                conflicts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &id.namespace, &api_resource(id.kind));
        api.patch(
            &id.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&partial),
        )
        .await
        .map_err(|source| Error::Kube {
            action: format!("applying the injection to {id}"),
            source,
        })?;
        ctx.metrics.write("binding", "apply");
        let bindings_of = |injection: &crate::plan::PodInjection| {
            injection
                .plans()
                .iter()
                .map(|p| p.binding().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (template_injection, admission_injection) =
            (desire.template_injection(), desire.admission_injection());
        let (reason, note) = if !template_injection.is_empty() {
            (
                "Injected",
                format!(
                    "injected Cloud SQL for {} (config hash {})",
                    bindings_of(&template_injection),
                    template_injection.config_hash()
                ),
            )
        } else if !admission_injection.is_empty() {
            (
                "Injected",
                format!(
                    "pods get Cloud SQL for {} at admission (config hash {})",
                    bindings_of(&admission_injection),
                    hashes.admission.clone().unwrap_or_default()
                ),
            )
        } else {
            ("Cleaned", "removed the Cloud SQL injection".to_string())
        };
        if !desire.injection.is_empty() || had_injection {
            publish(ctx, &object_reference(&id), EventType::Normal, reason, note).await;
        }
        info!(workload = %id, reason, "applied");
    }
    match desire.outcomes.get(key) {
        Some(Outcome::Injected) if desire.at_admission.contains(key) => {
            status.injected = admission;
            status.config_hash = hashes.admission;
            status.reason = Some(
                if admission {
                    "Admission"
                } else {
                    "NeedsAdmission"
                }
                .into(),
            );
            status.message = Some(if admission {
                "pods are injected at creation by the admission webhook".into()
            } else {
                "spec.injection is Admission, but no admission webhook serves this namespace".into()
            });
        }
        Some(Outcome::Injected) => {
            status.injected = true;
            status.config_hash = hashes.template;
        }
        Some(Outcome::Conflict(message)) => {
            status.reason = Some("Conflict".into());
            status.message = Some(message.clone());
        }
        Some(Outcome::PlanFailed(message)) => {
            status.reason = Some("PlanFailed".into());
            status.message = Some(message.clone());
        }
        None => {}
    }
    Ok(status)
}

fn desire_is_empty_removal(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations.is_some_and(|a| {
        a.contains_key(crate::api::CONFIG_HASH_ANNOTATION)
            || a.contains_key(ADMISSION_HASH_ANNOTATION)
    })
}

/// The config hashes of one workload: of its template injection, and of what
/// the webhook injects into its pods.
struct WorkloadHashes {
    template: Option<String>,
    admission: Option<String>,
}

/// Puts the admission hash annotation (or nothing) into the template of a
/// server-side-apply partial object. Omitted, an annotation we applied before
/// is removed by the apply.
fn set_admission_hash(kind: WorkloadKind, partial: &mut serde_json::Value, hash: Option<&str>) {
    let Some(hash) = hash else { return };
    let path: &[&str] = match kind {
        WorkloadKind::Pod => &["metadata", "annotations"],
        WorkloadKind::CronJob => &[
            "spec",
            "jobTemplate",
            "spec",
            "template",
            "metadata",
            "annotations",
        ],
        _ => &["spec", "template", "metadata", "annotations"],
    };
    let mut at = partial;
    for key in path {
        let serde_json::Value::Object(map) = at else {
            return;
        };
        at = map.entry(*key).or_insert_with(|| json!({}));
    }
    if let serde_json::Value::Object(map) = at {
        map.insert(ADMISSION_HASH_ANNOTATION.to_owned(), json!(hash));
    }
}

async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if ctx.recorder.publish(&event, reference).await.is_ok() {
        ctx.metrics.write("binding", "event");
    }
}

async fn sync_all(
    binding: &CloudSqlBinding,
    exclude: Option<&str>,
    ctx: &Context,
) -> Result<Vec<WorkloadResult>, Error> {
    let key = binding_key(binding);
    let (selected, all) = workloads_to_sync(binding, ctx);
    let results: Vec<Result<WorkloadResult, Error>> = futures::stream::iter(all)
        .map(|id| {
            let key = key.clone();
            let selected = selected.contains(&id);
            async move {
                let status = sync_workload(id.clone(), &key, exclude, ctx).await?;
                Ok(WorkloadResult {
                    id,
                    selected,
                    status,
                })
            }
        })
        .buffer_unordered(WORKLOAD_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        out.push(r?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Bare Pods listed one by one in a binding's status, at most: a selector
/// over bare Pods may match thousands (batch pods, executors), and a status
/// rewritten with one entry per pod on every pod created would grow towards
/// etcd's object size limit and load the API server with every admission.
/// The counts (`workloadsSummary`, the conditions, `pool.maxPods`) cover
/// every pod; the entries listed are those not injected first.
pub const MAX_LISTED_PODS: usize = 20;

/// The entries of `status.workloads`: every workload, but at most
/// [`MAX_LISTED_PODS`] bare Pods, those with a problem first; in the order
/// given.
fn listed(workloads: Vec<WorkloadStatus>) -> Vec<WorkloadStatus> {
    let is_pod = |w: &WorkloadStatus| w.kind == WorkloadKind::Pod.as_str();
    let pods = workloads.iter().filter(|w| is_pod(w)).count();
    if pods <= MAX_LISTED_PODS {
        return workloads;
    }
    let mut keep: BTreeSet<usize> = BTreeSet::new();
    for injected in [false, true] {
        for (i, w) in workloads.iter().enumerate() {
            if keep.len() == MAX_LISTED_PODS {
                break;
            }
            if is_pod(w) && w.injected == injected {
                keep.insert(i);
            }
        }
    }
    workloads
        .into_iter()
        .enumerate()
        .filter(|(i, w)| !is_pod(w) || keep.contains(i))
        .map(|(_, w)| w)
        .collect()
}

async fn apply(binding: Arc<CloudSqlBinding>, ctx: &Context) -> Result<Action, Error> {
    let key = binding_key(&binding);
    let ns = binding.namespace().unwrap_or_default();
    let generation = binding.metadata.generation;
    let now = Timestamp::now();
    let previous = binding.status.clone().unwrap_or_default();
    let prev_conditions = &previous.conditions;
    let me = ctx.options.identity.as_str();
    let uid = binding.metadata.uid.as_deref();

    let stance = ctx
        .operators
        .stance(me, uid, previous.reconciled_by.as_deref());
    if let Stance::StandBack { other, newly } = &stance {
        // Another installation keeps this binding: write nothing, say so once.
        if *newly {
            let note = conflict_message("CloudSqlBinding", me, other, false);
            warn!(binding = %key, "{note}");
            publish(
                ctx,
                &binding.object_ref(&()),
                EventType::Warning,
                OPERATOR_CONFLICT_REASON,
                note,
            )
            .await;
        }
        return Ok(Action::requeue(HOLD_OFF));
    }

    let results = sync_all(&binding, None, ctx).await?;
    let mut workloads: Vec<WorkloadStatus> = Vec::new();
    for r in &results {
        let mut status = r.status.clone();
        if r.selected {
            if let Some(m) = ctx.stores.max_pods(&r.id) {
                status.max_pods = Some(i64::from(m.count));
            }
            workloads.push(status);
        }
    }
    let injected = workloads.iter().filter(|w| w.injected).count();
    let matched = workloads.len();

    let mut status = CloudSqlBindingStatus {
        observed_generation: generation,
        reconciled_by: Some(me.to_owned()),
        workloads_summary: Some(format!("{injected}/{matched}")),
        ..Default::default()
    };
    let mut conditions = Vec::new();
    let mut events: Vec<(EventType, &str, String)> = Vec::new();
    if let Stance::Keep { other, newly } = &stance {
        let message = conflict_message("CloudSqlBinding", me, other, true);
        if *newly {
            warn!(binding = %key, "{message}");
            publish(
                ctx,
                &binding.object_ref(&()),
                EventType::Warning,
                OPERATOR_CONFLICT_REASON,
                message.clone(),
            )
            .await;
        }
        conditions.push(condition(
            prev_conditions,
            condition_type::OPERATOR_CONFLICT,
            true,
            OPERATOR_CONFLICT_REASON,
            message,
            generation,
            now,
        ));
    }
    let instance_name = binding.spec.instance_ref.name.clone();
    let mut retry_soon = false;

    match ctx.stores.eligibility(&binding) {
        Eligibility::InstanceMissing => {
            let message = format!(
                "CloudSqlInstance {instance_name:?} does not exist; workloads are left as they are until it does"
            );
            status.instance = previous.instance.clone();
            status.pool = previous.pool.clone();
            conditions.push(condition(
                prev_conditions,
                condition_type::READY,
                false,
                "InstanceNotFound",
                &message,
                generation,
                now,
            ));
            conditions.push(condition(
                prev_conditions,
                condition_type::INSTANCE_RESOLVED,
                false,
                "InstanceNotFound",
                &message,
                generation,
                now,
            ));
            events.push((EventType::Warning, "InstanceNotFound", message));
        }
        Eligibility::NamespaceNotAllowed(_) => {
            let message = format!(
                "CloudSqlInstance {instance_name:?} does not allow bindings from namespace {ns:?} (spec.allowedNamespaces); nothing is injected"
            );
            conditions.push(condition(
                prev_conditions,
                condition_type::READY,
                false,
                "NamespaceNotAllowed",
                &message,
                generation,
                now,
            ));
            conditions.push(condition(
                prev_conditions,
                condition_type::INSTANCE_RESOLVED,
                false,
                "NamespaceNotAllowed",
                &message,
                generation,
                now,
            ));
            events.push((EventType::Warning, "NamespaceNotAllowed", message));
        }
        Eligibility::Deleting => return Ok(Action::await_change()),
        Eligibility::Eligible(instance) => {
            status.instance = Some(BoundInstance {
                connection_name: instance.spec.connection_name.clone(),
                database_version: instance
                    .status
                    .as_ref()
                    .and_then(|s| s.database_version.clone())
                    .or_else(|| instance.spec.database_version.clone()),
            });
            conditions.push(condition(
                prev_conditions,
                condition_type::INSTANCE_RESOLVED,
                true,
                "Resolved",
                format!(
                    "bound to {} ({})",
                    instance_name, instance.spec.connection_name
                ),
                generation,
                now,
            ));

            // Pool arithmetic.
            let capacity = ctx
                .stores
                .capacity(&instance, ctx.stores.discovered(&instance));
            let budget = ctx.stores.budget(&instance, &capacity);
            let grant = ctx.stores.grant(&binding, &instance).per_pod;
            let max_pods = budget.max_pods.get(&key).copied().unwrap_or(0);
            let requested = i64::from(binding.spec.pool.max_per_pod);
            status.pool = Some(PoolStatus {
                requested_per_pod: requested,
                granted_per_pod: i64::from(grant),
                max_pods: i64::from(max_pods),
                connections: i64::from(grant) * i64::from(max_pods),
                summary: format!("{grant}/{requested}"),
            });
            let budget_condition = match (&capacity, &budget.allocation) {
                (Ok(CapacityResolution::Known(c)), Some(a)) if a.fits => {
                    let connections = u64::from(grant) * u64::from(max_pods);
                    let reason = if i64::from(grant) >= requested {
                        "Fits"
                    } else {
                        "Shared"
                    };
                    // Only this binding's arithmetic and the capacity: the
                    // instance-wide total allocated (on the instance's status)
                    // moves with every other binding, and would rewrite the
                    // status of every binding on the instance when one changes.
                    let message = format!(
                        "{grant} connections per pod x {max_pods} pods = {connections} of the {} usable on {instance_name}",
                        c.usable()
                    );
                    condition(
                        prev_conditions,
                        condition_type::BUDGET_FITS,
                        true,
                        reason,
                        message,
                        generation,
                        now,
                    )
                }
                (Ok(CapacityResolution::Known(c)), Some(a)) => {
                    let message = format!(
                        "minimum pools need {} connections; {instance_name} has {} usable; granted minPerPod {grant}",
                        a.needed_min,
                        c.usable()
                    );
                    events.push((EventType::Warning, "Overcommitted", message.clone()));
                    condition(
                        prev_conditions,
                        condition_type::BUDGET_FITS,
                        false,
                        "Overcommitted",
                        message,
                        generation,
                        now,
                    )
                }
                (Ok(CapacityResolution::Unknown(why)), _) => {
                    let message = format!("{why}; granted minPerPod {grant}");
                    condition(
                        prev_conditions,
                        condition_type::BUDGET_FITS,
                        false,
                        "CapacityUnknown",
                        message,
                        generation,
                        now,
                    )
                }
                (Ok(CapacityResolution::Known(_)), None) => {
                    let message = format!(
                        "the bindings of {instance_name} could not be allocated; granted minPerPod {grant}"
                    );
                    condition(
                        prev_conditions,
                        condition_type::BUDGET_FITS,
                        false,
                        "CapacityUnknown",
                        message,
                        generation,
                        now,
                    )
                }
                (Err(why), _) => {
                    let message = format!(
                        "the capacity of {instance_name} could not be resolved: {why}; granted minPerPod {grant}"
                    );
                    condition(
                        prev_conditions,
                        condition_type::BUDGET_FITS,
                        false,
                        "CapacityUnknown",
                        message,
                        generation,
                        now,
                    )
                }
            };
            conditions.push(budget_condition);

            // Pods that came without their injection (the webhook was not called).
            let missed = if crate::webhook::serves_namespace(&ns) {
                crate::webhook::missed::missed_pods(&ctx.stores, &binding)
            } else {
                Vec::new()
            };
            let missed = if missed.is_empty() {
                None
            } else {
                Some(crate::webhook::missed::report(ctx, &binding, &missed).await)
            };
            retry_soon = missed.as_ref().is_some_and(|m| m.retry);

            // Workloads.
            let problems: Vec<&WorkloadStatus> = workloads.iter().filter(|w| !w.injected).collect();
            let conflict = problems
                .iter()
                .find(|w| w.reason.as_deref() == Some("Conflict"));
            let (bound, reason, message) = if matched == 0 {
                (
                    false,
                    "NoWorkloads",
                    "no workload matches spec.workloads in this namespace".to_string(),
                )
            } else if let Some(w) = conflict {
                (
                    false,
                    "Conflict",
                    format!(
                        "{} {}: {}",
                        w.kind,
                        w.name,
                        w.message.clone().unwrap_or_default()
                    ),
                )
            } else if let Some(report) = &missed {
                (false, "InjectionMissed", report.message.clone())
            } else if let Some(w) = problems.first() {
                (
                    false,
                    w.reason
                        .clone()
                        .map(|r| {
                            if r == "NeedsAdmission" {
                                "NeedsAdmission"
                            } else {
                                "NotInjected"
                            }
                        })
                        .unwrap_or("NotInjected"),
                    format!(
                        "{} {}: {}",
                        w.kind,
                        w.name,
                        w.message.clone().unwrap_or_default()
                    ),
                )
            } else {
                (
                    true,
                    "Injected",
                    format!("{injected} of {matched} workloads injected"),
                )
            };
            if reason == "Conflict" || reason == "InjectionMissed" {
                events.push((EventType::Warning, reason, message.clone()));
            }
            conditions.push(condition(
                prev_conditions,
                condition_type::WORKLOADS_BOUND,
                bound,
                reason,
                &message,
                generation,
                now,
            ));
            conditions.push(condition(
                prev_conditions,
                condition_type::READY,
                bound,
                if bound { "Bound" } else { reason },
                if bound {
                    format!("{injected} workloads injected; {grant} connections per pod")
                } else {
                    message
                },
                generation,
                now,
            ));
        }
    }
    status.workloads = listed(workloads);
    status.conditions = conditions;

    // Compared with the store's status, or with our own last write when the
    // store has not seen it yet.
    let unchanged = status_equivalent(&previous, &status)
        || ctx
            .status_writes
            .pending(&binding)
            .is_some_and(|written| status_equivalent(&written, &status));
    if !unchanged {
        let api: Api<CloudSqlBinding> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "cloudsql.dev/v1alpha1",
            "kind": "CloudSqlBinding",
            "status": status,
        });
        api.patch_status(
            &binding.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: format!("writing the status of binding {key}"),
            source,
        })?;
        ctx.metrics.write("binding", "apply_status");
        ctx.status_writes.record(&binding, &status);
        ctx.operators.wrote(uid);
        // Events only on a change of the Ready reason, so an idle cluster sees none.
        let ready_reason = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            crate::api::find_condition(cs, condition_type::READY)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let budget_reason = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            crate::api::find_condition(cs, condition_type::BUDGET_FITS).map(|c| c.reason.clone())
        };
        let reference = binding.object_ref(&());
        for (type_, reason, note) in events {
            let changed = if reason == "Overcommitted" {
                budget_reason(prev_conditions) != budget_reason(&status.conditions)
            } else {
                ready_reason(prev_conditions) != ready_reason(&status.conditions)
            };
            if changed {
                publish(ctx, &reference, type_, reason, note).await;
            }
        }
    }
    ctx.instance_may_have_moved(&instance_name);
    if retry_soon {
        // A roll waits for the webhook to answer again.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    if status
        .workloads
        .iter()
        .any(|w| w.reason.as_deref() == Some("Admission") && w.kind != "Pod")
    {
        // Pod events reach bindings of kind Pod only: new pods of workloads
        // injected at admission are looked at for missed injections on their
        // owner's events and, as a backstop, this often.
        return Ok(Action::requeue(ADMISSION_RESYNC));
    }
    Ok(Action::requeue(Duration::from_secs(30 * 60)))
}

/// Whether two statuses say the same thing (condition timestamps aside).
fn status_equivalent(a: &CloudSqlBindingStatus, b: &CloudSqlBindingStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.reconciled_by == b.reconciled_by
        && a.instance == b.instance
        && a.pool == b.pool
        && a.workloads_summary == b.workloads_summary
        && a.workloads == b.workloads
        && conditions_equivalent(&a.conditions, &b.conditions)
}

async fn cleanup(binding: Arc<CloudSqlBinding>, ctx: &Context) -> Result<Action, Error> {
    let key = binding_key(&binding);
    let results = sync_all(&binding, Some(&key), ctx).await?;
    let cleaned = results
        .iter()
        .filter(|r| r.id.kind.has_mutable_template())
        .count();
    publish(
        ctx,
        &binding.object_ref(&()),
        EventType::Normal,
        "Cleaned",
        format!("removed the injection from {cleaned} workloads"),
    )
    .await;
    let _ = ctx
        .instance_trigger
        .send(ObjectRef::new(&binding.spec.instance_ref.name));
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: WorkloadKind, name: &str, injected: bool) -> WorkloadStatus {
        WorkloadStatus {
            kind: kind.as_str().to_string(),
            name: name.to_string(),
            injected,
            ..Default::default()
        }
    }

    #[test]
    fn a_few_pods_are_all_listed() {
        let all: Vec<_> = (0..MAX_LISTED_PODS)
            .map(|i| entry(WorkloadKind::Pod, &format!("p{i:03}"), true))
            .chain([entry(WorkloadKind::Deployment, "api", true)])
            .collect();
        assert_eq!(listed(all.clone()), all);
    }

    #[test]
    fn many_pods_are_capped_with_the_problems_first_and_other_kinds_kept() {
        let mut all = vec![entry(WorkloadKind::Deployment, "api", false)];
        all.extend((0..500).map(|i| entry(WorkloadKind::Pod, &format!("p{i:03}"), i != 400)));
        all.push(entry(WorkloadKind::StatefulSet, "worker", true));
        let out = listed(all);
        let pods: Vec<_> = out.iter().filter(|w| w.kind == "Pod").collect();
        assert_eq!(pods.len(), MAX_LISTED_PODS);
        assert!(pods.iter().any(|w| w.name == "p400" && !w.injected));
        assert_eq!(out.first().map(|w| w.name.as_str()), Some("api"));
        assert_eq!(out.last().map(|w| w.name.as_str()), Some("worker"));
        // The order given is kept.
        let names: Vec<_> = pods.iter().map(|w| w.name.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
