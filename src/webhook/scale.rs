//! `/validate-scale`: never denies. When a change to a HorizontalPodAutoscaler,
//! a Deployment or a StatefulSet (or its `scale` subresource) would raise what
//! the bindings of an instance ask for (`maxPerPod` x max pods, summed over
//! the instance's bindings) past the instance's usable connections, the
//! answer carries a warning with the numbers, which kubectl prints.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::runtime::reflector::ObjectRef;
use serde::de::DeserializeOwned;

use super::review::{AdmissionContext, with_warnings};
use crate::api::{CloudSqlBinding, CloudSqlInstance, WorkloadKind};
use crate::budget::CapacityResolution;
use crate::budget::max_pods as mp;
use crate::index::{Eligibility, Stores, WorkloadId};

/// The change under review, as it bears on max pods.
enum Change {
    /// An HPA created or updated (the new object).
    Hpa(HorizontalPodAutoscaler),
    /// A Deployment created or updated.
    Deployment(Deployment),
    /// A StatefulSet created or updated.
    StatefulSet(StatefulSet),
    /// `kubectl scale`: the scale subresource of a workload.
    Scale {
        /// Its new `spec.replicas`.
        replicas: i32,
    },
}

pub(crate) fn warn(
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(object) = &request.object else {
        return response;
    };
    let ns = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_default();
    if ns.is_empty() || !ctx.options.intercepts(&ns) {
        return response;
    }
    let Some((change, target, what)) = change_of(request, object) else {
        return response;
    };
    let warnings = overcommit_warnings(&ctx.stores, &ns, &change, &target, &what);
    with_warnings(response, warnings)
}

