//! The admission webhook on a real cluster: the API server calls the operator
//! (in this process) over TLS at https://127.0.0.1:<port>, with the CA the
//! operator made itself. Each test has its own namespace and its own webhook
//! configurations (`cloudsql-binder-<namespace>`, selecting only it).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Event, Pod, PodSpec, Secret};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::{self, AdmissionOperator, TestNamespace, eventually};

const USER: &str = "kubectl-user";
const DAY: Duration = Duration::from_secs(86_400);

fn ar(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", kind))
}

/// A CloudSqlInstance named after the test namespace; deleted when dropped.
struct TestInstance {
    name: String,
}

impl TestInstance {
    async fn create(ns: &TestNamespace, max_connections: i64) -> TestInstance {
        let name = format!("{}-db", ns.name);
        let api: Api<DynamicObject> = Api::all_with(ns.client.clone(), &ar("CloudSqlInstance"));
        let obj = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
            "metadata": {"name": name},
            "spec": {"connectionName": "my-project:us-central1:orders", "databaseVersion": "POSTGRES_16",
                     "capacity": {"maxConnections": max_connections, "reservedConnections": 0},
                     "discovery": "None"}});
        api.patch(&name, &PatchParams::apply(USER), &Patch::Apply(&obj))
            .await
            .expect("creating the instance");
        TestInstance { name }
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let _ = support::kubectl(
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

async fn apply_binding(ns: &TestNamespace, name: &str, instance: &str, extra: Value) {
    let mut spec = json!({"instanceRef": {"name": instance},
        "database": {"name": "orders", "user": "orders-app"},
        "pool": {"maxPerPod": 5, "minPerPod": 1}});
    for (k, v) in extra.as_object().expect("an object") {
        spec[k] = v.clone();
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    let obj = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                     "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(USER), &Patch::Apply(&obj))
        .await
        .expect("applying the binding");
}

/// Waits until binding `name` has condition `type_` with `reason`; returns it.
async fn wait_for_reason(ns: &TestNamespace, name: &str, type_: &str, reason: &str) -> Value {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = Value::Null;
    loop {
        if let Ok(Some(b)) = api.get_opt(name).await {
            let b = serde_json::to_value(b).expect("json");
            let found = b["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
                .cloned();
            if let Some(c) = found
                && c["reason"] == reason
            {
                return c;
            }
            last = b["status"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "binding {name} never reached {type_} reason {reason}; last status: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "app", "image": "example.com/app:1",
                                 "env": [{"name": "MINE", "value": "1"}]}]}}))
    .expect("a pod")
}

fn proxy(spec: &PodSpec) -> Option<&Container> {
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name.starts_with("cloud-sql-proxy"))
}

fn env(spec: &PodSpec, container: &str, name: &str) -> Option<String> {
    spec.containers
        .iter()
        .find(|c| c.name == container)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        proxy(s).is_some() && env(s, "app", "DB_POOL_MAX_CONNS").as_deref() == Some("5")
    })
}

/// Waits until the API server calls the webhook and it injects `probe`
/// (dry-run creations: nothing is stored).
async fn wait_until_injecting(ns: &TestNamespace, probe: &Pod) {
    let pods = ns.api::<Pod>();
    let dry_run = PostParams {
        dry_run: true,
        field_manager: None,
    };
    eventually(
        Duration::from_secs(60),
        "the webhook to inject pods",
        || {
            let pods = pods.clone();
            let dry_run = dry_run.clone();
            async move {
                pods.create(&dry_run, probe)
                    .await
                    .is_ok_and(|p| injected(&p))
            }
        },
    )
    .await;
}

