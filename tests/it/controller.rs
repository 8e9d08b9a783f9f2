//! The controller on a real cluster: bound workloads stay injected, and the
//! story is told through status, conditions and Events.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Event, Pod, PodSpec};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::{self, Operator, TestNamespace, eventually};

const USER: &str = "kubectl-user";

fn ar(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", kind))
}

/// A CloudSqlInstance named after the test namespace; deleted when dropped.
struct TestInstance {
    name: String,
}

impl TestInstance {
    async fn create(ns: &TestNamespace, spec: Value) -> TestInstance {
        let name = format!("{}-db", ns.name);
        let api: Api<DynamicObject> = Api::all_with(ns.client.clone(), &ar("CloudSqlInstance"));
        let obj = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
                         "metadata": {"name": name}, "spec": spec});
        api.patch(&name, &PatchParams::apply(USER), &Patch::Apply(&obj))
            .await
            .expect("creating the instance");
        TestInstance { name }
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let _ = crate::support::kubectl(
            &[
                "delete",
                "cloudsqlinstance",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
    }
}

fn basic_instance_spec() -> Value {
    json!({"connectionName": "my-project:us-central1:orders", "databaseVersion": "POSTGRES_16",
           "capacity": {"maxConnections": 100, "reservedConnections": 0}, "discovery": "None"})
}

async fn apply_binding(ns: &TestNamespace, name: &str, spec: Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    let obj = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                     "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(USER), &Patch::Apply(&obj))
        .await
        .expect("applying the binding");
}

async fn binding(ns: &TestNamespace, name: &str) -> Option<Value> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    api.get_opt(name)
        .await
        .expect("reading the binding")
        .map(|o| serde_json::to_value(o).expect("json"))
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn wait_for_condition(
    ns: &TestNamespace,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(b) = binding(ns, name).await {
            if let Some(c) = condition(&b, type_)
                && c["status"] == status
                && reason.is_none_or(|r| c["reason"] == r)
                && b["status"]["observedGeneration"] == b["metadata"]["generation"]
            {
                return b;
            }
            last = b["status"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "binding {name} never reached {type_}={status} {reason:?}; last status: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn deployment(name: &str, labels: Value, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": "app", "image": "example.com/app:1",
                                    "env": [{"name": "USER_SETTING", "value": "mine"}],
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            }
        }
    })
}

async fn apply_as_user<K>(api: &Api<K>, name: &str, obj: &Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply(USER), &Patch::Apply(obj))
        .await
        .expect("applying as the user");
}

/// Waits (30 s at most) until Deployment `name` passes `check`.
async fn wait_for_deployment(
    deployments: &Api<Deployment>,
    name: &str,
    what: &str,
    check: fn(&Deployment) -> bool,
) {
    eventually(Duration::from_secs(30), what, || {
        let deployments = deployments.clone();
        async move { deployments.get(name).await.is_ok_and(|d| check(&d)) }
    })
    .await;
}

fn template_spec(d: &Deployment) -> PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("a pod template")
}

fn config_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("cloudsql.dev/config-hash").cloned())
}

