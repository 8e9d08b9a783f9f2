//! Behaviour of injection on whole pod templates: examples and properties.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, PodSpec, Volume, VolumeMount,
};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::api::{
    CloudSqlBinding, CloudSqlBindingSpec, CloudSqlInstance, CloudSqlInstanceSpec, WorkloadKind,
};

use super::*;

// ---------------------------------------------------------------- fixtures

/// The `orders` instance of the examples.
pub(crate) fn instance() -> CloudSqlInstance {
    instance_named("orders", "my-project:asia-northeast3:orders")
}

pub(crate) fn instance_named(name: &str, connection_name: &str) -> CloudSqlInstance {
    let spec: CloudSqlInstanceSpec = serde_json::from_value(json!({
        "connectionName": connection_name,
        "databaseVersion": "POSTGRES_16",
    }))
    .unwrap();
    CloudSqlInstance::new(name, spec)
}

/// A binding `namespace/name` to `orders` for Deployment `orders-api`, with
/// the top-level spec keys of `extra` (YAML) replacing the defaults.
pub(crate) fn binding(namespace: &str, name: &str, extra: &str) -> CloudSqlBinding {
    let mut spec = json!({
        "instanceRef": { "name": "orders" },
        "workloads": [{ "kind": "Deployment", "name": "orders-api" }],
        "database": { "name": "orders", "user": "orders-app" },
    });
    if !extra.trim().is_empty() {
        let extra: Value = serde_saphyr::from_str(extra).unwrap();
        for (key, value) in extra.as_object().unwrap() {
            spec[key] = value.clone();
        }
    }
    let spec: CloudSqlBindingSpec = serde_json::from_value(spec).unwrap();
    let mut binding = CloudSqlBinding::new(name, spec);
    binding.metadata.namespace = Some(namespace.to_owned());
    binding
}

pub(crate) fn plan_of(binding: &CloudSqlBinding, grant: u32, native: bool) -> InjectionPlan {
    let instance = if binding.spec.instance_ref.name == "billing" {
        instance_named("billing", "my-project:asia-northeast3:billing")
    } else {
        instance()
    };
    InjectionPlan::new(
        binding,
        &instance,
        Grant { per_pod: grant },
        TargetCapabilities {
            native_sidecars: native,
        },
    )
    .unwrap()
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn container(name: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(format!("example.com/{name}:1")),
        ..Container::default()
    }
}

/// One app container `api` with `LOG_LEVEL=info` and port 8080.
pub(crate) fn pod_with_app() -> PodSpec {
    let mut api = container("api");
    api.env = Some(vec![env("LOG_LEVEL", "info")]);
    api.ports = Some(vec![ContainerPort {
        container_port: 8080,
        ..ContainerPort::default()
    }]);
    PodSpec {
        containers: vec![api],
        ..PodSpec::default()
    }
}

fn env_of<'a>(pod: &'a PodSpec, container: &str) -> Vec<(&'a str, &'a str)> {
    pod.containers
        .iter()
        .find(|c| c.name == container)
        .and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
        .collect()
}

fn names(containers: &[Container]) -> Vec<&str> {
    containers.iter().map(|c| c.name.as_str()).collect()
}

fn one(extra: &str) -> PodInjection {
    PodInjection::new(vec![plan_of(
        &binding("shop", "orders-api", extra),
        10,
        true,
    )])
}

// ---------------------------------------------------------------- examples

#[test]
fn unix_socket_injection_mounts_the_socket_volume_in_app_and_proxy() {
    let mut pod = pod_with_app();
    let mut annotations = BTreeMap::new();
    one("").apply(&mut pod, &mut annotations).unwrap();
    assert_eq!(
        env_of(&pod, "api"),
        [
            ("LOG_LEVEL", "info"),
            (
                "INSTANCE_UNIX_SOCKET",
                "/cloudsql/my-project:asia-northeast3:orders"
            ),
            ("DB_NAME", "orders"),
            ("DB_USER", "orders-app"),
            ("DB_POOL_MAX_CONNS", "10"),
        ]
    );
    let proxy = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(proxy.name, "cloud-sql-proxy");
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        proxy.volume_mounts.as_ref().unwrap()[0].mount_path,
        "/cloudsql"
    );
    assert_eq!(
        pod.containers[0].volume_mounts.as_ref().unwrap()[0].name,
        "cloudsql"
    );
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(
        volume.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], one("").config_hash());
    assert!(annotations.contains_key(INJECTED_ANNOTATION));
}

