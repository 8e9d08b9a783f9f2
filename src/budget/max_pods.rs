//! The most pods of a workload that can hold database connections at the same
//! time, rollouts and autoscaling included.
//!
//! Every function here errs on the high side where Kubernetes leaves room:
//! an overestimate only makes a pool smaller, an underestimate lets the
//! instance run out of connections. Pods that are terminating are not counted
//! (Kubernetes does not count them against `maxSurge` either); their pools
//! close as they shut down.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job, JobSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// Annotation on a CronJob with `concurrencyPolicy: Allow` saying how many of
/// its Jobs can run at once.
pub const MAX_CONCURRENT_JOBS_ANNOTATION: &str = "cloudsql.dev/max-concurrent-jobs";
/// Knative's revision-template annotation bounding the number of instances.
pub const KNATIVE_MAX_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/maxScale";
/// The kebab-case spelling of [`KNATIVE_MAX_SCALE_ANNOTATION`], also accepted.
pub const KNATIVE_MAX_SCALE_ANNOTATION_KEBAB: &str = "autoscaling.knative.dev/max-scale";
/// Cloud Run's default maximum number of instances.
pub const CLOUD_RUN_DEFAULT_MAX_INSTANCES: u32 = 100;

/// Kubernetes' default `maxSurge` for Deployments, in percent.
const DEPLOYMENT_DEFAULT_SURGE_PERCENT: u32 = 25;

/// How many pods of a workload can be alive at once, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxPods {
    /// The most pods alive at once.
    pub count: u32,
    /// Things the user should fix or know, each a full sentence.
    pub warnings: Vec<String>,
    /// The arithmetic behind `count`, for example
    /// `HPA maxReplicas 10 + maxSurge 3 (default 25%)`.
    pub explanation: String,
}

/// A count from an `int32` field: absent gives `default`, negative gives 0.
fn count_of(value: Option<i32>, default: u32) -> u32 {
    value.map_or(default, |n| u32::try_from(n).unwrap_or(0))
}

/// `percent`% of `of`, rounded up as Kubernetes does for `maxSurge`.
fn percent_rounded_up(of: u32, percent: u32) -> u32 {
    let scaled = (u64::from(of) * u64::from(percent)).div_ceil(100);
    u32::try_from(scaled).unwrap_or(u32::MAX)
}

/// A percentage such as `25%`; `None` for anything else.
fn parse_percent(value: &str) -> Option<u32> {
    let digits = value.trim().strip_suffix('%')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A `maxSurge` resolved against the count it is a percentage of: the number
/// of extra pods and how it reads in an explanation.
fn surge(
    value: Option<&IntOrString>,
    of: u32,
    default_percent: u32,
    field: &str,
    warnings: &mut Vec<String>,
) -> (u32, String) {
    let default = || {
        if default_percent == 0 {
            return (0, "maxSurge 0 (default)".to_owned());
        }
        let extra = percent_rounded_up(of, default_percent);
        (
            extra,
            format!("maxSurge {extra} (default {default_percent}%)"),
        )
    };
    match value {
        None => default(),
        Some(IntOrString::Int(n)) => {
            let extra = count_of(Some(*n), 0);
            (extra, format!("maxSurge {extra}"))
        }
        Some(IntOrString::String(text)) => match parse_percent(text) {
            Some(percent) => {
                let extra = percent_rounded_up(of, percent);
                (extra, format!("maxSurge {extra} ({percent}%)"))
            }
            None => {
                warnings.push(format!(
                    "{field} is {text:?}, which is neither a whole number nor a percentage such as \"25%\"; counted the default {default_percent}%"
                ));
                default()
            }
        },
    }
}

/// The replica count, or the HPA's `maxReplicas` when an HPA scales the
/// workload. A `spec.replicas` above `maxReplicas` (the HPA has not acted yet)
/// is kept, since those pods exist now.
fn replicas_or_hpa(
    replicas: u32,
    hpa_max_replicas: Option<i32>,
    warnings: &mut Vec<String>,
) -> (u32, String) {
    match hpa_max_replicas {
        None => (replicas, format!("replicas {replicas}")),
        Some(max) => {
            let max = count_of(Some(max), 0);
            if replicas > max {
                warnings.push(format!(
                    "spec.replicas {replicas} is above the HorizontalPodAutoscaler's maxReplicas {max}; counted {replicas} until the autoscaler scales it down"
                ));
                (
                    replicas,
                    format!("replicas {replicas} (above HPA maxReplicas {max})"),
                )
            } else {
                (max, format!("HPA maxReplicas {max}"))
            }
        }
    }
}

/// A Deployment: `replicas` (default 1), or the HPA's `maxReplicas` when one
/// targets it, plus `maxSurge` (an integer, or a percentage of that count
/// rounded up; default 25%). `Recreate` deployments do not surge.
pub fn deployment(deployment: &Deployment, hpa_max_replicas: Option<i32>) -> MaxPods {
    let mut warnings = Vec::new();
    let spec = deployment.spec.as_ref();
    let replicas = count_of(spec.and_then(|s| s.replicas), 1);
    let (base, base_text) = replicas_or_hpa(replicas, hpa_max_replicas, &mut warnings);
    let strategy = spec.and_then(|s| s.strategy.as_ref());
    match strategy.and_then(|s| s.type_.as_deref()) {
        Some("Recreate") => {
            return MaxPods {
                count: base,
                warnings,
                explanation: format!("{base_text} (Recreate: no surge)"),
            };
        }
        None | Some("RollingUpdate") => {}
        Some(other) => warnings.push(format!(
            "Deployment strategy type {other:?} is not RollingUpdate or Recreate; counted it as RollingUpdate"
        )),
    }
    let max_surge = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_surge.as_ref());
    let (extra, surge_text) = surge(
        max_surge,
        base,
        DEPLOYMENT_DEFAULT_SURGE_PERCENT,
        "spec.strategy.rollingUpdate.maxSurge",
        &mut warnings,
    );
    MaxPods {
        count: base.saturating_add(extra),
        warnings,
        explanation: format!("{base_text} + {surge_text}"),
    }
}