fn env_value(spec: &PodSpec, container: &str, name: &str) -> Option<String> {
    spec.containers
        .iter()
        .find(|c| c.name == container)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn has_proxy(spec: &PodSpec) -> bool {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .any(|c| c.name.starts_with("cloud-sql-proxy"))
}

fn proxy_binding_spec(instance: &str, workloads: Value) -> Value {
    json!({"instanceRef": {"name": instance}, "workloads": workloads,
           "database": {"name": "orders", "user": "orders-app"},
           "pool": {"maxPerPod": 5, "minPerPod": 1}})
}

#[tokio::test]
async fn a_bound_deployment_is_injected_and_its_new_pods_carry_the_proxy() {
    let ns = TestNamespace::new("ctl-basic", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    // Recreate: with no kubelet no pod ever becomes available, so a rolling
    // update would stop after its first surge pod.
    let mut manifest = deployment("orders-api", json!({}), 2);
    manifest["spec"]["strategy"] = json!({"type": "Recreate"});
    apply_as_user(&deployments, "orders-api", &manifest).await;
    apply_binding(
        &ns,
        "orders-api",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "name": "orders-api"}]),
        ),
    )
    .await;

    let b = wait_for_condition(&ns, "orders-api", "Ready", "True", Some("Bound")).await;
    assert_eq!(b["status"]["workloads"][0]["kind"], "Deployment");
    assert_eq!(b["status"]["workloads"][0]["name"], "orders-api");
    assert_eq!(b["status"]["workloads"][0]["injected"], true);
    assert_eq!(b["status"]["workloadsSummary"], "1/1");
    assert_eq!(b["status"]["pool"]["grantedPerPod"], 5);
    assert_eq!(b["status"]["pool"]["summary"], "5/5");

    let d = deployments.get("orders-api").await.expect("get");
    let spec = template_spec(&d);
    assert!(has_proxy(&spec), "the template carries the proxy");
    assert_eq!(
        env_value(&spec, "app", "INSTANCE_UNIX_SOCKET").as_deref(),
        Some("/cloudsql/my-project:us-central1:orders")
    );
    assert_eq!(
        env_value(&spec, "app", "DB_POOL_MAX_CONNS").as_deref(),
        Some("5")
    );
    assert_eq!(
        env_value(&spec, "app", "USER_SETTING").as_deref(),
        Some("mine")
    );
    assert_eq!(
        b["status"]["workloads"][0]["configHash"].as_str(),
        config_hash(&d).as_deref()
    );

    // kube-controller-manager rolls the Deployment: the new pods carry the injection.
    let pods = ns.api::<Pod>();
    eventually(
        Duration::from_secs(60),
        "2 pods with the proxy and the env",
        || {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default().labels("app=orders-api"))
                    .await
                    .is_ok_and(|l| {
                        l.items
                            .iter()
                            .filter(|p| p.metadata.deletion_timestamp.is_none())
                            .filter(|p| {
                                p.spec.as_ref().is_some_and(|s| {
                                    has_proxy(s)
                                        && env_value(s, "app", "DB_POOL_MAX_CONNS").as_deref()
                                            == Some("5")
                                })
                            })
                            .count()
                            >= 2
                    })
            }
        },
    )
    .await;

    // Events on the binding and on the workload.
    let events = ns.api::<Event>();
    eventually(
        Duration::from_secs(30),
        "an Injected event on the Deployment",
        || {
            let events = events.clone();
            async move {
                events.list(&ListParams::default()).await.is_ok_and(|l| {
                    l.items.iter().any(|e| {
                        e.reason.as_deref() == Some("Injected")
                            && e.involved_object.kind.as_deref() == Some("Deployment")
                    })
                })
            }
        },
    )
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn a_selector_binding_follows_labels_and_deleting_it_restores_the_users_template() {
    let ns = TestNamespace::new("ctl-selector", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    apply_binding(
        &ns,
        "by-label",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "selector": {"matchLabels": {"db": "orders"}}}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "by-label", "Ready", "False", Some("NoWorkloads")).await;

    // A matching Deployment created later is injected.
    let deployments = ns.api::<Deployment>();
    let original = deployment("late", json!({"db": "orders"}), 1);
    apply_as_user(&deployments, "late", &original).await;
    let before = {
        let d: Deployment = serde_json::from_value(original.clone()).expect("a deployment");
        template_spec(&d)
    };
    wait_for_deployment(
        &deployments,
        "late",
        "the later Deployment to be injected",
        |d| has_proxy(&template_spec(d)),
    )
    .await;
    wait_for_condition(&ns, "by-label", "Ready", "True", None).await;

    // Relabelled so it no longer matches: the injection goes.
    apply_as_user(
        &deployments,
        "late",
        &deployment("late", json!({"db": "other"}), 1),
    )
    .await;
    wait_for_deployment(
        &deployments,
        "late",
        "the injection to be removed after relabelling",
        |d| !has_proxy(&template_spec(d)) && config_hash(d).is_none(),
    )
    .await;

    // Matches again, then the binding is deleted: everything of ours goes, the
    // user's env and volumes stay exactly as they were, and the binding disappears.
    apply_as_user(&deployments, "late", &original).await;
    wait_for_deployment(&deployments, "late", "the injection to come back", |d| {
        has_proxy(&template_spec(d))
    })
    .await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    api.delete("by-label", &DeleteParams::default())
        .await
        .expect("deleting the binding");
    // No finalizer: the binding goes at once, and its injection is taken out
    // of the workload right after (from what our field manager owns there).
    eventually(Duration::from_secs(30), "the binding to disappear", || {
        let api = api.clone();
        async move { api.get_opt("by-label").await.is_ok_and(|b| b.is_none()) }
    })
    .await;
    wait_for_deployment(
        &deployments,
        "late",
        "the injection to be removed after the binding was deleted",
        |d| !has_proxy(&template_spec(d)) && config_hash(d).is_none(),
    )
    .await;
    let after = deployments.get("late").await.expect("get");
    let spec = template_spec(&after);
    let user_env = |s: &PodSpec| serde_json::to_value(&s.containers[0].env).expect("json");
    assert_eq!(
        user_env(&spec),
        user_env(&before),
        "the user's env is exactly as it was"
    );
    assert_eq!(
        serde_json::to_value(&spec.volumes).expect("json")[0]["name"],
        "data",
        "the user's volume stays"
    );
    assert_eq!(spec.volumes.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        spec.containers[0].volume_mounts.as_ref().map(Vec::len),
        Some(1)
    );
    operator.stop().await;
}