#[test]
fn a_classic_sidecar_is_appended_after_the_user_containers() {
    let mut pod = pod_with_app();
    pod.containers.push(container("worker"));
    let inj = PodInjection::new(vec![plan_of(&binding("shop", "orders-api", ""), 10, false)]);
    inj.apply(&mut pod, &mut BTreeMap::new()).unwrap();
    assert_eq!(names(&pod.containers), ["api", "worker", "cloud-sql-proxy"]);
    assert!(pod.init_containers.is_none());
    let args = pod.containers[2].args.as_ref().unwrap();
    assert!(args.contains(&"--quitquitquit".to_owned()));
    assert!(args.contains(&"--admin-port=9091".to_owned()));
}

#[test]
fn removing_a_binding_leaves_user_env_untouched() {
    let original = pod_with_app();
    let mut pod = original.clone();
    let mut annotations = Some(BTreeMap::from([("team".to_owned(), "shop".to_owned())]));
    one("")
        .apply_for(WorkloadKind::Deployment, &mut pod, &mut annotations)
        .unwrap();
    remove_for(&mut pod, &mut annotations);
    assert_eq!(pod, original);
    assert_eq!(
        annotations,
        Some(BTreeMap::from([("team".to_owned(), "shop".to_owned())]))
    );
}

#[test]
fn removing_restores_a_template_that_had_no_annotations() {
    let original = pod_with_app();
    let mut pod = original.clone();
    let mut annotations = None;
    one("")
        .apply_for(WorkloadKind::Deployment, &mut pod, &mut annotations)
        .unwrap();
    assert!(annotations.is_some());
    remove_for(&mut pod, &mut annotations);
    assert_eq!((pod, annotations), (original, None));
}

#[test]
fn a_user_value_identical_to_ours_stays_the_users() {
    let mut pod = pod_with_app();
    pod.containers[0]
        .env
        .as_mut()
        .unwrap()
        .push(env("DB_NAME", "orders"));
    let original = pod.clone();
    let mut annotations = BTreeMap::new();
    one("").apply(&mut pod, &mut annotations).unwrap();
    let db_names = env_of(&pod, "api")
        .iter()
        .filter(|(n, _)| *n == "DB_NAME")
        .count();
    assert_eq!(db_names, 1, "not duplicated");
    remove(&mut pod, &mut annotations);
    assert_eq!(pod, original, "and not removed with ours");
}

#[test]
fn a_different_user_value_is_a_conflict_and_nothing_changes() {
    let mut pod = pod_with_app();
    pod.containers[0]
        .env
        .as_mut()
        .unwrap()
        .push(env("DB_NAME", "legacy"));
    pod.containers[0].env.as_mut().unwrap().push(EnvVar {
        name: "DB_USER".into(),
        value: None,
        value_from: Some(EnvVarSource::default()),
    });
    let original = pod.clone();
    let mut annotations = BTreeMap::new();
    let conflicts = one("").apply(&mut pod, &mut annotations).unwrap_err();
    let messages: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            r#"container "api" already sets DB_NAME="legacy"; binding shop/orders-api would set "orders""#,
            r#"container "api" already sets DB_USER from valueFrom; binding shop/orders-api would set "orders-app""#,
        ]
    );
    assert_eq!(pod, original);
    assert!(annotations.is_empty());
}

