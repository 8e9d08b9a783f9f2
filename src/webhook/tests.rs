//! The webhook's answers, from in-memory stores: examples and properties.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::api::{CloudSqlBinding, CloudSqlInstance};
use crate::index::{Stores, TestWriters};
use crate::plan::TargetCapabilities;

fn put<K>(writer: &mut Writer<K>, value: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let obj: K = serde_json::from_value(value).expect("fixture");
    writer.apply_watcher_event(&watcher::Event::Apply(obj));
}

fn options() -> WebhookOptions {
    WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        endpoint: Endpoint::Url("https://127.0.0.1:8443".into()),
        configuration_name: DEFAULT_CONFIGURATION_NAME.into(),
        namespaces: vec![],
        excluded_namespaces: vec!["ops".into()],
        secret_namespace: "ops".into(),
        secret_name: DEFAULT_SECRET_NAME.into(),
        cert_validity: DEFAULT_CERT_VALIDITY,
        drain: Duration::ZERO,
    }
}

fn created(seconds: i64) -> Value {
    json!(Time(
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    ))
}

fn instance(max_connections: i64, allowed: Option<Value>) -> Value {
    let mut spec = json!({"connectionName": "my-project:us-central1:orders",
        "databaseVersion": "POSTGRES_16", "discovery": "None",
        "capacity": {"maxConnections": max_connections, "reservedConnections": 0}});
    if let Some(allowed) = allowed {
        spec["allowedNamespaces"] = allowed;
    }
    json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
           "metadata": {"name": "orders"}, "spec": spec})
}

fn binding(name: &str, age: i64, spec: Value) -> Value {
    let mut full = json!({"instanceRef": {"name": "orders"},
        "database": {"name": "orders", "user": "orders-app"},
        "pool": {"maxPerPod": 5, "minPerPod": 1}});
    for (k, v) in spec.as_object().unwrap() {
        full[k] = v.clone();
    }
    json!({"apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
           "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created(age)},
           "spec": full})
}

/// A context whose stores hold the `orders` instance and what `setup` adds.
fn context(setup: impl FnOnce(&mut TestWriters)) -> AdmissionContext {
    let (stores, mut writers) = Stores::for_tests();
    put::<CloudSqlInstance>(&mut writers.instances, instance(100, None));
    put(
        &mut writers.namespaces,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"team": "orders"}}}),
    );
    setup(&mut writers);
    AdmissionContext {
        stores,
        caps: TargetCapabilities {
            native_sidecars: true,
        },
        options: options(),
        metrics: None,
    }
}

fn review_of(
    kind: (&str, &str, &str),
    resource: &str,
    operation: &str,
    object: Value,
    old: Value,
) -> Vec<u8> {
    let (group, version, kind) = kind;
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": object["metadata"]["name"].as_str().unwrap_or_default(),
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "someone"},
            "object": object,
            "oldObject": old,
            "dryRun": false
        }
    }))
    .unwrap()
}

fn pod(name: &str, labels: Value, owner: Option<(&str, &str, &str)>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "app", "image": "example.com/app:1",
                                 "env": [{"name": "MINE", "value": "1"}]}]}});
    if let Some((api_version, kind, owner)) = owner {
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": api_version, "kind": kind,
            "name": owner, "uid": "u-1", "controller": true}]);
    }
    pod
}

fn answer(route: Route, body: &[u8], ctx: &AdmissionContext) -> Value {
    let bytes = review(route, body, ctx).expect("a review answer");
    serde_json::from_slice::<Value>(&bytes).unwrap()["response"].clone()
}

/// The object after the response's patch (unchanged without one).
fn patched(object: &Value, response: &Value) -> Value {
    let mut out = object.clone();
    if let Some(bytes) = response.get("patch") {
        let bytes: Vec<u8> = serde_json::from_value(bytes.clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut out, &patch).expect("the patch applies");
        assert_eq!(response["patchType"], "JSONPatch");
    }
    out
}

