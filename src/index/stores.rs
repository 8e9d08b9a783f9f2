//! What the controllers know of the cluster: reflector stores of every kind
//! they read, and the (pure over those stores) questions a reconcile asks —
//! which workloads a binding selects, whether a binding may inject, what its
//! grant is, and what one workload's template should carry.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::api::{CloudSqlBinding, CloudSqlInstance, WorkloadKind, WorkloadSelector};
use crate::budget::{self, Allocation, CapacityInputs, CapacityResolution, MaxPods, PoolRequest};
use crate::plan::{Conflict, Grant, InjectionPlan, PodInjection, TargetCapabilities};
use crate::workload::{KnativeService, TemplateView, Workload, selector_matches};

/// The reflector stores the controllers read.
#[derive(Clone)]
pub struct Stores {
    pub instances: Store<CloudSqlInstance>,
    pub bindings: Store<CloudSqlBinding>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub daemon_sets: Store<DaemonSet>,
    pub replica_sets: Store<ReplicaSet>,
    pub cron_jobs: Store<CronJob>,
    pub jobs: Store<Job>,
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// Present once the Knative Serving `Service` CRD exists.
    pub knative: Arc<RwLock<Option<Store<KnativeService>>>>,
    /// What the Cloud SQL Admin API told us, per connection name.
    pub discovery: Option<Arc<crate::gcp::CapacityDiscovery>>,
    /// Budgets already computed, valid while nothing in the stores changed.
    pub budgets: BudgetCache,
}

/// Budgets of instances, each valid for one generation of the stores.
///
/// Every reconcile and every admission asks for grants, and a grant needs the
/// whole budget of its instance (every binding of it, every workload they
/// select): computed afresh each time that is O(bindings) per question and
/// O(bindings²) per convergence. The reflectors of [`super::Cluster`] bump
/// `generation` after each watch event has reached its store; a budget
/// computed at generation `g` is reused while the generation is still `g`.
/// A store changed while a budget was being computed has bumped the
/// generation after the change, so that budget is never reused past it.
#[derive(Clone, Default)]
pub struct BudgetCache {
    /// `None` for stores filled by hand (tests): nothing is cached.
    generation: Option<Arc<AtomicU64>>,
    entries: Arc<Mutex<HashMap<String, CachedBudget>>>,
}

struct CachedBudget {
    generation: u64,
    usable: Option<u32>,
    budget: Arc<Budget>,
}

/// Follows one kind's watch events and tells which of them change what a
/// budget reads of an object: its labels, whether it is being deleted, its
/// owners and its spec, except the pod template of a workload (which the
/// operator itself writes: injecting a template must not throw every cached
/// budget away; Knative services keep theirs, whose annotations set the
/// scale). Status never counts. Events that change none of that leave the
/// cached budgets valid.
#[derive(Debug, Default)]
pub struct BudgetRelevance {
    seen: HashMap<(Option<String>, String), u64>,
}

impl BudgetRelevance {
    /// Whether `event` may change a budget (then the generation moves once the
    /// event is in the store).
    pub fn observe<K: Resource + serde::Serialize>(
        &mut self,
        event: &kube::runtime::watcher::Event<K>,
    ) -> bool {
        use kube::runtime::watcher::Event;
        let key = |o: &K| {
            (
                o.meta().namespace.clone(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match event {
            Event::Apply(o) | Event::InitApply(o) => match budget_fingerprint(o) {
                Some(fp) => self.seen.insert(key(o), fp) != Some(fp),
                None => true,
            },
            Event::Delete(o) => {
                self.seen.remove(&key(o));
                true
            }
            Event::Init => {
                self.seen.clear();
                true
            }
            Event::InitDone => true,
        }
    }
}

/// A hash of what a budget reads of `obj` (see [`BudgetRelevance`]).
fn budget_fingerprint<K: Resource + serde::Serialize>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.labels.hash(&mut hasher);
    meta.deletion_timestamp.is_some().hash(&mut hasher);
    for owner in meta.owner_references.iter().flatten() {
        (&owner.kind, &owner.name, owner.controller).hash(&mut hasher);
    }
    let serde_json::Value::Object(mut whole) = serde_json::to_value(obj).ok()? else {
        return None;
    };
    let knative = whole
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .is_some_and(|v| v.starts_with("serving.knative.dev/"));
    if let Some(mut spec) = whole.remove("spec") {
        if !knative && let Some(spec) = spec.as_object_mut() {
            spec.remove("template");
            if let Some(job) = spec
                .get_mut("jobTemplate")
                .and_then(|t| t.get_mut("spec"))
                .and_then(|s| s.as_object_mut())
            {
                job.remove("template");
            }
        }
        spec.to_string().hash(&mut hasher);
    }
    Some(hasher.finish())
}

impl BudgetCache {
    /// A cache invalidated by `generation`, which the store writers bump.
    pub fn new(generation: Arc<AtomicU64>) -> BudgetCache {
        BudgetCache {
            generation: Some(generation),
            entries: Arc::default(),
        }
    }

    /// The counter to bump after every change to any store.
    pub fn generation(&self) -> Option<Arc<AtomicU64>> {
        self.generation.clone()
    }

    fn now(&self) -> Option<u64> {
        self.generation.as_ref().map(|g| g.load(Ordering::Acquire))
    }

    fn get(&self, instance: &str, generation: u64, usable: Option<u32>) -> Option<Arc<Budget>> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(instance)
            .filter(|c| c.generation == generation && c.usable == usable)
            .map(|c| c.budget.clone())
    }

    fn put(&self, instance: String, generation: u64, usable: Option<u32>, budget: Arc<Budget>) {
        if let Ok(mut entries) = self.entries.lock() {
            // Entries of older generations are dead: drop them.
            entries.retain(|_, c| c.generation >= generation);
            entries.insert(
                instance,
                CachedBudget {
                    generation,
                    usable,
                    budget,
                },
            );
        }
    }
}

/// One workload a binding selects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Whether and how a binding takes part in injection.
#[derive(Clone, Debug)]
pub enum Eligibility {
    /// It injects, connecting to this instance.
    Eligible(Arc<CloudSqlInstance>),
    /// Its instance does not exist: workloads are left exactly as they are
    /// (deleting an instance must never cause an outage).
    InstanceMissing,
    /// The instance does not admit the binding's namespace: nothing injected.
    NamespaceNotAllowed(Arc<CloudSqlInstance>),
    /// The binding is being deleted: its injection is taken out.
    Deleting,
}

/// What one workload's template (or one pod at admission) should carry.
pub struct Desire {
    /// The injection of every binding that takes part.
    pub injection: PodInjection,
    /// Per binding key, what happened.
    pub outcomes: BTreeMap<String, Outcome>,
    /// Keys of the taking-part bindings whose injection reaches the pods at
    /// admission rather than through the template.
    pub at_admission: BTreeSet<String>,
    /// Per refused binding key, the conflicts that refused it.
    pub conflicts: BTreeMap<String, Vec<Conflict>>,
}

impl Desire {
    /// What goes into the workload's template: the plans of the bindings
    /// injected through it.
    pub fn template_injection(&self) -> PodInjection {
        self.injection_where(|key| !self.at_admission.contains(key))
    }