#[test]
fn a_user_container_or_volume_with_our_name_keeps_it_and_ours_moves_aside() {
    let mut pod = pod_with_app();
    pod.containers.push(container("cloud-sql-proxy"));
    pod.volumes = Some(vec![Volume {
        name: "cloudsql".into(),
        ..Volume::default()
    }]);
    one("containers: [api]\n")
        .apply(&mut pod, &mut BTreeMap::new())
        .unwrap();
    let proxy = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(proxy.name, "cloud-sql-proxy-1");
    assert_eq!(proxy.volume_mounts.as_ref().unwrap()[0].name, "cloudsql-1");
    assert_eq!(pod.volumes.as_ref().unwrap()[1].name, "cloudsql-1");
    assert_eq!(
        env_of(&pod, "cloud-sql-proxy"),
        [],
        "not selected by spec.containers"
    );
}

#[test]
fn health_ports_skip_the_ports_the_pod_uses() {
    let mut pod = pod_with_app();
    pod.containers[0].ports = Some(
        [9801, 9802, 9091]
            .map(|p| ContainerPort {
                container_port: p,
                ..ContainerPort::default()
            })
            .to_vec(),
    );
    let inj = PodInjection::new(vec![plan_of(&binding("shop", "orders-api", ""), 10, false)]);
    inj.apply(&mut pod, &mut BTreeMap::new()).unwrap();
    let args = pod.containers[1].args.clone().unwrap();
    assert!(args.contains(&"--http-port=9803".to_owned()), "{args:?}");
    assert!(args.contains(&"--admin-port=9092".to_owned()), "{args:?}");
    assert_eq!(
        pod.containers[1]
            .startup_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9803)
    );
}

#[test]
fn two_bindings_get_two_proxies_named_after_them_with_distinct_ports() {
    let orders = binding("shop", "orders-api", "");
    let billing = binding(
        "shop",
        "billing",
        "instanceRef: { name: billing }\nenv: { unixSocket: BILLING_SOCKET, database: BILLING_DB, user: BILLING_USER, poolMax: BILLING_POOL }\n",
    );
    let inj = PodInjection::new(vec![plan_of(&orders, 10, true), plan_of(&billing, 4, true)]);
    let mut pod = pod_with_app();
    inj.apply(&mut pod, &mut BTreeMap::new()).unwrap();
    let init = pod.init_containers.as_ref().unwrap();
    assert_eq!(
        names(init),
        ["cloud-sql-proxy-billing", "cloud-sql-proxy-orders-api"]
    );
    assert!(
        init[0]
            .args
            .as_ref()
            .unwrap()
            .contains(&"--http-port=9801".to_owned())
    );
    assert!(
        init[1]
            .args
            .as_ref()
            .unwrap()
            .contains(&"--http-port=9802".to_owned())
    );
    assert!(
        init[0]
            .args
            .as_ref()
            .unwrap()
            .contains(&"--max-connections=4".to_owned())
    );
    assert_eq!(
        pod.volumes.as_ref().unwrap().len(),
        1,
        "one socket directory for both"
    );
    assert_eq!(pod.containers[0].volume_mounts.as_ref().unwrap().len(), 1);
}

#[test]
fn two_bindings_setting_one_env_name_differently_conflict_naming_both() {
    let orders = binding("shop", "orders-api", "");
    let billing = binding("shop", "billing", "instanceRef: { name: billing }\n");
    let inj = PodInjection::new(vec![plan_of(&orders, 10, true), plan_of(&billing, 4, true)]);
    let conflicts = inj
        .apply(&mut pod_with_app(), &mut BTreeMap::new())
        .unwrap_err();
    let socket = conflicts
        .iter()
        .find(|c| matches!(&c.kind, ConflictKind::BindingEnv { name, .. } if name == "INSTANCE_UNIX_SOCKET"))
        .unwrap();
    assert_eq!(
        socket.binding.name, "orders-api",
        "the later binding in key order is refused"
    );
    assert_eq!(
        socket.to_string(),
        r#"container "api": binding shop/billing sets INSTANCE_UNIX_SOCKET="/cloudsql/my-project:asia-northeast3:billing"; binding shop/orders-api would set "/cloudsql/my-project:asia-northeast3:orders" (give one of them another env name in spec.env, or select other containers)"#
    );
}

