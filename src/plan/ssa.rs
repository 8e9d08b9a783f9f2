//! The server-side-apply partial object: only the fields the operator owns.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::api::WorkloadKind;

use super::conflict::Conflict;
use super::pod::{Merged, Platform, PodInjection};
use super::{CLOUD_RUN_INSTANCES_ANNOTATION, CONFIG_HASH_ANNOTATION, INJECTED_ANNOTATION};

impl PodInjection {
    /// The partial object the controller applies (field manager
    /// `cloudsql-binder`) to workload `kind` `namespace/name` whose template is
    /// currently `current` with `current_annotations`.
    ///
    /// For Kubernetes kinds it holds only our fields: our containers and init
    /// containers, our volume, and inside each app container (by name) only
    /// our env items and volume mounts, plus our template annotations.
    /// Server-side apply merges all of these lists by key, so the user's items
    /// are neither owned nor touched, and applying an empty injection drops
    /// everything we owned. The template sits at `spec.template`
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job),
    /// `spec.jobTemplate.spec.template` (CronJob), or is the Pod itself.
    ///
    /// A Knative Service is different. Its CRD (serving.knative.dev v0.51
    /// `services`) gives `spec.template.spec.containers` no list-map keys, so
    /// the API server treats the list as atomic: whoever applies it owns all
    /// of it, and an env item cannot be owned alone. The partial therefore
    /// carries the whole container list (the user's containers with our env
    /// merged in; after removal, without it), always, even for an empty
    /// injection: applying without the list would release it, and if we were
    /// its only owner the API server would delete the containers. Likewise the
    /// `run.googleapis.com/cloudsql-instances` annotation (one string holding
    /// the user's and our names) is included whenever it exists. The
    /// consequences: the controller must apply with `force: true` (taking the
    /// list from the user's field manager), a later server-side apply by the
    /// user without our env conflicts with `cloudsql-binder` (a client-side
    /// `kubectl apply` or an update simply replaces the list, and the next
    /// reconcile merges our env back), and we stay a co-owner of the
    /// container list as long as the controller manages the service.
    pub fn ssa_partial(
        &self,
        kind: WorkloadKind,
        name: &str,
        namespace: &str,
        current: &PodSpec,
        current_annotations: &BTreeMap<String, String>,
    ) -> Result<Value, Vec<Conflict>> {
        let platform = Platform::of(kind);
        let merged = self.merge(platform, current, &Some(current_annotations.clone()))?;
        let template = match platform {
            Platform::Kubernetes => kubernetes_template(&merged),
            Platform::CloudRun => cloud_run_template(&merged),
        };
        Ok(wrap(kind, name, namespace, template))
    }
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // k8s-openapi types always serialize to JSON (string map keys only).
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn our_annotations(merged: &Merged, extra: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(annotations) = &merged.annotations {
        for key in [CONFIG_HASH_ANNOTATION, INJECTED_ANNOTATION]
            .iter()
            .chain(extra)
        {
            if let Some(value) = annotations.get(*key) {
                out.insert((*key).to_owned(), Value::String(value.clone()));
            }
        }
    }
    out
}

fn template_object(
    annotations: Map<String, Value>,
    spec: Map<String, Value>,
) -> Map<String, Value> {
    let mut template = Map::new();
    if !annotations.is_empty() {
        template.insert("metadata".to_owned(), json!({ "annotations": annotations }));
    }
    if !spec.is_empty() {
        template.insert("spec".to_owned(), Value::Object(spec));
    }
    template
}

