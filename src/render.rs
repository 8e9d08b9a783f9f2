//! `cloudsql-binder render`: the injection applied offline to YAML.
//!
//! Reads multi-document YAML holding CloudSqlInstances, CloudSqlBindings and
//! workloads, and prints every document back in order, with the injection of
//! the bindings that select a workload applied to its pod template (or, with
//! `remove`, every injection of ours taken out). Nothing is printed when
//! anything is wrong: every problem comes back as one [`RenderError`].
//!
//! The grant comes from the same connection budget the operator computes,
//! over the objects in the input: each instance's capacity from its spec
//! (`capacity.maxConnections`, else `capacity.tier` with the tier table; no
//! Admin API offline), each binding's max pods from the workloads and
//! HorizontalPodAutoscalers in the input (a DaemonSet counts as one node), and
//! the weighted fair share. An instance whose capacity the spec does not give
//! grants each binding its `maxPerPod` (the operator would ask the Admin API;
//! render cannot), so set `capacity.maxConnections` or `capacity.tier` to
//! render with the budget.
//!
//! A workload that no binding in the input selects is printed as it is (an
//! injection it already carries stays); `--remove` takes out every injection
//! of ours, whatever the bindings in the input. `kind: List` documents are not
//! looked into.
//!
//! Documents are re-serialized: key order and values are kept, comments and
//! empty documents are not. Plain scalars are read as kubectl reads them
//! (YAML 1.1: an unquoted `yes` is a boolean), and strings are written
//! quoted wherever any YAML reader could take them for something else.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use crate::api::{CloudSqlBinding, CloudSqlInstance, GROUP, VERSION, WorkloadKind};
use crate::error::Cause;
use crate::plan::{
    BindingKey, Conflict, Grant, InjectionPlan, PlanError, PodInjection, TargetCapabilities,
    remove_for,
};

/// How to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderOptions {
    /// Take our injection out of every workload instead of injecting.
    pub remove: bool,
    /// Whether the target cluster supports native sidecars (decides
    /// `proxy.sidecar: Auto`).
    pub native_sidecars: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            remove: false,
            native_sidecars: true,
        }
    }
}

/// One problem with the input; each displays as one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// The text is not YAML.
    #[error("{input}: document {document}, line {line}: invalid YAML: {message}")]
    Yaml {
        /// Source name (file, or `<stdin>`).
        input: String,
        /// 1-based document number in the source.
        document: usize,
        /// 1-based line in the source.
        line: u64,
        /// What the parser said.
        message: String,
        /// The parser's error.
        #[source]
        source: Cause,
    },
    /// A document is YAML but not a valid object of its kind.
    #[error("{input}: document {document} ({object}): {message}")]
    InvalidObject {
        /// Source name.
        input: String,
        /// 1-based document number in the source.
        document: usize,
        /// `Kind namespace/name`.
        object: String,
        /// What is wrong, and where.
        message: String,
        /// The underlying error (JSON, YAML), when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// A binding selects a kind no binding can select.
    #[error(
        "binding {binding}: spec.workloads[{index}].kind {kind:?} is not a kind a binding can select; use one of {allowed}"
    )]
    UnknownKind {
        /// The binding.
        binding: BindingKey,
        /// Index in `spec.workloads`.
        index: usize,
        /// The kind given.
        kind: String,
        /// The kinds allowed.
        allowed: String,
    },
    /// A binding's instance is not in the input.
    #[error(
        "binding {binding}: CloudSqlInstance {instance:?} (spec.instanceRef.name) is not in the input; add its YAML with another -f"
    )]
    InstanceNotFound {
        /// The binding.
        binding: BindingKey,
        /// `spec.instanceRef.name`.
        instance: String,
    },
    /// A binding cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Injecting into a workload would overwrite something.
    #[error("{workload}: {conflict}")]
    Conflict {
        /// `Kind namespace/name`.
        workload: String,
        /// The conflict.
        conflict: Conflict,
    },
}