/// A StatefulSet: `replicas` (default 1), or the HPA's `maxReplicas` when one
/// targets it. StatefulSets replace pods one by one (delete, then create), so
/// rollouts add no pods.
pub fn stateful_set(stateful_set: &StatefulSet, hpa_max_replicas: Option<i32>) -> MaxPods {
    let mut warnings = Vec::new();
    let replicas = count_of(stateful_set.spec.as_ref().and_then(|s| s.replicas), 1);
    let (count, explanation) = replicas_or_hpa(replicas, hpa_max_replicas, &mut warnings);
    MaxPods {
        count,
        warnings,
        explanation,
    }
}

/// A ReplicaSet: `replicas` (default 1), or the HPA's `maxReplicas` when one
/// targets it.
pub fn replica_set(replica_set: &ReplicaSet, hpa_max_replicas: Option<i32>) -> MaxPods {
    let mut warnings = Vec::new();
    let replicas = count_of(replica_set.spec.as_ref().and_then(|s| s.replicas), 1);
    let (count, explanation) = replicas_or_hpa(replicas, hpa_max_replicas, &mut warnings);
    MaxPods {
        count,
        warnings,
        explanation,
    }
}

/// A DaemonSet on a cluster of `nodes` nodes: one pod per node plus
/// `maxSurge` (an integer, or a percentage of `nodes` rounded up; default 0).
/// `OnDelete` DaemonSets do not surge.
///
/// `nodes` should be every node in the cluster, cordoned ones included
/// (DaemonSet pods tolerate `node.kubernetes.io/unschedulable`). The
/// DaemonSet's nodeSelector, affinity and tolerations are not evaluated, so
/// the count is an upper bound, which the explanation says.
pub fn daemon_set(daemon_set: &DaemonSet, nodes: u32) -> MaxPods {
    let mut warnings = Vec::new();
    let base_text =
        format!("nodes {nodes} (every node; nodeSelector, affinity and taints not evaluated)");
    let strategy = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref());
    match strategy.and_then(|s| s.type_.as_deref()) {
        Some("OnDelete") => {
            return MaxPods {
                count: nodes,
                warnings,
                explanation: format!("{base_text} (OnDelete: no surge)"),
            };
        }
        None | Some("RollingUpdate") => {}
        Some(other) => warnings.push(format!(
            "DaemonSet update strategy type {other:?} is not RollingUpdate or OnDelete; counted it as RollingUpdate"
        )),
    }
    let max_surge = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_surge.as_ref());
    let (extra, surge_text) = surge(
        max_surge,
        nodes,
        0,
        "spec.updateStrategy.rollingUpdate.maxSurge",
        &mut warnings,
    );
    MaxPods {
        count: nodes.saturating_add(extra),
        warnings,
        explanation: format!("{base_text} + {surge_text}"),
    }
}