#[tokio::test]
async fn connector_mode_on_a_statefulset_and_a_cronjobs_job_template() {
    let ns = TestNamespace::new("ctl-kinds", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let sts = ns.api::<StatefulSet>();
    apply_as_user(&sts, "worker", &json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "worker"},
        "spec": {"serviceName": "worker", "replicas": 3, "selector": {"matchLabels": {"app": "worker"}},
                 "template": {"metadata": {"labels": {"app": "worker"}},
                              "spec": {"containers": [{"name": "worker", "image": "example.com/w:1"}]}}}
    })).await;
    let cronjobs = ns.api::<CronJob>();
    apply_as_user(
        &cronjobs,
        "nightly",
        &json!({
            "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
            "spec": {"schedule": "0 3 * * *", "concurrencyPolicy": "Forbid",
                     "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                         "containers": [{"name": "report", "image": "example.com/r:1"}]}}}}}
        }),
    )
    .await;
    apply_binding(
        &ns,
        "worker",
        json!({
            "instanceRef": {"name": instance.name}, "mode": "Connector", "network": "Private",
            "workloads": [{"kind": "StatefulSet", "name": "worker"}],
            "database": {"name": "orders", "user": "worker@my-project.iam", "iamAuth": true},
            "pool": {"maxPerPod": 4}
        }),
    )
    .await;
    apply_binding(
        &ns,
        "nightly",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "CronJob", "name": "nightly"}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "worker", "Ready", "True", None).await;
    wait_for_condition(&ns, "nightly", "Ready", "True", None).await;

    let s = sts.get("worker").await.expect("get");
    let spec = s.spec.and_then(|s| s.template.spec).expect("template");
    assert!(!has_proxy(&spec), "connector mode runs no sidecar");
    assert_eq!(
        env_value(&spec, "worker", "INSTANCE_CONNECTION_NAME").as_deref(),
        Some("my-project:us-central1:orders")
    );
    assert_eq!(
        env_value(&spec, "worker", "DB_IAM_USER").as_deref(),
        Some("worker@my-project.iam")
    );
    assert_eq!(
        env_value(&spec, "worker", "PRIVATE_IP").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_value(&spec, "worker", "DB_POOL_MAX_CONNS").as_deref(),
        Some("4")
    );

    let c = cronjobs.get("nightly").await.expect("get");
    let spec = c
        .spec
        .and_then(|s| s.job_template.spec)
        .and_then(|j| j.template.spec)
        .expect("job template");
    assert!(
        has_proxy(&spec),
        "the CronJob's job template carries the proxy"
    );
    assert_eq!(
        env_value(&spec, "report", "DB_NAME").as_deref(),
        Some("orders")
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_knative_service_gets_the_cloud_run_annotation_and_env() {
    let ns = TestNamespace::new("ctl-knative", &[]).await;
    support::install_crds(&ns.client).await;
    support::install_knative_serving_crd().await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let ksvc_ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "serving.knative.dev",
        "v1",
        "Service",
    ));
    let ksvcs: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ksvc_ar);
    let svc = json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"template": {"metadata": {"annotations": {
            "autoscaling.knative.dev/maxScale": "20",
            "run.googleapis.com/cloudsql-instances": "other-project:us-east1:legacy"}},
            "spec": {"containers": [{"image": "example.com/web:1"}]}}}});
    ksvcs
        .patch("web", &PatchParams::apply(USER), &Patch::Apply(&svc))
        .await
        .expect("creating the Knative service");
    apply_binding(
        &ns,
        "web",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Service.serving.knative.dev", "name": "web"}]),
        ),
    )
    .await;
    let b = wait_for_condition(&ns, "web", "Ready", "True", None).await;
    assert_eq!(
        b["status"]["workloads"][0]["maxPods"], 20,
        "maxScale feeds the budget"
    );

    let got = serde_json::to_value(ksvcs.get("web").await.expect("get")).expect("json");
    let template = &got["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["run.googleapis.com/cloudsql-instances"],
        "other-project:us-east1:legacy,my-project:us-central1:orders"
    );
    let env = template["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env");
    assert!(env.iter().any(|e| e["name"] == "INSTANCE_UNIX_SOCKET"
        && e["value"] == "/cloudsql/my-project:us-central1:orders"));
    assert!(
        env.iter()
            .any(|e| e["name"] == "DB_POOL_MAX_CONNS" && e["value"] == "5")
    );
    assert_eq!(
        template["spec"]["containers"].as_array().map(Vec::len),
        Some(1),
        "no sidecar on Cloud Run"
    );
    operator.stop().await;
}