// The API server calls back into this process while kubectl runs: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn bare_pods_and_the_pods_of_a_job_are_injected_at_creation_and_opted_out_pods_are_not() {
    let ns = TestNamespace::new("adm-pods", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 100).await;
    apply_binding(
        &ns,
        "pods",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    apply_binding(
        &ns,
        "migrate",
        &instance.name,
        json!({"workloads": [{"kind": "Job", "name": "migrate"}]}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;

    // A bare Pod.
    let pods = ns.api::<Pod>();
    let created = pods
        .create(
            &PostParams::default(),
            &pod("bare", json!({"db": "orders"})),
        )
        .await
        .expect("creating a bare pod");
    assert!(injected(&created), "the bare pod carries the proxy and env");
    let spec = created.spec.as_ref().expect("a spec");
    assert_eq!(
        env(spec, "app", "INSTANCE_UNIX_SOCKET").as_deref(),
        Some("/cloudsql/my-project:us-central1:orders")
    );
    assert_eq!(env(spec, "app", "MINE").as_deref(), Some("1"));

    // Opted out.
    let created = pods
        .create(
            &PostParams::default(),
            &pod(
                "opted-out",
                json!({"db": "orders", "cloudsql.dev/inject": "false"}),
            ),
        )
        .await
        .expect("creating an opted-out pod");
    assert!(created.spec.as_ref().is_some_and(|s| proxy(s).is_none()));
    assert_eq!(
        created.spec.as_ref().and_then(|s| env(s, "app", "DB_NAME")),
        None
    );

    // A Job: kube-controller-manager's Job controller creates its pod.
    let job: Job = serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "migrate"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "app", "image": "example.com/migrate:1"}]}}}}))
    .expect("a job");
    ns.api::<Job>()
        .create(&PostParams::default(), &job)
        .await
        .expect("creating the job");
    let mut job_pod = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while job_pod.is_none() {
        assert!(Instant::now() < deadline, "the Job never got a pod");
        job_pod = pods
            .list(&ListParams::default().labels("batch.kubernetes.io/job-name=migrate"))
            .await
            .expect("listing the job's pods")
            .items
            .into_iter()
            .next();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job_pod = job_pod.expect("a pod");
    assert!(
        injected(&job_pod),
        "the Job's pod carries the proxy and env"
    );
    // What a Job needs to complete with a sidecar: the proxy is a native
    // sidecar (an init container that restarts Always, which Kubernetes stops
    // once the app containers are done), and the only regular container is
    // the app.
    let spec = job_pod.spec.as_ref().expect("a spec");
    let sidecar = proxy(spec).expect("the proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        spec.containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["app"]
    );
    assert!(
        sidecar
            .args
            .iter()
            .flatten()
            .any(|a| a == "--exit-zero-on-sigterm")
    );

    // The binding of the Job is Ready through admission.
    let ready = wait_for_reason(&ns, "migrate", "Ready", "Bound").await;
    assert_eq!(ready["status"], "True");

    // /metrics tells the story: the Pods injected (the probe, the bare pod,
    // the Job's pod), each answer timed. (The opted-out pod never reaches the
    // webhook: the configuration's objectSelector leaves it out.)
    let text = operator.metrics.encode();
    let patched = cloudsql_binder::telemetry::parse_total(
        &text,
        "cloudsql_binder_admission_requests_total{webhook=\"mutate-pods\",outcome=\"patched\"}",
    );
    assert!(patched >= 3, "patched pods in /metrics:\n{text}");
    let answered =
        cloudsql_binder::telemetry::parse_total(&text, "cloudsql_binder_admission_requests_total");
    let timed = cloudsql_binder::telemetry::parse_total(
        &text,
        "cloudsql_binder_admission_duration_seconds_count",
    );
    assert_eq!(answered, timed, "every answer timed:\n{text}");
    operator.stop().await;
}