/// Pods of one Job at once: `parallelism` (default 1), capped by
/// `completions` when set.
fn job_pods(spec: Option<&JobSpec>) -> (u32, String) {
    let parallelism = spec.and_then(|s| s.parallelism);
    let parallelism_text = match parallelism {
        None => "parallelism 1 (default)".to_owned(),
        Some(_) => format!("parallelism {}", count_of(parallelism, 1)),
    };
    let parallelism = count_of(parallelism, 1);
    match spec.and_then(|s| s.completions) {
        None => (parallelism, parallelism_text),
        Some(completions) => {
            let completions = count_of(Some(completions), 0);
            (
                parallelism.min(completions),
                format!("min({parallelism_text}, completions {completions})"),
            )
        }
    }
}

/// A Job: `parallelism` (default 1), capped by `completions` when set.
pub fn job(job: &Job) -> MaxPods {
    let (count, explanation) = job_pods(job.spec.as_ref());
    MaxPods {
        count,
        warnings: Vec::new(),
        explanation,
    }
}

/// A CronJob: the pods of one Job (see [`job`]) times the Jobs that can run at
/// once. `Forbid` and `Replace` allow one; `Allow` (the Kubernetes default)
/// allows any number, so the count comes from the CronJob's
/// [`MAX_CONCURRENT_JOBS_ANNOTATION`], else 1 with a warning.
///
/// `Replace` is counted as one Job although the replaced Job's pods may still
/// be shutting down when the new one starts.
pub fn cron_job(cron_job: &CronJob) -> MaxPods {
    let mut warnings = Vec::new();
    let spec = cron_job.spec.as_ref();
    let (per_job, job_text) = job_pods(spec.and_then(|s| s.job_template.spec.as_ref()));
    let policy = spec
        .and_then(|s| s.concurrency_policy.as_deref())
        .unwrap_or("Allow");
    let (jobs, jobs_text) = match policy {
        "Forbid" | "Replace" => (1, format!("concurrent jobs 1 (concurrencyPolicy {policy})")),
        other => {
            if other != "Allow" {
                warnings.push(format!(
                    "concurrencyPolicy {other:?} is not Allow, Forbid or Replace; counted it as Allow"
                ));
            }
            let annotation = cron_job
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MAX_CONCURRENT_JOBS_ANNOTATION));
            match annotation.map(|value| (value, parse_at_least_one(value))) {
                Some((_, Some(n))) => (
                    n,
                    format!("concurrent jobs {n} ({MAX_CONCURRENT_JOBS_ANNOTATION})"),
                ),
                Some((value, None)) => {
                    warnings.push(format!(
                        "annotation {MAX_CONCURRENT_JOBS_ANNOTATION} is {value:?}, not a whole number of at least 1; counted 1 Job at a time"
                    ));
                    (1, "concurrent jobs 1 (annotation invalid)".to_owned())
                }
                None => {
                    warnings.push(format!(
                        "concurrencyPolicy Allow lets runs overlap and nothing says how many; counted 1 Job at a time. Set the annotation {MAX_CONCURRENT_JOBS_ANNOTATION} on the CronJob to the most runs that can overlap, or use concurrencyPolicy Forbid"
                    ));
                    (
                        1,
                        "concurrent jobs 1 (concurrencyPolicy Allow, assumed)".to_owned(),
                    )
                }
            }
        }
    };
    MaxPods {
        count: per_job.saturating_mul(jobs),
        warnings,
        explanation: format!("{job_text} × {jobs_text}"),
    }
}

/// A decimal number of at least 1, digits only.
fn parse_at_least_one(value: &str) -> Option<u32> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n >= 1)
}

