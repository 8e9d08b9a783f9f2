//! The safety net under `failurePolicy: Ignore`: a bound Pod created while
//! the webhook could not be called runs without its injection. The binding
//! controller finds such pods (bound through admission, created after the
//! binding, without the webhook's [`ADMITTED_ANNOTATION`]), reports them
//! (reason `InjectionMissed` on the binding, an Event on each pod, once), and
//! when the binding says `rollOnMissedInjection: true` rolls their owner once
//! the webhook answers again.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{info, warn};

use super::Context;
use crate::api::{CloudSqlBinding, FIELD_MANAGER, WorkloadKind};
use crate::index::{PodOwner, Stores};
use crate::plan::{ADMITTED_ANNOTATION, CONFIG_HASH_ANNOTATION, INJECTED_ANNOTATION, opted_out};
use crate::telemetry::KubeError;

/// Pod annotation marking the bindings whose missed injection was reported
/// (an Event is sent once per pod and binding).
pub const MISSED_ANNOTATION: &str = "cloudsql.dev/injection-missed";
/// Pod-template annotation the operator bumps to roll a workload whose pods
/// missed their injection (`spec.rollOnMissedInjection`).
pub const ROLLED_ANNOTATION: &str = "cloudsql.dev/rolled-for-missed-injection";

/// How many pod names a condition message lists.
const LISTED: usize = 5;

/// A bound pod that came without its injection.
#[derive(Debug, Clone, PartialEq)]
pub struct MissedPod {
    /// The pod's name.
    pub name: String,
    /// When it was created.
    pub created: Timestamp,
    /// The owner to roll (Deployment, StatefulSet, DaemonSet), if any.
    pub rollable: Option<PodOwner>,
    /// Whether the miss was reported already (Event sent).
    pub reported: bool,
}

fn names_in(annotations: Option<&BTreeMap<String, String>>, key: &str) -> Vec<String> {
    annotations
        .and_then(|a| a.get(key))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The pods of `binding`'s namespace it injects at admission that were
/// created after it without the webhook having handled them.
pub fn missed_pods(stores: &Stores, binding: &CloudSqlBinding) -> Vec<MissedPod> {
    let ns = binding.namespace().unwrap_or_default();
    let name = binding.name_any();
    let Some(since) = binding.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return Vec::new();
    };
    let mut out: Vec<MissedPod> = stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| !opted_out(p.metadata.labels.as_ref()))
        .filter_map(|p| {
            // Timestamps have whole seconds: a pod of the binding's second counts.
            let created = p.metadata.creation_timestamp.as_ref()?.0;
            if created < since {
                return None;
            }
            let annotations = p.metadata.annotations.as_ref();
            if names_in(annotations, ADMITTED_ANNOTATION).contains(&name) {
                return None;
            }
            let owners = stores.pod_owners(&ns, &p.metadata);
            let (_, at_admission) = Stores::pod_route(binding, &owners)?;
            if !at_admission {
                return None;
            }
            let rollable = owners
                .iter()
                .rev()
                .find(|o| {
                    matches!(
                        o.kind,
                        WorkloadKind::Deployment
                            | WorkloadKind::StatefulSet
                            | WorkloadKind::DaemonSet
                    )
                })
                .cloned();
            Some(MissedPod {
                name: p.name_any(),
                created,
                rollable,
                reported: names_in(annotations, MISSED_ANNOTATION).contains(&name),
            })
        })
        .collect();
    out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    out
}

/// What the binding's status says about missed pods, and whether to look
/// again soon (a roll waits for the webhook to answer).
pub struct MissedReport {
    /// The condition message, with the numbers and names.
    pub message: String,
    /// A roll is pending: reconcile again soon.
    pub retry: bool,
}