fn env_of(pod: &Value, container: &str, name: &str) -> Option<String> {
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn proxy_of(pod: &Value) -> Option<Value> {
    pod["spec"]["initContainers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "cloud-sql-proxy")
        .cloned()
}

fn pod_review(pod: &Value) -> Vec<u8> {
    review_of(
        ("", "v1", "Pod"),
        "pods",
        "CREATE",
        pod.clone(),
        Value::Null,
    )
}

#[test]
fn a_bare_pod_named_by_a_binding_gets_the_proxy_and_env() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "solo",
                0,
                json!({"workloads": [{"kind": "Pod", "name": "solo"}]}),
            ),
        );
    });
    let original = pod("solo", json!({}), None);
    let response = answer(Route::MutatePods, &pod_review(&original), &ctx);
    assert_eq!(response["allowed"], true);
    let after = patched(&original, &response);
    let proxy = proxy_of(&after).expect("a native sidecar proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        env_of(&after, "app", "DB_POOL_MAX_CONNS").as_deref(),
        Some("5")
    );
    assert_eq!(env_of(&after, "app", "MINE").as_deref(), Some("1"));
    assert_eq!(
        after["metadata"]["annotations"][ADMITTED_ANNOTATION],
        "solo"
    );
    // The pod as injected passes again unchanged.
    let again = answer(Route::MutatePods, &pod_review(&after), &ctx);
    assert!(again.get("patch").is_none(), "idempotent: {again}");
}

#[test]
fn a_pod_from_a_template_injected_by_the_controller_passes_unchanged() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "solo",
                0,
                json!({"workloads": [{"kind": "Pod", "name": "solo"}]}),
            ),
        );
    });
    let original = pod("solo", json!({}), None);
    let mut injected = patched(
        &original,
        &answer(Route::MutatePods, &pod_review(&original), &ctx),
    );
    // What the API server defaults in the containers we added.
    injected["spec"]["initContainers"][0]["imagePullPolicy"] = json!("IfNotPresent");
    injected["spec"]["initContainers"][0]["terminationMessagePath"] = json!("/dev/termination-log");
    let response = answer(Route::MutatePods, &pod_review(&injected), &ctx);
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn a_jobs_pod_is_injected_through_its_owner_and_an_opted_out_pod_is_not() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "batch",
                0,
                json!({"workloads": [{"kind": "Job", "name": "nightly"}]}),
            ),
        );
        put(
            &mut w.jobs,
            json!({"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": "nightly", "namespace": "shop"},
                   "spec": {"template": {"spec": {"restartPolicy": "Never",
                       "containers": [{"name": "app", "image": "x"}]}}}}),
        );
    });
    let of_job = pod(
        "nightly-abcde",
        json!({}),
        Some(("batch/v1", "Job", "nightly")),
    );
    let after = patched(
        &of_job,
        &answer(Route::MutatePods, &pod_review(&of_job), &ctx),
    );
    assert!(proxy_of(&after).is_some());
    assert_eq!(env_of(&after, "app", "DB_NAME").as_deref(), Some("orders"));

    let opted_out = pod(
        "nightly-fghij",
        json!({INJECT_LABEL: "false"}),
        Some(("batch/v1", "Job", "nightly")),
    );
    let response = answer(Route::MutatePods, &pod_review(&opted_out), &ctx);
    assert!(response.get("patch").is_none());
}

#[test]
fn a_pod_of_a_deployment_bound_at_admission_is_injected_via_its_replica_set() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "api",
                0,
                json!({"injection": "Admission",
                       "workloads": [{"kind": "Deployment", "selector": {"matchLabels": {"db": "orders"}}}]}),
            ),
        );
        put(
            &mut w.deployments,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "api", "namespace": "shop", "labels": {"db": "orders"}},
                   "spec": {"selector": {"matchLabels": {"app": "api"}},
                            "template": {"metadata": {"labels": {"app": "api"}},
                                         "spec": {"containers": [{"name": "app", "image": "x"}]}}}}),
        );
        put(
            &mut w.replica_sets,
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                   "metadata": {"name": "api-7d9", "namespace": "shop",
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": "api", "uid": "u-2", "controller": true}]},
                   "spec": {"selector": {"matchLabels": {"app": "api"}}}}),
        );
    });
    let p = pod(
        "",
        json!({"app": "api"}),
        Some(("apps/v1", "ReplicaSet", "api-7d9")),
    );
    let after = patched(&p, &answer(Route::MutatePods, &pod_review(&p), &ctx));
    assert!(proxy_of(&after).is_some());
    assert_eq!(after["metadata"]["annotations"][ADMITTED_ANNOTATION], "api");
}