#[test]
fn a_binding_selecting_no_container_of_the_pod_is_a_conflict() {
    let conflicts = one("containers: [web]\n")
        .apply(&mut pod_with_app(), &mut BTreeMap::new())
        .unwrap_err();
    assert!(matches!(
        conflicts[0].kind,
        ConflictKind::NoSelectedContainer { .. }
    ));
}

#[test]
fn a_tcp_proxy_on_a_port_the_pod_uses_is_a_conflict() {
    let conflicts = one("proxy: { socket: TCP, port: 8080 }\n")
        .apply(&mut pod_with_app(), &mut BTreeMap::new())
        .unwrap_err();
    assert_eq!(conflicts[0].kind, ConflictKind::UserPort { port: 8080 });
}

#[test]
fn cloud_run_gets_the_instances_annotation_and_env_but_no_sidecar() {
    let mut pod = pod_with_app();
    pod.containers[0].name.clear();
    let mut annotations = Some(BTreeMap::from([(
        CLOUD_RUN_INSTANCES_ANNOTATION.to_owned(),
        "other:us-central1:db,my-project:asia-northeast3:orders".to_owned(),
    )]));
    let original = (pod.clone(), annotations.clone());
    let inj = one("containers: [web]\n");
    inj.apply_for(WorkloadKind::KnativeService, &mut pod, &mut annotations)
        .unwrap();
    assert!(pod.init_containers.is_none() && pod.volumes.is_none() && pod.containers.len() == 1);
    assert_eq!(
        env_of(&pod, "").len(),
        5,
        "the unnamed first container is the app"
    );
    let map = annotations.as_ref().unwrap();
    assert_eq!(
        map[CLOUD_RUN_INSTANCES_ANNOTATION],
        "other:us-central1:db,my-project:asia-northeast3:orders"
    );

    let other = binding(
        "shop",
        "b",
        "instanceRef: { name: billing }\nenv: { unixSocket: B_SOCK, database: B_DB, user: B_USER, poolMax: B_POOL }\n",
    );
    let two = PodInjection::new(vec![
        plan_of(&binding("shop", "orders-api", ""), 10, true),
        plan_of(&other, 3, true),
    ]);
    let (mut pod, mut annotations) = original.clone();
    two.apply_for(WorkloadKind::KnativeService, &mut pod, &mut annotations)
        .unwrap();
    assert_eq!(
        annotations.as_ref().unwrap()[CLOUD_RUN_INSTANCES_ANNOTATION],
        "other:us-central1:db,my-project:asia-northeast3:orders,my-project:asia-northeast3:billing"
    );
    remove_for(&mut pod, &mut annotations);
    assert_eq!((pod, annotations), original);
}

#[test]
fn proxy_settings_do_not_roll_a_cloud_run_service() {
    let plain = one("");
    let other_image = one("proxy: { image: example.com/proxy:9 }\n");
    assert_ne!(plain.config_hash(), other_image.config_hash());
    assert_eq!(
        plain.config_hash_for(WorkloadKind::KnativeService),
        other_image.config_hash_for(WorkloadKind::KnativeService)
    );
}

#[test]
fn injecting_over_a_previous_injection_replaces_it() {
    let mut pod = pod_with_app();
    let mut annotations = BTreeMap::new();
    one("").apply(&mut pod, &mut annotations).unwrap();
    let connector = one("mode: Connector\n");
    connector.apply(&mut pod, &mut annotations).unwrap();
    assert!(pod.init_containers.is_none() && pod.volumes.is_none());
    assert_eq!(
        env_of(&pod, "api")[1],
        (
            "INSTANCE_CONNECTION_NAME",
            "my-project:asia-northeast3:orders"
        )
    );
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], connector.config_hash());
}