/// Renders `inputs` (source name, text), in order, into one multi-document
/// YAML stream.
pub fn render(
    inputs: &[(String, String)],
    options: &RenderOptions,
) -> Result<String, Vec<RenderError>> {
    let mut errors = Vec::new();
    let mut docs = Vec::new();
    for (input, text) in inputs {
        match parse_documents(input, text) {
            Ok(nodes) => docs.extend(nodes.into_iter().enumerate().map(|(i, node)| Document {
                input: input.clone(),
                number: i + 1,
                node,
            })),
            Err(mut error) => errors.append(&mut error),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut instances: BTreeMap<String, CloudSqlInstance> = BTreeMap::new();
    let mut bindings: Vec<CloudSqlBinding> = Vec::new();
    let mut workloads: Vec<(usize, WorkloadKind)> = Vec::new();
    for (index, doc) in docs.iter().enumerate() {
        let json = doc.node.to_json();
        let api_version = json
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = json.get("kind").and_then(Value::as_str).unwrap_or_default();
        let ours = api_version == format!("{GROUP}/{VERSION}");
        match kind {
            "CloudSqlInstance" if ours => match serde_json::from_value::<CloudSqlInstance>(json) {
                Ok(instance) => {
                    instances.insert(instance.metadata.name.clone().unwrap_or_default(), instance);
                }
                Err(e) => errors.push(doc.invalid_because(e.to_string(), e)),
            },
            "CloudSqlBinding" if ours => match read_binding(doc, json) {
                Ok(binding) => bindings.push(binding),
                Err(mut e) => errors.append(&mut e),
            },
            _ => {
                if let Some(kind) = WorkloadKind::from_object(api_version, kind) {
                    workloads.push((index, kind));
                }
            }
        }
    }

    let grants = offline_grants(&docs, &instances, &bindings, &workloads);
    let mut plans: Vec<(CloudSqlBinding, InjectionPlan)> = Vec::new();
    if !options.remove {
        let caps = TargetCapabilities {
            native_sidecars: options.native_sidecars,
        };
        for binding in bindings {
            let key = match BindingKey::of(&binding) {
                Ok(key) => key,
                Err(e) => {
                    errors.push(e.into());
                    continue;
                }
            };
            let Some(instance) = instances.get(&binding.spec.instance_ref.name) else {
                errors.push(RenderError::InstanceNotFound {
                    binding: key,
                    instance: binding.spec.instance_ref.name.clone(),
                });
                continue;
            };
            let grant = grants
                .get(&key.to_string())
                .map(|per_pod| Grant { per_pod: *per_pod })
                .unwrap_or_else(|| Grant::requested(&binding));
            match InjectionPlan::new(&binding, instance, grant, caps) {
                Ok(plan) => plans.push((binding, plan)),
                Err(e) => errors.push(e.into()),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    for (index, kind) in workloads {
        let doc = &mut docs[index];
        let result = if options.remove {
            doc.edit_template(kind, |pod, annotations| {
                remove_for(pod, annotations);
                Ok(())
            })
        } else {
            let meta = doc
                .node
                .to_json()
                .get("metadata")
                .cloned()
                .unwrap_or(Value::Null);
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let namespace = namespace_of(&meta);
            let labels: BTreeMap<String, String> = meta
                .get("labels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let selected: Vec<InjectionPlan> = plans
                .iter()
                .filter(|(binding, plan)| {
                    plan.binding().namespace == namespace && selects(binding, kind, &name, &labels)
                })
                .map(|(_, plan)| plan.clone())
                .collect();
            if selected.is_empty() {
                continue;
            }
            let injection = PodInjection::new(selected);
            let workload = format!("{} {namespace}/{name}", kind.as_str());
            doc.edit_template(kind, |pod, annotations| {
                injection
                    .apply_for(kind, pod, annotations)
                    .map_err(|conflicts| {
                        conflicts
                            .into_iter()
                            .map(|conflict| RenderError::Conflict {
                                workload: workload.clone(),
                                conflict,
                            })
                            .collect()
                    })
            })
        };
        if let Err(mut e) = result {
            errors.append(&mut e);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut out = String::new();
    for doc in &docs {
        out.push_str("---\n");
        match serde_saphyr::to_string(&doc.node) {
            Ok(yaml) => out.push_str(&yaml),
            Err(e) => {
                errors.push(doc.invalid_because(format!("cannot be written back as YAML: {e}"), e))
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The per-pod grant of every binding, by `namespace/name`, from the budget
/// over the input's objects (see the module documentation).
fn offline_grants(
    docs: &[Document],
    instances: &BTreeMap<String, CloudSqlInstance>,
    bindings: &[CloudSqlBinding],
    workloads: &[(usize, WorkloadKind)],
) -> BTreeMap<String, u32> {
    use crate::budget::{self, CapacityInputs, CapacityResolution, PoolRequest, max_pods};
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

    let hpas: Vec<(String, HorizontalPodAutoscaler)> = docs
        .iter()
        .map(|d| d.node.to_json())
        .filter(|j| j.get("kind").and_then(Value::as_str) == Some("HorizontalPodAutoscaler"))
        .filter_map(|j| {
            let ns = namespace_of(j.get("metadata").unwrap_or(&Value::Null));
            serde_json::from_value(j).ok().map(|h| (ns, h))
        })
        .collect();
    // (namespace, kind, name, labels, max pods) of every workload in the input.
    let mut pods_of = Vec::new();
    for (index, kind) in workloads {
        let json = docs[*index].node.to_json();
        let meta = json.get("metadata").cloned().unwrap_or(Value::Null);
        let ns = namespace_of(&meta);
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let labels: BTreeMap<String, String> = meta
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        let hpa = || {
            let in_ns: Vec<HorizontalPodAutoscaler> = hpas
                .iter()
                .filter(|(n, _)| *n == ns)
                .map(|(_, h)| h.clone())
                .collect();
            max_pods::hpa_max_replicas_for(&in_ns, kind.object_kind(), &name)
        };
        let count = match kind {
            WorkloadKind::Deployment => serde_json::from_value(json)
                .ok()
                .map(|d| max_pods::deployment(&d, hpa())),
            WorkloadKind::StatefulSet => serde_json::from_value(json)
                .ok()
                .map(|d| max_pods::stateful_set(&d, hpa())),
            WorkloadKind::ReplicaSet => serde_json::from_value(json)
                .ok()
                .map(|d| max_pods::replica_set(&d, hpa())),
            WorkloadKind::DaemonSet => serde_json::from_value(json)
                .ok()
                .map(|d| max_pods::daemon_set(&d, 1)),
            WorkloadKind::Job => serde_json::from_value(json).ok().map(|d| max_pods::job(&d)),
            WorkloadKind::CronJob => serde_json::from_value(json)
                .ok()
                .map(|d| max_pods::cron_job(&d)),
            WorkloadKind::Pod => Some(max_pods::pod()),
            WorkloadKind::KnativeService => {
                let annotations: BTreeMap<String, String> = json
                    .pointer("/spec/template/metadata/annotations")
                    .and_then(|a| serde_json::from_value(a.clone()).ok())
                    .unwrap_or_default();
                Some(max_pods::knative_service(&annotations))
            }
        }
        .map_or(0, |m| m.count);
        pods_of.push((ns, *kind, name, labels, count));
    }

    let mut grants = BTreeMap::new();
    for (instance_name, instance) in instances {
        let mut requests = Vec::new();
        for binding in bindings
            .iter()
            .filter(|b| &b.spec.instance_ref.name == instance_name)
        {
            let ns = binding
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned());
            let key = format!("{ns}/{}", binding.metadata.name.clone().unwrap_or_default());
            let max_pods = pods_of
                .iter()
                .filter(|(wns, kind, name, labels, _)| {
                    *wns == ns && selects(binding, *kind, name, labels)
                })
                .fold(0u32, |acc, (.., count)| acc.saturating_add(*count));
            let pool = &binding.spec.pool;
            requests.push(PoolRequest {
                key,
                max_pods,
                min_per_pod: u32::try_from(pool.min_per_pod).unwrap_or(1).max(1),
                max_per_pod: u32::try_from(pool.max_per_pod).unwrap_or(1).max(1),
                weight: u32::try_from(pool.weight).unwrap_or(1).max(1),
            });
        }
        let spec = &instance.spec;
        let inputs = CapacityInputs {
            spec_max_connections: spec
                .capacity
                .max_connections
                .and_then(|n| u32::try_from(n).ok()),
            spec_tier: spec.capacity.tier.clone(),
            spec_database_version: spec.database_version.clone(),
            discovered: None,
            reserved: u32::try_from(spec.capacity.reserved_connections).unwrap_or(0),
            external: u32::try_from(spec.capacity.external_connections).unwrap_or(0),
        };
        match budget::resolve_capacity(&inputs) {
            Ok(CapacityResolution::Known(capacity)) => {
                if let Ok(allocation) = budget::allocate(capacity.usable(), &requests) {
                    grants.extend(allocation.grants);
                }
            }
            // Offline there is no Admin API to ask: without a capacity in the
            // spec, each binding gets what it requests.
            _ => grants.extend(requests.into_iter().map(|r| (r.key, r.max_per_pod))),
        }
    }
    grants
}

/// One parsed document and where it came from.
struct Document {
    input: String,
    number: usize,
    node: Node,
}

impl Document {
    fn invalid(&self, message: String) -> RenderError {
        self.invalid_with(message, None)
    }

    /// [`invalid`](Self::invalid), keeping the error that made it so.
    fn invalid_because(
        &self,
        message: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> RenderError {
        self.invalid_with(message, Some(Cause::new(source)))
    }

    fn invalid_with(&self, message: String, source: Option<Cause>) -> RenderError {
        let json = self.node.to_json();
        let kind = json.get("kind").and_then(Value::as_str).unwrap_or("object");
        let meta = json.get("metadata").cloned().unwrap_or(Value::Null);
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>");
        RenderError::InvalidObject {
            input: self.input.clone(),
            document: self.number,
            object: format!("{kind} {}/{name}", namespace_of(&meta)),
            message: one_line(&message),
            source,
        }
    }

    /// Runs `edit` on the workload's pod template (typed) and writes the
    /// changed parts back, keeping everything else as it was written.
    fn edit_template(
        &mut self,
        kind: WorkloadKind,
        edit: impl FnOnce(
            &mut PodSpec,
            &mut Option<BTreeMap<String, String>>,
        ) -> Result<(), Vec<RenderError>>,
    ) -> Result<(), Vec<RenderError>> {
        let path: &[&str] = match kind {
            WorkloadKind::Pod => &[],
            WorkloadKind::CronJob => &["spec", "jobTemplate", "spec", "template"],
            _ => &["spec", "template"],
        };
        let template = self
            .node
            .get_path(path)
            .map(Node::to_json)
            .unwrap_or(Value::Null);
        let Some(spec_json) = template.get("spec").filter(|s| s.is_object()) else {
            let at = path
                .iter()
                .chain(&["spec"])
                .copied()
                .collect::<Vec<_>>()
                .join(".");
            return Err(vec![
                self.invalid(format!("has no pod template: {at} is missing")),
            ]);
        };
        let mut pod: PodSpec = serde_json::from_value(spec_json.clone()).map_err(|e| {
            vec![self.invalid_because(format!("invalid pod template spec: {e}"), e)]
        })?;
        let annotations_json = template
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .cloned();
        let mut annotations: Option<BTreeMap<String, String>> =
            match annotations_json {
                None | Some(Value::Null) => None,
                Some(value) => Some(serde_json::from_value(value).map_err(|e| {
                    vec![self.invalid_because(
                        format!("pod template annotations must be strings: {e}"),
                        e,
                    )]
                })?),
            };
        let annotations_before = annotations.clone();
        let pod_before = pod.clone();

        edit(&mut pod, &mut annotations)?;

        let new_spec = serde_json::to_value(&pod).map_err(|e| {
            vec![self.invalid_because(format!("cannot write the pod template back: {e}"), e)]
        })?;
        let Some(template_node) = self.node.get_path_mut(path) else {
            return Ok(());
        };
        if pod != pod_before {
            let spec_node = template_node.entry("spec");
            for key in ["containers", "initContainers", "volumes"] {
                let mut new_value = new_spec.get(key).cloned();
                if let Some(Value::Array(items)) = new_value.as_mut() {
                    // A single-container Knative service may leave its container unnamed.
                    for item in items.iter_mut() {
                        if let Value::Object(map) = item
                            && map.get("name").and_then(Value::as_str) == Some("")
                        {
                            map.remove("name");
                        }
                    }
                }
                match new_value {
                    Some(value) => {
                        let merged = merge_json(spec_node.get(key), &value);
                        spec_node.set(key, merged);
                    }
                    None => spec_node.remove(key),
                }
            }
        }
        if annotations != annotations_before {
            // A template's metadata conventionally comes before its spec.
            if template_node.get("metadata").is_none()
                && let Node::Map(entries) = template_node
            {
                entries.insert(0, ("metadata".to_owned(), Node::Map(Vec::new())));
            }
            let metadata = template_node.entry("metadata");
            match &annotations {
                Some(map) => {
                    // Exactly these keys: ours may be gone. Written order kept.
                    let mut entries: Vec<(String, Node)> = match metadata.get("annotations") {
                        Some(Node::Map(old)) => old
                            .iter()
                            .filter(|(k, _)| map.contains_key(k))
                            .map(|(k, old_value)| {
                                let value = Value::String(map.get(k).cloned().unwrap_or_default());
                                (k.clone(), merge_json(Some(old_value), &value))
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    for (k, v) in map {
                        if !entries.iter().any(|(key, _)| key == k) {
                            entries.push((k.clone(), Node::Str(v.clone())));
                        }
                    }
                    metadata.set("annotations", Node::Map(entries));
                }
                None => {
                    metadata.remove("annotations");
                    if matches!(metadata, Node::Map(entries) if entries.is_empty()) {
                        template_node.remove("metadata");
                    }
                }
            }
        }
        Ok(())
    }
}

fn namespace_of(metadata: &Value) -> String {
    metadata
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .to_owned()
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses one source into its documents (empty ones skipped).
fn parse_documents(input: &str, text: &str) -> Result<Vec<Node>, Vec<RenderError>> {
    serde_saphyr::from_multiple::<Node>(text).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line());
        vec![RenderError::Yaml {
            input: input.to_owned(),
            document: document_at_line(text, line),
            line,
            message: yaml_message(&e.to_string()),
            source: Cause::new(e),
        }]
    })
}

/// The parser's message without its source snippet and repeated position,
/// on one line.
fn yaml_message(rendered: &str) -> String {
    let head = rendered.split("-->").next().unwrap_or(rendered);
    let mut message = one_line(head);
    if let Some(rest) = message.strip_prefix("error: ") {
        message = rest.to_owned();
    }
    // "line 23 column 1: ..." repeats what the error line says.
    if message.starts_with("line ")
        && let Some((_, rest)) = message.split_once(": ")
    {
        message = rest.to_owned();
    }
    // Advice about the parser's own options means nothing to a user.
    if let Some((before, _)) = message.split_once(", set DuplicateKeyPolicy") {
        message = before.to_owned();
    }
    if message.starts_with("duplicate mapping key") {
        message.push_str(" (is a --- missing between two documents?)");
    }
    message
}

/// The 1-based number of the document holding `line` (1-based): documents
/// are separated by `---` at the start of a line.
fn document_at_line(text: &str, line: u64) -> usize {
    let mut document = 1;
    let mut content = false;
    for (number, l) in text.lines().enumerate() {
        if number as u64 + 1 >= line {
            break;
        }
        if l == "---" || l.starts_with("--- ") {
            if content {
                document += 1;
            }
            content = false;
        } else if !l.trim().is_empty() && !l.trim_start().starts_with('#') {
            content = true;
        }
    }
    document
}

/// Reads a binding, checking first what the CRD schema would reject, so
/// that the messages name the field.
fn read_binding(doc: &Document, mut json: Value) -> Result<CloudSqlBinding, Vec<RenderError>> {
    let name = json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let namespace = namespace_of(json.get("metadata").unwrap_or(&Value::Null));
    let key = BindingKey {
        namespace: namespace.clone(),
        name,
    };
    let mut errors = Vec::new();
    let allowed = WorkloadKind::ALL.map(WorkloadKind::as_str).join(", ");
    let workloads = json
        .pointer("/spec/workloads")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (index, workload) in workloads.iter().enumerate() {
        let kind = workload
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !WorkloadKind::ALL.iter().any(|k| k.as_str() == kind) {
            errors.push(RenderError::UnknownKind {
                binding: key.clone(),
                index,
                kind: kind.to_owned(),
                allowed: allowed.clone(),
            });
        }
        if workload.get("name").is_some() == workload.get("selector").is_some() {
            errors.push(doc.invalid(format!(
                "spec.workloads[{index}]: exactly one of name and selector must be set"
            )));
        }
        for (i, expr) in workload
            .pointer("/selector/matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let op = expr
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&op) {
                errors.push(doc.invalid(format!(
                    "spec.workloads[{index}].selector.matchExpressions[{i}].operator {op:?} must be In, NotIn, Exists or DoesNotExist"
                )));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if let Some(meta) = json.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("namespace".to_owned(), Value::String(namespace));
    }
    serde_json::from_value(json).map_err(|e| vec![doc.invalid_because(e.to_string(), e)])
}

/// Whether a binding selects workload `kind` `name` with `labels` (same
/// namespace assumed).
fn selects(
    binding: &CloudSqlBinding,
    kind: WorkloadKind,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    binding.spec.workloads.iter().any(|w| {
        w.kind == kind
            && match (&w.name, &w.selector) {
                (Some(n), _) => n == name,
                (None, Some(selector)) => selector_matches(selector, labels),
                (None, None) => false,
            }
    })
}

/// Label selector semantics: every `matchLabels` pair and every expression
/// must hold; an empty selector matches everything.
fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let match_expressions = selector.match_expressions.iter().flatten().all(|expr| {
        let values = expr.values.as_deref().unwrap_or_default();
        let value = labels.get(&expr.key);
        match expr.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    match_labels && match_expressions
}

// ------------------------------------------------------------------ documents

/// A YAML document as written: maps keep their key order (serde_json's map
/// would sort it, and nobody wants their manifests alphabetized).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    fn to_json(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::UInt(u) => Value::from(*u),
            Node::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// A node for a value we produced: `name` first, then the rest.
    fn from_json(value: &Value) -> Node {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Node::Int(i),
                (None, Some(u), _) => Node::UInt(u),
                (None, None, Some(f)) => Node::Float(f),
                _ => Node::Null,
            },
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(map) => {
                let mut entries: Vec<(String, Node)> = Vec::with_capacity(map.len());
                if let Some(name) = map.get("name") {
                    entries.push(("name".to_owned(), Node::from_json(name)));
                }
                entries.extend(
                    map.iter()
                        .filter(|(k, _)| *k != "name")
                        .map(|(k, v)| (k.clone(), Node::from_json(v))),
                );
                Node::Map(entries)
            }
        }
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get_path(&self, path: &[&str]) -> Option<&Node> {
        path.iter().try_fold(self, |node, key| node.get(key))
    }

    fn get_path_mut(&mut self, path: &[&str]) -> Option<&mut Node> {
        let mut node = self;
        for key in path {
            let Node::Map(entries) = node else {
                return None;
            };
            node = entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)?;
        }
        Some(node)
    }

    /// The value at `key`, created as an empty map when absent (a non-map
    /// becomes a map).
    fn entry(&mut self, key: &str) -> &mut Node {
        if !matches!(self, Node::Map(_)) {
            *self = Node::Map(Vec::new());
        }
        match self {
            Node::Map(entries) => {
                let index = match entries.iter().position(|(k, _)| k == key) {
                    Some(index) => index,
                    None => {
                        entries.push((key.to_owned(), Node::Map(Vec::new())));
                        entries.len() - 1
                    }
                };
                &mut entries[index].1
            }
            // Not reached: made a map above.
            other => other,
        }
    }

    fn set(&mut self, key: &str, value: Node) {
        *self.entry(key) = value;
    }

    fn remove(&mut self, key: &str) {
        if let Node::Map(entries) = self {
            entries.retain(|(k, _)| k != key);
        }
    }

    /// The key a list item is matched by across a rewrite.
    fn item_key(&self) -> Option<(&'static str, String)> {
        ["mountPath", "name"]
            .into_iter()
            .find_map(|k| match self.get(k) {
                Some(Node::Str(s)) => Some((k, s.clone())),
                _ => None,
            })
    }
}

/// `new` (what the typed model produced) written over `old` (as written):
/// map keys keep their order and new keys follow; list items are matched by
/// `mountPath` or `name`, else by position; equal scalars keep their form.
/// Keys the typed model does not know survive; of the known ones, only the
/// lists we create (`env`, `volumeMounts`) disappear when absent from `new`.
fn merge_json(old: Option<&Node>, new: &Value) -> Node {
    match (old, new) {
        (Some(Node::Map(entries)), Value::Object(map)) => {
            let mut out: Vec<(String, Node)> = Vec::with_capacity(map.len());
            for (key, old_value) in entries {
                match map.get(key) {
                    Some(new_value) => {
                        out.push((key.clone(), merge_json(Some(old_value), new_value)))
                    }
                    None if key == "env" || key == "volumeMounts" => {}
                    None => out.push((key.clone(), old_value.clone())),
                }
            }
            for (key, value) in map {
                if !entries.iter().any(|(k, _)| k == key) {
                    out.push((key.clone(), Node::from_json(value)));
                }
            }
            Node::Map(out)
        }
        (Some(Node::Seq(items)), Value::Array(new_items)) => Node::Seq(
            new_items
                .iter()
                .enumerate()
                .map(|(i, new_item)| {
                    let new_key = Node::from_json(new_item).item_key();
                    let old_item = match &new_key {
                        Some(key) => items.iter().find(|o| o.item_key().as_ref() == Some(key)),
                        None => items.get(i),
                    };
                    merge_json(old_item, new_item)
                })
                .collect(),
        ),
        (
            Some(
                old @ (Node::Null
                | Node::Bool(_)
                | Node::Int(_)
                | Node::UInt(_)
                | Node::Float(_)
                | Node::Str(_)),
            ),
            _,
        ) if scalar_eq(old, new) => old.clone(),
        (_, new) => Node::from_json(new),
    }
}

/// Equal as values, or as text (`cpu: 1` read as the quantity "1").
fn scalar_eq(old: &Node, new: &Value) -> bool {
    let old_json = old.to_json();
    if old_json == *new {
        return true;
    }
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    text(&old_json).is_some() && text(&old_json) == text(new)
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => serializer.serialize_unit(),
            Node::Bool(b) => serializer.serialize_bool(*b),
            Node::Int(i) => serializer.serialize_i64(*i),
            Node::UInt(u) => serializer.serialize_u64(*u),
            Node::Float(f) => serializer.serialize_f64(*f),
            Node::Str(s) => serializer.serialize_str(s),
            Node::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Node::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(i64::try_from(v).map_or(Node::UInt(v), Node::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<Node, Node>()? {
            let key = match key {
                Node::Str(s) => s,
                other => match other.to_json() {
                    Value::String(s) => s,
                    json => json.to_string(),
                },
            };
            entries.retain(|(k, _)| *k != key);
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn inputs(paths: &[&Path]) -> Vec<(String, String)> {
        paths
            .iter()
            .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
            .collect()
    }

    fn one(text: &str) -> Vec<(String, String)> {
        vec![("input.yaml".to_owned(), text.to_owned())]
    }

    /// Options from a first-lines comment `# render: --remove --native-sidecars=false`.
    fn options_of(text: &str) -> RenderOptions {
        let mut options = RenderOptions::default();
        for line in text.lines().take_while(|l| l.starts_with('#')) {
            if let Some(flags) = line.strip_prefix("# render:") {
                for flag in flags.split_whitespace() {
                    match flag {
                        "--remove" => options.remove = true,
                        "--native-sidecars=false" => options.native_sidecars = false,
                        "--native-sidecars=true" => options.native_sidecars = true,
                        other => panic!("unknown flag {other} in a golden input"),
                    }
                }
            }
        }
        options
    }

    fn rendered_or_errors(result: Result<String, Vec<RenderError>>) -> String {
        match result {
            Ok(yaml) => yaml,
            Err(errors) => {
                let mut out = "# render fails, printing nothing; stderr:\n".to_owned();
                for e in errors {
                    out.push_str(&format!("# {e}\n"));
                }
                out
            }
        }
    }

    fn golden_cases() -> Vec<PathBuf> {
        let mut cases: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/golden"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".in.yaml"))
            .collect();
        cases.sort();
        cases
    }

    #[test]
    fn golden_files_match_what_render_prints() {
        let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
        let cases = golden_cases();
        assert!(cases.len() >= 12, "golden inputs are missing: {cases:?}");
        let mut differing = Vec::new();
        for case in cases {
            let text = std::fs::read_to_string(&case).unwrap();
            let name = case.file_name().unwrap().to_string_lossy().into_owned();
            let actual =
                rendered_or_errors(render(&[(name.clone(), text.clone())], &options_of(&text)));
            let out = case.with_file_name(name.replace(".in.yaml", ".out.yaml"));
            if update {
                std::fs::write(&out, &actual).unwrap();
            } else if std::fs::read_to_string(&out).unwrap_or_default() != actual {
                differing.push(format!("{name}:\n{actual}"));
            }
        }
        assert!(
            differing.is_empty(),
            "golden outputs differ (UPDATE_GOLDEN=1 cargo test --lib render rewrites them):\n{}",
            differing.join("\n")
        );
    }

    #[test]
    fn rendering_a_rendered_file_changes_nothing_and_removing_restores_it() {
        for case in golden_cases() {
            let text = std::fs::read_to_string(&case).unwrap();
            let options = options_of(&text);
            if options.remove {
                continue;
            }
            let Ok(once) = render(&one(&text), &options) else {
                continue;
            };
            assert_eq!(
                render(&one(&once), &options).unwrap(),
                once,
                "{}",
                case.display()
            );
            let removed = render(
                &one(&once),
                &RenderOptions {
                    remove: true,
                    ..options
                },
            )
            .unwrap();
            let original = render(
                &one(&text),
                &RenderOptions {
                    remove: true,
                    ..options
                },
            )
            .unwrap();
            assert_eq!(removed, original, "{}", case.display());
        }
    }

    #[test]
    fn the_examples_render_and_every_workload_is_bound() {
        let dir = repo().join("examples");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let out = render(&inputs(&paths), &RenderOptions::default()).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        let workloads: Vec<&Value> = docs
            .iter()
            .filter(|d| {
                let api = d["apiVersion"].as_str().unwrap_or_default();
                WorkloadKind::from_object(api, d["kind"].as_str().unwrap_or_default()).is_some()
            })
            .collect();
        assert_eq!(workloads.len(), 4);
        for w in workloads {
            assert!(
                w["spec"]["template"]["metadata"]["annotations"]["cloudsql.dev/config-hash"]
                    .is_string(),
                "{} is not injected",
                w["metadata"]["name"]
            );
        }
        // The HorizontalPodAutoscaler passes through unchanged, in place.
        assert_eq!(docs[2]["kind"], "HorizontalPodAutoscaler");
    }

    #[test]
    fn the_datapath_input_renders_when_present() {
        let path = repo().join("e2e/datapath/testdata/input.yaml");
        if path.exists() {
            render(&inputs(&[&path]), &RenderOptions::default()).unwrap();
        }
    }

    #[test]
    fn invalid_yaml_names_the_document_and_the_line() {
        let text = "apiVersion: v1\nkind: ConfigMap\n---\napiVersion: v1\nkind: [unclosed\n";
        let errors = render(&one(text), &RenderOptions::default()).unwrap_err();
        assert_eq!(errors.len(), 1);
        let message = errors[0].to_string();
        assert!(
            message.starts_with("input.yaml: document 2, line 5"),
            "{message}"
        );
        assert!(!message.contains('\n'));
    }

    #[test]
    fn a_binding_whose_instance_is_not_in_the_input_is_an_error() {
        let text = "apiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlBinding\nmetadata: { name: a, namespace: shop }\nspec:\n  instanceRef: { name: nowhere }\n  workloads: [{ kind: Deployment, name: x }]\n  database: { name: d, user: u }\n";
        let errors = render(&one(text), &RenderOptions::default()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            r#"binding shop/a: CloudSqlInstance "nowhere" (spec.instanceRef.name) is not in the input; add its YAML with another -f"#
        );
    }

    #[test]
    fn an_unknown_kind_in_a_binding_is_an_error_listing_the_kinds() {
        let text = "apiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlBinding\nmetadata: { name: a }\nspec:\n  instanceRef: { name: orders }\n  workloads: [{ kind: Rollout, name: x }]\n  database: { name: d, user: u }\n";
        let errors = render(&one(text), &RenderOptions::default()).unwrap_err();
        let message = errors[0].to_string();
        assert!(
            message.starts_with(
                r#"binding default/a: spec.workloads[0].kind "Rollout" is not a kind"#
            ),
            "{message}"
        );
        assert!(message.contains("Service.serving.knative.dev"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "apiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlBinding\nmetadata: { name: a }\nspec:\n  instanceRef: { name: one }\n  workloads: [{ kind: Deployment, name: x }]\n  database: { name: d, user: u }\n---\napiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlBinding\nmetadata: { name: b }\nspec:\n  instanceRef: { name: two }\n  workloads: [{ kind: Deployment, name: x }]\n  database: { name: d, user: u }\n";
        assert_eq!(
            render(&one(text), &RenderOptions::default())
                .unwrap_err()
                .len(),
            2
        );
    }

    #[test]
    fn documents_keep_their_key_order_and_unrelated_documents_pass_through() {
        let text = "kind: ConfigMap\napiVersion: v1\nmetadata: { name: c }\ndata:\n  z: \"1\"\n  a: \"true\"\n";
        let out = render(&one(text), &RenderOptions::default()).unwrap();
        assert_eq!(
            out,
            "---\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: c\ndata:\n  z: \"1\"\n  a: \"true\"\n"
        );
    }

    #[test]
    fn selectors_follow_label_selector_semantics() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "api".to_owned()),
            ("tier".to_owned(), "web".to_owned()),
        ]);
        let selector = |json: Value| serde_json::from_value::<LabelSelector>(json).unwrap();
        assert!(selector_matches(&selector(serde_json::json!({})), &labels));
        assert!(selector_matches(
            &selector(serde_json::json!({"matchLabels": {"app": "api"}})),
            &labels
        ));
        assert!(!selector_matches(
            &selector(serde_json::json!({"matchLabels": {"app": "web"}})),
            &labels
        ));
        assert!(selector_matches(
            &selector(serde_json::json!({"matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["db"]},
                {"key": "app", "operator": "Exists"},
                {"key": "canary", "operator": "DoesNotExist"}
            ]})),
            &labels
        ));
        assert!(!selector_matches(
            &selector(
                serde_json::json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]})
            ),
            &labels
        ));
    }
}