#[test]
fn pods_in_kube_system_and_unbound_pods_pass_untouched() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "solo",
                0,
                json!({"workloads": [{"kind": "Pod", "name": "solo"}]}),
            ),
        );
    });
    let other = pod("other", json!({}), None);
    let response = answer(Route::MutatePods, &pod_review(&other), &ctx);
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());

    let mut system = pod("solo", json!({}), None);
    system["metadata"]["namespace"] = json!("kube-system");
    let mut body: Value = serde_json::from_slice(&pod_review(&system)).unwrap();
    body["request"]["namespace"] = json!("kube-system");
    let response = answer(Route::MutatePods, &serde_json::to_vec(&body).unwrap(), &ctx);
    assert!(response.get("patch").is_none());
}

#[test]
fn a_second_binding_setting_the_same_env_differently_is_denied_naming_the_first() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "first",
                0,
                json!({"workloads": [{"kind": "Deployment", "name": "api"}]}),
            ),
        );
        put(
            &mut w.deployments,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "api", "namespace": "shop"},
                   "spec": {"selector": {"matchLabels": {"app": "api"}},
                            "template": {"metadata": {"labels": {"app": "api"}},
                                         "spec": {"containers": [{"name": "app", "image": "x"}]}}}}),
        );
    });
    let mut second = binding(
        "second",
        10,
        json!({"workloads": [{"kind": "Deployment", "name": "api"}],
               "mode": "Connector", "database": {"name": "billing", "user": "b"}}),
    );
    second["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("creationTimestamp");
    let body = review_of(
        ("cloudsql.dev", "v1alpha1", "CloudSqlBinding"),
        "cloudsqlbindings",
        "CREATE",
        second,
        Value::Null,
    );
    let response = answer(Route::ValidateBindings, &body, &ctx);
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("shop/first"), "{message}");
    assert!(message.contains("DB_NAME"), "{message}");

    // The same binding with its own env names is fine.
    let distinct = binding(
        "second",
        10,
        json!({"workloads": [{"kind": "Deployment", "name": "api"}],
               "mode": "Connector", "database": {"name": "billing", "user": "b"},
               "env": {"database": "BILLING_DB", "user": "BILLING_USER", "poolMax": "BILLING_POOL",
                       "connectionName": "BILLING_CONN"}}),
    );
    let body = review_of(
        ("cloudsql.dev", "v1alpha1", "CloudSqlBinding"),
        "cloudsqlbindings",
        "CREATE",
        distinct,
        Value::Null,
    );
    let response = answer(Route::ValidateBindings, &body, &ctx);
    assert_eq!(response["allowed"], true, "{response}");
}

#[test]
fn a_binding_from_a_namespace_the_instance_does_not_allow_is_denied() {
    let ctx = context(|w| {
        put::<CloudSqlInstance>(
            &mut w.instances,
            instance(
                100,
                Some(json!({"selector": {"matchLabels": {"team": "billing"}}})),
            ),
        );
    });
    let body = review_of(
        ("cloudsql.dev", "v1alpha1", "CloudSqlBinding"),
        "cloudsqlbindings",
        "CREATE",
        binding(
            "api",
            0,
            json!({"workloads": [{"kind": "Deployment", "name": "api"}]}),
        ),
        Value::Null,
    );
    let response = answer(Route::ValidateBindings, &body, &ctx);
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"orders\"") && message.contains("\"shop\""),
        "{message}"
    );
}

#[test]
fn raising_an_hpa_past_the_capacity_warns_with_the_numbers_and_is_admitted() {
    let hpa = |max: i32| {
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "api", "namespace": "shop"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                        "minReplicas": 1, "maxReplicas": max}})
    };
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "api",
                0,
                json!({"workloads": [{"kind": "Deployment", "name": "api"}]}),
            ),
        );
        put(
            &mut w.deployments,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "api", "namespace": "shop"},
                   "spec": {"replicas": 2, "strategy": {"type": "Recreate"},
                            "selector": {"matchLabels": {"app": "api"}},
                            "template": {"metadata": {"labels": {"app": "api"}},
                                         "spec": {"containers": [{"name": "app", "image": "x"}]}}}}),
        );
        put(&mut w.hpas, hpa(4));
    });
    let body = review_of(
        ("autoscaling", "v2", "HorizontalPodAutoscaler"),
        "horizontalpodautoscalers",
        "UPDATE",
        hpa(40),
        hpa(4),
    );
    let response = answer(Route::ValidateScale, &body, &ctx);
    assert_eq!(response["allowed"], true);
    let warnings = response["warnings"].as_array().expect("a warning");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.starts_with("maxReplicas 40 would need 200 connections on orders, 100 usable"),
        "{warning}"
    );

    // Within capacity: no warning.
    let body = review_of(
        ("autoscaling", "v2", "HorizontalPodAutoscaler"),
        "horizontalpodautoscalers",
        "UPDATE",
        hpa(10),
        hpa(4),
    );
    assert!(
        answer(Route::ValidateScale, &body, &ctx)
            .get("warnings")
            .is_none()
    );
}