fn kubernetes_template(merged: &Merged) -> Map<String, Value> {
    let record = &merged.record;
    let mut containers = Vec::new();
    for container in &merged.pod.containers {
        if record.containers.contains(&container.name) {
            containers.push(to_json(container));
            continue;
        }
        let env_names = record.env.get(&container.name);
        let mount_paths = record.volume_mounts.get(&container.name);
        if env_names.is_none() && mount_paths.is_none() {
            continue;
        }
        let mut entry = Map::new();
        entry.insert("name".to_owned(), Value::String(container.name.clone()));
        if let Some(names) = env_names {
            let env: Vec<Value> = container
                .env
                .iter()
                .flatten()
                .filter(|e| names.contains(&e.name))
                .map(to_json)
                .collect();
            entry.insert("env".to_owned(), Value::Array(env));
        }
        if let Some(paths) = mount_paths {
            let mounts: Vec<Value> = container
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| paths.contains(&m.mount_path))
                .map(to_json)
                .collect();
            entry.insert("volumeMounts".to_owned(), Value::Array(mounts));
        }
        containers.push(Value::Object(entry));
    }
    let init_containers: Vec<Value> = merged
        .pod
        .init_containers
        .iter()
        .flatten()
        .filter(|c| record.init_containers.contains(&c.name))
        .map(to_json)
        .collect();
    let volumes: Vec<Value> = merged
        .pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| record.volumes.contains(&v.name))
        .map(to_json)
        .collect();

    let mut spec = Map::new();
    for (key, list) in [
        ("initContainers", init_containers),
        ("containers", containers),
        ("volumes", volumes),
    ] {
        if !list.is_empty() {
            spec.insert(key.to_owned(), Value::Array(list));
        }
    }
    template_object(our_annotations(merged, &[]), spec)
}

fn cloud_run_template(merged: &Merged) -> Map<String, Value> {
    let containers: Vec<Value> = merged
        .pod
        .containers
        .iter()
        .map(|c| {
            let mut value = to_json(c);
            // A single-container service may leave its container unnamed.
            if c.name.is_empty()
                && let Value::Object(map) = &mut value
            {
                map.remove("name");
            }
            value
        })
        .collect();
    let mut spec = Map::new();
    spec.insert("containers".to_owned(), Value::Array(containers));
    template_object(
        our_annotations(merged, &[CLOUD_RUN_INSTANCES_ANNOTATION]),
        spec,
    )
}