    /// What the admission webhook injects into each new pod on top of the
    /// template (its hash is the template's admission annotation).
    pub fn admission_injection(&self) -> PodInjection {
        self.injection_where(|key| self.at_admission.contains(key))
    }

    fn injection_where(&self, keep: impl Fn(&str) -> bool) -> PodInjection {
        PodInjection::new(
            self.injection
                .plans()
                .iter()
                .filter(|p| keep(&p.binding().to_string()))
                .cloned()
                .collect(),
        )
    }
}

/// Template annotation of a workload whose bindings inject at admission: the
/// hash of what the webhook injects, so a change (of the grant, say) rolls
/// the workload's pods, which are then injected anew.
pub const ADMISSION_HASH_ANNOTATION: &str = "cloudsql.dev/admission-config-hash";

/// One workload a pod belongs to: the pod itself, an owner, or the Knative
/// service its labels name.
#[derive(Clone, Debug, PartialEq)]
pub struct PodOwner {
    /// The kind.
    pub kind: WorkloadKind,
    /// The name (a pod being created may have only a `generateName`: empty).
    pub name: String,
    /// Its labels, when known (an owner not yet in the cache: `None`).
    pub labels: Option<BTreeMap<String, String>>,
}

/// Knative's pod label naming the service a revision belongs to.
pub const KNATIVE_SERVICE_LABEL: &str = "serving.knative.dev/service";

/// What happened to one binding on one workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Its plan is part of the injection.
    Injected,
    /// Refused: it collides with the user's template or another binding.
    Conflict(String),
    /// Its plan could not be built.
    PlanFailed(String),
}

/// The key of a binding, `namespace/name`.
pub fn binding_key(binding: &CloudSqlBinding) -> String {
    format!(
        "{}/{}",
        binding.namespace().unwrap_or_default(),
        binding.name_any()
    )
}

/// Whether `key` is [`binding_key`] of `binding` (without building it).
fn is_key_of(key: &str, binding: &CloudSqlBinding) -> bool {
    let ns = binding.metadata.namespace.as_deref().unwrap_or_default();
    let name = binding.metadata.name.as_deref().unwrap_or_default();
    key.strip_prefix(ns)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| rest == name)
}

fn by_creation(a: &Arc<CloudSqlBinding>, b: &Arc<CloudSqlBinding>) -> std::cmp::Ordering {
    let at = |x: &Arc<CloudSqlBinding>| x.metadata.creation_timestamp.as_ref().map(|t| t.0);
    at(a).cmp(&at(b)).then_with(|| by_key(a, b))
}

/// The order of [`binding_key`] (namespace, then name), without building
/// the keys: sorts run over every binding of a namespace or an instance.
fn by_key(a: &Arc<CloudSqlBinding>, b: &Arc<CloudSqlBinding>) -> std::cmp::Ordering {
    let (a_ns, b_ns) = (
        a.metadata.namespace.as_deref().unwrap_or_default(),
        b.metadata.namespace.as_deref().unwrap_or_default(),
    );
    if a_ns == b_ns {
        let (a_name, b_name) = (
            a.metadata.name.as_deref().unwrap_or_default(),
            b.metadata.name.as_deref().unwrap_or_default(),
        );
        return a_name.cmp(b_name);
    }
    fn key(x: &CloudSqlBinding) -> impl Iterator<Item = u8> + '_ {
        let ns = x.metadata.namespace.as_deref().unwrap_or_default();
        let name = x.metadata.name.as_deref().unwrap_or_default();
        ns.bytes().chain(std::iter::once(b'/')).chain(name.bytes())
    }
    key(a).cmp(key(b))
}

fn get<K: Workload>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>> {
    store.get(&ObjectRef::new(name).within(ns))
}

fn select<K: Workload>(store: &Store<K>, ns: &str, entry: &WorkloadSelector) -> Vec<Arc<K>> {
    match (&entry.name, &entry.selector) {
        (Some(name), _) => get(store, ns, name).into_iter().collect(),
        (None, Some(selector)) => store
            .state()
            .into_iter()
            .filter(|o| o.namespace().as_deref() == Some(ns))
            .filter(|o| selector_matches(selector, o.meta().labels.as_ref()))
            .collect(),
        (None, None) => Vec::new(),
    }
}

fn entry_selects(
    entry: &WorkloadSelector,
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match (&entry.name, &entry.selector) {
        (Some(n), _) => n == name,
        (None, Some(selector)) => selector_matches(selector, labels),
        (None, None) => false,
    }
}

/// Whether our field manager owns anything in the object's spec (its pod
/// template): the proof that the object carries an injection of ours. The
/// record annotation alone is not: the workload's owner can write it (or
/// copy it from `kubectl get -o yaml` of an injected object).
pub fn carries_our_fields(meta: &ObjectMeta) -> bool {
    meta.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(crate::api::FIELD_MANAGER)
            && m.subresource.as_deref().unwrap_or_default().is_empty()
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
    })
}

/// The workloads of `store` that carry our fields (see [`carries_our_fields`]).
fn carrying_ours<K: Workload>(store: &Store<K>, out: &mut Vec<WorkloadId>) {
    for obj in store.state() {
        if carries_our_fields(obj.meta()) {
            out.push(WorkloadId {
                kind: K::KIND,
                namespace: obj.namespace().unwrap_or_default(),
                name: obj.name_any(),
            });
        }
    }
}

impl Stores {
    fn knative_store(&self) -> Option<Store<KnativeService>> {
        self.knative.read().ok().and_then(|g| g.clone())
    }