/// Reports the misses (an Event on each pod, once) and, when the binding
/// asks for it, rolls their owners once the webhook answers again.
pub async fn report(
    ctx: &Context,
    binding: &CloudSqlBinding,
    missed: &[MissedPod],
) -> MissedReport {
    let ns = binding.namespace().unwrap_or_default();
    let name = binding.name_any();
    for pod in missed.iter().filter(|p| !p.reported) {
        mark_reported(ctx, &ns, &name, pod).await;
    }

    let mut retry = false;
    let mut rolled: Vec<String> = Vec::new();
    let mut waiting: Vec<String> = Vec::new();
    if binding.spec.roll_on_missed_injection {
        // One roll per owner, unless rolled since its oldest missed pod.
        let mut owners: BTreeMap<(WorkloadKind, String), &MissedPod> = BTreeMap::new();
        for pod in missed {
            if let Some(owner) = &pod.rollable {
                owners
                    .entry((owner.kind, owner.name.clone()))
                    .or_insert(pod);
            }
        }
        for ((kind, owner), oldest) in owners {
            let label = format!("{kind} {owner}");
            if rolled_since(&ctx.stores, &ns, kind, &owner, oldest.created) {
                rolled.push(label);
                continue;
            }
            if webhook_answers(ctx, &ns, &name, &oldest.name).await {
                if roll(ctx, &ns, kind, &owner).await {
                    rolled.push(label);
                } else {
                    retry = true;
                    waiting.push(label);
                }
            } else {
                retry = true;
                waiting.push(label);
            }
        }
    }

    let listed: Vec<&str> = missed
        .iter()
        .take(LISTED)
        .map(|p| p.name.as_str())
        .collect();
    let more = missed.len().saturating_sub(LISTED);
    let mut message = format!(
        "{} pod(s) were created without the injection because the admission webhook was not called (failurePolicy Ignore let them through): {}{}",
        missed.len(),
        listed.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    if !rolled.is_empty() {
        message.push_str(&format!(
            "; rolled {} (waiting for the rollout to replace them)",
            rolled.join(", ")
        ));
    }
    if !waiting.is_empty() {
        message.push_str(&format!(
            "; will roll {} once the webhook answers again",
            waiting.join(", ")
        ));
    }
    if !binding.spec.roll_on_missed_injection {
        message.push_str(
            "; delete them to have them recreated, or set spec.rollOnMissedInjection to roll their owners",
        );
    } else if missed.iter().any(|p| p.rollable.is_none()) {
        message.push_str(
            "; pods of Jobs and bare Pods cannot be rolled: delete them to have them recreated",
        );
    }
    MissedReport { message, retry }
}

/// An Event on the pod and our mark on it, so both happen once.
async fn mark_reported(ctx: &Context, ns: &str, binding: &str, pod: &MissedPod) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(ns.to_owned()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "InjectionMissed".into(),
        note: Some(format!(
            "created without the Cloud SQL injection of binding {binding}: the admission webhook was not called (unreachable?) and failurePolicy Ignore let the pod through"
        )),
        action: "InjectionMissed".into(),
        secondary: None,
    };
    if ctx.recorder.publish(&event, &reference).await.is_ok() {
        ctx.metrics.write("binding", "event");
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let current = ctx
        .stores
        .pods
        .get(&ObjectRef::new(&pod.name).within(ns))
        .map(|p| names_in(p.metadata.annotations.as_ref(), MISSED_ANNOTATION))
        .unwrap_or_default();
    let mut names = current;
    if !names.iter().any(|n| n == binding) {
        names.push(binding.to_owned());
    }
    names.sort();
    let patch = json!({"metadata": {"annotations": {MISSED_ANNOTATION: names.join(",")}}});
    match pods
        .patch(
            &pod.name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => ctx.metrics.write("binding", "annotate"),
        Err(err) => {
            warn!(pod = %pod.name, error = %KubeError(&err), "cannot mark a pod's missed injection")
        }
    }
}

/// Whether the owner's template was rolled for a missed injection after `since`.
fn rolled_since(
    stores: &Stores,
    ns: &str,
    kind: WorkloadKind,
    name: &str,
    since: Timestamp,
) -> bool {
    let annotations = match kind {
        WorkloadKind::Deployment => stores
            .deployments
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|d| {
                d.spec
                    .as_ref()?
                    .template
                    .metadata
                    .as_ref()?
                    .annotations
                    .clone()
            }),
        WorkloadKind::StatefulSet => stores
            .stateful_sets
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|d| {
                d.spec
                    .as_ref()?
                    .template
                    .metadata
                    .as_ref()?
                    .annotations
                    .clone()
            }),
        WorkloadKind::DaemonSet => stores
            .daemon_sets
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|d| {
                d.spec
                    .as_ref()?
                    .template
                    .metadata
                    .as_ref()?
                    .annotations
                    .clone()
            }),
        _ => None,
    };
    annotations
        .and_then(|a| a.get(ROLLED_ANNOTATION).cloned())
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_some_and(|t| t > since)
}

/// Whether the webhook injects pods again: a dry-run create of a copy of a
/// missed pod comes back handled (the whole path, API server to webhook).
async fn webhook_answers(ctx: &Context, ns: &str, binding: &str, pod: &str) -> bool {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let Ok(original) = pods.get(pod).await else {
        return false;
    };
    let mut annotations = original.metadata.annotations.clone().unwrap_or_default();
    for key in [
        ADMITTED_ANNOTATION,
        MISSED_ANNOTATION,
        INJECTED_ANNOTATION,
        CONFIG_HASH_ANNOTATION,
    ] {
        annotations.remove(key);
    }
    let probe = Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", pod.chars().take(40).collect::<String>())),
            namespace: Some(ns.to_owned()),
            labels: original.metadata.labels.clone(),
            annotations: Some(annotations),
            owner_references: original.metadata.owner_references.clone(),
            ..ObjectMeta::default()
        },
        spec: original.spec.clone(),
        status: None,
    };
    let params = PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    };
    match pods.create(&params, &probe).await {
        Ok(created) => names_in(created.metadata.annotations.as_ref(), ADMITTED_ANNOTATION)
            .iter()
            .any(|n| n == binding),
        Err(err) => {
            warn!(error = %KubeError(&err), "probing the admission webhook with a dry-run pod");
            false
        }
    }
}

/// Bumps the owner's template annotation: a rollout whose new pods pass the
/// webhook.
async fn roll(ctx: &Context, ns: &str, kind: WorkloadKind, name: &str) -> bool {
    let (group, version) = kind.api_version().split_once('/').unwrap_or(("", "v1"));
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind.object_kind()));
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        ROLLED_ANNOTATION: Timestamp::now().to_string()
    }}}}});
    match api
        .patch(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics.write("binding", "roll");
            let reference = ObjectReference {
                api_version: Some(kind.api_version().into()),
                kind: Some(kind.object_kind().into()),
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Normal,
                reason: "RolledForMissedInjection".into(),
                note: Some("some pods were created without the Cloud SQL injection; rolled so the webhook injects their replacements".into()),
                action: "Roll".into(),
                secondary: None,
            };
            if ctx.recorder.publish(&event, &reference).await.is_ok() {
                ctx.metrics.write("binding", "event");
            }
            info!(workload = %format!("{kind} {ns}/{name}"), "rolled for a missed injection");
            true
        }
        Err(err) => {
            warn!(error = %KubeError(&err), workload = %format!("{kind} {ns}/{name}"), "cannot roll");
            false
        }
    }
}