#[test]
fn an_empty_injection_takes_ours_out() {
    let original = pod_with_app();
    let mut pod = original.clone();
    let mut annotations = None;
    one("")
        .apply_for(WorkloadKind::Deployment, &mut pod, &mut annotations)
        .unwrap();
    PodInjection::new(vec![])
        .apply_for(WorkloadKind::Deployment, &mut pod, &mut annotations)
        .unwrap();
    assert_eq!((pod, annotations), (original, None));
}

// ---------------------------------------------------------------- properties

const ENV_NAMES: [&str; 7] = [
    "LOG_LEVEL",
    "DB_NAME",
    "DB_USER",
    "DB_POOL_MAX_CONNS",
    "INSTANCE_UNIX_SOCKET",
    "PORT",
    "X",
];
const ENV_VALUES: [&str; 5] = ["info", "orders", "orders-app", "10", "legacy"];

fn arb_env() -> impl Strategy<Value = Option<Vec<EnvVar>>> {
    let item = (
        prop::sample::select(&ENV_NAMES[..]),
        prop::sample::select(&ENV_VALUES[..]),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(name, value, from)| EnvVar {
            name: name.into(),
            value: (!from).then(|| value.into()),
            value_from: from.then(EnvVarSource::default),
        });
    prop::option::weighted(0.8, prop::collection::vec(item, 0..4))
}

fn arb_ports() -> impl Strategy<Value = Option<Vec<ContainerPort>>> {
    prop::option::of(prop::collection::vec(
        prop::sample::select(&[8080, 9801, 9802, 9091, 5432][..]).prop_map(|p| ContainerPort {
            container_port: p,
            ..ContainerPort::default()
        }),
        0..3,
    ))
}

fn arb_mounts() -> impl Strategy<Value = Option<Vec<VolumeMount>>> {
    prop::option::of(prop::collection::vec(
        prop::sample::select(
            &[
                ("data", "/data"),
                ("cache", "/cache"),
                ("data", "/cloudsql"),
            ][..],
        )
        .prop_map(|(n, p)| VolumeMount {
            name: n.into(),
            mount_path: p.into(),
            ..VolumeMount::default()
        }),
        0..2,
    ))
}

fn arb_container(name: &'static str) -> impl Strategy<Value = Container> {
    (
        arb_env(),
        arb_ports(),
        prop::bool::weighted(0.15).prop_flat_map(|m| {
            if m {
                arb_mounts().boxed()
            } else {
                Just(None).boxed()
            }
        }),
    )
        .prop_map(move |(env, ports, volume_mounts)| Container {
            env,
            ports,
            volume_mounts,
            ..container(name)
        })
}

prop_compose! {
    fn arb_pod()(
        apps in prop::sample::subsequence(vec!["api", "worker", "cloud-sql-proxy", "cloud-sql-proxy-orders-api"], 1..=3)
            .prop_flat_map(|names| names.into_iter().map(arb_container).collect::<Vec<_>>()),
        inits in prop::option::of(prop::sample::subsequence(vec!["migrate", "cloud-sql-proxy-1"], 0..=2)),
        volumes in prop::option::of(prop::sample::subsequence(vec!["data", "cloudsql", "cloudsql-1"], 0..=3)),
    ) -> PodSpec {
        let inits = inits.map(|names| names.into_iter().map(container).collect());
        let volumes = volumes.map(|names| names.into_iter().map(|n| Volume { name: n.into(), ..Volume::default() }).collect());
        PodSpec { containers: apps, init_containers: inits, volumes, ..PodSpec::default() }
    }
}

fn arb_annotations() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    prop::option::of(prop::collection::btree_map(
        prop::sample::select(&["team", "owner", CLOUD_RUN_INSTANCES_ANNOTATION][..])
            .prop_map(str::to_owned),
        prop::sample::select(
            &[
                "shop",
                "",
                "my-project:asia-northeast3:orders",
                "a:b:c, d:e:f,",
            ][..],
        )
        .prop_map(str::to_owned),
        0..3,
    ))
}

