//! The CRD contract as the real API server enforces it.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::{self, TestNamespace, kubectl};

fn instance(spec: Value) -> Value {
    json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
           "metadata": {"generateName": "api-test-"}, "spec": spec})
}

fn binding(spec: Value) -> Value {
    json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
           "metadata": {"generateName": "api-test-"}, "spec": spec})
}

fn minimal_binding_spec() -> Value {
    json!({
        "instanceRef": {"name": "orders"},
        "workloads": [{"kind": "Deployment", "name": "orders-api"}],
        "database": {"name": "orders", "user": "orders-app"}
    })
}

fn with(mut base: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer with a parent");
    let target = base.pointer_mut(parent).expect("the parent exists");
    match target {
        Value::Object(map) => {
            map.insert(key.to_string(), value);
        }
        Value::Array(items) => {
            let i: usize = key.parse().expect("an index");
            items[i] = value;
        }
        _ => panic!("cannot set {pointer}"),
    }
    base
}

fn api_for(client: &kube::Client, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", kind));
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn create_dry_run(client: &kube::Client, ns: &str, obj: &Value) -> Result<(), String> {
    let kind = obj["kind"].as_str().expect("kind");
    let api = api_for(client, kind, (kind == "CloudSqlBinding").then_some(ns));
    let obj: DynamicObject = serde_json::from_value(obj.clone()).expect("a dynamic object");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&pp, &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn invalid_objects_are_refused_with_the_field_named() {
    let ns = TestNamespace::new("api-invalid", &[]).await;
    support::install_crds(&ns.client).await;
    let good_instance = json!({"connectionName": "my-project:us-central1:orders"});
    let b = minimal_binding_spec;

    // (case, object, text the error must contain: the field path, and what is allowed)
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "connection name without region",
            instance(json!({"connectionName": "my-project:orders"})),
            vec!["spec.connectionName", "PROJECT:REGION:INSTANCE"],
        ),
        (
            "connection name in upper case",
            instance(json!({"connectionName": "My-Project:us-central1:orders"})),
            vec!["spec.connectionName", "PROJECT:REGION:INSTANCE"],
        ),
        (
            "connection name with a bad region",
            instance(json!({"connectionName": "my-project:central:orders"})),
            vec!["spec.connectionName"],
        ),
        (
            "negative maxConnections",
            instance(with(
                good_instance.clone(),
                "/capacity",
                json!({"maxConnections": -1}),
            )),
            vec!["spec.capacity.maxConnections", "greater than or equal to 0"],
        ),
        (
            "negative reservedConnections",
            instance(with(
                good_instance.clone(),
                "/capacity",
                json!({"reservedConnections": -3}),
            )),
            vec!["spec.capacity.reservedConnections"],
        ),
        (
            "negative externalConnections",
            instance(with(
                good_instance.clone(),
                "/capacity",
                json!({"externalConnections": -1}),
            )),
            vec!["spec.capacity.externalConnections"],
        ),
        (
            "unknown discovery",
            instance(with(good_instance.clone(), "/discovery", json!("Magic"))),
            vec!["spec.discovery", "AdminAPI"],
        ),
        (
            "bad database version",
            instance(with(
                good_instance.clone(),
                "/databaseVersion",
                json!("postgres16"),
            )),
            vec!["spec.databaseVersion", "POSTGRES_16"],
        ),
        (
            "bad tier",
            instance(with(
                good_instance.clone(),
                "/capacity",
                json!({"tier": "large"}),
            )),
            vec!["spec.capacity.tier", "db-custom-2-7680"],
        ),
        (
            "no workloads",
            binding(with(b(), "/workloads", json!([]))),
            vec!["spec.workloads", "at least 1"],
        ),
        (
            "both name and selector",
            binding(with(
                b(),
                "/workloads/0",
                json!({"kind": "Deployment", "name": "a", "selector": {"matchLabels": {"app": "a"}}}),
            )),
            vec!["spec.workloads[0]", "exactly one of name and selector"],
        ),
        (
            "neither name nor selector",
            binding(with(b(), "/workloads/0", json!({"kind": "Deployment"}))),
            vec!["spec.workloads[0]", "exactly one of name and selector"],
        ),
        (
            "unknown kind",
            binding(with(
                b(),
                "/workloads/0",
                json!({"kind": "Rollout", "name": "a"}),
            )),
            vec!["spec.workloads[0].kind", "Deployment"],
        ),
        (
            "minPerPod above maxPerPod",
            binding(with(b(), "/pool", json!({"maxPerPod": 2, "minPerPod": 5}))),
            vec![
                "spec.pool",
                "minPerPod must be less than or equal to maxPerPod",
            ],
        ),
        (
            "zero maxPerPod",
            binding(with(b(), "/pool", json!({"maxPerPod": 0}))),
            vec!["spec.pool.maxPerPod", "greater than or equal to 1"],
        ),
        (
            "zero minPerPod",
            binding(with(b(), "/pool", json!({"minPerPod": 0}))),
            vec!["spec.pool.minPerPod", "greater than or equal to 1"],
        ),
        (
            "zero weight",
            binding(with(b(), "/pool", json!({"weight": 0}))),
            vec!["spec.pool.weight"],
        ),
        (
            "port with a Unix socket",
            binding(with(b(), "/proxy", json!({"port": 5432}))),
            vec!["spec.proxy", "port may only be set with socket: TCP"],
        ),
        (
            "proxy with connector mode",
            binding(with(
                with(b(), "/mode", json!("Connector")),
                "/proxy",
                json!({"socket": "TCP"}),
            )),
            vec!["spec.proxy", "only be set with spec.mode: Proxy"],
        ),
        (
            "invalid env name",
            binding(with(b(), "/env", json!({"poolMax": "1POOL"}))),
            vec!["spec.env.poolMax", "valid environment variable name"],
        ),
        (
            "env name with a dash",
            binding(with(b(), "/env", json!({"user": "DB-USER"}))),
            vec!["spec.env.user", "valid environment variable name"],
        ),
        (
            "unknown mode",
            binding(with(b(), "/mode", json!("Sidecar"))),
            vec!["spec.mode", "Proxy"],
        ),
        (
            "unknown network",
            binding(with(b(), "/network", json!("VPN"))),
            vec!["spec.network", "PSC"],
        ),
        (
            "unknown sidecar mode",
            binding(with(b(), "/proxy", json!({"sidecar": "Always"}))),
            vec!["spec.proxy.sidecar", "Native"],
        ),
        (
            "port out of range",
            binding(with(b(), "/proxy", json!({"socket": "TCP", "port": 70000}))),
            vec!["spec.proxy.port"],
        ),
        (
            "missing database",
            binding(
                json!({"instanceRef": {"name": "orders"}, "workloads": [{"kind": "Pod", "name": "p"}]}),
            ),
            vec!["spec.database", "Required"],
        ),
    ];
    assert!(cases.len() >= 15);

    let mut failures = Vec::new();
    for (case, obj, expected) in &cases {
        match create_dry_run(&ns.client, &ns.name, obj).await {
            Ok(()) => failures.push(format!("{case}: was accepted")),
            Err(message) => {
                for text in expected {
                    if !message.contains(text) {
                        failures.push(format!("{case}: message lacks {text:?}: {message}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn valid_edge_cases_are_accepted_with_defaults_applied() {
    let ns = TestNamespace::new("api-valid", &[]).await;
    support::install_crds(&ns.client).await;
    let cases: Vec<(&str, Value)> = vec![
        (
            "minimal instance",
            instance(json!({"connectionName": "my-project:us-central1:orders"})),
        ),
        (
            "domain-scoped project",
            instance(json!({"connectionName": "example.com:my-project:us-central1:orders"})),
        ),
        (
            "full instance",
            instance(json!({
            "connectionName": "my-project:asia-northeast3:orders", "databaseVersion": "POSTGRES_16",
            "capacity": {"maxConnections": 400, "tier": "db-custom-2-7680", "reservedConnections": 0, "externalConnections": 20},
            "discovery": "None", "allowedNamespaces": {"selector": {"matchLabels": {"team": "orders"}}}})),
        ),
        (
            "selector with matchExpressions",
            binding(with(
                minimal_binding_spec(),
                "/workloads/0",
                json!({
            "kind": "Deployment", "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}}),
            )),
        ),
        (
            "knative kind",
            binding(with(
                minimal_binding_spec(),
                "/workloads/0",
                json!({"kind": "Service.serving.knative.dev", "name": "web"}),
            )),
        ),
        (
            "minimal connector binding",
            binding(with(minimal_binding_spec(), "/mode", json!("Connector"))),
        ),
        (
            "TCP with a port",
            binding(with(
                minimal_binding_spec(),
                "/proxy",
                json!({"socket": "TCP", "port": 6432}),
            )),
        ),
        (
            "min equal to max",
            binding(with(
                minimal_binding_spec(),
                "/pool",
                json!({"maxPerPod": 3, "minPerPod": 3}),
            )),
        ),
    ];
    for (case, obj) in &cases {
        if let Err(message) = create_dry_run(&ns.client, &ns.name, obj).await {
            panic!("{case} was refused: {message}");
        }
    }

    // Defaults are applied by the API server itself.
    let api = api_for(&ns.client, "CloudSqlBinding", Some(&ns.name));
    let obj: DynamicObject =
        serde_json::from_value(binding(minimal_binding_spec())).expect("object");
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("create");
    let spec = &created.data["spec"];
    assert_eq!(spec["mode"], "Proxy");
    assert_eq!(spec["network"], "Public");
    assert_eq!(spec["pool"]["weight"], 1);
    assert_eq!(spec["env"]["poolMax"], "DB_POOL_MAX_CONNS");
    assert_eq!(spec["env"]["unixSocket"], "INSTANCE_UNIX_SOCKET");

    let api = api_for(&ns.client, "CloudSqlInstance", None);
    let obj: DynamicObject = serde_json::from_value(instance(
        json!({"connectionName": "my-project:us-central1:orders"}),
    ))
    .expect("object");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let created = api.create(&pp, &obj).await.expect("create");
    assert_eq!(created.data["spec"]["capacity"]["reservedConnections"], 6);
    assert_eq!(created.data["spec"]["discovery"], "AdminAPI");
}

#[tokio::test]
async fn every_example_passes_a_server_side_dry_run() {
    let ns = TestNamespace::new("api-examples", &[]).await;
    support::install_crds(&ns.client).await;
    support::install_knative_serving_crd().await;
    let dir = support::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "examples/ holds the instance and four bound apps"
    );
    for file in files {
        let path = file.display().to_string();
        let (ok, _out, err) = kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-n",
                &ns.name,
                "-f",
                &path,
            ],
            None,
        );
        assert!(ok, "{path} failed a server-side dry-run: {err}");
    }
}

#[tokio::test]
async fn the_servers_table_carries_the_printer_columns() {
    let ns = TestNamespace::new("api-columns", &[]).await;
    support::install_crds(&ns.client).await;
    let (ok, _, err) = kubectl(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(
            &serde_json::to_string(&with(
                binding(minimal_binding_spec()),
                "/metadata",
                json!({"name": "cols"}),
            ))
            .expect("json"),
        ),
    );
    assert!(ok, "{err}");
    let (ok, out, err) = kubectl(&["get", "sqlbindings", "-n", &ns.name], None);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "INSTANCE",
        "MODE",
        "WORKLOADS",
        "POOL",
        "READY",
        "AGE",
    ] {
        assert!(
            header.contains(column),
            "sqlbindings table lacks {column}: {header}"
        );
    }
    let (ok, out, err) = kubectl(&["get", "sqlinstances"], None);
    assert!(ok, "{err}");
    if let Some(header) = out.lines().next() {
        for column in [
            "CONNECTION",
            "VERSION",
            "CAPACITY",
            "ALLOCATED",
            "BINDINGS",
            "READY",
            "AGE",
        ] {
            assert!(
                header.contains(column),
                "sqlinstances table lacks {column}: {header}"
            );
        }
    }
    // The raw Table response: what every client renders.
    let request = http::Request::get(format!(
        "/apis/cloudsql.dev/v1alpha1/namespaces/{}/cloudsqlbindings",
        ns.name
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("a request");
    let table: Value =
        serde_json::from_str(&ns.client.request_text(request).await.expect("GET Table"))
            .expect("a Table");
    assert_eq!(table["kind"], "Table");
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "Name",
            "Instance",
            "Mode",
            "Workloads",
            "Pool",
            "Ready",
            "Age"
        ]
    );
    let (ok, out, err) = kubectl(&["get", "cloudsql", "-n", &ns.name], None);
    assert!(ok, "the cloudsql category lists both kinds: {err}");
    assert!(out.contains("cloudsqlbinding.cloudsql.dev/cols"), "{out}");
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_documentation() {
    let ns = TestNamespace::new("api-explain", &[]).await;
    support::install_crds(&ns.client).await;
    let (ok, out, err) = kubectl(&["explain", "cloudsqlbinding.spec.pool"], None);
    assert!(ok, "{err}");
    assert!(out.contains("maxPerPod"), "{out}");
    assert!(
        out.contains("Connections per pod the app would like"),
        "{out}"
    );
    assert!(out.contains("weight"), "{out}");
}

#[test]
fn crds_directory_matches_the_types() {
    let generated = cloudsql_binder::api::crds_yaml().expect("rendering the CRDs");
    let committed =
        std::fs::read_to_string(support::repo_root().join("crds/cloudsql.dev_crds.yaml"))
            .expect("crds/cloudsql.dev_crds.yaml exists (run `make crds`)");
    assert!(
        generated == committed,
        "crds/ is stale: run `make crds` and commit the result"
    );
}