/// A Knative Service (Cloud Run v1 YAML), from its revision template's
/// annotations: `autoscaling.knative.dev/maxScale` (or `max-scale`). Absent,
/// `0` (unlimited) or invalid counts Cloud Run's default of 100 instances,
/// with a warning asking for a `maxScale`. When both spellings are present the
/// larger counts.
///
/// During a traffic migration the old revision's instances may still run
/// beside the new one's; they are not counted.
pub fn knative_service(template_annotations: &BTreeMap<String, String>) -> MaxPods {
    let mut warnings = Vec::new();
    let mut found: Vec<(&str, u32)> = Vec::new();
    for key in [
        KNATIVE_MAX_SCALE_ANNOTATION,
        KNATIVE_MAX_SCALE_ANNOTATION_KEBAB,
    ] {
        let Some(value) = template_annotations.get(key) else {
            continue;
        };
        let digits = value.trim();
        let parsed = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse::<u32>().ok()
        } else {
            None
        };
        match parsed {
            Some(0) => warnings.push(format!(
                "{key} is 0, which means no limit; counted Cloud Run's default of {CLOUD_RUN_DEFAULT_MAX_INSTANCES} instances. Set {KNATIVE_MAX_SCALE_ANNOTATION} on the revision template to the real limit"
            )),
            Some(n) => found.push((key, n)),
            None => warnings.push(format!(
                "{key} is {value:?}, not a whole number; counted Cloud Run's default of {CLOUD_RUN_DEFAULT_MAX_INSTANCES} instances"
            )),
        }
    }
    if let [(first, a), (second, b)] = found.as_slice()
        && a != b
    {
        warnings.push(format!(
            "both {first} ({a}) and {second} ({b}) are set; counted the larger. Keep only one"
        ));
    }
    match found.iter().max_by_key(|(_, n)| *n) {
        Some((key, n)) => MaxPods {
            count: *n,
            warnings,
            explanation: format!("{key} {n}"),
        },
        None => {
            if warnings.is_empty() {
                warnings.push(format!(
                    "no {KNATIVE_MAX_SCALE_ANNOTATION} on the revision template; counted Cloud Run's default of {CLOUD_RUN_DEFAULT_MAX_INSTANCES} instances. Set it to the real limit"
                ));
            }
            MaxPods {
                count: CLOUD_RUN_DEFAULT_MAX_INSTANCES,
                warnings,
                explanation: format!(
                    "Cloud Run default max instances {CLOUD_RUN_DEFAULT_MAX_INSTANCES}"
                ),
            }
        }
    }
}

/// A bare Pod: one.
pub fn pod() -> MaxPods {
    MaxPods {
        count: 1,
        warnings: Vec::new(),
        explanation: "a single Pod".to_owned(),
    }
}

/// Whether `hpa` scales the workload of kind `kind` (for example
/// `Deployment`) named `name`. Only kind and name are compared: pass HPAs from
/// the workload's own namespace.
pub fn hpa_targets(hpa: &HorizontalPodAutoscaler, kind: &str, name: &str) -> bool {
    hpa.spec
        .as_ref()
        .is_some_and(|s| s.scale_target_ref.kind == kind && s.scale_target_ref.name == name)
}

/// The HPA's `maxReplicas`; `None` when it has no spec.
pub fn hpa_max_replicas(hpa: &HorizontalPodAutoscaler) -> Option<i32> {
    hpa.spec.as_ref().map(|s| s.max_replicas)
}

