//! The control plane is real and complete enough for what the operator relies on.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use crate::support::{TestNamespace, eventually};

fn deployment(name: &str, replicas: i32) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}
            }
        }
    })
}

#[tokio::test]
async fn a_deployment_gets_a_replicaset_and_its_pods_from_the_controller_manager() {
    let ns = TestNamespace::new("foundation-rollout", &[]).await;
    let deployments = ns.api::<Deployment>();
    deployments
        .patch(
            "web",
            &PatchParams::apply("test"),
            &Patch::Apply(deployment("web", 2)),
        )
        .await
        .expect("applying a Deployment");

    let replicasets = ns.api::<ReplicaSet>();
    eventually(
        Duration::from_secs(60),
        "a ReplicaSet owned by the Deployment",
        || {
            let replicasets = replicasets.clone();
            async move {
                replicasets
                    .list(&ListParams::default())
                    .await
                    .is_ok_and(|l| {
                        l.items.iter().any(|rs| {
                            rs.metadata
                                .owner_references
                                .iter()
                                .flatten()
                                .any(|o| o.kind == "Deployment" && o.name == "web")
                        })
                    })
            }
        },
    )
    .await;

    let pods = ns.api::<Pod>();
    eventually(Duration::from_secs(60), "2 pods of the Deployment", || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels("app=web"))
                .await
                .is_ok_and(|l| l.items.len() == 2)
        }
    })
    .await;
}

fn env_of(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect()
}

fn env_patch(name: &str, env: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "env": env}]}}}
    })
}

#[tokio::test]
async fn server_side_apply_keeps_each_managers_env_entries_and_removes_only_what_one_drops() {
    let ns = TestNamespace::new("foundation-ssa", &[]).await;
    let deployments = ns.api::<Deployment>();
    let mut owner = deployment("api", 1);
    owner["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "USER_SETTING", "value": "mine"}]);
    deployments
        .patch("api", &PatchParams::apply("owner"), &Patch::Apply(&owner))
        .await
        .expect("the owner's apply");

    deployments
        .patch(
            "api",
            &PatchParams::apply("injector"),
            &Patch::Apply(env_patch(
                "api",
                json!([{"name": "DB_NAME", "value": "orders"}, {"name": "DB_POOL_MAX_CONNS", "value": "6"}]),
            )),
        )
        .await
        .expect("the injector's apply");
    let both = env_of(&deployments.get("api").await.expect("get"));
    assert_eq!(both.get("USER_SETTING").map(String::as_str), Some("mine"));
    assert_eq!(both.get("DB_NAME").map(String::as_str), Some("orders"));
    assert_eq!(both.get("DB_POOL_MAX_CONNS").map(String::as_str), Some("6"));

    // The owner re-applies its own object: the injector's entries stay.
    deployments
        .patch("api", &PatchParams::apply("owner"), &Patch::Apply(&owner))
        .await
        .expect("the owner's second apply");
    let after_owner = env_of(&deployments.get("api").await.expect("get"));
    assert_eq!(after_owner, both);

    // The injector drops one entry: only that entry goes.
    deployments
        .patch(
            "api",
            &PatchParams::apply("injector"),
            &Patch::Apply(env_patch(
                "api",
                json!([{"name": "DB_NAME", "value": "orders"}]),
            )),
        )
        .await
        .expect("the injector's second apply");
    let after = env_of(&deployments.get("api").await.expect("get"));
    assert_eq!(
        after.keys().cloned().collect::<Vec<_>>(),
        vec!["DB_NAME".to_string(), "USER_SETTING".to_string()]
    );
}

#[tokio::test]
async fn the_api_server_reports_the_pinned_release_and_matches_the_crate() {
    let client = crate::support::client().await;
    let info = client.apiserver_version().await.expect("GET /version");
    let versions = std::fs::read_to_string(crate::support::repo_root().join("tools/versions.env"))
        .expect("reading tools/versions.env");
    let pinned = versions
        .lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION="))
        .expect("KUBE_VERSION in tools/versions.env");
    assert_eq!(info.git_version, pinned);
    assert_eq!(
        format!("{}.{}", info.major, info.minor),
        cloudsql_binder::KUBERNETES_API_VERSION,
        "the crate's k8s-openapi feature must match the control plane"
    );
}