    /// The workloads of `binding`: those it selects now, and with them those
    /// its status lists (which may still carry its injection).
    pub fn workloads_of(
        &self,
        binding: &CloudSqlBinding,
    ) -> (BTreeSet<WorkloadId>, BTreeSet<WorkloadId>) {
        let ns = binding.namespace().unwrap_or_default();
        let selected: BTreeSet<WorkloadId> = self.selected(binding).into_iter().collect();
        let mut all = selected.clone();
        for w in binding.status.iter().flat_map(|s| s.workloads.iter()) {
            if let Some(kind) = WorkloadKind::ALL.into_iter().find(|k| k.as_str() == w.kind) {
                all.insert(WorkloadId {
                    kind,
                    namespace: ns.clone(),
                    name: w.name.clone(),
                });
            }
        }
        (selected, all)
    }

    /// Every workload with a mutable template that carries fields of ours.
    pub fn workloads_carrying_ours(&self) -> Vec<WorkloadId> {
        let mut out = Vec::new();
        carrying_ours(&self.deployments, &mut out);
        carrying_ours(&self.stateful_sets, &mut out);
        carrying_ours(&self.daemon_sets, &mut out);
        carrying_ours(&self.replica_sets, &mut out);
        carrying_ours(&self.cron_jobs, &mut out);
        if let Some(knative) = self.knative_store() {
            carrying_ours(&knative, &mut out);
        }
        out
    }

    /// Whether workload `id` carries fields of ours (see [`carries_our_fields`]).
    pub fn carries_ours(&self, id: &WorkloadId) -> bool {
        self.with_template(id, |meta, _, _| carries_our_fields(meta))
            .unwrap_or(false)
    }

    /// Whether any binding of the workload's namespace selects it now.
    pub fn selected_by_any(&self, id: &WorkloadId) -> bool {
        let labels = self
            .with_template(id, |meta, _, _| meta.labels.clone())
            .flatten();
        self.bindings_in_any_order(&id.namespace)
            .iter()
            .any(|b| Stores::selects(b, id.kind, &id.name, labels.as_ref()))
    }

    /// Every workload a binding selects now, deduplicated and sorted.
    pub fn selected(&self, binding: &CloudSqlBinding) -> Vec<WorkloadId> {
        self.selected_where(binding, |_| true)
    }

    /// What the entries of `binding` that `keep` accepts select now,
    /// deduplicated and sorted.
    fn selected_where(
        &self,
        binding: &CloudSqlBinding,
        keep: impl Fn(&WorkloadSelector) -> bool,
    ) -> Vec<WorkloadId> {
        let ns = binding.namespace().unwrap_or_default();
        let mut out = Vec::new();
        for entry in binding.spec.workloads.iter().filter(|e| keep(e)) {
            let names: Vec<String> = match entry.kind {
                WorkloadKind::Deployment => names(select(&self.deployments, &ns, entry)),
                WorkloadKind::StatefulSet => names(select(&self.stateful_sets, &ns, entry)),
                WorkloadKind::DaemonSet => names(select(&self.daemon_sets, &ns, entry)),
                WorkloadKind::ReplicaSet => names(select(&self.replica_sets, &ns, entry)),
                WorkloadKind::CronJob => names(select(&self.cron_jobs, &ns, entry)),
                WorkloadKind::Job => names(select(&self.jobs, &ns, entry)),
                WorkloadKind::Pod => match (&entry.name, &entry.selector) {
                    (Some(name), _) => self
                        .pods
                        .get(&ObjectRef::new(name).within(&ns))
                        .map(|p| vec![p.name_any()])
                        .unwrap_or_default(),
                    (None, Some(selector)) => self
                        .pods_matching(&ns, selector)
                        .map(|p| p.name_any())
                        .collect(),
                    (None, None) => Vec::new(),
                },
                WorkloadKind::KnativeService => self
                    .knative_store()
                    .map(|s| names(select(&s, &ns, entry)))
                    .unwrap_or_default(),
            };
            out.extend(names.into_iter().map(|name| WorkloadId {
                kind: entry.kind,
                namespace: ns.clone(),
                name,
            }));
        }
        out.sort();
        out.dedup();
        out
    }