/// The largest `maxReplicas` among the HPAs that target the workload of kind
/// `kind` named `name`; `None` when none does. (Two HPAs on one workload fight
/// each other; the larger bound is the safe one to count.)
pub fn hpa_max_replicas_for<'a>(
    hpas: impl IntoIterator<Item = &'a HorizontalPodAutoscaler>,
    kind: &str,
    name: &str,
) -> Option<i32> {
    hpas.into_iter()
        .filter(|hpa| hpa_targets(hpa, kind, name))
        .filter_map(hpa_max_replicas)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("test fixture deserializes")
    }

    fn deploy(spec: serde_json::Value) -> Deployment {
        from_json(
            json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "web" }, "spec": spec }),
        )
    }

    fn selector() -> serde_json::Value {
        json!({ "matchLabels": { "app": "web" } })
    }

    fn template() -> serde_json::Value {
        json!({ "spec": { "containers": [{ "name": "app", "image": "app" }] } })
    }

    fn deploy_with_surge(replicas: i32, max_surge: serde_json::Value) -> Deployment {
        deploy(json!({
            "replicas": replicas,
            "selector": selector(),
            "template": template(),
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": max_surge } }
        }))
    }

    #[test]
    fn deployment_defaults_to_one_replica_and_25_percent_surge() {
        let pods = deployment(
            &deploy(json!({ "selector": selector(), "template": template() })),
            None,
        );
        assert_eq!(pods.count, 2);
        assert_eq!(pods.explanation, "replicas 1 + maxSurge 1 (default 25%)");
        assert!(pods.warnings.is_empty());
    }

    #[test]
    fn three_replicas_with_default_surge_is_four() {
        let pods = deployment(
            &deploy(json!({ "replicas": 3, "selector": selector(), "template": template() })),
            None,
        );
        assert_eq!(pods.count, 4);
        assert_eq!(pods.explanation, "replicas 3 + maxSurge 1 (default 25%)");
    }

    #[test]
    fn hpa_max_ten_with_default_surge_is_thirteen() {
        let pods = deployment(
            &deploy(json!({ "replicas": 2, "selector": selector(), "template": template() })),
            Some(10),
        );
        assert_eq!(pods.count, 13);
        assert_eq!(
            pods.explanation,
            "HPA maxReplicas 10 + maxSurge 3 (default 25%)"
        );
    }

    #[test]
    fn replicas_above_hpa_max_are_counted_with_a_warning() {
        let pods = deployment(
            &deploy(json!({ "replicas": 12, "selector": selector(), "template": template() })),
            Some(10),
        );
        assert_eq!(pods.count, 15);
        assert_eq!(pods.warnings.len(), 1);
    }

    #[test]
    fn integer_surge_is_added_as_is() {
        let pods = deployment(&deploy_with_surge(3, json!(2)), None);
        assert_eq!(pods.count, 5);
        assert_eq!(pods.explanation, "replicas 3 + maxSurge 2");
    }

    #[test]
    fn percent_surge_rounds_up() {
        let pods = deployment(&deploy_with_surge(3, json!("50%")), None);
        assert_eq!(pods.count, 5);
        assert_eq!(pods.explanation, "replicas 3 + maxSurge 2 (50%)");
    }

    #[test]
    fn zero_surge_adds_nothing() {
        assert_eq!(deployment(&deploy_with_surge(4, json!(0)), None).count, 4);
        assert_eq!(
            deployment(&deploy_with_surge(4, json!("0%")), None).count,
            4
        );
    }

    #[test]
    fn malformed_percent_surge_warns_and_counts_the_default() {
        for bad in ["lots", "25", "%", "-5%"] {
            let pods = deployment(&deploy_with_surge(8, json!(bad)), None);
            assert_eq!(pods.count, 10, "{bad}");
            assert_eq!(pods.warnings.len(), 1, "{bad}");
            assert!(pods.warnings[0].contains("maxSurge"), "{bad}");
        }
    }

    #[test]
    fn recreate_deployment_does_not_surge() {
        let pods = deployment(
            &deploy(json!({
                "replicas": 3, "selector": selector(), "template": template(),
                "strategy": { "type": "Recreate" }
            })),
            Some(6),
        );
        assert_eq!(pods.count, 6);
        assert_eq!(pods.explanation, "HPA maxReplicas 6 (Recreate: no surge)");
    }

    #[test]
    fn negative_counts_are_clamped_to_zero() {
        let pods = deployment(&deploy_with_surge(-3, json!(-2)), None);
        assert_eq!(pods.count, 0);
        let pods = deployment(&deploy_with_surge(3, json!(1)), Some(-1));
        assert_eq!(pods.count, 4, "replicas above a negative HPA max are kept");
    }

    #[test]
    fn huge_counts_saturate() {
        let pods = deployment(&deploy_with_surge(i32::MAX, json!("1000%")), None);
        assert_eq!(pods.count, u32::MAX);
    }

    #[test]
    fn deployment_without_spec_counts_defaults() {
        let pods = deployment(&Deployment::default(), None);
        assert_eq!(pods.count, 2);
    }

    fn sts(replicas: Option<i32>) -> StatefulSet {
        let mut spec =
            json!({ "selector": selector(), "template": template(), "serviceName": "db" });
        if let Some(replicas) = replicas {
            spec["replicas"] = json!(replicas);
        }
        from_json(json!({ "metadata": { "name": "db" }, "spec": spec }))
    }

    #[test]
    fn stateful_set_counts_replicas_without_surge() {
        assert_eq!(stateful_set(&sts(Some(3)), None).count, 3);
        assert_eq!(stateful_set(&sts(Some(3)), None).explanation, "replicas 3");
    }

    #[test]
    fn stateful_set_defaults_to_one_replica() {
        assert_eq!(stateful_set(&sts(None), None).count, 1);
    }

    #[test]
    fn stateful_set_scaled_by_hpa_counts_max_replicas() {
        let pods = stateful_set(&sts(Some(2)), Some(7));
        assert_eq!(pods.count, 7);
        assert_eq!(pods.explanation, "HPA maxReplicas 7");
    }

    fn rs(replicas: Option<i32>) -> ReplicaSet {
        let mut spec = json!({ "selector": selector(), "template": template() });
        if let Some(replicas) = replicas {
            spec["replicas"] = json!(replicas);
        }
        from_json(json!({ "metadata": { "name": "web-abc" }, "spec": spec }))
    }

    #[test]
    fn replica_set_counts_replicas_or_hpa_max() {
        assert_eq!(replica_set(&rs(Some(4)), None).count, 4);
        assert_eq!(replica_set(&rs(None), None).count, 1);
        assert_eq!(replica_set(&rs(Some(4)), Some(9)).count, 9);
    }

    fn ds(update_strategy: serde_json::Value) -> DaemonSet {
        from_json(json!({
            "metadata": { "name": "agent" },
            "spec": { "selector": selector(), "template": template(), "updateStrategy": update_strategy }
        }))
    }

    #[test]
    fn daemon_set_counts_nodes_with_no_default_surge() {
        let pods = daemon_set(&ds(json!({ "type": "RollingUpdate" })), 5);
        assert_eq!(pods.count, 5);
        assert!(
            pods.explanation.starts_with("nodes 5 ("),
            "{}",
            pods.explanation
        );
        assert!(
            pods.explanation.contains("not evaluated"),
            "{}",
            pods.explanation
        );
        assert!(
            pods.explanation.ends_with("+ maxSurge 0 (default)"),
            "{}",
            pods.explanation
        );
    }

    #[test]
    fn daemon_set_percent_surge_rounds_up_over_nodes() {
        let pods = daemon_set(
            &ds(
                json!({ "type": "RollingUpdate", "rollingUpdate": { "maxSurge": "10%", "maxUnavailable": 0 } }),
            ),
            11,
        );
        assert_eq!(pods.count, 13);
    }

    #[test]
    fn daemon_set_integer_surge_is_added() {
        let pods = daemon_set(
            &ds(json!({ "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 } })),
            3,
        );
        assert_eq!(pods.count, 4);
    }

    #[test]
    fn on_delete_daemon_set_does_not_surge() {
        let pods = daemon_set(
            &ds(json!({ "type": "OnDelete", "rollingUpdate": { "maxSurge": 2 } })),
            3,
        );
        assert_eq!(pods.count, 3);
    }

    fn job_of(spec: serde_json::Value) -> Job {
        let mut spec = spec;
        spec["template"] = template();
        from_json(json!({ "metadata": { "name": "migrate" }, "spec": spec }))
    }

    #[test]
    fn job_defaults_to_one_pod() {
        let pods = job(&job_of(json!({})));
        assert_eq!(pods.count, 1);
        assert_eq!(pods.explanation, "parallelism 1 (default)");
    }

    #[test]
    fn job_counts_parallelism() {
        assert_eq!(job(&job_of(json!({ "parallelism": 4 }))).count, 4);
    }

    #[test]
    fn job_parallelism_is_capped_by_completions() {
        let pods = job(&job_of(json!({ "parallelism": 4, "completions": 2 })));
        assert_eq!(pods.count, 2);
        assert_eq!(pods.explanation, "min(parallelism 4, completions 2)");
        assert_eq!(
            job(&job_of(json!({ "parallelism": 2, "completions": 10 }))).count,
            2
        );
    }

    fn cron(policy: Option<&str>, annotation: Option<&str>, parallelism: i32) -> CronJob {
        let mut value = json!({
            "metadata": { "name": "nightly" },
            "spec": {
                "schedule": "0 3 * * *",
                "jobTemplate": { "spec": { "parallelism": parallelism, "template": template() } }
            }
        });
        if let Some(policy) = policy {
            value["spec"]["concurrencyPolicy"] = json!(policy);
        }
        if let Some(annotation) = annotation {
            value["metadata"]["annotations"] =
                json!({ MAX_CONCURRENT_JOBS_ANNOTATION: annotation });
        }
        from_json(value)
    }

    #[test]
    fn cron_job_with_forbid_runs_one_job() {
        let pods = cron_job(&cron(Some("Forbid"), Some("5"), 3));
        assert_eq!(pods.count, 3);
        assert!(pods.warnings.is_empty());
        assert_eq!(
            pods.explanation,
            "parallelism 3 × concurrent jobs 1 (concurrencyPolicy Forbid)"
        );
    }

    #[test]
    fn cron_job_with_replace_runs_one_job() {
        assert_eq!(cron_job(&cron(Some("Replace"), None, 2)).count, 2);
    }

    #[test]
    fn cron_job_allowing_overlap_uses_the_annotation() {
        let pods = cron_job(&cron(Some("Allow"), Some("3"), 2));
        assert_eq!(pods.count, 6);
        assert!(pods.warnings.is_empty());
    }

    #[test]
    fn cron_job_defaults_to_allow_and_warns_to_set_the_annotation() {
        let pods = cron_job(&cron(None, None, 2));
        assert_eq!(pods.count, 2);
        assert_eq!(pods.warnings.len(), 1);
        assert!(pods.warnings[0].contains(MAX_CONCURRENT_JOBS_ANNOTATION));
    }

    #[test]
    fn cron_job_with_invalid_annotation_warns_and_counts_one_job() {
        for bad in ["0", "many", "-2", ""] {
            let pods = cron_job(&cron(Some("Allow"), Some(bad), 2));
            assert_eq!(pods.count, 2, "{bad:?}");
            assert_eq!(pods.warnings.len(), 1, "{bad:?}");
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn knative_service_counts_max_scale() {
        let pods = knative_service(&annotations(&[(KNATIVE_MAX_SCALE_ANNOTATION, "10")]));
        assert_eq!(pods.count, 10);
        assert!(pods.warnings.is_empty());
        assert_eq!(pods.explanation, "autoscaling.knative.dev/maxScale 10");
    }

    #[test]
    fn knative_service_accepts_kebab_case_max_scale() {
        let pods = knative_service(&annotations(&[(KNATIVE_MAX_SCALE_ANNOTATION_KEBAB, "7")]));
        assert_eq!(pods.count, 7);
    }

    #[test]
    fn knative_service_with_both_spellings_counts_the_larger() {
        let pods = knative_service(&annotations(&[
            (KNATIVE_MAX_SCALE_ANNOTATION, "5"),
            (KNATIVE_MAX_SCALE_ANNOTATION_KEBAB, "8"),
        ]));
        assert_eq!(pods.count, 8);
        assert_eq!(pods.warnings.len(), 1);
    }

    #[test]
    fn knative_service_without_max_scale_counts_cloud_run_default_with_a_warning() {
        let pods = knative_service(&BTreeMap::new());
        assert_eq!(pods.count, 100);
        assert_eq!(pods.warnings.len(), 1);
    }

    #[test]
    fn knative_service_with_zero_or_invalid_max_scale_counts_the_default() {
        for bad in ["0", "ten", "-1", ""] {
            let pods = knative_service(&annotations(&[(KNATIVE_MAX_SCALE_ANNOTATION, bad)]));
            assert_eq!(pods.count, 100, "{bad:?}");
            assert_eq!(pods.warnings.len(), 1, "{bad:?}");
        }
    }

    #[test]
    fn a_pod_is_one() {
        assert_eq!(pod().count, 1);
    }

    fn hpa(kind: &str, name: &str, max: i32) -> HorizontalPodAutoscaler {
        from_json(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": { "name": name },
            "spec": {
                "scaleTargetRef": { "apiVersion": "apps/v1", "kind": kind, "name": name },
                "maxReplicas": max
            }
        }))
    }

    #[test]
    fn hpa_targets_matches_kind_and_name() {
        let web = hpa("Deployment", "web", 10);
        assert!(hpa_targets(&web, "Deployment", "web"));
        assert!(!hpa_targets(&web, "StatefulSet", "web"));
        assert!(!hpa_targets(&web, "Deployment", "api"));
        assert!(!hpa_targets(
            &HorizontalPodAutoscaler::default(),
            "Deployment",
            "web"
        ));
        assert_eq!(hpa_max_replicas(&web), Some(10));
    }

    #[test]
    fn largest_max_replicas_among_targeting_hpas_counts() {
        let hpas = [
            hpa("Deployment", "web", 10),
            hpa("Deployment", "web", 4),
            hpa("Deployment", "api", 50),
        ];
        assert_eq!(hpa_max_replicas_for(&hpas, "Deployment", "web"), Some(10));
        assert_eq!(hpa_max_replicas_for(&hpas, "Deployment", "jobs"), None);
    }
}