fn wrap(
    kind: WorkloadKind,
    name: &str,
    namespace: &str,
    mut template: Map<String, Value>,
) -> Value {
    let mut object = Map::new();
    object.insert("apiVersion".to_owned(), json!(kind.api_version()));
    object.insert("kind".to_owned(), json!(kind.object_kind()));
    let mut metadata = Map::new();
    metadata.insert("name".to_owned(), json!(name));
    metadata.insert("namespace".to_owned(), json!(namespace));
    match kind {
        WorkloadKind::Pod => {
            if let Some(Value::Object(mut template_meta)) = template.remove("metadata")
                && let Some(annotations) = template_meta.remove("annotations")
            {
                metadata.insert("annotations".to_owned(), annotations);
            }
            object.insert("metadata".to_owned(), Value::Object(metadata));
            if let Some(spec) = template.remove("spec") {
                object.insert("spec".to_owned(), spec);
            }
        }
        _ => {
            object.insert("metadata".to_owned(), Value::Object(metadata));
            if !template.is_empty() {
                let template = Value::Object(template);
                let spec = match kind {
                    WorkloadKind::CronJob => {
                        json!({ "jobTemplate": { "spec": { "template": template } } })
                    }
                    _ => json!({ "template": template }),
                };
                object.insert("spec".to_owned(), spec);
            }
        }
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{binding, instance, plan_of, pod_with_app};
    use crate::plan::{Grant, InjectionPlan, TargetCapabilities};

    fn injection(extra: &str) -> PodInjection {
        PodInjection::new(vec![plan_of(
            &binding("shop", "orders-api", extra),
            10,
            true,
        )])
    }

    #[test]
    fn the_partial_holds_only_our_fields() {
        let pod = pod_with_app();
        let partial = injection("")
            .ssa_partial(
                WorkloadKind::Deployment,
                "orders-api",
                "shop",
                &pod,
                &BTreeMap::new(),
            )
            .unwrap();
        let template = &partial["spec"]["template"];
        let app = &template["spec"]["containers"][0];
        assert_eq!(app["name"], "api");
        assert!(
            app.get("image").is_none(),
            "the user's image is not ours: {app}"
        );
        let env_names: Vec<&str> = app["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            env_names,
            [
                "INSTANCE_UNIX_SOCKET",
                "DB_NAME",
                "DB_USER",
                "DB_POOL_MAX_CONNS"
            ]
        );
        assert_eq!(
            template["spec"]["initContainers"][0]["name"],
            "cloud-sql-proxy"
        );
        assert_eq!(template["spec"]["volumes"][0]["name"], "cloudsql");
        assert!(template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].is_string());
        assert_eq!(partial["metadata"]["namespace"], "shop");
    }

    #[test]
    fn an_empty_injection_owns_nothing() {
        let mut pod = pod_with_app();
        let mut annotations = BTreeMap::new();
        injection("").apply(&mut pod, &mut annotations).unwrap();
        let partial = PodInjection::new(vec![])
            .ssa_partial(WorkloadKind::CronJob, "nightly", "shop", &pod, &annotations)
            .unwrap();
        assert_eq!(
            partial,
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly", "namespace": "shop"}})
        );
    }

    #[test]
    fn a_cron_job_template_sits_under_the_job_template() {
        let partial = injection("")
            .ssa_partial(
                WorkloadKind::CronJob,
                "nightly",
                "shop",
                &pod_with_app(),
                &BTreeMap::new(),
            )
            .unwrap();
        assert!(
            partial["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"].is_array()
        );
    }

    #[test]
    fn a_knative_partial_carries_the_whole_container_list_even_after_removal() {
        let mut pod = pod_with_app();
        pod.containers[0].name.clear();
        let mut annotations = BTreeMap::new();
        let inj = injection("");
        let partial = inj
            .ssa_partial(
                WorkloadKind::KnativeService,
                "web",
                "shop",
                &pod,
                &annotations,
            )
            .unwrap();
        let containers = partial["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1);
        assert!(containers[0].get("name").is_none());
        assert_eq!(containers[0]["image"], "example.com/api:1");
        assert_eq!(
            partial["spec"]["template"]["metadata"]["annotations"][CLOUD_RUN_INSTANCES_ANNOTATION],
            "my-project:asia-northeast3:orders"
        );

        let mut template_annotations = None;
        inj.apply_for(
            WorkloadKind::KnativeService,
            &mut pod,
            &mut template_annotations,
        )
        .unwrap();
        annotations = template_annotations.unwrap_or_default();
        let removal = PodInjection::new(vec![])
            .ssa_partial(
                WorkloadKind::KnativeService,
                "web",
                "shop",
                &pod,
                &annotations,
            )
            .unwrap();
        let containers = removal["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(
            containers[0]["env"],
            json!([{ "name": "LOG_LEVEL", "value": "info" }]),
            "ours is taken out"
        );
    }

    #[test]
    fn conflicts_come_back_instead_of_a_partial() {
        let mut pod = pod_with_app();
        pod.containers[0].env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "DB_NAME".into(),
            value: Some("legacy".into()),
            value_from: None,
        }]);
        let plan = InjectionPlan::new(
            &binding("shop", "orders-api", ""),
            &instance(),
            Grant { per_pod: 5 },
            TargetCapabilities {
                native_sidecars: true,
            },
        )
        .unwrap();
        let err = PodInjection::new(vec![plan])
            .ssa_partial(
                WorkloadKind::Deployment,
                "x",
                "shop",
                &pod,
                &BTreeMap::new(),
            )
            .unwrap_err();
        assert_eq!(
            err[0].to_string(),
            r#"container "api" already sets DB_NAME="legacy"; binding shop/orders-api would set "orders""#
        );
    }
}