#[tokio::test]
async fn the_later_of_two_colliding_bindings_reports_a_conflict_and_nothing_is_clobbered() {
    let ns = TestNamespace::new("ctl-conflict", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    apply_as_user(&deployments, "api", &deployment("api", json!({}), 1)).await;
    apply_binding(
        &ns,
        "first",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "name": "api"}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "first", "Ready", "True", None).await;
    let mut second = proxy_binding_spec(
        &instance.name,
        json!([{"kind": "Deployment", "name": "api"}]),
    );
    second["database"]["name"] = json!("billing");
    apply_binding(&ns, "second", second).await;
    let b = wait_for_condition(&ns, "second", "Ready", "False", Some("Conflict")).await;
    let message = condition(&b, "Ready").expect("Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("first"),
        "the conflict names the other binding: {message}"
    );
    let spec = template_spec(&deployments.get("api").await.expect("get"));
    assert_eq!(
        env_value(&spec, "app", "DB_NAME").as_deref(),
        Some("orders"),
        "the first binding's value stays"
    );
    wait_for_condition(&ns, "first", "Ready", "True", None).await;
    operator.stop().await;
}

#[tokio::test]
async fn a_namespace_the_instance_does_not_allow_gets_nothing() {
    let ns = TestNamespace::new("ctl-notallowed", &[("team", "billing")]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let mut spec = basic_instance_spec();
    spec["allowedNamespaces"] = json!({"selector": {"matchLabels": {"team": "orders"}}});
    let instance = TestInstance::create(&ns, spec).await;
    let deployments = ns.api::<Deployment>();
    apply_as_user(&deployments, "api", &deployment("api", json!({}), 1)).await;
    apply_binding(
        &ns,
        "api",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "name": "api"}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "api", "Ready", "False", Some("NamespaceNotAllowed")).await;
    let spec = template_spec(&deployments.get("api").await.expect("get"));
    assert!(!has_proxy(&spec));
    assert_eq!(env_value(&spec, "app", "DB_NAME"), None);
    operator.stop().await;
}