// The API server calls back into this process while kubectl runs: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_webhook_down_pods_are_still_created_and_the_miss_is_reported_and_rolled() {
    let ns = TestNamespace::new("adm-missed", &[]).await;
    support::install_crds(&ns.client).await;
    let mut operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 100).await;
    apply_binding(
        &ns,
        "pods",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    apply_binding(
        &ns,
        "api",
        &instance.name,
        json!({"workloads": [{"kind": "Deployment", "name": "api"}],
               "injection": "Admission", "rollOnMissedInjection": true}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;

    operator.stop_webhook().await;
    let pods = ns.api::<Pod>();
    let created = pods
        .create(
            &PostParams::default(),
            &pod("while-down", json!({"db": "orders"})),
        )
        .await
        .expect("failurePolicy Ignore: the pod is created");
    assert!(!injected(&created));
    // A Deployment injected at admission, whose first pod comes while the
    // webhook is down.
    let deployment: Deployment = serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api"},
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                 "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}}}}))
    .expect("a deployment");
    ns.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .expect("creating the deployment");
    let message = wait_for_reason(&ns, "api", "Ready", "InjectionMissed").await["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("once the webhook answers again"),
        "{message}"
    );

    operator.start_webhook().await;
    let condition = wait_for_reason(&ns, "pods", "Ready", "InjectionMissed").await;
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(message.contains("while-down"), "{message}");
    assert!(
        message.contains("admission webhook was not called"),
        "{message}"
    );
    let events = ns.api::<Event>();
    eventually(
        Duration::from_secs(30),
        "an InjectionMissed Event on the pod",
        || {
            let events = events.clone();
            async move {
                events.list(&ListParams::default()).await.is_ok_and(|l| {
                    l.items.iter().any(|e| {
                        e.reason.as_deref() == Some("InjectionMissed")
                            && e.involved_object.name.as_deref() == Some("while-down")
                    })
                })
            }
        },
    )
    .await;

    // The webhook answers again: the Deployment is rolled once, and its new
    // pod is injected.
    let deployments = ns.api::<Deployment>();
    eventually(
        Duration::from_secs(180),
        "the Deployment rolled for the missed injection",
        || {
            let deployments = deployments.clone();
            async move {
                deployments.get("api").await.is_ok_and(|d| {
                    d.spec
                        .and_then(|s| s.template.metadata)
                        .and_then(|m| m.annotations)
                        .is_some_and(|a| a.contains_key("cloudsql.dev/rolled-for-missed-injection"))
                })
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(180),
        "an injected pod of the Deployment",
        || {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default().labels("app=api"))
                    .await
                    .is_ok_and(|l| {
                        l.items
                            .iter()
                            .any(|p| p.metadata.deletion_timestamp.is_none() && injected(p))
                    })
            }
        },
    )
    .await;
    operator.stop().await;
}

/// The serving certificate (PEM) in the webhook Secret.
async fn served_certificate(ns: &TestNamespace) -> Option<Vec<u8>> {
    let secret = ns
        .api::<Secret>()
        .get_opt(cloudsql_binder::webhook::DEFAULT_SECRET_NAME)
        .await
        .ok()??;
    Some(secret.data?.get("tls.crt")?.0.clone())
}

// The API server calls back into this process while kubectl runs: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn pods_are_admitted_without_a_failure_across_a_certificate_rotation() {
    let ns = TestNamespace::new("adm-rotate", &[]).await;
    support::install_crds(&ns.client).await;
    // 20 s certificates, renewed at 2/3: a rotation every ~13 s.
    let operator = AdmissionOperator::start(&ns.name, Duration::from_secs(20)).await;
    // Room for every pod this loop can create at the full pool of 5: each
    // pod counts against the budget, and a shrinking grant is not what this
    // test is about.
    let instance = TestInstance::create(&ns, 100_000).await;
    apply_binding(
        &ns,
        "pods",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;
    let first = served_certificate(&ns).await.expect("a certificate");

    let pods = ns.api::<Pod>();
    let started = Instant::now();
    let mut created = 0;
    let mut not_injected = Vec::new();
    let mut rotations = 0;
    let mut last = first.clone();
    // Across at least two rotations.
    while started.elapsed() < Duration::from_secs(32) {
        let name = format!("p{created:04}");
        let p = pods
            .create(&PostParams::default(), &pod(&name, json!({"db": "orders"})))
            .await
            .expect("creating a pod");
        if !injected(&p) {
            not_injected.push(name);
        }
        created += 1;
        if let Some(now) = served_certificate(&ns).await
            && now != last
        {
            rotations += 1;
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotations >= 1, "the certificate never rotated");
    assert!(
        not_injected.is_empty(),
        "{} of {created} pods were not injected across {rotations} rotation(s): {not_injected:?}",
        not_injected.len()
    );
    operator.stop().await;
}

// The API server calls back into this process while kubectl runs: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn raising_an_hpa_past_the_capacity_prints_a_kubectl_warning_and_is_admitted() {
    let ns = TestNamespace::new("adm-hpa", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 100).await;
    let manifest = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": ns.name},
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                 "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}}}});
    let (ok, _, err) = support::kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(ok, "{err}");
    apply_binding(
        &ns,
        "api",
        &instance.name,
        json!({"workloads": [{"kind": "Deployment", "name": "api"}]}),
    )
    .await;
    wait_for_reason(&ns, "api", "Ready", "Bound").await;

    let hpa = |max: u32| {
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "api", "namespace": ns.name},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                        "minReplicas": 1, "maxReplicas": max}})
        .to_string()
    };
    let (ok, _, err) = support::kubectl(&["apply", "-f", "-"], Some(&hpa(4)));
    assert!(ok, "{err}");
    assert!(!err.contains("Warning"), "within capacity: {err}");
    // The HPA must be in the operator's cache before the raise is judged
    // against it (the webhook compares the new object with the old one).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, _, err) = support::kubectl(&["apply", "-f", "-"], Some(&hpa(40)));
    assert!(ok, "the raise is admitted: {err}");
    let expected = format!(
        "Warning: maxReplicas 40 would need 200 connections on {}, 100 usable",
        instance.name
    );
    assert!(err.contains(&expected), "kubectl printed: {err}");
    let (ok, out, err) = support::kubectl(
        &[
            "get",
            "hpa",
            "api",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.maxReplicas}",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "40");
    operator.stop().await;
}

