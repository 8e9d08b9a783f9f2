//! The supported workload kinds: where each keeps its pod template and how the
//! operator reads it. Types only; no client.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::CustomResource;
use kube::Resource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::WorkloadKind;

/// A Knative Serving `Service` (`serving.knative.dev/v1`), which is also the
/// YAML form of a Cloud Run service. Only the parts the operator reads are typed.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema, Default)]
#[kube(
    group = "serving.knative.dev",
    version = "v1",
    kind = "Service",
    root = "KnativeService",
    namespaced,
    schema = "disabled"
)]
pub struct KnativeServiceSpec {
    /// The revision template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<RevisionTemplate>,
}

/// A Knative revision template: metadata plus a pod spec (Knative adds fields
/// such as `containerConcurrency`, which the operator does not read).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema, Default)]
pub struct RevisionTemplate {
    /// Template metadata (annotations such as `autoscaling.knative.dev/maxScale`).
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// The revision's pod spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub spec: Option<PodSpec>,
}

/// A pod template as the operator sees it, whatever kind holds it.
#[derive(Debug, Clone, Copy)]
pub struct TemplateView<'a> {
    /// The template's pod spec.
    pub spec: &'a PodSpec,
    /// The template's annotations, when it has any.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// The template's labels, when it has any.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// A kind of object whose pods can be bound.
pub trait Workload:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The kind in binding terms.
    const KIND: WorkloadKind;
    /// The pod template, when the object has one.
    fn template(&self) -> Option<TemplateView<'_>>;
    /// The label selector of the pods it owns, when it has one.
    fn pod_selector(&self) -> Option<&LabelSelector> {
        None
    }
}

macro_rules! template_workload {
    ($ty:ty, $kind:expr) => {
        impl Workload for $ty {
            const KIND: WorkloadKind = $kind;
            fn template(&self) -> Option<TemplateView<'_>> {
                let template = &self.spec.as_ref()?.template;
                Some(TemplateView {
                    spec: template.spec.as_ref()?,
                    annotations: template
                        .metadata
                        .as_ref()
                        .and_then(|m| m.annotations.as_ref()),
                    labels: template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
                })
            }
            fn pod_selector(&self) -> Option<&LabelSelector> {
                self.spec.as_ref().map(|s| &s.selector)
            }
        }
    };
}

template_workload!(Deployment, WorkloadKind::Deployment);
template_workload!(StatefulSet, WorkloadKind::StatefulSet);
template_workload!(DaemonSet, WorkloadKind::DaemonSet);

impl Workload for ReplicaSet {
    const KIND: WorkloadKind = WorkloadKind::ReplicaSet;
    fn template(&self) -> Option<TemplateView<'_>> {
        let template = self.spec.as_ref()?.template.as_ref()?;
        Some(TemplateView {
            spec: template.spec.as_ref()?,
            annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()),
            labels: template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        })
    }
    fn pod_selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|s| &s.selector)
    }
}

impl Workload for Job {
    const KIND: WorkloadKind = WorkloadKind::Job;
    fn template(&self) -> Option<TemplateView<'_>> {
        let template = &self.spec.as_ref()?.template;
        Some(TemplateView {
            spec: template.spec.as_ref()?,
            annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()),
            labels: template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        })
    }
}

impl Workload for CronJob {
    const KIND: WorkloadKind = WorkloadKind::CronJob;
    fn template(&self) -> Option<TemplateView<'_>> {
        let template = &self.spec.as_ref()?.job_template.spec.as_ref()?.template;
        Some(TemplateView {
            spec: template.spec.as_ref()?,
            annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()),
            labels: template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        })
    }
}

impl Workload for Pod {
    const KIND: WorkloadKind = WorkloadKind::Pod;
    fn template(&self) -> Option<TemplateView<'_>> {
        Some(TemplateView {
            spec: self.spec.as_ref()?,
            annotations: self.metadata.annotations.as_ref(),
            labels: self.metadata.labels.as_ref(),
        })
    }
}

impl Workload for KnativeService {
    const KIND: WorkloadKind = WorkloadKind::KnativeService;
    fn template(&self) -> Option<TemplateView<'_>> {
        let template = self.spec.template.as_ref()?;
        Some(TemplateView {
            spec: template.spec.as_ref()?,
            annotations: template.metadata.annotations.as_ref(),
            labels: template.metadata.labels.as_ref(),
        })
    }
}

/// Whether a label selector matches a label set (matchLabels and
/// matchExpressions, with Kubernetes semantics; an empty selector matches all).
pub fn selector_matches(
    selector: &LabelSelector,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An operator the API server would have refused: match nothing.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions_follow_kubernetes_semantics() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "orders")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["api".into(), "worker".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(selector_matches(
            &selector,
            Some(&labels(&[("app", "orders"), ("tier", "api")]))
        ));
        assert!(!selector_matches(
            &selector,
            Some(&labels(&[("app", "orders"), ("tier", "web")]))
        ));
        assert!(!selector_matches(
            &selector,
            Some(&labels(&[
                ("app", "orders"),
                ("tier", "api"),
                ("canary", "1")
            ]))
        ));
        assert!(!selector_matches(&selector, None));
        assert!(selector_matches(&LabelSelector::default(), None));
    }
}