#[tokio::test]
async fn deleting_the_instance_reports_it_and_leaves_workloads_as_they_are() {
    let ns = TestNamespace::new("ctl-instance-gone", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    apply_as_user(&deployments, "api", &deployment("api", json!({}), 1)).await;
    apply_binding(
        &ns,
        "api",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "name": "api"}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "api", "Ready", "True", None).await;
    let before = deployments.get("api").await.expect("get");
    let (ok, _, err) = support::kubectl(&["delete", "cloudsqlinstance", &instance.name], None);
    assert!(ok, "{err}");
    wait_for_condition(&ns, "api", "Ready", "False", Some("InstanceNotFound")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = deployments.get("api").await.expect("get");
    assert_eq!(config_hash(&after), config_hash(&before));
    assert_eq!(
        template_spec(&after),
        template_spec(&before),
        "the workload is left exactly as it was"
    );
    operator.stop().await;
}

#[tokio::test]
async fn owner_edits_keep_our_fields_a_restart_changes_nothing_and_idle_means_no_writes() {
    let ns = TestNamespace::new("ctl-idle", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    // The owner uses client-side `kubectl apply`.
    let manifest = serde_json::to_string(&deployment("api", json!({}), 2)).expect("json");
    let (ok, _, err) = support::kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest));
    assert!(ok, "{err}");
    apply_binding(
        &ns,
        "api",
        proxy_binding_spec(
            &instance.name,
            json!([{"kind": "Deployment", "name": "api"}]),
        ),
    )
    .await;
    wait_for_condition(&ns, "api", "Ready", "True", None).await;
    let injected = deployments.get("api").await.expect("get");
    let hash = config_hash(&injected);

    // The owner changes the image and re-applies client-side: our fields stay.
    let mut edited = deployment("api", json!({}), 2);
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("example.com/app:2");
    let manifest = serde_json::to_string(&edited).expect("json");
    let (ok, _, err) = support::kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest));
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deployments.get("api").await.expect("get");
    assert!(has_proxy(&template_spec(&d)));
    assert_eq!(
        env_value(&template_spec(&d), "app", "DB_NAME").as_deref(),
        Some("orders")
    );
    assert_eq!(config_hash(&d), hash);

    // Restart the operator after convergence: nothing changes.
    let replicasets = ns.api::<ReplicaSet>();
    eventually(Duration::from_secs(30), "the rollout's ReplicaSets", || {
        let rs = replicasets.clone();
        async move {
            rs.list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.len() >= 2)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rs_before = replicasets
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .len();
    let before = deployments.get("api").await.expect("get");
    operator.stop().await;
    let operator = Operator::start(&[&ns.name]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = deployments.get("api").await.expect("get");
    assert_eq!(
        template_spec(&after),
        template_spec(&before),
        "no duplicate containers"
    );
    assert_eq!(config_hash(&after), config_hash(&before));
    assert_eq!(
        replicasets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        rs_before,
        "no new ReplicaSet"
    );
    assert_eq!(
        operator.metrics.total_writes(),
        0,
        "a restart after convergence writes nothing"
    );

    // 30 s idle: zero writes.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        operator.metrics.total_writes(),
        0,
        "an idle cluster costs no writes"
    );
    operator.stop().await;
}

/// Upgrading from a version that put the finalizer `cloudsql.dev/cleanup` on
/// every binding: the finalizer is taken out of a live binding, and a binding
/// already being deleted (its namespace, say) gets its injection removed and
/// then goes, instead of being stranded.
#[tokio::test]
async fn the_finalizer_of_older_versions_is_taken_out_on_upgrade() {
    let ns = TestNamespace::new("ctl-legacy-fin", &[]).await;
    support::install_crds(&ns.client).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    apply_as_user(&deployments, "api", &deployment("api", json!({}), 1)).await;
    let bindings: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    for name in ["live", "leaving"] {
        let spec = if name == "leaving" {
            proxy_binding_spec(
                &instance.name,
                json!([{"kind": "Deployment", "name": "api"}]),
            )
        } else {
            proxy_binding_spec(
                &instance.name,
                json!([{"kind": "Deployment", "name": "none"}]),
            )
        };
        let obj = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                         "metadata": {"name": name, "finalizers": ["cloudsql.dev/cleanup"]},
                         "spec": spec});
        // The field manager of the older versions.
        bindings
            .patch(
                name,
                &PatchParams::apply("cloudsql-binder").force(),
                &Patch::Apply(&obj),
            )
            .await
            .expect("a binding as an older version left it");
    }
    // The older version had injected `api` for "leaving": run once to inject, then stop.
    let operator = Operator::start(&[&ns.name]).await;
    wait_for_deployment(&deployments, "api", "the Deployment to be injected", |d| {
        has_proxy(&template_spec(d))
    })
    .await;
    operator.stop().await;
    // Put the finalizer back (the new version took it out) and delete "leaving"
    // while no operator runs: it waits on the finalizer, as under an old version.
    for name in ["live", "leaving"] {
        let patch = json!({"metadata": {"finalizers": ["cloudsql.dev/cleanup"]}});
        bindings
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("the finalizer back");
    }
    bindings
        .delete("leaving", &DeleteParams::default())
        .await
        .expect("deleting the binding");
    assert!(
        binding(&ns, "leaving").await.is_some(),
        "the finalizer holds it while no operator runs"
    );

    let operator = Operator::start(&[&ns.name]).await;
    eventually(
        Duration::from_secs(30),
        "the binding being deleted to go, its injection removed",
        || {
            let (ns, deployments) = (&ns, deployments.clone());
            async move {
                binding(ns, "leaving").await.is_none()
                    && deployments
                        .get("api")
                        .await
                        .is_ok_and(|d| !has_proxy(&template_spec(&d)))
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the live binding to lose the old finalizer",
        || {
            let ns = &ns;
            async move {
                binding(ns, "live").await.is_some_and(|b| {
                    b["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty())
                })
            }
        },
    )
    .await;
    // And the user's template is what the user wrote.
    let d = deployments.get("api").await.expect("the Deployment");
    assert_eq!(
        env_value(&template_spec(&d), "app", "USER_SETTING").as_deref(),
        Some("mine")
    );
    operator.stop().await;
}

/// The record annotation alone is not proof of ownership: a Deployment whose
/// manifest was copied from an injected one (annotations and a container
/// named like our proxy included), with no binding selecting it, is left
/// exactly as its owner wrote it.
#[tokio::test]
async fn a_copied_injection_record_without_our_fields_is_left_alone() {
    let ns = TestNamespace::new("ctl-copied", &[]).await;
    support::install_crds(&ns.client).await;
    let deployments = ns.api::<Deployment>();
    let mut copied = deployment("copied", json!({}), 1);
    copied["spec"]["template"]["metadata"]["annotations"] = json!({
        "cloudsql.dev/injected": "{\"containers\":[\"cloud-sql-proxy\"],\"env\":{\"app\":[\"USER_SETTING\"]},\"volumes\":[\"data\"]}",
        "cloudsql.dev/config-hash": "0123456789abcdef"
    });
    copied["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "cloud-sql-proxy", "image": "example.com/my-own-proxy:1"}));
    apply_as_user(&deployments, "copied", &copied).await;
    let before = deployments.get("copied").await.expect("the Deployment");
    let operator = Operator::start(&[&ns.name]).await;
    // Long enough for the start-up sweep and a few watch events.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = deployments.get("copied").await.expect("the Deployment");
    // (Its status moves with the Deployment controller: compare the rest.)
    assert_eq!(
        before.metadata.generation, after.metadata.generation,
        "the Deployment's spec changed"
    );
    assert_eq!(template_spec(&before), template_spec(&after));
    assert_eq!(
        before
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.clone()),
        after
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.clone())
    );
    let ours: Vec<_> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some("cloudsql-binder"))
        .collect();
    assert!(
        ours.is_empty(),
        "the operator wrote to a Deployment it never injected: {ours:?}"
    );
    operator.stop().await;
}

