//! The connection budget on a real cluster, with the Cloud SQL Admin API test
//! fixture playing Google: grants follow HPA limits and the discovered tier,
//! and an Admin API outage removes nothing.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::PodSpec;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::fixture_sqladmin::SqlAdminFixture;
use crate::support::{self, Operator, TestNamespace, kubectl};

const USER: &str = "kubectl-user";

fn ar(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

async fn apply(api: &Api<DynamicObject>, obj: Value) {
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    api.patch(&name, &PatchParams::apply(USER), &Patch::Apply(&obj))
        .await
        .expect("applying");
}

async fn get(api: &Api<DynamicObject>, name: &str) -> Value {
    serde_json::to_value(api.get(name).await.expect("get")).expect("json")
}

fn pool_env(spec: &Value) -> Option<i64> {
    spec["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "DB_POOL_MAX_CONNS")?["value"]
        .as_str()?
        .parse()
        .ok()
}

fn ready(obj: &Value) -> bool {
    obj["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    }) && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

struct Scenario {
    ns: TestNamespace,
    bindings: Api<DynamicObject>,
    instances: Api<DynamicObject>,
    instance: String,
}

impl Scenario {
    /// Per binding: (granted per pod, max pods), and the template's pool env.
    async fn grants(&self) -> Vec<(String, i64, i64, Option<i64>)> {
        let templates = [
            (
                "api",
                self.template("apps", "v1", "Deployment", "api", "/spec/template/spec")
                    .await,
            ),
            (
                "worker",
                self.template("apps", "v1", "StatefulSet", "worker", "/spec/template/spec")
                    .await,
            ),
            (
                "web",
                self.template(
                    "serving.knative.dev",
                    "v1",
                    "Service",
                    "web",
                    "/spec/template/spec",
                )
                .await,
            ),
        ];
        let mut out = Vec::new();
        for (name, template) in templates {
            let b = get(&self.bindings, name).await;
            out.push((
                name.to_string(),
                b["status"]["pool"]["grantedPerPod"].as_i64().unwrap_or(-1),
                b["status"]["pool"]["maxPods"].as_i64().unwrap_or(-1),
                pool_env(&template),
            ));
        }
        out
    }

    async fn template(
        &self,
        group: &str,
        version: &str,
        kind: &str,
        name: &str,
        pointer: &str,
    ) -> Value {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.ns.client.clone(),
            &self.ns.name,
            &ar(group, version, kind),
        );
        get(&api, name)
            .await
            .pointer(pointer)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until every binding is Ready, its template carries its grant,
    /// and the predicate on the grants holds.
    async fn settle(
        &self,
        what: &str,
        check: impl Fn(&[(String, i64, i64, Option<i64>)]) -> bool,
    ) -> Vec<(String, i64, i64, Option<i64>)> {
        // Settled: the same grants, all Ready, injected and passing `check`,
        // for 2 s. While the budget moves, each binding's status is written by
        // its own reconcile, so one read can mix a binding's old grant with
        // the others' new ones.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let mut since = None::<(Vec<Grants>, tokio::time::Instant)>;
        loop {
            let grants = self.grants().await;
            let mut all_ready = true;
            for (name, ..) in &grants {
                all_ready &= ready(&get(&self.bindings, name).await);
            }
            let injected = grants.iter().all(|(_, g, _, env)| Some(*g) == *env);
            if all_ready && injected && check(&grants) {
                match &since {
                    Some((seen, at)) if *seen == grants => {
                        if at.elapsed() >= Duration::from_secs(2) {
                            return grants;
                        }
                    }
                    _ => since = Some((grants.clone(), tokio::time::Instant::now())),
                }
            } else {
                since = None;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: never settled; last grants {grants:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One binding's (name, granted per pod, max pods, injected DB_POOL_MAX_CONNS).
type Grants = (String, i64, i64, Option<i64>);

fn total(grants: &[(String, i64, i64, Option<i64>)]) -> i64 {
    grants.iter().map(|(_, g, pods, _)| g * pods).sum()
}

#[tokio::test]
async fn grants_fit_the_discovered_capacity_and_follow_hpa_limits_tiers_and_outages() {
    let ns = TestNamespace::new("budget", &[]).await;
    support::install_crds(&ns.client).await;
    support::install_knative_serving_crd().await;
    let fixture = SqlAdminFixture::start().await;
    let connection = format!("budget-project:us-central1:{}", ns.name);
    fixture.set_instance(&connection, "POSTGRES_16", "db-custom-1-3840", &[]);
    let operator = Operator::start_with(cloudsql_binder::controller::Options {
        namespaces: vec![ns.name.clone()],
        discovery: Some(Arc::new(fixture.discovery())),
        discovery_refresh: Duration::from_secs(2),
        ..Default::default()
    })
    .await;

    let client = ns.client.clone();
    let instances: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ar("cloudsql.dev", "v1alpha1", "CloudSqlInstance"),
    );
    let instance = format!("{}-db", ns.name);
    apply(
        &instances,
        json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
        "metadata": {"name": instance},
        "spec": {"connectionName": connection, "capacity": {"reservedConnections": 6}}}),
    )
    .await;

    let deployments: Api<Deployment> = ns.api();
    deployments.patch("api", &PatchParams::apply(USER), &Patch::Apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "api", "image": "example.com/api:1"}]}}}}))).await.expect("deployment");
    let hpas: Api<HorizontalPodAutoscaler> = ns.api();
    let hpa = |max: i32| {
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "api"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                 "minReplicas": 3, "maxReplicas": max}})
    };
    hpas.patch("api", &PatchParams::apply(USER), &Patch::Apply(hpa(10)))
        .await
        .expect("hpa");
    let sts: Api<StatefulSet> = ns.api();
    sts.patch("worker", &PatchParams::apply(USER), &Patch::Apply(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "worker"},
        "spec": {"serviceName": "worker", "replicas": 3, "selector": {"matchLabels": {"app": "worker"}},
                 "template": {"metadata": {"labels": {"app": "worker"}},
                              "spec": {"containers": [{"name": "worker", "image": "example.com/w:1"}]}}}}))).await.expect("sts");
    let ksvcs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ar("serving.knative.dev", "v1", "Service"),
    );
    apply(&ksvcs, json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"template": {"metadata": {"annotations": {"autoscaling.knative.dev/maxScale": "20"}},
                              "spec": {"containers": [{"image": "example.com/web:1"}]}}}})).await;

    let bindings: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ar("cloudsql.dev", "v1alpha1", "CloudSqlBinding"),
    );
    for (name, kind, max, min) in [
        ("api", "Deployment", 10, 1),
        ("worker", "StatefulSet", 10, 1),
        ("web", "Service.serving.knative.dev", 5, 1),
    ] {
        apply(
            &bindings,
            json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
            "metadata": {"name": name},
            "spec": {"instanceRef": {"name": instance}, "workloads": [{"kind": kind, "name": name}],
                     "database": {"name": "orders", "user": name},
                     "pool": {"maxPerPod": max, "minPerPod": min}}}),
        )
        .await;
    }
    let scenario = Scenario {
        ns,
        bindings,
        instances,
        instance: instance.clone(),
    };

    // db-custom-1-3840 PostgreSQL: 100 connections, 94 usable. HPA max 10 with
    // the default 25% surge is 13 pods; the StatefulSet 3; the service 20.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while get(&scenario.instances, &scenario.instance).await["status"]["capacity"]["maxConnections"]
        != 100
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the capacity was never discovered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Once the capacity is known, the leftover is shared: nobody stays at the minimum.
    let first = scenario
        .settle("the first allocation", |g| {
            g.iter()
                .map(|(_, grant, pods, _)| grant * pods)
                .sum::<i64>()
                > 36 + 30
        })
        .await;
    let pods: Vec<i64> = first.iter().map(|(_, _, p, _)| *p).collect();
    assert_eq!(pods, vec![13, 3, 20], "max pods per binding");
    assert!(
        total(&first) <= 94,
        "the grants fit the usable capacity: {first:?}"
    );
    let inst = get(&scenario.instances, &scenario.instance).await;
    assert_eq!(inst["status"]["capacity"]["maxConnections"], 100);
    assert_eq!(inst["status"]["capacity"]["source"], "AdminAPITier");
    assert_eq!(inst["status"]["capacity"]["usable"], 94);
    assert_eq!(inst["status"]["tier"], "db-custom-1-3840");
    let (ok, out, err) = kubectl(&["get", "sqlinstance", &scenario.instance], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("94"),
        "the CAPACITY column shows the usable connections: {out}"
    );
    let (ok, out, err) = kubectl(&["get", "sqlbindings", "-n", &scenario.ns.name], None);
    assert!(ok, "{err}");
    let api_line = out
        .lines()
        .find(|l| l.starts_with("api "))
        .unwrap_or_default()
        .to_string();
    assert!(
        api_line.contains(&format!("{}/10", first[0].1)),
        "the POOL column shows granted/requested: {out}"
    );

    // The HPA may now scale to 40: the Deployment's pods grow, every grant drops.
    let api_hash_before = scenario
        .template(
            "apps",
            "v1",
            "Deployment",
            "api",
            "/spec/template/metadata/annotations",
        )
        .await["cloudsql.dev/config-hash"]
        .clone();
    hpas.patch("api", &PatchParams::apply(USER), &Patch::Apply(hpa(40)))
        .await
        .expect("hpa");
    let second = scenario
        .settle("after raising the HPA", |g| g[0].2 == 50)
        .await;
    assert!(total(&second) <= 94, "{second:?}");
    assert!(
        second[0].1 < first[0].1,
        "the Deployment's grant dropped: {first:?} -> {second:?}"
    );
    let api_hash_after = scenario
        .template(
            "apps",
            "v1",
            "Deployment",
            "api",
            "/spec/template/metadata/annotations",
        )
        .await["cloudsql.dev/config-hash"]
        .clone();
    assert_ne!(
        api_hash_before, api_hash_after,
        "the Deployment rolls with its new grant"
    );
    let inst = get(&scenario.instances, &scenario.instance).await;
    assert_eq!(
        inst["status"]["allocated"].as_i64(),
        Some(total(&second)),
        "the instance's allocation follows"
    );

    // The instance moves to a bigger tier (15 GiB: 500 connections): grants rise.
    fixture.set_instance(&connection, "POSTGRES_16", "db-custom-4-15360", &[]);
    let third = scenario
        .settle("after the tier grew", |g| {
            g.iter().zip(&second).all(|(a, b)| a.1 >= b.1) && g != second.as_slice()
        })
        .await;
    assert!(total(&third) <= 494);
    let inst = get(&scenario.instances, &scenario.instance).await;
    assert_eq!(inst["status"]["capacity"]["maxConnections"], 500);

    // The Admin API refuses (403): a condition carries Google's message and
    // nothing is taken from the workloads.
    fixture.fail_always(403);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let inst = get(&scenario.instances, &scenario.instance).await;
        let discovered = inst["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Discovered").cloned())
            .unwrap_or(Value::Null);
        if discovered["status"] == "False" {
            assert_eq!(discovered["reason"], "AdminAPIPermissionDenied");
            let message = discovered["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(crate::fixture_sqladmin::google_message(403)),
                "{message}"
            );
            assert!(message.contains("last known capacity is kept"), "{message}");
            assert_eq!(
                inst["status"]["capacity"]["maxConnections"], 500,
                "the last known capacity is kept"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Discovered=False after a 403: {inst:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let during = scenario.grants().await;
    assert_eq!(
        during, third,
        "an Admin API outage changes no grant and removes nothing"
    );
    let spec: PodSpec = serde_json::from_value(
        scenario
            .template("apps", "v1", "Deployment", "api", "/spec/template/spec")
            .await,
    )
    .expect("spec");
    assert!(
        spec.init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "cloud-sql-proxy")
    );
    operator.stop().await;
}