/// Bindings to inject, as spec extras: one or two, every mode.
const BINDING_SETS: [&[(&str, &str)]; 7] = [
    &[("orders-api", "")],
    &[("orders-api", "proxy: { socket: TCP }\n")],
    &[("orders-api", "mode: Connector\nnetwork: Private\n")],
    &[(
        "orders-api",
        "network: PSC\ndatabase: { name: orders, user: u@p.iam, iamAuth: true }\nproxy: { sidecar: Container }\n",
    )],
    &[(
        "orders-api",
        "containers: [api, worker]\nproxy: { sidecar: Native }\n",
    )],
    &[
        ("orders-api", ""),
        (
            "billing",
            "instanceRef: { name: billing }\nenv: { unixSocket: B_SOCK, database: B_DB, user: B_USER, poolMax: B_POOL }\n",
        ),
    ],
    &[("orders-api", ""), ("zz", "mode: Connector\n")],
];

fn injection_of(set: usize, grant: u32, native: bool) -> PodInjection {
    PodInjection::new(
        BINDING_SETS[set]
            .iter()
            .map(|(name, extra)| plan_of(&binding("shop", name, extra), grant, native))
            .collect(),
    )
}

fn arb_kind() -> impl Strategy<Value = WorkloadKind> {
    prop::sample::select(
        &[
            WorkloadKind::Deployment,
            WorkloadKind::Job,
            WorkloadKind::KnativeService,
        ][..],
    )
}

type Template = (PodSpec, Option<BTreeMap<String, String>>);