    /// The bare Pods of namespace `ns` that `selector` matches.
    fn pods_matching<'a>(
        &self,
        ns: &'a str,
        selector: &'a LabelSelector,
    ) -> impl Iterator<Item = Arc<PartialObjectMeta<Pod>>> + 'a {
        self.pods
            .state()
            .into_iter()
            .filter(move |p| p.metadata.namespace.as_deref() == Some(ns))
            .filter(move |p| selector_matches(selector, p.metadata.labels.as_ref()))
    }

    /// Whether `binding` selects the workload `name` of `kind` with `labels`.
    pub fn selects(
        binding: &CloudSqlBinding,
        kind: WorkloadKind,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        binding
            .spec
            .workloads
            .iter()
            .any(|e| e.kind == kind && entry_selects(e, name, labels))
    }

    /// Bindings of a namespace, oldest first.
    pub fn bindings_in(&self, ns: &str) -> Vec<Arc<CloudSqlBinding>> {
        let mut out = self.bindings_in_any_order(ns);
        out.sort_by(by_creation);
        out
    }

    /// Bindings of a namespace, in no particular order (for triggers).
    pub fn bindings_in_any_order(&self, ns: &str) -> Vec<Arc<CloudSqlBinding>> {
        self.bindings
            .state()
            .into_iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(ns))
            .collect()
    }

    /// Bindings of an instance, in no particular order.
    pub fn bindings_of_any_order(&self, instance: &str) -> Vec<Arc<CloudSqlBinding>> {
        self.bindings
            .state()
            .into_iter()
            .filter(|b| b.spec.instance_ref.name == instance)
            .collect()
    }

    /// Bindings of an instance, in key order.
    pub fn bindings_of(&self, instance: &str) -> Vec<Arc<CloudSqlBinding>> {
        let mut out = self.bindings_of_any_order(instance);
        out.sort_by(by_key);
        out
    }

    /// Whether and how a binding takes part in injection.
    pub fn eligibility(&self, binding: &CloudSqlBinding) -> Eligibility {
        if binding.metadata.deletion_timestamp.is_some() {
            return Eligibility::Deleting;
        }
        let Some(instance) = self
            .instances
            .get(&ObjectRef::new(&binding.spec.instance_ref.name))
        else {
            return Eligibility::InstanceMissing;
        };
        if self.namespace_allowed(&instance, &binding.namespace().unwrap_or_default()) {
            Eligibility::Eligible(instance)
        } else {
            Eligibility::NamespaceNotAllowed(instance)
        }
    }

    /// Whether `instance.spec.allowedNamespaces` admits namespace `ns`.
    pub fn namespace_allowed(&self, instance: &CloudSqlInstance, ns: &str) -> bool {
        let Some(allowed) = &instance.spec.allowed_namespaces else {
            return true;
        };
        if allowed.names.iter().any(|n| n == ns) {
            return true;
        }
        let Some(selector) = &allowed.selector else {
            return false;
        };
        self.namespaces
            .get(&ObjectRef::new(ns))
            .is_some_and(|n| selector_matches(selector, n.metadata.labels.as_ref()))
    }

    fn hpa_max(&self, ns: &str, kind: &str, name: &str) -> Option<i32> {
        let hpas = self.hpas.state();
        budget::max_pods::hpa_max_replicas_for(
            hpas.iter()
                .filter(|h| h.metadata.namespace.as_deref() == Some(ns))
                .map(|h| &**h),
            kind,
            name,
        )
    }

    /// The most pods of one workload that can hold connections at once.
    pub fn max_pods(&self, id: &WorkloadId) -> Option<MaxPods> {
        let (ns, name) = (id.namespace.as_str(), id.name.as_str());
        use budget::max_pods as mp;
        Some(match id.kind {
            WorkloadKind::Deployment => mp::deployment(
                &*get(&self.deployments, ns, name)?,
                self.hpa_max(ns, "Deployment", name),
            ),
            WorkloadKind::StatefulSet => mp::stateful_set(
                &*get(&self.stateful_sets, ns, name)?,
                self.hpa_max(ns, "StatefulSet", name),
            ),
            WorkloadKind::ReplicaSet => mp::replica_set(
                &*get(&self.replica_sets, ns, name)?,
                self.hpa_max(ns, "ReplicaSet", name),
            ),
            WorkloadKind::DaemonSet => {
                let nodes = u32::try_from(self.nodes.state().len()).unwrap_or(u32::MAX);
                mp::daemon_set(&*get(&self.daemon_sets, ns, name)?, nodes)
            }
            WorkloadKind::Job => mp::job(&*get(&self.jobs, ns, name)?),
            WorkloadKind::CronJob => mp::cron_job(&*get(&self.cron_jobs, ns, name)?),
            WorkloadKind::Pod => {
                self.pods.get(&ObjectRef::new(name).within(ns))?;
                mp::pod()
            }
            WorkloadKind::KnativeService => {
                let store = self.knative_store()?;
                let svc = get(&store, ns, name)?;
                let annotations = svc
                    .spec
                    .template
                    .as_ref()
                    .and_then(|t| t.metadata.annotations.clone())
                    .unwrap_or_default();
                mp::knative_service(&annotations)
            }
        })
    }

    /// Max pods of a binding: the sum over the workloads it selects.
    pub fn binding_max_pods(&self, binding: &CloudSqlBinding) -> (u32, Vec<(WorkloadId, MaxPods)>) {
        let per: Vec<(WorkloadId, MaxPods)> = self
            .selected(binding)
            .into_iter()
            .filter_map(|id| self.max_pods(&id).map(|m| (id, m)))
            .collect();
        let total = per
            .iter()
            .fold(0u32, |acc, (_, m)| acc.saturating_add(m.count));
        (total, per)
    }

    /// The total of [`Stores::binding_max_pods`] without its per-workload
    /// list: what a budget reads. Bare Pods under a label selector (one pod
    /// each) are counted in place rather than listed, named and looked up
    /// again: a budget over such a binding is recomputed on every Pod
    /// created, and the binding may select thousands.
    pub fn binding_max_pods_total(&self, binding: &CloudSqlBinding) -> u32 {
        let mut pod_entries = binding
            .spec
            .workloads
            .iter()
            .filter(|e| e.kind == WorkloadKind::Pod);
        // With one Pod entry no pod can be counted twice; with more the
        // listing deduplicates them.
        let (Some(entry), None) = (pod_entries.next(), pod_entries.next()) else {
            return self.binding_max_pods(binding).0;
        };
        let (None, Some(selector)) = (&entry.name, &entry.selector) else {
            return self.binding_max_pods(binding).0;
        };
        let ns = binding.metadata.namespace.as_deref().unwrap_or_default();
        let pods = self.pods_matching(ns, selector).count();
        let pod = budget::max_pods::pod().count;
        self.selected_where(binding, |e| e.kind != WorkloadKind::Pod)
            .iter()
            .filter_map(|id| self.max_pods(id))
            .fold(
                u32::try_from(pods).unwrap_or(u32::MAX).saturating_mul(pod),
                |acc, m| acc.saturating_add(m.count),
            )
    }

    /// The instance's capacity, from its spec and (later) what discovery found.
    pub fn capacity(
        &self,
        instance: &CloudSqlInstance,
        discovered: Option<budget::DiscoveredInstance>,
    ) -> CapacityResolutionOrError {
        let spec = &instance.spec;
        let inputs = CapacityInputs {
            spec_max_connections: spec
                .capacity
                .max_connections
                .and_then(|n| u32::try_from(n).ok()),
            spec_tier: spec.capacity.tier.clone(),
            spec_database_version: spec.database_version.clone(),
            discovered,
            reserved: u32::try_from(spec.capacity.reserved_connections).unwrap_or(0),
            external: u32::try_from(spec.capacity.external_connections).unwrap_or(0),
        };
        budget::resolve_capacity(&inputs).map_err(|e| e.to_string())
    }

    /// The budget of an instance over every binding that takes part in it.
    pub fn budget(
        &self,
        instance: &CloudSqlInstance,
        capacity: &CapacityResolutionOrError,
    ) -> Arc<Budget> {
        let name = instance.name_any();
        let usable = match capacity {
            Ok(CapacityResolution::Known(c)) => Some(c.usable()),
            _ => None,
        };
        let generation = self.budgets.now();
        if let Some(g) = generation
            && let Some(cached) = self.budgets.get(&name, g, usable)
        {
            return cached;
        }
        let budget = Arc::new(self.compute_budget(&name, usable));
        if let Some(g) = generation {
            self.budgets.put(name, g, usable, budget.clone());
        }
        budget
    }

    fn compute_budget(&self, name: &str, usable: Option<u32>) -> Budget {
        let mut requests = Vec::new();
        let mut max_pods = BTreeMap::new();
        for binding in self.bindings_of(name) {
            if !matches!(self.eligibility(&binding), Eligibility::Eligible(_)) {
                continue;
            }
            let pods = self.binding_max_pods_total(&binding);
            let pool = &binding.spec.pool;
            let key = binding_key(&binding);
            max_pods.insert(key.clone(), pods);
            requests.push(PoolRequest {
                key,
                max_pods: pods,
                min_per_pod: u32::try_from(pool.min_per_pod).unwrap_or(1).max(1),
                max_per_pod: u32::try_from(pool.max_per_pod).unwrap_or(1).max(1),
                weight: u32::try_from(pool.weight).unwrap_or(1).max(1),
            });
        }
        let allocation = usable.and_then(|u| budget::allocate(u, &requests).ok());
        Budget {
            requests,
            max_pods,
            allocation,
        }
    }

    /// The per-pod grant of a binding: its share of the instance's budget, or
    /// `minPerPod` while the capacity is unknown.
    pub fn grant(&self, binding: &CloudSqlBinding, instance: &CloudSqlInstance) -> Grant {
        let capacity = self.capacity(instance, self.discovered(instance));
        let budget = self.budget(instance, &capacity);
        let key = binding_key(binding);
        let per_pod = budget
            .allocation
            .as_ref()
            .and_then(|a| a.grants.get(&key).copied())
            .unwrap_or_else(|| {
                u32::try_from(binding.spec.pool.min_per_pod)
                    .unwrap_or(1)
                    .max(1)
            });
        Grant { per_pod }
    }

    /// What the Admin API told us about the instance (filled by the discovery loop).
    pub fn discovered(&self, instance: &CloudSqlInstance) -> Option<budget::DiscoveredInstance> {
        if instance.spec.discovery != crate::api::Discovery::AdminApi {
            return None;
        }
        self.discovery
            .as_ref()?
            .discovered(&instance.spec.connection_name)
    }

    /// What the template of workload `id` should carry, given every binding of
    /// its namespace. Bindings are taken oldest first; one whose injection
    /// collides with what is already accepted is refused (`Conflict`).
    pub fn desire(
        &self,
        id: &WorkloadId,
        labels: Option<&BTreeMap<String, String>>,
        template: TemplateView<'_>,
        caps: TargetCapabilities,
        exclude: Option<&str>,
    ) -> Desire {
        // Only the bindings that select this workload take part (the others
        // have no route): filtered before the sort.
        let mut bindings: Vec<Arc<CloudSqlBinding>> = self
            .bindings_in_any_order(&id.namespace)
            .into_iter()
            .filter(|b| exclude.is_none_or(|key| !is_key_of(key, b)))
            .filter(|b| Stores::selects(b, id.kind, &id.name, labels))
            .collect();
        bindings.sort_by(by_creation);
        self.resolve(
            &bindings,
            id.kind,
            |b| {
                Stores::selects(b, id.kind, &id.name, labels)
                    .then_some(b.spec.injects_at_admission(id.kind))
            },
            template.spec,
            template.annotations,
            caps,
        )
    }

    /// The core of [`Stores::desire`], shared with the admission webhook: the
    /// injection of `bindings` (oldest first) into one pod spec of a workload
    /// of `kind` (which decides the platform). `route` says whether a binding
    /// selects the target at all (`None`) and, if so, whether its injection
    /// reaches the pods at admission (`Some(true)`) or through the template.
    /// Each binding's plan is tried on top of those already accepted; one that
    /// collides is refused with its conflicts.
    pub fn resolve(
        &self,
        bindings: &[Arc<CloudSqlBinding>],
        kind: WorkloadKind,
        route: impl Fn(&CloudSqlBinding) -> Option<bool>,
        spec: &PodSpec,
        annotations: Option<&BTreeMap<String, String>>,
        caps: TargetCapabilities,
    ) -> Desire {
        let mut accepted: Vec<InjectionPlan> = Vec::new();
        let mut desire = Desire {
            injection: PodInjection::default(),
            outcomes: BTreeMap::new(),
            at_admission: BTreeSet::new(),
            conflicts: BTreeMap::new(),
        };
        for binding in bindings {
            let Some(at_admission) = route(binding) else {
                continue;
            };
            let key = binding_key(binding);
            let (instance, grant) = match self.eligibility(binding) {
                Eligibility::Eligible(instance) => {
                    let grant = self.grant(binding, &instance);
                    (instance, grant)
                }
                // The instance is gone: keep injecting exactly what was injected
                // (recorded in the binding's status), so nothing rolls or breaks.
                Eligibility::InstanceMissing => match last_known(binding) {
                    Some(known) => known,
                    None => continue,
                },
                Eligibility::NamespaceNotAllowed(_) | Eligibility::Deleting => continue,
            };
            let plan = match InjectionPlan::new(binding, &instance, grant, caps) {
                Ok(plan) => plan,
                Err(err) => {
                    desire
                        .outcomes
                        .insert(key, Outcome::PlanFailed(err.to_string()));
                    continue;
                }
            };
            let mut trial = accepted.clone();
            trial.push(plan.clone());
            let mut spec: PodSpec = spec.clone();
            let mut annotations = annotations.cloned();
            match PodInjection::new(trial).apply_for(kind, &mut spec, &mut annotations) {
                Ok(()) => {
                    accepted.push(plan);
                    if at_admission {
                        desire.at_admission.insert(key.clone());
                    }
                    desire.outcomes.insert(key, Outcome::Injected);
                }
                Err(conflicts) => {
                    let message = conflicts
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    desire
                        .outcomes
                        .insert(key.clone(), Outcome::Conflict(message));
                    desire.conflicts.insert(key, conflicts);
                }
            }
        }
        desire.injection = PodInjection::new(accepted);
        desire
    }

    /// The workloads a pod belongs to, nearest first: the pod itself, its
    /// controller (ReplicaSet, Job, StatefulSet, DaemonSet) and that one's
    /// controller (Deployment of a ReplicaSet, CronJob of a Job), then the
    /// Knative service its `serving.knative.dev/service` label names.
    pub fn pod_owners(&self, ns: &str, pod: &ObjectMeta) -> Vec<PodOwner> {
        let controller_of = |meta: &ObjectMeta| {
            meta.owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .and_then(|o| {
                    WorkloadKind::from_object(&o.api_version, &o.kind).map(|k| (k, o.name.clone()))
                })
        };
        let mut out = vec![PodOwner {
            kind: WorkloadKind::Pod,
            name: pod.name.clone().unwrap_or_default(),
            labels: pod.labels.clone(),
        }];
        let mut next = controller_of(pod);
        // Two levels at most: Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob.
        for _ in 0..2 {
            let Some((kind, name)) = next.take() else {
                break;
            };
            let meta: Option<ObjectMeta> = match kind {
                WorkloadKind::ReplicaSet => match get(&self.replica_sets, ns, &name) {
                    Some(o) => Some(o.metadata.clone()),
                    None => {
                        // Not in the cache yet: the Deployment controller creates
                        // a ReplicaSet milliseconds before its pods.
                        if let Some(deployment) = self.deployment_of_new_replica_set(ns, &name, pod)
                        {
                            next = Some((WorkloadKind::Deployment, deployment));
                            out.push(PodOwner {
                                kind,
                                name,
                                labels: pod.labels.clone(),
                            });
                            continue;
                        }
                        None
                    }
                },
                WorkloadKind::Deployment => {
                    get(&self.deployments, ns, &name).map(|o| o.metadata.clone())
                }
                WorkloadKind::StatefulSet => {
                    get(&self.stateful_sets, ns, &name).map(|o| o.metadata.clone())
                }
                WorkloadKind::DaemonSet => {
                    get(&self.daemon_sets, ns, &name).map(|o| o.metadata.clone())
                }
                WorkloadKind::Job => get(&self.jobs, ns, &name).map(|o| o.metadata.clone()),
                WorkloadKind::CronJob => {
                    get(&self.cron_jobs, ns, &name).map(|o| o.metadata.clone())
                }
                WorkloadKind::Pod | WorkloadKind::KnativeService => None,
            };
            next = meta.as_ref().and_then(controller_of);
            out.push(PodOwner {
                kind,
                name,
                labels: meta.and_then(|m| m.labels),
            });
        }
        if let Some(service) = pod
            .labels
            .as_ref()
            .and_then(|l| l.get(KNATIVE_SERVICE_LABEL))
        {
            let labels = self
                .knative_store()
                .and_then(|s| get(&s, ns, service))
                .and_then(|s| s.metadata.labels.clone());
            out.push(PodOwner {
                kind: WorkloadKind::KnativeService,
                name: service.clone(),
                labels,
            });
        }
        out
    }

    /// The Deployment owning ReplicaSet `rs` of pod `pod`, when the ReplicaSet
    /// is not cached yet: the Deployment controller names it
    /// `<deployment>-<pod-template-hash>` and gives its pods that hash as a
    /// label, so a cached Deployment of that name whose selector matches the
    /// pod is its owner.
    fn deployment_of_new_replica_set(
        &self,
        ns: &str,
        rs: &str,
        pod: &ObjectMeta,
    ) -> Option<String> {
        let hash = pod.labels.as_ref()?.get("pod-template-hash")?;
        let name = rs.strip_suffix(hash.as_str())?.strip_suffix('-')?;
        let deployment = get(&self.deployments, ns, name)?;
        let selector = &deployment.spec.as_ref()?.selector;
        crate::workload::selector_matches(selector, pod.labels.as_ref()).then(|| name.to_owned())
    }

    /// Whether `binding` selects any of a pod's owners, and if so the nearest
    /// one it selects and whether that route injects at admission.
    pub fn pod_route<'a>(
        binding: &CloudSqlBinding,
        owners: &'a [PodOwner],
    ) -> Option<(&'a PodOwner, bool)> {
        let selected: Vec<&PodOwner> = owners
            .iter()
            .filter(|o| Stores::selects(binding, o.kind, &o.name, o.labels.as_ref()))
            .collect();
        let first = *selected.first()?;
        // A pod selected through a template the controller injects needs
        // nothing at admission; otherwise the webhook is its only way in.
        let at_admission = selected
            .iter()
            .all(|o| binding.spec.injects_at_admission(o.kind));
        Some((first, at_admission))
    }

    /// The pod template and labels of a workload with a mutable template, or
    /// `None` when it does not exist (or has none).
    pub fn with_template<R>(
        &self,
        id: &WorkloadId,
        f: impl FnOnce(&kube::api::ObjectMeta, TemplateView<'_>, serde_json::Value) -> R,
    ) -> Option<R> {
        fn on<K: Workload, R>(
            store: &Store<K>,
            id: &WorkloadId,
            f: impl FnOnce(&kube::api::ObjectMeta, TemplateView<'_>, serde_json::Value) -> R,
        ) -> Option<R> {
            let obj = get(store, &id.namespace, &id.name)?;
            let template = obj.template()?;
            let json = serde_json::to_value(&*obj).unwrap_or(serde_json::Value::Null);
            Some(f(obj.meta(), template, json))
        }
        match id.kind {
            WorkloadKind::Deployment => on(&self.deployments, id, f),
            WorkloadKind::StatefulSet => on(&self.stateful_sets, id, f),
            WorkloadKind::DaemonSet => on(&self.daemon_sets, id, f),
            WorkloadKind::ReplicaSet => on(&self.replica_sets, id, f),
            WorkloadKind::CronJob => on(&self.cron_jobs, id, f),
            WorkloadKind::KnativeService => on(&self.knative_store()?, id, f),
            WorkloadKind::Job | WorkloadKind::Pod => None,
        }
    }
}

/// The instance and grant a binding last injected with, from its status: used
/// while its instance is missing so its workloads stay exactly as they are.
fn last_known(binding: &CloudSqlBinding) -> Option<(Arc<CloudSqlInstance>, Grant)> {
    let status = binding.status.as_ref()?;
    let bound = status.instance.as_ref()?;
    let granted = status.pool.as_ref()?.granted_per_pod;
    let mut instance = CloudSqlInstance::new(
        &binding.spec.instance_ref.name,
        crate::api::CloudSqlInstanceSpec {
            connection_name: bound.connection_name.clone(),
            database_version: bound.database_version.clone(),
            capacity: Default::default(),
            discovery: crate::api::Discovery::None,
            allowed_namespaces: None,
        },
    );
    instance.status = Some(crate::api::CloudSqlInstanceStatus {
        database_version: bound.database_version.clone(),
        ..Default::default()
    });
    let per_pod = u32::try_from(granted).ok().filter(|g| *g > 0)?;
    Some((Arc::new(instance), Grant { per_pod }))
}

fn names<K: Resource>(objs: Vec<Arc<K>>) -> Vec<String> {
    objs.into_iter().map(|o| o.name_any()).collect()
}

/// A capacity resolution, or the error that prevented one.
pub type CapacityResolutionOrError = Result<CapacityResolution, String>;

/// The budget of one instance.
#[derive(Debug, PartialEq)]
pub struct Budget {
    /// One request per taking-part binding.
    pub requests: Vec<PoolRequest>,
    /// Max pods per binding key.
    pub max_pods: BTreeMap<String, u32>,
    /// The allocation, when the capacity is known.
    pub allocation: Option<Allocation>,
}

/// The writers of [`Stores::for_tests`]: tests feed the stores by hand.
#[cfg(test)]
pub(crate) struct TestWriters {
    pub instances: kube::runtime::reflector::store::Writer<CloudSqlInstance>,
    pub bindings: kube::runtime::reflector::store::Writer<CloudSqlBinding>,
    pub namespaces: kube::runtime::reflector::store::Writer<PartialObjectMeta<Namespace>>,
    pub hpas: kube::runtime::reflector::store::Writer<HorizontalPodAutoscaler>,
    pub deployments: kube::runtime::reflector::store::Writer<Deployment>,
    pub stateful_sets: kube::runtime::reflector::store::Writer<StatefulSet>,
    pub replica_sets: kube::runtime::reflector::store::Writer<ReplicaSet>,
    pub jobs: kube::runtime::reflector::store::Writer<Job>,
    pub pods: kube::runtime::reflector::store::Writer<PartialObjectMeta<Pod>>,
}

#[cfg(test)]
impl Stores {
    /// Empty stores and the writers that fill them (no watches).
    pub(crate) fn for_tests() -> (Stores, TestWriters) {
        use kube::runtime::reflector::store;
        let (instances, w_instances) = store();
        let (bindings, w_bindings) = store();
        let (namespaces, w_namespaces) = store();
        let (nodes, _) = store();
        let (hpas, w_hpas) = store();
        let (deployments, w_deployments) = store();
        let (stateful_sets, w_stateful_sets) = store();
        let (daemon_sets, _) = store();
        let (replica_sets, w_replica_sets) = store();
        let (cron_jobs, _) = store();
        let (jobs, w_jobs) = store();
        let (pods, w_pods) = store();
        (
            Stores {
                instances,
                bindings,
                namespaces,
                nodes,
                hpas,
                deployments,
                stateful_sets,
                daemon_sets,
                replica_sets,
                cron_jobs,
                jobs,
                pods,
                knative: Arc::default(),
                discovery: None,
                budgets: BudgetCache::default(),
            },
            TestWriters {
                instances: w_instances,
                bindings: w_bindings,
                namespaces: w_namespaces,
                hpas: w_hpas,
                deployments: w_deployments,
                stateful_sets: w_stateful_sets,
                replica_sets: w_replica_sets,
                jobs: w_jobs,
                pods: w_pods,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher;
    use proptest::prelude::*;
    use serde_json::json;

    fn binding(ns: &str, name: &str) -> Arc<CloudSqlBinding> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"instanceRef": {"name": "orders"},
                         "database": {"name": "orders", "user": "app"},
                         "pool": {"maxPerPod": 10, "minPerPod": 1},
                         "workloads": [{"kind": "Deployment", "name": name}]}
            }))
            .expect("a binding"),
        )
    }

    proptest! {
        // The allocation-free comparison orders exactly like the keys do
        // (namespaces may hold '-', which sorts before '/').
        #[test]
        fn by_key_orders_like_binding_key(
            a in ("[a-z0-9-]{1,6}", "[a-z0-9.-]{1,6}"),
            b in ("[a-z0-9-]{1,6}", "[a-z0-9.-]{1,6}"),
        ) {
            let (x, y) = (binding(&a.0, &a.1), binding(&b.0, &b.1));
            prop_assert_eq!(by_key(&x, &y), binding_key(&x).cmp(&binding_key(&y)));
            prop_assert!(is_key_of(&binding_key(&x), &x));
            prop_assert_eq!(is_key_of(&binding_key(&y), &x), binding_key(&x) == binding_key(&y));
        }
    }

    fn deployment(name: &str, replicas: i32) -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"replicas": replicas, "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "app", "image": "app"}]}}}
        }))
        .expect("a deployment")
    }

    fn instance() -> CloudSqlInstance {
        serde_json::from_value(json!({
            "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
            "metadata": {"name": "orders"},
            "spec": {"connectionName": "p:r:orders", "databaseVersion": "POSTGRES_16",
                     "discovery": "None",
                     "capacity": {"maxConnections": 100, "reservedConnections": 0}}
        }))
        .expect("an instance")
    }

    fn pod_of(rs: &str, labels: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(json!({
            "name": format!("{rs}-x1"), "namespace": "shop", "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                 "uid": "u", "controller": true}]
        }))
        .expect("pod metadata")
    }

    #[test]
    fn a_pod_of_a_replica_set_not_cached_yet_is_owned_by_its_deployment() {
        let (stores, mut w) = Stores::for_tests();
        w.deployments
            .apply_watcher_event(&watcher::Event::Apply(deployment("api", 1)));
        let kinds = |owners: Vec<PodOwner>| -> Vec<(WorkloadKind, String)> {
            owners.into_iter().map(|o| (o.kind, o.name)).collect()
        };
        // The ReplicaSet api-7c9d is not in the cache: its name and the pod's
        // pod-template-hash lead to the Deployment.
        let pod = pod_of(
            "api-7c9d",
            json!({"app": "api", "pod-template-hash": "7c9d"}),
        );
        assert_eq!(
            kinds(stores.pod_owners("shop", &pod)),
            vec![
                (WorkloadKind::Pod, "api-7c9d-x1".to_owned()),
                (WorkloadKind::ReplicaSet, "api-7c9d".to_owned()),
                (WorkloadKind::Deployment, "api".to_owned()),
            ]
        );
        // No hash label, another hash, or a pod the Deployment does not
        // select: only the ReplicaSet, as before.
        for pod in [
            pod_of("api-7c9d", json!({"app": "api"})),
            pod_of(
                "api-7c9d",
                json!({"app": "api", "pod-template-hash": "other"}),
            ),
            pod_of(
                "api-7c9d",
                json!({"app": "web", "pod-template-hash": "7c9d"}),
            ),
        ] {
            assert_eq!(
                kinds(stores.pod_owners("shop", &pod)),
                vec![
                    (WorkloadKind::Pod, "api-7c9d-x1".to_owned()),
                    (WorkloadKind::ReplicaSet, "api-7c9d".to_owned()),
                ]
            );
        }
    }

    #[test]
    fn a_cached_budget_lasts_exactly_until_the_generation_moves() {
        let (mut stores, mut w) = Stores::for_tests();
        let generation = Arc::new(AtomicU64::new(0));
        stores.budgets = BudgetCache::new(generation.clone());
        let instance = instance();
        w.instances
            .apply_watcher_event(&watcher::Event::Apply(instance.clone()));
        let b = (*binding("shop", "api")).clone();
        w.bindings.apply_watcher_event(&watcher::Event::Apply(b));
        w.deployments
            .apply_watcher_event(&watcher::Event::Apply(deployment("api", 4)));
        let capacity = stores.capacity(&instance, None);
        let first = stores.budget(&instance, &capacity);
        assert_eq!(first.max_pods.get("shop/api"), Some(&4));
        // Nothing moved: the same budget, not a new computation.
        assert!(Arc::ptr_eq(&first, &stores.budget(&instance, &capacity)));
        // The store changes and the writer bumps the generation: recomputed.
        w.deployments
            .apply_watcher_event(&watcher::Event::Apply(deployment("api", 30)));
        generation.fetch_add(1, Ordering::Release);
        let second = stores.budget(&instance, &capacity);
        assert_eq!(second.max_pods.get("shop/api"), Some(&30));
        // Another capacity at the same generation is another budget.
        let mut bigger = instance.clone();
        bigger.spec.capacity.max_connections = Some(1000);
        let third = stores.budget(&bigger, &stores.capacity(&bigger, None));
        assert!(!Arc::ptr_eq(&second, &third));
        assert_ne!(
            second.allocation.as_ref().map(|a| a.grants.clone()),
            third.allocation.as_ref().map(|a| a.grants.clone())
        );
    }

    #[test]
    fn only_what_a_budget_reads_moves_the_generation() {
        use watcher::Event;
        let mut relevance = BudgetRelevance::default();
        let d = deployment("api", 4);
        assert!(relevance.observe(&Event::Apply(d.clone())), "a new object");
        assert!(
            !relevance.observe(&Event::Apply(d.clone())),
            "the same again"
        );
        // Our own injection into the template, and status: not read by a budget.
        let mut injected = d.clone();
        let template = injected
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut());
        template.expect("a pod spec").containers[0].image = Some("app:2".into());
        injected.status = Some(Default::default());
        assert!(!relevance.observe(&Event::Apply(injected.clone())));
        // Replicas, labels and deletion are.
        assert!(relevance.observe(&Event::Apply(deployment("api", 5))));
        let mut labelled = deployment("api", 5);
        labelled.metadata.labels = Some([("team".to_owned(), "a".to_owned())].into());
        assert!(relevance.observe(&Event::Apply(labelled.clone())));
        let mut deleting = labelled.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(relevance.observe(&Event::Apply(deleting)));
        assert!(relevance.observe(&Event::Delete(labelled)));
        assert!(relevance.observe(&Event::<Deployment>::Init));
        assert!(relevance.observe(&Event::<Deployment>::InitDone));
        // A Knative service's template carries its scale: it counts.
        let knative = |max: &str| -> crate::workload::KnativeService {
            serde_json::from_value(json!({
                "apiVersion": "serving.knative.dev/v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"template": {"metadata": {"annotations": {"autoscaling.knative.dev/max-scale": max}},
                                      "spec": {"containers": [{"image": "app"}]}}}
            }))
            .expect("a knative service")
        };
        assert!(relevance.observe(&Event::Apply(knative("10"))));
        assert!(relevance.observe(&Event::Apply(knative("20"))));
        assert!(!relevance.observe(&Event::Apply(knative("20"))));
    }

    fn labelled_pod(ns: &str, name: &str, tier: &str) -> PartialObjectMeta<Pod> {
        serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": ns, "labels": {"tier": tier}}
        }))
        .expect("a pod's metadata")
    }

    proptest! {
        // The count-in-place total is the listing's sum, whatever mix of
        // entries (overlapping Pod entries, named pods, other namespaces).
        #[test]
        fn the_max_pods_total_is_the_sum_of_the_listing(
            pods in proptest::collection::vec((0..2usize, 0..3usize), 0..12),
            entries in proptest::collection::vec(0..5usize, 1..4),
        ) {
            let (stores, mut w) = Stores::for_tests();
            let tiers = ["web", "worker", "batch"];
            for (i, (ns, tier)) in pods.iter().enumerate() {
                let ns = ["shop", "other"][*ns];
                w.pods.apply_watcher_event(&watcher::Event::Apply(
                    labelled_pod(ns, &format!("p{i}"), tiers[*tier]),
                ));
            }
            w.deployments.apply_watcher_event(&watcher::Event::Apply(deployment("api", 3)));
            let entries: Vec<_> = entries
                .iter()
                .map(|e| match e {
                    0 => json!({"kind": "Pod", "selector": {"matchLabels": {"tier": "web"}}}),
                    1 => json!({"kind": "Pod", "selector": {"matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["web", "worker"]}]}}),
                    2 => json!({"kind": "Pod", "name": "p0"}),
                    3 => json!({"kind": "Deployment", "name": "api"}),
                    _ => json!({"kind": "Deployment", "selector": {"matchLabels": {"app": "api"}}}),
                })
                .collect();
            let b: CloudSqlBinding = serde_json::from_value(json!({
                "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                "metadata": {"name": "b", "namespace": "shop"},
                "spec": {"instanceRef": {"name": "orders"},
                         "database": {"name": "orders", "user": "app"},
                         "workloads": entries}
            }))
            .expect("a binding");
            prop_assert_eq!(stores.binding_max_pods_total(&b), stores.binding_max_pods(&b).0);
        }
    }

    #[test]
    fn stores_filled_by_hand_never_cache() {
        let (stores, mut w) = Stores::for_tests();
        let instance = instance();
        w.instances
            .apply_watcher_event(&watcher::Event::Apply(instance.clone()));
        let capacity = stores.capacity(&instance, None);
        let first = stores.budget(&instance, &capacity);
        assert!(!Arc::ptr_eq(&first, &stores.budget(&instance, &capacity)));
    }
}