#[test]
fn malformed_and_oversized_reviews_are_errors_not_answers() {
    let ctx = context(|_| {});
    assert!(matches!(
        review(Route::MutatePods, b"{not json", &ctx),
        Err(review::ReviewError::Malformed { .. })
    ));
    assert!(matches!(
        review(
            Route::MutatePods,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            &ctx
        ),
        Err(review::ReviewError::NoRequest)
    ));
    let big = vec![b' '; MAX_REVIEW_BYTES + 1];
    assert!(matches!(
        review(Route::ValidateScale, &big, &ctx),
        Err(review::ReviewError::TooLarge { .. })
    ));
}

#[test]
fn kubectl_scale_of_a_bound_statefulset_past_the_capacity_warns() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "db",
                0,
                json!({"workloads": [{"kind": "StatefulSet", "name": "db"}]}),
            ),
        );
        put(
            &mut w.stateful_sets,
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "db", "namespace": "shop"},
                   "spec": {"replicas": 3, "serviceName": "db",
                            "selector": {"matchLabels": {"app": "db"}},
                            "template": {"metadata": {"labels": {"app": "db"}},
                                         "spec": {"containers": [{"name": "app", "image": "x"}]}}}}),
        );
    });
    let scale = |replicas: i32| {
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
               "metadata": {"name": "db", "namespace": "shop"}, "spec": {"replicas": replicas}})
    };
    let mut body: Value = serde_json::from_slice(&review_of(
        ("autoscaling", "v1", "Scale"),
        "statefulsets",
        "UPDATE",
        scale(30),
        scale(3),
    ))
    .unwrap();
    body["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "statefulsets"});
    body["request"]["subResource"] = json!("scale");
    let response = answer(
        Route::ValidateScale,
        &serde_json::to_vec(&body).unwrap(),
        &ctx,
    );
    assert_eq!(response["allowed"], true);
    let warning = response["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("replicas 30 would need 150 connections on orders, 100 usable"),
        "{response}"
    );
}

#[test]
fn a_bound_pod_created_without_the_webhook_is_a_miss_and_only_then() {
    let ctx = context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "batch",
                0,
                json!({"workloads": [{"kind": "Job", "name": "nightly"}]}),
            ),
        );
        let meta = |name: &str, age: i64, labels: Value, annotations: Value| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created(age),
                                "labels": labels, "annotations": annotations,
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                    "name": "nightly", "uid": "u", "controller": true}]}})
        };
        put(&mut w.pods, meta("missed", 10, json!({}), json!({})));
        put(
            &mut w.pods,
            meta(
                "admitted",
                10,
                json!({}),
                json!({ADMITTED_ANNOTATION: "other,batch"}),
            ),
        );
        put(&mut w.pods, meta("older", -10, json!({}), json!({})));
        put(
            &mut w.pods,
            meta("opted-out", 10, json!({INJECT_LABEL: "false"}), json!({})),
        );
    });
    let b: CloudSqlBinding = serde_json::from_value(binding(
        "batch",
        0,
        json!({"workloads": [{"kind": "Job", "name": "nightly"}]}),
    ))
    .unwrap();
    let missed = crate::controller::missed::missed_pods(&ctx.stores, &b);
    let names: Vec<&str> = missed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["missed"]);
    assert_eq!(missed[0].rollable, None, "a Job's pod cannot be rolled");
}