fn typed<T: DeserializeOwned>(object: &DynamicObject) -> Option<T> {
    serde_json::to_value(object)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// The change, the workload it bears on (kind, name) and how it reads in a
/// warning (`maxReplicas 40`).
fn change_of(
    request: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
) -> Option<(Change, (WorkloadKind, String), String)> {
    let name = if request.name.is_empty() {
        object.metadata.name.clone().unwrap_or_default()
    } else {
        request.name.clone()
    };
    if request.sub_resource.as_deref() == Some("scale") {
        let kind = match request.resource.resource.as_str() {
            "deployments" => WorkloadKind::Deployment,
            "statefulsets" => WorkloadKind::StatefulSet,
            "replicasets" => WorkloadKind::ReplicaSet,
            _ => return None,
        };
        let replicas = object
            .data
            .get("spec")
            .and_then(|s| s.get("replicas"))
            .and_then(serde_json::Value::as_i64)
            .and_then(|r| i32::try_from(r).ok())
            .unwrap_or(0);
        return Some((
            Change::Scale { replicas },
            (kind, name),
            format!("replicas {replicas}"),
        ));
    }
    match request.kind.kind.as_str() {
        "HorizontalPodAutoscaler" => {
            let hpa: HorizontalPodAutoscaler = typed(object)?;
            let spec = hpa.spec.as_ref()?;
            let kind = WorkloadKind::from_object(
                spec.scale_target_ref
                    .api_version
                    .as_deref()
                    .unwrap_or("apps/v1"),
                &spec.scale_target_ref.kind,
            )?;
            let target = (kind, spec.scale_target_ref.name.clone());
            let what = format!("maxReplicas {}", spec.max_replicas);
            Some((Change::Hpa(hpa), target, what))
        }
        "Deployment" => {
            let d: Deployment = typed(object)?;
            let what = format!(
                "replicas {}",
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
            );
            Some((
                Change::Deployment(d),
                (WorkloadKind::Deployment, name),
                what,
            ))
        }
        "StatefulSet" => {
            let s: StatefulSet = typed(object)?;
            let what = format!(
                "replicas {}",
                s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
            );
            Some((
                Change::StatefulSet(s),
                (WorkloadKind::StatefulSet, name),
                what,
            ))
        }
        _ => None,
    }
}

/// The HPAs of the namespace as they would be after the change.
fn hpas_after(stores: &Stores, ns: &str, change: &Change) -> Vec<HorizontalPodAutoscaler> {
    let mut hpas: Vec<HorizontalPodAutoscaler> = stores
        .hpas
        .state()
        .into_iter()
        .filter(|h| h.namespace().as_deref() == Some(ns))
        .map(|h| (*h).clone())
        .collect();
    if let Change::Hpa(new) = change {
        hpas.retain(|h| h.name_any() != new.name_any());
        hpas.push(new.clone());
    }
    hpas
}

/// Max pods of workload `id` after the change (`None`: unknown / absent).
fn max_pods_after(
    stores: &Stores,
    id: &WorkloadId,
    change: &Change,
    target: &(WorkloadKind, String),
    hpas: &[HorizontalPodAutoscaler],
) -> Option<u32> {
    let is_target = id.kind == target.0 && id.name == target.1;
    let (ns, name) = (id.namespace.as_str(), id.name.as_str());
    let hpa = |kind: &str| mp::hpa_max_replicas_for(hpas, kind, name);
    let count = match (id.kind, change) {
        (WorkloadKind::Deployment, Change::Deployment(new)) if is_target => {
            mp::deployment(new, hpa("Deployment"))
        }
        (WorkloadKind::StatefulSet, Change::StatefulSet(new)) if is_target => {
            mp::stateful_set(new, hpa("StatefulSet"))
        }
        (WorkloadKind::Deployment, Change::Scale { replicas, .. }) if is_target => {
            let mut d = (*stores.deployments.get(&ObjectRef::new(name).within(ns))?).clone();
            if let Some(spec) = d.spec.as_mut() {
                spec.replicas = Some(*replicas);
            }
            mp::deployment(&d, hpa("Deployment"))
        }
        (WorkloadKind::StatefulSet, Change::Scale { replicas, .. }) if is_target => {
            let mut s = (*stores.stateful_sets.get(&ObjectRef::new(name).within(ns))?).clone();
            if let Some(spec) = s.spec.as_mut() {
                spec.replicas = Some(*replicas);
            }
            mp::stateful_set(&s, hpa("StatefulSet"))
        }
        (WorkloadKind::ReplicaSet, Change::Scale { replicas, .. }) if is_target => {
            let mut r = (*stores.replica_sets.get(&ObjectRef::new(name).within(ns))?).clone();
            if let Some(spec) = r.spec.as_mut() {
                spec.replicas = Some(*replicas);
            }
            mp::replica_set(&r, hpa("ReplicaSet"))
        }
        // HPAs bound the scalable kinds: recount those with the new HPAs.
        (WorkloadKind::Deployment, Change::Hpa(_)) => mp::deployment(
            &*stores.deployments.get(&ObjectRef::new(name).within(ns))?,
            hpa("Deployment"),
        ),
        (WorkloadKind::StatefulSet, Change::Hpa(_)) => mp::stateful_set(
            &*stores.stateful_sets.get(&ObjectRef::new(name).within(ns))?,
            hpa("StatefulSet"),
        ),
        (WorkloadKind::ReplicaSet, Change::Hpa(_)) => mp::replica_set(
            &*stores.replica_sets.get(&ObjectRef::new(name).within(ns))?,
            hpa("ReplicaSet"),
        ),
        _ => return stores.max_pods(id).map(|m| m.count),
    };
    Some(count.count)
}

/// Connections the eligible bindings of `instance` would like
/// (`maxPerPod` x their max pods), before and after the change.
fn needed(
    stores: &Stores,
    instance: &CloudSqlInstance,
    change: &Change,
    target: &(WorkloadKind, String),
    target_labels: Option<&std::collections::BTreeMap<String, String>>,
    hpas: &[HorizontalPodAutoscaler],
) -> (u64, u64) {
    let (mut before, mut after) = (0u64, 0u64);
    for binding in stores.bindings_of(&instance.name_any()) {
        if !matches!(stores.eligibility(&binding), Eligibility::Eligible(_)) {
            continue;
        }
        let per_pod = u64::try_from(binding.spec.pool.max_per_pod).unwrap_or(0);
        let pods_before = stores.binding_max_pods_total(&binding);
        before += per_pod * u64::from(pods_before);
        let pods_after: u64 = selected_after(stores, &binding, target, target_labels)
            .iter()
            .filter_map(|id| max_pods_after(stores, id, change, target, hpas))
            .map(u64::from)
            .sum();
        after += per_pod * pods_after;
    }
    (before, after)
}

/// The workloads `binding` selects after the change: the target is in when
/// its (new) labels or name match.
fn selected_after(
    stores: &Stores,
    binding: &CloudSqlBinding,
    target: &(WorkloadKind, String),
    target_labels: Option<&std::collections::BTreeMap<String, String>>,
) -> Vec<WorkloadId> {
    let ns = binding.namespace().unwrap_or_default();
    let mut ids: BTreeSet<WorkloadId> = stores
        .selected(binding)
        .into_iter()
        .filter(|id| !(id.kind == target.0 && id.name == target.1))
        .collect();
    if Stores::selects(binding, target.0, &target.1, target_labels) {
        ids.insert(WorkloadId {
            kind: target.0,
            namespace: ns,
            name: target.1.clone(),
        });
    }
    ids.into_iter().collect()
}

fn overcommit_warnings(
    stores: &Stores,
    ns: &str,
    change: &Change,
    target: &(WorkloadKind, String),
    what: &str,
) -> Vec<String> {
    let target_labels = match change {
        Change::Deployment(d) => d.metadata.labels.clone(),
        Change::StatefulSet(s) => s.metadata.labels.clone(),
        Change::Hpa(_) | Change::Scale { .. } => labels_in_store(stores, ns, target),
    };
    let instances: BTreeSet<String> = stores
        .bindings_in(ns)
        .iter()
        .filter(|b| Stores::selects(b, target.0, &target.1, target_labels.as_ref()))
        .map(|b| b.spec.instance_ref.name.clone())
        .collect();
    if instances.is_empty() {
        return Vec::new();
    }
    let hpas = hpas_after(stores, ns, change);
    let mut warnings = Vec::new();
    for name in instances {
        let Some(instance) = stores.instances.get(&ObjectRef::new(&name)) else {
            continue;
        };
        let usable = match stores.capacity(&instance, stores.discovered(&instance)) {
            Ok(CapacityResolution::Known(c)) => u64::from(c.usable()),
            _ => continue,
        };
        let (before, after) = needed(
            stores,
            &instance,
            change,
            target,
            target_labels.as_ref(),
            &hpas,
        );
        if after > usable && after > before {
            warnings.push(format!(
                "{what} would need {after} connections on {name}, {usable} usable: pools will be shared below spec.pool.maxPerPod"
            ));
        }
    }
    warnings
}

fn labels_in_store(
    stores: &Stores,
    ns: &str,
    target: &(WorkloadKind, String),
) -> Option<std::collections::BTreeMap<String, String>> {
    let name = target.1.as_str();
    match target.0 {
        WorkloadKind::Deployment => stores
            .deployments
            .get(&ObjectRef::new(name).within(ns))?
            .metadata
            .labels
            .clone(),
        WorkloadKind::StatefulSet => stores
            .stateful_sets
            .get(&ObjectRef::new(name).within(ns))?
            .metadata
            .labels
            .clone(),
        WorkloadKind::ReplicaSet => stores
            .replica_sets
            .get(&ObjectRef::new(name).within(ns))?
            .metadata
            .labels
            .clone(),
        _ => None,
    }
}