// The API server calls back into this process while kubectl runs: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflicting_binding_is_refused_at_admission_naming_the_other() {
    let ns = TestNamespace::new("adm-validate", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 100).await;
    let manifest = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": ns.name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}}}});
    let (ok, _, err) = support::kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(ok, "{err}");
    apply_binding(
        &ns,
        "first",
        &instance.name,
        json!({"workloads": [{"kind": "Deployment", "name": "api"}]}),
    )
    .await;
    wait_for_reason(&ns, "first", "Ready", "Bound").await;
    let second = json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
        "metadata": {"name": "second", "namespace": ns.name},
        "spec": {"instanceRef": {"name": instance.name}, "mode": "Connector",
                 "workloads": [{"kind": "Deployment", "name": "api"}],
                 "database": {"name": "billing", "user": "billing-app"}}});
    let (ok, _, err) = support::kubectl(&["apply", "-f", "-"], Some(&second.to_string()));
    assert!(!ok, "the conflicting binding is refused");
    assert!(err.contains("bindings.cloudsql.dev"), "{err}");
    assert!(err.contains(&format!("{}/first", ns.name)), "{err}");
    assert!(err.contains("DB_NAME"), "{err}");
    operator.stop().await;
}

/// The property test against real stores: plausible and arbitrary Pod
/// reviews in a namespace full of bindings never panic the handler, and
/// every patch it answers with applies and is answered again with none.
#[tokio::test(flavor = "multi_thread")]
async fn any_pod_review_gets_an_answer_whose_patch_applies_or_a_clean_error() {
    use cloudsql_binder::webhook::{AdmissionContext, Route, review};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let ns = TestNamespace::new("adm-fuzz", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 100).await;
    apply_binding(
        &ns,
        "pods",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    apply_binding(
        &ns,
        "tcp",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"tier": "api"}}}],
               "proxy": {"socket": "TCP", "port": 5432}, "env": {"database": "TCP_DB"}}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;
    let ctx = AdmissionContext {
        stores: operator.stores(),
        caps: cloudsql_binder::plan::TargetCapabilities {
            native_sidecars: true,
        },
        options: operator.options.clone(),
        metrics: None,
    };
    let namespace = ns.name.clone();
    let review_of = move |object: Value| -> Vec<u8> {
        serde_json::to_vec(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "name": "", "namespace": namespace, "operation": "CREATE",
                        "userInfo": {}, "object": object}}),
        )
        .expect("json")
    };
    let container = (
        prop_oneof![Just("app"), Just("cloud-sql-proxy"), Just("sidecar"), Just("")],
        prop::collection::vec(
            (
                prop_oneof![Just("DB_NAME"), Just("TCP_DB"), Just("DB_USER"), Just("X")],
                "[a-z]{0,3}",
            ),
            0..3,
        ),
        prop::collection::vec(prop_oneof![Just(5432), Just(9801), Just(9802)], 0..2),
        prop::option::of(prop_oneof![Just("/cloudsql"), Just("/data")]),
    )
        .prop_map(|(name, env, ports, mount)| {
            json!({"name": name, "image": "x",
                   "env": env.iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>(),
                   "ports": ports.iter().map(|p| json!({"containerPort": p})).collect::<Vec<_>>(),
                   "volumeMounts": mount.iter().map(|m| json!({"name": "v", "mountPath": m})).collect::<Vec<_>>()})
        });
    let pods = (
        prop::collection::vec(container.clone(), 0..3),
        prop::collection::vec(container, 0..2),
        prop::collection::btree_map(
            prop_oneof![Just("db"), Just("tier"), Just("cloudsql.dev/inject")],
            prop_oneof![Just("orders"), Just("api"), Just("false")],
            0..3,
        ),
        prop::option::of("[ -~]{0,40}"),
    )
        .prop_map(|(containers, inits, labels, junk)| {
            let (containers, inits) = unique_names(containers, inits);
            let mut p = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "fuzz-", "labels": labels},
                "spec": {"containers": containers, "initContainers": inits}});
            if let Some(junk) = junk {
                p["metadata"]["annotations"] = json!({
                    "cloudsql.dev/injected": junk.clone(),
                    "cloudsql.dev/admitted": junk,
                });
            }
            p
        });
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        runner.run(&pods, |object| {
            let Ok(bytes) = review(Route::MutatePods, &review_of(object.clone()), &ctx) else {
                return Ok(());
            };
            let response: Value = serde_json::from_slice(&bytes).expect("an AdmissionReview");
            let response = &response["response"];
            prop_assert_eq!(&response["allowed"], &json!(true));
            let mut after = object.clone();
            if let Some(patch) = response.get("patch") {
                let bytes: Vec<u8> = serde_json::from_value(patch.clone()).expect("bytes");
                let patch: json_patch::Patch =
                    serde_json::from_slice(&bytes).expect("a JSON patch");
                prop_assert!(json_patch::patch(&mut after, &patch).is_ok());
            }
            let again: Value = serde_json::from_slice(
                &review(Route::MutatePods, &review_of(after), &ctx).expect("an answer"),
            )
            .expect("json");
            prop_assert!(again["response"].get("patch").is_none());
            Ok(())
        })
    })
    .await
    .expect("the property test ran");
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    operator.stop().await;
}

