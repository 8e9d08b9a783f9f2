//! The objects the benchmarks create, and creating many of them quickly.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

/// The Cloud SQL connection name every instance of the bench points at.
pub const CONNECTION_NAME: &str = "bench-project:us-central1:bench-db";
/// The CloudSqlInstance every binding of the bench uses.
pub const INSTANCE: &str = "bench-db";
/// `spec.pool` of every binding: what each asks for per pod.
pub const MAX_PER_POD: u32 = 10;
pub const MIN_PER_POD: u32 = 2;
/// `spec.capacity.reservedConnections` of the instance.
pub const RESERVED: u32 = 6;

pub fn deployments() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apps", "v1", "Deployment"),
        "deployments",
    )
}
pub fn pods() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods")
}
pub fn bindings() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", "CloudSqlBinding"),
        "cloudsqlbindings",
    )
}
pub fn instances() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", "CloudSqlInstance"),
        "cloudsqlinstances",
    )
}
pub fn auth_proxy_workloads() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cloudsql.cloud.google.com", "v1", "AuthProxyWorkload"),
        "authproxyworkloads",
    )
}

/// How the bench's Deployments are shaped.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeploymentShape {
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.paused`: a paused Deployment gets no ReplicaSet and no Pods from
    /// kube-controller-manager, whatever its replicas.
    pub paused: bool,
}

/// Name of the `i`th workload of a scenario.
pub fn workload_name(i: usize) -> String {
    format!("app-{i:05}")
}

/// A Deployment with one app container, labelled `app=<name>` and `group`.
pub fn deployment(name: &str, group: &str, shape: DeploymentShape) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": { "app": name, "bench-group": group } },
        "spec": {
            "replicas": shape.replicas,
            "paused": shape.paused,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name, "bench-group": group } },
                "spec": {
                    "containers": [{
                        "name": "app",
                        "image": "registry.example/bench/app:1.0.0",
                        "ports": [{ "containerPort": 8080 }],
                        "env": [{ "name": "LOG_LEVEL", "value": "info" }],
                    }],
                },
            },
        },
    })
}

/// A bare Pod (no owner), labelled `app=<app>`.
pub fn pod(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": {
            "containers": [{ "name": "app", "image": "registry.example/bench/app:1.0.0" }],
        },
    })
}

/// The CloudSqlInstance, with its capacity given by the spec (no Admin API).
pub fn instance(max_connections: u32) -> Value {
    json!({
        "apiVersion": "cloudsql.dev/v1alpha1",
        "kind": "CloudSqlInstance",
        "metadata": { "name": INSTANCE },
        "spec": {
            "connectionName": CONNECTION_NAME,
            "databaseVersion": "POSTGRES_16",
            "capacity": { "maxConnections": max_connections, "reservedConnections": RESERVED },
            "discovery": "None",
        },
    })
}

fn binding(name: &str, workload: Value) -> Value {
    json!({
        "apiVersion": "cloudsql.dev/v1alpha1",
        "kind": "CloudSqlBinding",
        "metadata": { "name": name },
        "spec": {
            "instanceRef": { "name": INSTANCE },
            "workloads": [workload],
            "database": { "name": "app", "user": "app" },
            "pool": { "maxPerPod": MAX_PER_POD, "minPerPod": MIN_PER_POD },
        },
    })
}

/// A CloudSqlBinding of one workload of `kind`, by name.
pub fn binding_by_name(name: &str, kind: &str, workload: &str) -> Value {
    binding(name, json!({ "kind": kind, "name": workload }))
}

/// A CloudSqlBinding of every workload of `kind` labelled `key=value`.
pub fn binding_by_selector(name: &str, kind: &str, key: &str, value: &str) -> Value {
    binding(
        name,
        json!({ "kind": kind, "selector": { "matchLabels": { key: value } } }),
    )
}

fn auth_proxy_workload(name: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "cloudsql.cloud.google.com/v1",
        "kind": "AuthProxyWorkload",
        "metadata": { "name": name },
        "spec": {
            "workloadSelector": selector,
            "instances": [{
                "connectionString": CONNECTION_NAME,
                "unixSocketPath": format!("/cloudsql/{CONNECTION_NAME}"),
                "unixSocketPathEnvName": "INSTANCE_UNIX_SOCKET",
            }],
        },
    })
}

/// Google's AuthProxyWorkload for one workload, by name.
pub fn apw_by_name(name: &str, kind: &str, workload: &str) -> Value {
    auth_proxy_workload(name, json!({ "kind": kind, "name": workload }))
}

/// Google's AuthProxyWorkload for every workload labelled `key=value`.
pub fn apw_by_selector(name: &str, kind: &str, key: &str, value: &str) -> Value {
    auth_proxy_workload(
        name,
        json!({ "kind": kind, "selector": { "matchLabels": { key: value } } }),
    )
}

/// When a burst of creations started and when its last one returned.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    pub first_sent: Instant,
    pub last_done: Instant,
}

impl Burst {
    pub fn seconds(&self) -> f64 {
        (self.last_done - self.first_sent).as_secs_f64()
    }
}

fn retryable(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

/// Creates `objects` of resource `ar` (in `ns`, or cluster-wide when `None`)
/// with up to `concurrency` requests in flight; an object that already
/// exists counts as created. Returns the created objects (in no order).
pub async fn create_all(
    client: &kube::Client,
    ar: &ApiResource,
    ns: Option<&str>,
    objects: Vec<Value>,
    concurrency: usize,
) -> anyhow::Result<(Burst, Vec<DynamicObject>)> {
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let first_sent = Instant::now();
    let results: Vec<anyhow::Result<Option<DynamicObject>>> = futures::stream::iter(objects)
        .map(|value| {
            let api = api.clone();
            async move {
                let object: DynamicObject =
                    serde_json::from_value(value).context("building an object")?;
                let name = object.metadata.name.clone().unwrap_or_default();
                let created = (|| async { api.create(&PostParams::default(), &object).await })
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(50))
                            .with_max_times(6),
                    )
                    .when(retryable)
                    .await;
                match created {
                    Ok(o) => Ok(Some(o)),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
                    Err(err) => Err(err).context(format!("creating {} {name}", ar.kind)),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let last_done = Instant::now();
    let mut created = Vec::with_capacity(results.len());
    for r in results {
        if let Some(o) = r? {
            created.push(o);
        }
    }
    Ok((
        Burst {
            first_sent,
            last_done,
        },
        created,
    ))
}
