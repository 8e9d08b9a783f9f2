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

use super::binding_status::{BindingView, Budget, Note, Pool, Resolution, binding_status};
use super::missed::MissedReport;
use super::operators::{HOLD_OFF, Stance, conflict_message};
use super::subset;
use super::{Context, Error};
use crate::api::{
    BoundInstance, CloudSqlBinding, CloudSqlBindingStatus, FIELD_MANAGER, Reason, WorkloadKind,
    WorkloadStatus, conditions_equivalent,
};
use crate::budget::CapacityResolution;
use crate::index::{ADMISSION_HASH_ANNOTATION, Eligibility, Outcome, WorkloadId, binding_key};
use crate::plan::INJECTED_ANNOTATION;

/// The finalizer versions before 0.2 put on every binding. This version adds
/// none and takes it out: with the operator stopped it held namespaces in
/// `Terminating` forever.
pub const LEGACY_FINALIZER: &str = "cloudsql.dev/cleanup";

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
    crate::index::store_ready(&ctx.stores.instances).await;
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
    let admission = ctx.admission.serves(&id.namespace);
    if !id.kind.has_mutable_template() {
        if admission {
            status.injected = true;
            status.reason = Some(Reason::Admission.to_string());
            status.message = Some("pods are injected at creation by the admission webhook".into());
        } else {
            status.reason = Some(Reason::NeedsAdmission.to_string());
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
        status.reason = Some(Reason::NotFound.to_string());
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
                Reason::Injected,
                format!(
                    "injected Cloud SQL for {} (config hash {})",
                    bindings_of(&template_injection),
                    template_injection.config_hash()
                ),
            )
        } else if !admission_injection.is_empty() {
            (
                Reason::Injected,
                format!(
                    "pods get Cloud SQL for {} at admission (config hash {})",
                    bindings_of(&admission_injection),
                    hashes.admission.clone().unwrap_or_default()
                ),
            )
        } else {
            (
                Reason::Cleaned,
                "removed the Cloud SQL injection".to_string(),
            )
        };
        if !desire.injection.is_empty() || had_injection {
            publish(
                ctx,
                &object_reference(&id),
                EventType::Normal,
                reason.as_str(),
                note,
            )
            .await;
        }
        info!(workload = %id, reason = %reason, "applied");
    }
    match desire.outcomes.get(key) {
        Some(Outcome::Injected) if desire.at_admission.contains(key) => {
            status.injected = admission;
            status.config_hash = hashes.admission;
            status.reason = Some(
                if admission {
                    Reason::Admission
                } else {
                    Reason::NeedsAdmission
                }
                .to_string(),
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
            status.reason = Some(Reason::Conflict.to_string());
            status.message = Some(message.clone());
        }
        Some(Outcome::PlanFailed(message)) => {
            status.reason = Some(Reason::PlanFailed.to_string());
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
    let (selected, all) = ctx.stores.workloads_of(binding);
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
pub(super) fn listed(workloads: Vec<WorkloadStatus>) -> Vec<WorkloadStatus> {
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

/// The reconcile of a binding that exists: dereference (the stores) →
/// plan and apply (per workload: what every binding on it wants, applied
/// when it differs) → status (pure) → write.
async fn apply(binding: Arc<CloudSqlBinding>, ctx: &Context) -> Result<Action, Error> {
    let key = binding_key(&binding);
    let me = ctx.options.identity.as_str();
    let stance = ctx.operators.stance(
        me,
        binding.metadata.uid.as_deref(),
        binding
            .status
            .as_ref()
            .and_then(|s| s.reconciled_by.as_deref()),
    );
    let operator_conflict = match &stance {
        Stance::Sole => None,
        Stance::Keep { other, newly } => {
            let message = conflict_message("CloudSqlBinding", me, other, true);
            if *newly {
                warn!(binding = %key, "{message}");
                publish_on_binding(
                    ctx,
                    &binding,
                    EventType::Warning,
                    Reason::AnotherOperator,
                    message.clone(),
                )
                .await;
            }
            Some(message)
        }
        Stance::StandBack { other, newly } => {
            // Another installation keeps this binding: write nothing, say so once.
            if *newly {
                let note = conflict_message("CloudSqlBinding", me, other, false);
                warn!(binding = %key, "{note}");
                publish_on_binding(
                    ctx,
                    &binding,
                    EventType::Warning,
                    Reason::AnotherOperator,
                    note,
                )
                .await;
            }
            return Ok(Action::requeue(HOLD_OFF));
        }
    };
    let Some(view) = dereference(&binding, ctx, operator_conflict) else {
        return Ok(Action::await_change());
    };
    let workloads = selected_entries(sync_all(&binding, None, ctx).await?, ctx);
    let missed = match &view.resolution {
        Resolution::Eligible(_) => missed_injections(&binding, ctx).await,
        _ => None,
    };
    let (status, notes) = binding_status(&view, workloads, missed.as_ref(), Timestamp::now());
    write_status(&binding, &view.previous, &status, notes, ctx).await?;

    ctx.instance_may_have_moved(&view.instance_name);
    if missed.as_ref().is_some_and(|m| m.retry) {
        // A roll waits for the webhook to answer again.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    if status.workloads.iter().any(|w| {
        w.reason.as_deref() == Some(Reason::Admission.as_str())
            && w.kind != WorkloadKind::Pod.as_str()
    }) {
        // Pod events reach bindings of kind Pod only: new pods of workloads
        // injected at admission are looked at for missed injections on their
        // owner's events and, as a backstop, this often.
        return Ok(Action::requeue(ADMISSION_RESYNC));
    }
    Ok(Action::requeue(Duration::from_secs(30 * 60)))
}

/// What the binding's status is computed from, read from the stores;
/// `None` while the binding is being deleted.
fn dereference(
    binding: &CloudSqlBinding,
    ctx: &Context,
    operator_conflict: Option<String>,
) -> Option<BindingView> {
    let instance_name = binding.spec.instance_ref.name.clone();
    let resolution = match ctx.stores.eligibility(binding) {
        Eligibility::Deleting => return None,
        Eligibility::InstanceMissing => Resolution::InstanceMissing,
        Eligibility::NamespaceNotAllowed(_) => Resolution::NamespaceNotAllowed,
        Eligibility::Eligible(instance) => {
            let capacity = ctx
                .stores
                .capacity(&instance, ctx.stores.discovered(&instance));
            let budget = ctx.stores.budget(&instance, &capacity);
            let grant = ctx.stores.grant(binding, &instance).per_pod;
            let max_pods = budget
                .max_pods
                .get(&binding_key(binding))
                .copied()
                .unwrap_or(0);
            let budget = match (&capacity, &budget.allocation) {
                (Ok(CapacityResolution::Known(c)), Some(a)) if a.fits => {
                    Budget::Fits { usable: c.usable() }
                }
                (Ok(CapacityResolution::Known(c)), Some(a)) => Budget::Overcommitted {
                    needed_min: a.needed_min,
                    usable: c.usable(),
                },
                (Ok(CapacityResolution::Unknown(why)), _) => Budget::Unknown(why.to_string()),
                (Ok(CapacityResolution::Known(_)), None) => Budget::NotAllocated,
                (Err(why), _) => Budget::Invalid(why.to_string()),
            };
            Resolution::Eligible(Pool {
                instance: BoundInstance {
                    connection_name: instance.spec.connection_name.clone(),
                    database_version: instance
                        .status
                        .as_ref()
                        .and_then(|s| s.database_version.clone())
                        .or_else(|| instance.spec.database_version.clone()),
                },
                grant,
                max_pods,
                budget,
            })
        }
    };
    Some(BindingView {
        generation: binding.metadata.generation,
        previous: binding.status.clone().unwrap_or_default(),
        identity: ctx.options.identity.clone(),
        operator_conflict,
        instance_name,
        namespace: binding.namespace().unwrap_or_default(),
        requested_per_pod: i64::from(binding.spec.pool.max_per_pod),
        resolution,
    })
}

/// The status entries of the workloads the binding selects, with their max pods.
fn selected_entries(results: Vec<WorkloadResult>, ctx: &Context) -> Vec<WorkloadStatus> {
    results
        .into_iter()
        .filter(|r| r.selected)
        .map(|r| {
            let mut status = r.status;
            if let Some(m) = ctx.stores.max_pods(&r.id) {
                status.max_pods = Some(i64::from(m.count));
            }
            status
        })
        .collect()
}

/// Pods that came without their injection (the webhook was not called),
/// reported and, when the binding asks for it, rolled.
async fn missed_injections(binding: &CloudSqlBinding, ctx: &Context) -> Option<MissedReport> {
    if !ctx
        .admission
        .serves(&binding.namespace().unwrap_or_default())
    {
        return None;
    }
    let missed = super::missed::missed_pods(&ctx.stores, binding);
    if missed.is_empty() {
        return None;
    }
    Some(super::missed::report(ctx, binding, &missed).await)
}

/// Writes `status` when it says something new (compared with the store's
/// status, or with our own last write while the store has not seen it), and
/// publishes the Events that come with it.
async fn write_status(
    binding: &CloudSqlBinding,
    previous: &CloudSqlBindingStatus,
    status: &CloudSqlBindingStatus,
    notes: Vec<Note>,
    ctx: &Context,
) -> Result<(), Error> {
    let unchanged = status_equivalent(previous, status)
        || ctx
            .status_writes
            .pending(binding)
            .is_some_and(|written| status_equivalent(&written, status));
    if unchanged {
        return Ok(());
    }
    let api: Api<CloudSqlBinding> =
        Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
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
        action: format!("writing the status of binding {}", binding_key(binding)),
        source,
    })?;
    ctx.metrics.write("binding", "apply_status");
    ctx.status_writes.record(binding, status);
    ctx.operators.wrote(binding.metadata.uid.as_deref());
    for note in notes {
        publish_on_binding(ctx, binding, note.type_, note.reason, note.note).await;
    }
    Ok(())
}

async fn publish_on_binding(
    ctx: &Context,
    binding: &CloudSqlBinding,
    type_: EventType,
    reason: Reason,
    note: String,
) {
    publish(ctx, &binding.object_ref(&()), type_, reason.as_str(), note).await;
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
        Reason::Cleaned.as_str(),
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