/// Container names are unique in a pod (the API server refuses others):
/// repeated names get a suffix.
fn unique_names(containers: Vec<Value>, inits: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
    let mut seen = std::collections::BTreeSet::new();
    let mut rename = |mut c: Value| {
        let name = c["name"].as_str().unwrap_or_default().to_owned();
        let mut unique = name.clone();
        let mut n = 0;
        while !seen.insert(unique.clone()) {
            n += 1;
            unique = format!("{name}-{n}");
        }
        c["name"] = json!(unique);
        c
    };
    let containers = containers.into_iter().map(&mut rename).collect();
    let inits = inits.into_iter().map(&mut rename).collect();
    (containers, inits)
}

/// Webhook latency over 1,000 Pod creations, from the client and from the
/// API server's own `apiserver_admission_webhook_admission_duration_seconds`.
/// Not asserted: run with `cargo test --test it admission -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check: run by hand"]
async fn webhook_latency_over_1000_pod_creations() {
    let ns = TestNamespace::new("adm-latency", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 10_000).await;
    apply_binding(
        &ns,
        "pods",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;
    let before = webhook_histogram().await;

    let pods = ns.api::<Pod>();
    let mut with_webhook = Vec::with_capacity(1_000);
    for i in 0..1_000 {
        let p = pod(&format!("p{i:04}"), json!({"db": "orders"}));
        let start = Instant::now();
        let created = pods
            .create(&PostParams::default(), &p)
            .await
            .expect("creating a pod");
        with_webhook.push(start.elapsed());
        assert!(injected(&created));
    }
    let after = webhook_histogram().await;
    // The handler alone, in this process, on the same stores.
    let ctx = cloudsql_binder::webhook::AdmissionContext {
        stores: operator.stores(),
        caps: cloudsql_binder::plan::TargetCapabilities {
            native_sidecars: true,
        },
        options: operator.options.clone(),
        metrics: None,
    };
    let body = serde_json::to_vec(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "name": "h", "namespace": ns.name, "operation": "CREATE", "userInfo": {},
                    "object": pod("h", json!({"db": "orders"}))}}),
    )
    .expect("json");
    let mut handler = Vec::with_capacity(1_000);
    for _ in 0..1_000 {
        let start = Instant::now();
        cloudsql_binder::webhook::review(cloudsql_binder::webhook::Route::MutatePods, &body, &ctx)
            .expect("an answer");
        handler.push(start.elapsed());
    }
    // The same creations outside the webhook (opted out), for the baseline.
    let mut without = Vec::with_capacity(200);
    for i in 0..200 {
        let p = pod(
            &format!("q{i:04}"),
            json!({"db": "orders", "cloudsql.dev/inject": "false"}),
        );
        let start = Instant::now();
        pods.create(&PostParams::default(), &p)
            .await
            .expect("creating a pod");
        without.push(start.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    println!(
        "handler (review(), {} pods in the namespace): p50 {:?} p99 {:?}",
        1_001,
        pct(&mut handler, 0.50),
        pct(&mut handler, 0.99),
    );
    println!(
        "client: pod create with webhook p50 {:?} p99 {:?}; without p50 {:?} p99 {:?}",
        pct(&mut with_webhook, 0.50),
        pct(&mut with_webhook, 0.99),
        pct(&mut without, 0.50),
        pct(&mut without, 0.99),
    );
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, n)| *n)
                .unwrap_or(0.0);
            (*le, n - was)
        })
        .collect();
    let total = delta.last().map(|(_, n)| *n).unwrap_or(0.0);
    let quantile = |q: f64| {
        delta
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map(|(le, _)| *le)
    };
    println!(
        "apiserver_admission_webhook_admission_duration_seconds{{name=pods.cloudsql.dev}}: {total} calls, p50 <= {:?} s, p99 <= {:?} s (bucket bounds)",
        quantile(0.50),
        quantile(0.99)
    );
    operator.stop().await;
}

