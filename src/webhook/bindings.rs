//! `/validate-bindings`: what the CRD schema cannot see. A binding is refused
//! when its instance does not admit its namespace, when its injection
//! collides with another binding's on a workload they both select, or when
//! its own settings cannot make a plan (two values under one env name).
//! Collisions with the workload's own template only warn: the workload may
//! change, and the controller reports them.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::runtime::reflector::ObjectRef;

use super::review::{AdmissionContext, with_warnings};
use crate::api::{CloudSqlBinding, WorkloadKind};
use crate::index::{Desire, Outcome, Stores, WorkloadId, binding_key};
use crate::plan::{ConflictKind, Grant, InjectionPlan, PlanError};
use crate::workload::Workload;

/// Longest denial message sent back (kubectl prints it whole).
const MAX_MESSAGE: usize = 2_000;

pub(crate) fn validate(
    request: &AdmissionRequest<CloudSqlBinding>,
    ctx: &AdmissionContext,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(binding) = &request.object else {
        return response;
    };
    let ns = request
        .namespace
        .clone()
        .or_else(|| binding.metadata.namespace.clone())
        .unwrap_or_default();
    if ns.is_empty()
        || !ctx.options.intercepts(&ns)
        || binding.metadata.deletion_timestamp.is_some()
    {
        return response;
    }
    // Finalizer and label changes do not change what is injected.
    if request.operation == Operation::Update
        && request
            .old_object
            .as_ref()
            .is_some_and(|old| old.spec == binding.spec)
    {
        return response;
    }
    let mut candidate = binding.clone();
    candidate.metadata.namespace = Some(ns.clone());
    if candidate.metadata.name.as_deref().is_none_or(str::is_empty) {
        candidate.metadata.name = Some(request.name.clone());
    }
    if request.operation == Operation::Create {
        candidate.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
    }
    let (denials, warnings) = judge(&candidate, &ns, ctx);
    let response = with_warnings(response, warnings);
    if denials.is_empty() {
        return response;
    }
    let mut message = denials.join("; ");
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    response.deny(message)
}

/// The reasons to refuse `candidate` and the warnings to give.
fn judge(
    candidate: &CloudSqlBinding,
    ns: &str,
    ctx: &AdmissionContext,
) -> (Vec<String>, Vec<String>) {
    let stores = &ctx.stores;
    let mut denials = Vec::new();
    let mut warnings = Vec::new();
    let key = binding_key(candidate);
    let instance_name = &candidate.spec.instance_ref.name;

    match stores.instances.get(&ObjectRef::new(instance_name)) {
        None => warnings.push(format!(
            "CloudSqlInstance {instance_name:?} does not exist yet: nothing is injected until it does"
        )),
        Some(instance) => {
            if !stores.namespace_allowed(&instance, ns) {
                denials.push(format!(
                    "CloudSqlInstance {instance_name:?} does not allow bindings from namespace {ns:?} (its spec.allowedNamespaces); ask its owners to admit the namespace, or bind another instance"
                ));
                return (denials, warnings);
            }
            if let Err(err) =
                InjectionPlan::new(candidate, &instance, Grant::requested(candidate), ctx.caps)
            {
                match err {
                    PlanError::DuplicateEnvName { .. }
                    | PlanError::TcpOnCloudRun { .. }
                    | PlanError::InvalidPort { .. } => denials.push(err.to_string()),
                    other => warnings.push(other.to_string()),
                }
            }
        }
    }

    // The bindings of the namespace as they would be: the candidate replaces
    // its stored self (same place, oldest first) or comes last (newest).
    let current = stores.bindings_in(ns);
    let mut proposed: Vec<Arc<CloudSqlBinding>> = current.clone();
    let candidate = Arc::new(candidate.clone());
    match proposed.iter().position(|b| binding_key(b) == key) {
        Some(at) => proposed[at] = candidate.clone(),
        None => proposed.push(candidate.clone()),
    }

    for id in stores.selected(&candidate) {
        let Some((before, after)) = trial(stores, &id, &current, &proposed, ctx) else {
            continue;
        };
        for (other, conflicts) in &after.conflicts {
            let between_bindings: Vec<String> = conflicts
                .iter()
                .filter(|c| is_between_bindings(&c.kind))
                .map(ToString::to_string)
                .collect();
            let with_template: Vec<String> = conflicts
                .iter()
                .filter(|c| !is_between_bindings(&c.kind))
                .map(ToString::to_string)
                .collect();
            if *other == key {
                if !between_bindings.is_empty() {
                    denials.push(format!("{id}: {}", between_bindings.join("; ")));
                }
                if !with_template.is_empty() {
                    warnings.push(format!(
                        "{id}: not injected until the workload changes: {}",
                        with_template.join("; ")
                    ));
                }
            } else if before.outcomes.get(other) == Some(&Outcome::Injected)
                && !between_bindings.is_empty()
            {
                denials.push(format!(
                    "{id}: this change would stop binding {other} from injecting: {}",
                    between_bindings.join("; ")
                ));
            }
        }
    }
    (denials, warnings)
}

/// The conflicts one binding has with another (not with the user's template).
fn is_between_bindings(kind: &ConflictKind) -> bool {
    matches!(
        kind,
        ConflictKind::BindingEnv { .. }
            | ConflictKind::BindingPort { .. }
            | ConflictKind::SameSocket { .. }
    )
}

/// The injection of workload `id` with the current bindings and with the
/// proposed ones; `None` when its pod template is not known (a bare Pod: the
/// pod cache holds metadata only).
fn trial(
    stores: &Stores,
    id: &WorkloadId,
    current: &[Arc<CloudSqlBinding>],
    proposed: &[Arc<CloudSqlBinding>],
    ctx: &AdmissionContext,
) -> Option<(Desire, Desire)> {
    let resolve = |bindings: &[Arc<CloudSqlBinding>],
                   labels: Option<&std::collections::BTreeMap<String, String>>,
                   view: crate::workload::TemplateView<'_>| {
        stores.resolve(
            bindings,
            id.kind,
            |b| {
                Stores::selects(b, id.kind, &id.name, labels)
                    .then_some(b.spec.injects_at_admission(id.kind))
            },
            view.spec,
            view.annotations,
            ctx.caps,
        )
    };
    match id.kind {
        WorkloadKind::Pod => None,
        WorkloadKind::Job => {
            let job = stores
                .jobs
                .get(&ObjectRef::new(&id.name).within(&id.namespace))?;
            let view = job.template()?;
            let labels = job.metadata.labels.as_ref();
            Some((
                resolve(current, labels, view),
                resolve(proposed, labels, view),
            ))
        }
        _ => stores.with_template(id, |meta, view, _| {
            let labels = meta.labels.as_ref();
            (
                resolve(current, labels, view),
                resolve(proposed, labels, view),
            )
        }),
    }
}