// ------------------------------------------------------------- properties

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-zA-Z0-9_./:-]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("Pod"),
            Just("CREATE"),
            Just("app"),
            Just("solo"),
            Just("cloudsql.dev/inject"),
            Just("false")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-zA-Z]{1,10}",
                    Just("name".to_owned()),
                    Just("env".to_owned()),
                    Just("containers".to_owned()),
                    Just("initContainers".to_owned()),
                    Just("ownerReferences".to_owned()),
                    Just("labels".to_owned()),
                    Just("annotations".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A plausible pod: random containers, env, ports, mounts, labels, owners.
fn any_pod() -> impl Strategy<Value = Value> {
    let container = (
        prop_oneof![Just("app"), Just("cloud-sql-proxy"), Just("side"), Just("")],
        prop::collection::vec(
            (
                prop_oneof![Just("DB_NAME"), Just("DB_USER"), Just("X"), Just("INSTANCE_UNIX_SOCKET")],
                "[a-z]{0,4}",
            ),
            0..4,
        ),
        prop::collection::vec(prop_oneof![Just(5432), Just(9801), Just(9091), Just(8080)], 0..3),
        prop::collection::vec(prop_oneof![Just("/cloudsql"), Just("/data"), Just("/cloudsql/")], 0..2),
    )
        .prop_map(|(name, env, ports, mounts)| {
            json!({"name": name, "image": "x",
                   "env": env.iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>(),
                   "ports": ports.iter().map(|p| json!({"containerPort": p})).collect::<Vec<_>>(),
                   "volumeMounts": mounts.iter().map(|m| json!({"name": "v", "mountPath": m})).collect::<Vec<_>>()})
        });
    (
        prop::collection::vec(container.clone(), 0..3),
        prop::collection::vec(container, 0..2),
        prop_oneof![Just("solo"), Just(""), Just("other")],
        prop::option::of(prop_oneof![
            Just(("batch/v1", "Job", "nightly")),
            Just(("apps/v1", "ReplicaSet", "api-7d9")),
            Just(("apps/v1", "StatefulSet", "db")),
            Just(("v1", "Node", "n")),
        ]),
        any::<bool>(),
        prop::option::of(any_json()),
    )
        .prop_map(|(containers, inits, name, owner, opt_out, annotations)| {
            let (containers, inits) = unique_names(containers, inits);
            let mut p = pod(name, json!({"app": "api"}), owner);
            p["spec"]["containers"] = Value::Array(containers);
            p["spec"]["initContainers"] = Value::Array(inits);
            if opt_out {
                p["metadata"]["labels"][INJECT_LABEL] = json!("false");
            }
            if let Some(Value::Object(a)) = annotations {
                p["metadata"]["annotations"] = Value::Object(
                    a.into_iter()
                        .map(|(k, v)| (k, Value::String(v.to_string())))
                        .collect(),
                );
            }
            p
        })
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

fn busy_context() -> AdmissionContext {
    context(|w| {
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "solo",
                0,
                json!({"workloads": [{"kind": "Pod", "name": "solo"}]}),
            ),
        );
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "tcp",
                1,
                json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"app": "api"}}}],
                       "proxy": {"socket": "TCP", "port": 5432}, "env": {"database": "TCP_DB"}}),
            ),
        );
        put::<CloudSqlBinding>(
            &mut w.bindings,
            binding(
                "batch",
                2,
                json!({"workloads": [{"kind": "Job", "name": "nightly"}],
                                         "containers": ["app"]}),
            ),
        );
        put(
            &mut w.jobs,
            json!({"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": "nightly", "namespace": "shop"},
                   "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}}}),
        );
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let ctx = busy_context();
        for route in Route::ALL {
            let _ = review(route, &body, &ctx);
        }
    }

    #[test]
    fn arbitrary_json_reviews_never_panic(
        object in any_json(),
        old in any_json(),
        operation in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE"), Just("CONNECT"), Just("x")],
        kind in prop_oneof![Just("Pod"), Just("HorizontalPodAutoscaler"), Just("Deployment"),
                            Just("StatefulSet"), Just("CloudSqlBinding"), Just("Scale")],
        sub in prop::option::of(prop_oneof![Just("scale"), Just("status")]),
    ) {
        let ctx = busy_context();
        let mut body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": kind},
                        "resource": {"group": "", "version": "v1", "resource": "deployments"},
                        "name": "solo", "namespace": "shop", "operation": operation,
                        "userInfo": {}, "object": object, "oldObject": old}});
        if let Some(sub) = sub {
            body["request"]["subResource"] = json!(sub);
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        for route in Route::ALL {
            let _ = review(route, &bytes, &ctx);
        }
    }

    #[test]
    fn plausible_pods_get_a_patch_that_applies_and_is_idempotent(p in any_pod()) {
        let ctx = busy_context();
        if let Ok(bytes) = review(Route::MutatePods, &pod_review(&p), &ctx) {
            let response = serde_json::from_slice::<Value>(&bytes).unwrap()["response"].clone();
            prop_assert_eq!(&response["allowed"], &json!(true));
            let after = patched(&p, &response);
            prop_assert!(serde_json::from_value::<Pod>(after.clone()).is_ok());
            let again = answer(Route::MutatePods, &pod_review(&after), &ctx);
            prop_assert!(again.get("patch").is_none(), "not idempotent: {}", again);
        }
    }
}