/// Cumulative buckets `(le, count)` of the API server's webhook duration
/// histogram for our Pod webhook (every configuration's `pods.cloudsql.dev`).
async fn webhook_histogram() -> Vec<(f64, f64)> {
    let (ok, out, err) = support::kubectl(&["get", "--raw", "/metrics"], None);
    assert!(ok, "{err}");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in out.lines() {
        if !line.starts_with("apiserver_admission_webhook_admission_duration_seconds_bucket")
            || !line.contains("name=\"pods.cloudsql.dev\"")
        {
            continue;
        }
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(|s| {
                if s == "+Inf" {
                    f64::INFINITY
                } else {
                    s.parse().unwrap_or(0.0)
                }
            });
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        if let Some(le) = le {
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, n)) => *n += count,
                None => buckets.push((le, count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

// The API server calls back into this process while pods are created: the
// webhook needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_selector_over_many_bare_pods_counts_them_all_and_lists_twenty() {
    let ns = TestNamespace::new("adm-many-pods", &[]).await;
    support::install_crds(&ns.client).await;
    let operator = AdmissionOperator::start(&ns.name, 90 * DAY).await;
    let instance = TestInstance::create(&ns, 10_000).await;
    apply_binding(
        &ns,
        "batch",
        &instance.name,
        json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"db": "orders"}}}]}),
    )
    .await;
    wait_until_injecting(&ns, &pod("probe", json!({"db": "orders"}))).await;
    let pods = ns.api::<Pod>();
    let count = cloudsql_binder::controller::MAX_LISTED_PODS + 5;
    for i in 0..count {
        let created = pods
            .create(
                &PostParams::default(),
                &pod(&format!("task-{i:02}"), json!({"db": "orders"})),
            )
            .await
            .expect("creating a pod");
        assert!(injected(&created), "task-{i:02} was not injected");
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    let want = format!("{count}/{count}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = api
            .get("batch")
            .await
            .map(|b| serde_json::to_value(b).expect("json")["status"].clone())
            .unwrap_or_default();
        if status["workloadsSummary"] == want.as_str() && status["pool"]["maxPods"] == count {
            let listed = status["workloads"].as_array().map(Vec::len);
            assert_eq!(
                listed,
                Some(cloudsql_binder::controller::MAX_LISTED_PODS),
                "{status:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the binding never counted {want} pods: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    operator.stop().await;
}