/// `template` with the grant-dependent values blanked: pool env values,
/// `--max-connections` and the config hash.
fn without_pool_values((mut pod, mut annotations): Template) -> Template {
    for c in pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten())
    {
        for e in c.env.iter_mut().flatten() {
            if e.name == "DB_POOL_MAX_CONNS" || e.name == "B_POOL" {
                e.value = None;
            }
        }
        for a in c.args.iter_mut().flatten() {
            if a.starts_with("--max-connections=") {
                a.clear();
            }
        }
    }
    if let Some(map) = annotations.as_mut() {
        map.remove(CONFIG_HASH_ANNOTATION);
    }
    (pod, annotations)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn injecting_twice_is_injecting_once(
        pod in arb_pod(), annotations in arb_annotations(), set in 0..BINDING_SETS.len(),
        native in any::<bool>(), kind in arb_kind(),
    ) {
        let inj = injection_of(set, 10, native);
        let (mut once, mut once_ann) = (pod.clone(), annotations.clone());
        if inj.apply_for(kind, &mut once, &mut once_ann).is_ok() {
            let (mut twice, mut twice_ann) = (once.clone(), once_ann.clone());
            prop_assert!(inj.apply_for(kind, &mut twice, &mut twice_ann).is_ok());
            prop_assert_eq!((twice, twice_ann), (once, once_ann));
        }
    }

    #[test]
    fn removing_after_injecting_restores_the_template_exactly(
        pod in arb_pod(), annotations in arb_annotations(), set in 0..BINDING_SETS.len(),
        native in any::<bool>(), kind in arb_kind(),
    ) {
        let (mut injected, mut injected_ann) = (pod.clone(), annotations.clone());
        match injection_of(set, 10, native).apply_for(kind, &mut injected, &mut injected_ann) {
            Ok(()) => {
                remove_for(&mut injected, &mut injected_ann);
                prop_assert_eq!((injected, injected_ann), (pod, annotations));
            }
            Err(conflicts) => {
                prop_assert!(!conflicts.is_empty());
                prop_assert_eq!((injected, injected_ann), (pod, annotations), "a conflict changes nothing");
            }
        }
    }

    #[test]
    fn the_users_containers_env_and_volumes_keep_their_content_and_order(
        pod in arb_pod(), annotations in arb_annotations(), set in 0..BINDING_SETS.len(),
        native in any::<bool>(), kind in arb_kind(),
    ) {
        let (mut injected, mut injected_ann) = (pod.clone(), annotations.clone());
        if injection_of(set, 10, native).apply_for(kind, &mut injected, &mut injected_ann).is_ok() {
            prop_assert!(injected.containers.len() >= pod.containers.len());
            for (before, after) in pod.containers.iter().zip(&injected.containers) {
                let env_before = before.env.clone().unwrap_or_default();
                let env_after = after.env.clone().unwrap_or_default();
                prop_assert_eq!(&env_after[..env_before.len()], &env_before[..]);
                let mounts_before = before.volume_mounts.clone().unwrap_or_default();
                let mounts_after = after.volume_mounts.clone().unwrap_or_default();
                prop_assert_eq!(&mounts_after[..mounts_before.len()], &mounts_before[..]);
                let stripped = Container { env: before.env.clone(), volume_mounts: before.volume_mounts.clone(), ..after.clone() };
                prop_assert_eq!(&stripped, before);
            }
            let ib = pod.init_containers.clone().unwrap_or_default();
            let ia = injected.init_containers.clone().unwrap_or_default();
            prop_assert_eq!(&ia[..ib.len()], &ib[..]);
            let vb = pod.volumes.clone().unwrap_or_default();
            let va = injected.volumes.clone().unwrap_or_default();
            prop_assert_eq!(&va[..vb.len()], &vb[..]);
            for (key, value) in annotations.iter().flatten() {
                if key != CLOUD_RUN_INSTANCES_ANNOTATION {
                    prop_assert_eq!(injected_ann.as_ref().and_then(|m| m.get(key)), Some(value));
                }
            }
        }
    }

    #[test]
    fn a_grant_change_alters_only_the_pool_values_and_the_hash(
        pod in arb_pod(), annotations in arb_annotations(), set in 0..BINDING_SETS.len(),
        native in any::<bool>(), kind in arb_kind(), grant in 1u32..50,
    ) {
        let (mut a, mut a_ann) = (pod.clone(), annotations.clone());
        let (mut b, mut b_ann) = (pod.clone(), annotations.clone());
        let ok_a = injection_of(set, 10, native).apply_for(kind, &mut a, &mut a_ann).is_ok();
        let ok_b = injection_of(set, grant, native).apply_for(kind, &mut b, &mut b_ann).is_ok();
        if ok_a && ok_b {
            let hash = |ann: &Option<BTreeMap<String, String>>| ann.as_ref().and_then(|m| m.get(CONFIG_HASH_ANNOTATION)).cloned();
            prop_assert_eq!(grant == 10, hash(&a_ann) == hash(&b_ann));
            prop_assert_eq!(without_pool_values((a, a_ann)), without_pool_values((b, b_ann)));
        }
    }

    #[test]
    fn the_partial_for_server_side_apply_matches_what_apply_injects(
        pod in arb_pod(), set in 0..BINDING_SETS.len(), native in any::<bool>(),
    ) {
        let inj = injection_of(set, 10, native);
        let mut annotations = BTreeMap::new();
        let mut injected = pod.clone();
        let applied = inj.apply(&mut injected, &mut annotations);
        let partial = inj.ssa_partial(WorkloadKind::Deployment, "w", "shop", &pod, &BTreeMap::new());
        prop_assert_eq!(applied.is_ok(), partial.is_ok());
        if let Ok(partial) = partial {
            let template = &partial["spec"]["template"];
            prop_assert_eq!(
                &template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
                &json!(annotations[CONFIG_HASH_ANNOTATION])
            );
            let ours = template["spec"]["initContainers"].as_array().map_or(0, Vec::len)
                + template["spec"]["containers"].as_array().into_iter().flatten()
                    .filter(|c| c.get("image").is_some()).count();
            prop_assert_eq!(
                ours,
                injected.containers.len() - pod.containers.len()
                    + injected.init_containers.map_or(0, |i| i.len()) - pod.init_containers.map_or(0, |i| i.len())
            );
        }
    }
}