/// Two bindings on one Deployment; one is deleted: its part goes (no
/// finalizer, so from the workload's own fields), the other's stays.
#[tokio::test]
async fn deleting_one_of_two_bindings_on_a_workload_takes_out_only_its_part() {
    let ns = TestNamespace::new("ctl-shared", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = Operator::start(&[&ns.name]).await;
    let instance = TestInstance::create(&ns, basic_instance_spec()).await;
    let deployments = ns.api::<Deployment>();
    apply_as_user(&deployments, "api", &deployment("api", json!({}), 1)).await;
    let on_api = json!([{"kind": "Deployment", "name": "api"}]);
    apply_binding(
        &ns,
        "proxy",
        proxy_binding_spec(&instance.name, on_api.clone()),
    )
    .await;
    apply_binding(
        &ns,
        "connector",
        json!({"instanceRef": {"name": instance.name}, "workloads": on_api, "mode": "Connector",
               "database": {"name": "reports", "user": "reporter"},
               "env": {"connectionName": "REPORTS_CONN", "database": "REPORTS_DB",
                       "user": "REPORTS_USER", "poolMax": "REPORTS_POOL"},
               "pool": {"maxPerPod": 3, "minPerPod": 1}}),
    )
    .await;
    wait_for_condition(&ns, "proxy", "Ready", "True", None).await;
    wait_for_condition(&ns, "connector", "Ready", "True", None).await;
    wait_for_deployment(&deployments, "api", "both injections", |d| {
        let spec = template_spec(d);
        has_proxy(&spec) && env_value(&spec, "app", "REPORTS_DB").as_deref() == Some("reports")
    })
    .await;

    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    api.delete("proxy", &DeleteParams::default())
        .await
        .expect("deleting the binding");
    wait_for_deployment(
        &deployments,
        "api",
        "the deleted binding's proxy gone, the other's env kept",
        |d| {
            let spec = template_spec(d);
            !has_proxy(&spec)
                && env_value(&spec, "app", "REPORTS_DB").as_deref() == Some("reports")
                && env_value(&spec, "app", "DB_NAME").is_none()
                && env_value(&spec, "app", "USER_SETTING").as_deref() == Some("mine")
        },
    )
    .await;
    operator.stop().await;
}
