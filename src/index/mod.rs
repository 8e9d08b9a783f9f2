//! The shared view of the cluster: reflector stores of everything the
//! operator reads, their lookups (bindings of an instance, workloads a
//! binding selects, pod owners, budgets), and the triggers that watch events
//! send to the controllers. Every replica keeps it, leader or not; the
//! controllers and the admission webhook read it, and it writes nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::predicates;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::{Predicate, PredicateConfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::api::{CloudSqlBinding, CloudSqlInstance, WorkloadKind};
use crate::plan::TargetCapabilities;
use crate::workload::{KnativeService, Workload};

mod admission;
mod orphans;
mod stores;

pub use admission::AdmissionScope;
pub use orphans::Orphans;
pub use stores::*;

/// Strips what the controllers never read from cached objects: of the
/// managed fields, only our field manager's entries are kept (they prove
/// what a workload carries of ours; see `carries_our_fields`).
fn trim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    if let Some(fields) = meta.managed_fields.as_mut() {
        fields.retain(|m| m.manager.as_deref() == Some(crate::api::FIELD_MANAGER));
        for entry in fields.iter_mut() {
            // Only which top-level fields we own is read: the set below them
            // (every env var, mount and probe of the proxy) is dropped.
            if let Some(f) = entry.fields_v1.as_mut()
                && let serde_json::Value::Object(owned) = &mut f.0
            {
                for value in owned.values_mut() {
                    *value = serde_json::Value::Object(Default::default());
                }
            }
            entry.time = None;
        }
        if fields.is_empty() {
            meta.managed_fields = None;
        }
    }
}

/// What a kind needs to be watched into a store of ours.
pub trait Cached:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + serde::Serialize
    + Send
    + Sync
    + 'static
{
}

impl<K> Cached for K where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize
        + Send
        + Sync
        + 'static
{
}

/// A reflector for `K` whose store the controllers read; returns the store and
/// the stream of touched objects (to map into reconcile triggers).
fn reflect<K>(
    api: Api<K>,
    generation: Arc<AtomicU64>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send,
)
where
    K: Cached,
{
    reflect_events(
        watcher(api, watcher::Config::default().any_semantic()),
        generation,
    )
}

/// [`reflect`] for our own kinds, whose objects a user writes: one object
/// that does not deserialize (stored under an older schema, say) is logged
/// and left out instead of failing every list and stalling the watch.
fn reflect_guarded<K>(
    client: Client,
    generation: Arc<AtomicU64>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send,
)
where
    K: Cached,
{
    let api = Api::<DeserializeGuard<K>>::all(client);
    reflect_events(
        watcher(api, watcher::Config::default().any_semantic())
            .filter_map(|event| futures::future::ready(unguard(event))),
        generation,
    )
}

/// The event with its valid objects; an object that failed to deserialize
/// is logged (one line, with its name and why) and dropped.
fn unguard<K: Resource<DynamicType = ()>>(
    event: Result<watcher::Event<DeserializeGuard<K>>, watcher::Error>,
) -> Option<Result<watcher::Event<K>, watcher::Error>> {
    let valid = |guard: DeserializeGuard<K>| match guard.0 {
        Ok(obj) => Some(obj),
        Err(invalid) => {
            warn!(
                kind = %K::kind(&()),
                namespace = invalid.metadata.namespace.as_deref().unwrap_or_default(),
                name = invalid.metadata.name.as_deref().unwrap_or_default(),
                error = %invalid,
                "an object does not match this operator's schema and is ignored"
            );
            None
        }
    };
    Some(match event {
        Err(err) => Err(err),
        Ok(watcher::Event::Init) => Ok(watcher::Event::Init),
        Ok(watcher::Event::InitDone) => Ok(watcher::Event::InitDone),
        Ok(watcher::Event::InitApply(g)) => Ok(watcher::Event::InitApply(valid(g)?)),
        Ok(watcher::Event::Apply(g)) => Ok(watcher::Event::Apply(valid(g)?)),
        Ok(watcher::Event::Delete(g)) => Ok(watcher::Event::Delete(valid(g)?)),
    })
}

/// The reflector over a stream of watch events (see [`reflect`]).
fn reflect_events<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    generation: Arc<AtomicU64>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send,
)
where
    K: Cached,
{
    let (reader, writer) = reflector::store();
    // This stream's own mark: set before the reflector applies an event, taken
    // after it did (events pass one at a time).
    let pending = Arc::new(AtomicBool::new(false));
    let stream = reflector(
        writer,
        budget_relevance(events.modify(trim), pending.clone()),
    )
    // After the event reached the store (see `BudgetCache`).
    .inspect(move |_| {
        if pending.swap(false, Ordering::AcqRel) {
            generation.fetch_add(1, Ordering::Release);
        }
    })
    .default_backoff()
    .touched_objects();
    (reader, stream)
}

use kube::runtime::reflector::reflector;

/// Marks the budget-relevant events of a watch stream (see
/// `BudgetRelevance`) in `pending`; the generation moves once such an
/// event has reached the store, downstream of the reflector.
fn budget_relevance<K, S>(stream: S, pending: Arc<AtomicBool>) -> impl Stream<Item = S::Item> + Send
where
    K: Resource + serde::Serialize + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut relevance = BudgetRelevance::default();
    stream.map(move |event| {
        if let Ok(e) = &event
            && relevance.observe(e)
        {
            pending.store(true, Ordering::Release);
        }
        event
    })
}

/// Bindings to reconcile when workload `obj` of kind `kind` changes: those in
/// its namespace that select it now, or that list it in their status.
fn bindings_for_workload(
    stores: &Stores,
    kind: WorkloadKind,
    ns: &str,
    name: &str,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> Vec<ObjectRef<CloudSqlBinding>> {
    stores
        .bindings_in_any_order(ns)
        .into_iter()
        .filter(|b| touches_workload(b, kind, name, labels))
        .map(|b| ObjectRef::from_obj(&*b))
        .collect()
}

/// Whether `binding` selects the workload now or lists it in its status.
fn touches_workload(
    binding: &CloudSqlBinding,
    kind: WorkloadKind,
    name: &str,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    Stores::selects(binding, kind, name, labels)
        || binding.status.as_ref().is_some_and(|s| {
            s.workloads
                .iter()
                .any(|w| w.kind == kind.as_str() && w.name == name)
        })
}

fn spawn_workload_mapper<K, S>(
    stream: S,
    stores: Stores,
    tx: broadcast::Sender<ObjectRef<CloudSqlBinding>>,
    orphans: Arc<Orphans>,
) where
    K: Workload,
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    let ns = obj.namespace().unwrap_or_default();
                    let labels = obj.meta().labels.clone();
                    let bindings = bindings_for_workload(
                        &stores,
                        K::KIND,
                        &ns,
                        &obj.name_any(),
                        labels.as_ref(),
                    );
                    // Ours, and no binding here will look at it: the sweeper does.
                    if bindings.is_empty() && carries_our_fields(obj.meta()) {
                        orphans.add(WorkloadId {
                            kind: K::KIND,
                            namespace: ns,
                            name: obj.name_any(),
                        });
                    }
                    for r in bindings {
                        let _ = tx.send(r);
                    }
                }
                Err(err) => {
                    warn!(kind = %K::KIND, error = %crate::telemetry::WatchError(&err), "watch error")
                }
            }
        }
    });
}

/// Runs a metadata-only reflector in the background, calling `on_change` for
/// every touched object.
fn spawn_metadata_reflector<K>(
    api: Api<kube::api::PartialObjectMeta<K>>,
    generation: Arc<AtomicU64>,
    on_change: impl Fn(&kube::api::PartialObjectMeta<K>) + Send + 'static,
) -> Store<kube::api::PartialObjectMeta<K>>
where
    K: Cached,
{
    let (reader, stream) = reflect(api, generation);
    spawn_forwarder(stream, on_change);
    reader
}

/// Whether the API server supports native sidecars (restartable init containers, 1.29+).
async fn server_has_native_sidecars(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(info) => {
            let minor: u32 = info
                .minor
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            info.major == "1" && minor >= 29
        }
        Err(err) => {
            warn!(error = %crate::telemetry::KubeError(&err), "cannot read the server version; assuming no native sidecars");
            false
        }
    }
}

/// Starts the Knative `Service` reflector once its CRD exists (now or later).
fn watch_for_knative(
    client: Client,
    stores: Stores,
    tx: broadcast::Sender<ObjectRef<CloudSqlBinding>>,
    orphans: Arc<Orphans>,
) {
    let generation = stores.budgets.generation().unwrap_or_default();
    tokio::spawn(async move {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let config =
            watcher::Config::default().fields("metadata.name=services.serving.knative.dev");
        let mut stream = std::pin::pin!(watcher(crds, config).default_backoff().applied_objects());
        while let Some(item) = stream.next().await {
            let Ok(crd) = item else { continue };
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            let started = stores.knative.read().map(|g| g.is_some()).unwrap_or(true);
            if established && !started {
                info!("Knative Serving is installed: binding Service.serving.knative.dev");
                let (store, stream) = reflect(
                    Api::<KnativeService>::all(client.clone()),
                    generation.clone(),
                );
                if let Ok(mut guard) = stores.knative.write() {
                    *guard = Some(store);
                }
                spawn_workload_mapper(stream, stores.clone(), tx.clone(), orphans.clone());
                // Bindings waiting for Knative services can now find them.
                for b in stores.bindings.state() {
                    let _ = tx.send(ObjectRef::from_obj(&*b));
                }
            }
        }
    });
}

/// How often bindings touched by pod events are reconciled, at most. A
/// binding over bare Pods counts every pod, so each of its reconciles is
/// O(pods): one per pod event (every creation, every status change) would
/// be O(pods²) during a burst and would compete with the admission webhook.
const POD_TRIGGER_PERIOD: Duration = Duration::from_millis(500);

/// Collects reconcile triggers and sends each at most once per period
/// (trailing edge: a trigger waits at most one period, never longer, however
/// often it repeats).
struct Coalescer {
    pending: Arc<std::sync::Mutex<std::collections::HashSet<ObjectRef<CloudSqlBinding>>>>,
}

impl Coalescer {
    fn spawn(tx: broadcast::Sender<ObjectRef<CloudSqlBinding>>, period: Duration) -> Coalescer {
        let pending: Arc<std::sync::Mutex<std::collections::HashSet<_>>> = Arc::default();
        let weak = Arc::downgrade(&pending);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Gone with its reflector: stop.
                let Some(pending) = weak.upgrade() else {
                    return;
                };
                let due: Vec<_> = match pending.lock() {
                    Ok(mut set) => set.drain().collect(),
                    Err(_) => return,
                };
                for r in due {
                    let _ = tx.send(r);
                }
            }
        });
        Coalescer { pending }
    }

    fn add(&self, r: ObjectRef<CloudSqlBinding>) {
        if let Ok(mut set) = self.pending.lock() {
            set.insert(r);
        }
    }
}

/// Capacity of the trigger channels. A controller that falls further behind
/// than this resyncs every object (see `triggers`).
const TRIGGER_CAPACITY: usize = 16_384;

/// What every replica keeps of the cluster, leader or not: the synced stores
/// (read by the reconcilers and the admission webhook) and the channels on
/// which watch events ask for reconciles.
pub struct Cluster {
    /// The stores.
    pub stores: Stores,
    /// What the API server supports.
    pub caps: TargetCapabilities,
    /// Watch events asking for a binding reconcile.
    pub binding_events: broadcast::Sender<ObjectRef<CloudSqlBinding>>,
    /// Watch events asking for an instance reconcile.
    pub instance_events: broadcast::Sender<ObjectRef<CloudSqlInstance>>,
    /// Workloads the leader's sweeper looks at (kept while no leader runs:
    /// deduplicated, so at most one entry per workload).
    pub orphans: Arc<Orphans>,
    /// The namespaces this process's admission webhook serves.
    pub admission: AdmissionScope,
}

impl Cluster {
    /// Starts every reflector and returns once all stores have synced.
    /// `native_sidecars` forces the sidecar style (else the server's version
    /// decides); `discovery` is the Cloud SQL Admin API client, if any.
    pub async fn start(
        client: Client,
        native_sidecars: Option<bool>,
        discovery: Option<Arc<crate::gcp::CapacityDiscovery>>,
    ) -> Arc<Cluster> {
        let caps = TargetCapabilities {
            native_sidecars: match native_sidecars {
                Some(forced) => forced,
                None => server_has_native_sidecars(&client).await,
            },
        };
        let budgets = BudgetCache::new(Arc::new(AtomicU64::new(0)));
        let generation = budgets.generation().unwrap_or_default();
        let (binding_tx, _) = broadcast::channel(TRIGGER_CAPACITY);
        let (instance_tx, _) = broadcast::channel(TRIGGER_CAPACITY);
        let orphans = Arc::new(Orphans::default());

        let (deployments, deployment_stream) =
            reflect(Api::<Deployment>::all(client.clone()), generation.clone());
        let (stateful_sets, sts_stream) =
            reflect(Api::<StatefulSet>::all(client.clone()), generation.clone());
        let (daemon_sets, ds_stream) =
            reflect(Api::<DaemonSet>::all(client.clone()), generation.clone());
        let (replica_sets, rs_stream) =
            reflect(Api::<ReplicaSet>::all(client.clone()), generation.clone());
        let (cron_jobs, cj_stream) =
            reflect(Api::<CronJob>::all(client.clone()), generation.clone());
        let (jobs, job_stream) = reflect(Api::<Job>::all(client.clone()), generation.clone());
        let (hpas, hpa_stream) = reflect(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            generation.clone(),
        );
        let (bindings, binding_stream) =
            reflect_guarded::<CloudSqlBinding>(client.clone(), generation.clone());
        let (instances, instance_stream) =
            reflect_guarded::<CloudSqlInstance>(client.clone(), generation.clone());

        let stores_cell: Arc<RwLock<Option<Stores>>> = Arc::default();
        let ns_tx = binding_tx.clone();
        let ns_cell = stores_cell.clone();
        let namespaces = spawn_metadata_reflector(
            Api::<kube::api::PartialObjectMeta<Namespace>>::all(client.clone()),
            generation.clone(),
            move |ns| {
                if let Some(stores) = ns_cell.read().ok().and_then(|g| g.clone()) {
                    for b in stores.bindings_in_any_order(&ns.name_any()) {
                        let _ = ns_tx.send(ObjectRef::from_obj(&*b));
                    }
                }
            },
        );
        let pod_triggers = Coalescer::spawn(binding_tx.clone(), POD_TRIGGER_PERIOD);
        let pod_cell = stores_cell.clone();
        let pods = spawn_metadata_reflector(
            Api::<kube::api::PartialObjectMeta<Pod>>::all(client.clone()),
            generation.clone(),
            move |pod| {
                if let Some(stores) = pod_cell.read().ok().and_then(|g| g.clone()) {
                    for r in bindings_for_pod(&stores, pod) {
                        pod_triggers.add(r);
                    }
                }
            },
        );
        let nodes = spawn_metadata_reflector(
            Api::<kube::api::PartialObjectMeta<Node>>::all(client.clone()),
            generation.clone(),
            |_| {},
        );

        let stores = Stores {
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
            discovery,
            budgets,
        };
        if let Ok(mut guard) = stores_cell.write() {
            *guard = Some(stores.clone());
        }
        spawn_workload_mapper(
            deployment_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        spawn_workload_mapper(
            sts_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        spawn_workload_mapper(
            ds_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        spawn_workload_mapper(
            rs_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        spawn_workload_mapper(
            cj_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        spawn_workload_mapper(
            job_stream,
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );
        watch_for_knative(
            client.clone(),
            stores.clone(),
            binding_tx.clone(),
            orphans.clone(),
        );

        // HPA changes move max pods: every binding of the HPA's namespace looks again.
        spawn_forwarder(hpa_stream, {
            let stores = stores.clone();
            let tx = binding_tx.clone();
            move |hpa: &HorizontalPodAutoscaler| {
                for b in stores.bindings_in_any_order(&hpa.namespace().unwrap_or_default()) {
                    let _ = tx.send(ObjectRef::from_obj(&*b));
                }
            }
        });
        // A binding changed beyond its status (kube's predicates: its
        // generation, labels, annotations or finalizers moved; a new object
        // passes): reconcile it. A deleted one: its instance's budget moved,
        // and the workloads it injected are the sweeper's (no finalizer).
        spawn_forwarder(
            on_deletion(binding_stream, stores.bindings.clone(), {
                let stores = stores.clone();
                let itx = instance_tx.clone();
                let orphans = orphans.clone();
                move |b: &CloudSqlBinding| {
                    let _ = itx.send(ObjectRef::new(&b.spec.instance_ref.name));
                    // What it selected and what it listed: each is brought
                    // back to what the remaining bindings want (another
                    // binding may still select it).
                    for id in stores.workloads_of(b).1 {
                        orphans.add(id);
                    }
                }
            })
            // And when another installation writes its identity into the
            // status (see `operators`): that is how two installations find
            // each other promptly.
            .predicate_filter(
                beyond_status().combine(|b: &CloudSqlBinding| {
                    Some(fingerprint(
                        b.status.as_ref().and_then(|s| s.reconciled_by.as_deref()),
                    ))
                }),
                PredicateConfig::default(),
            ),
            {
                let tx = binding_tx.clone();
                move |b: &CloudSqlBinding| {
                    let _ = tx.send(ObjectRef::from_obj(b));
                }
            },
        );
        // An instance created, changed beyond its status (or in the database
        // version its bindings inject, from its status), or deleted: it looks
        // again, and so do its bindings.
        let instance_changed = {
            let stores = stores.clone();
            let tx = binding_tx.clone();
            let itx = instance_tx.clone();
            move |instance: &CloudSqlInstance| {
                let _ = itx.send(ObjectRef::from_obj(instance));
                for b in stores.bindings_of_any_order(&instance.name_any()) {
                    let _ = tx.send(ObjectRef::from_obj(&*b));
                }
            }
        };
        spawn_forwarder(
            on_deletion(
                instance_stream,
                stores.instances.clone(),
                instance_changed.clone(),
            )
            .predicate_filter(
                beyond_status().combine(|i: &CloudSqlInstance| {
                    let status = i.status.as_ref();
                    Some(fingerprint((
                        status.and_then(|s| s.database_version.as_deref()),
                        status.and_then(|s| s.reconciled_by.as_deref()),
                    )))
                }),
                PredicateConfig::default(),
            ),
            instance_changed,
        );

        // Everything reads these stores: return only once they have synced, so
        // a restart never computes from a half-filled cache (and never writes).
        store_ready(&stores.deployments).await;
        store_ready(&stores.stateful_sets).await;
        store_ready(&stores.daemon_sets).await;
        store_ready(&stores.replica_sets).await;
        store_ready(&stores.cron_jobs).await;
        store_ready(&stores.jobs).await;
        store_ready(&stores.pods).await;
        store_ready(&stores.namespaces).await;
        store_ready(&stores.nodes).await;
        store_ready(&stores.hpas).await;
        store_ready(&stores.bindings).await;
        store_ready(&stores.instances).await;
        info!("caches synced");
        Arc::new(Cluster {
            stores,
            caps,
            binding_events: binding_tx,
            instance_events: instance_tx,
            orphans,
            admission: AdmissionScope::default(),
        })
    }
}

fn fingerprint(value: impl std::hash::Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What of one of our objects its own reconcile reads, but its status, which
/// that reconcile writes: a reconcile triggered by its own status write would
/// find (while pods are being created) a new pod count, write it, and trigger
/// itself again, as fast as the API server answers. kube's predicates; the
/// cache behind them is keyed by uid, so a recreated object passes.
fn beyond_status<K: Resource + 'static>() -> impl Predicate<K> + Send + 'static {
    predicates::generation
        .combine(predicates::labels)
        .combine(predicates::annotations)
        .combine(predicates::finalizers)
}

/// Calls `on_delete` for every object of a touched-objects stream that is no
/// longer in `store` (the reflector upstream has applied its deletion), and
/// passes every item on.
fn on_deletion<K, S>(
    stream: S,
    store: Store<K>,
    on_delete: impl Fn(&K) + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: Stream<Item = Result<K, watcher::Error>> + Send,
{
    stream.inspect(move |item| {
        if let Ok(obj) = item
            && store.get(&ObjectRef::from_obj(obj)).is_none()
        {
            on_delete(obj);
        }
    })
}

/// Bindings to reconcile when a pod changes: those that select or list it as
/// a bare Pod (its count and entry), and those that reach it at admission
/// through one of its owners (a pod of theirs that missed the webhook is
/// reported and rolled by that reconcile).
fn bindings_for_pod(
    stores: &Stores,
    pod: &kube::api::PartialObjectMeta<Pod>,
) -> Vec<ObjectRef<CloudSqlBinding>> {
    let meta = &pod.metadata;
    let ns = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let bindings = stores.bindings_in_any_order(ns);
    // The owner walk only when a binding here may reach an owned pod.
    let owners = (meta
        .owner_references
        .as_ref()
        .is_some_and(|o| !o.is_empty())
        && bindings.iter().any(|b| b.spec.admits_owned_pods()))
    .then(|| stores.pod_owners(ns, meta));
    bindings
        .iter()
        .filter(|b| {
            touches_workload(b, WorkloadKind::Pod, name, meta.labels.as_ref())
                || owners
                    .as_ref()
                    .is_some_and(|o| matches!(Stores::pod_route(b, o), Some((_, true))))
        })
        .map(|b| ObjectRef::from_obj(&**b))
        .collect()
}

/// Drives a reflector stream in the background, calling `on_change` for every touched object.
fn spawn_forwarder<K, S>(stream: S, on_change: impl Fn(&K) + Send + 'static)
where
    K: Resource<DynamicType = ()> + Send + 'static,
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => on_change(&obj),
                Err(err) => {
                    warn!(kind = %K::kind(&()), error = %crate::telemetry::WatchError(&err), "watch error")
                }
            }
        }
    });
}

/// Waits until a store has synced. Polled in a loop: a store's readiness may
/// wake only one of several waiters (the controller's own runner waits too).
pub async fn store_ready<K>(store: &Store<K>)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut ready = std::pin::pin!(store.wait_until_ready());
    while tokio::time::timeout(Duration::from_millis(100), &mut ready)
        .await
        .is_err()
    {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_of_pod_triggers_is_one_reconcile_per_period_per_binding() {
        let (tx, mut rx) = broadcast::channel(64);
        let period = Duration::from_millis(100);
        let coalescer = Coalescer::spawn(tx, period);
        let a = ObjectRef::<CloudSqlBinding>::new("a").within("shop");
        let b = ObjectRef::<CloudSqlBinding>::new("b").within("shop");
        for _ in 0..50 {
            coalescer.add(a.clone());
            coalescer.add(b.clone());
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            let r = tokio::time::timeout(4 * period, rx.recv())
                .await
                .expect("sent within a period or so")
                .expect("a trigger");
            got.push(r.name);
        }
        got.sort();
        assert_eq!(got, ["a", "b"]);
        // Nothing more until something new comes.
        assert!(
            tokio::time::timeout(3 * period, rx.recv()).await.is_err(),
            "a repeated trigger was sent twice"
        );
        coalescer.add(a.clone());
        let r = tokio::time::timeout(4 * period, rx.recv())
            .await
            .expect("sent again")
            .expect("a trigger");
        assert_eq!(r.name, "a");
    }

    #[test]
    fn a_pod_event_reaches_the_bindings_that_admit_it_through_its_owners() {
        use serde_json::json;
        let (stores, mut w) = Stores::for_tests();
        fn apply<K>(w: &mut kube::runtime::reflector::store::Writer<K>, v: K)
        where
            K: Resource<DynamicType = ()>
                + Clone
                + kube::runtime::reflector::Lookup<DynamicType = ()>,
        {
            w.apply_watcher_event(&watcher::Event::Apply(v));
        }
        let binding = |name: &str, spec: serde_json::Value| -> CloudSqlBinding {
            let mut b = json!({
                "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"instanceRef": {"name": "orders"},
                         "database": {"name": "orders", "user": "app"}}
            });
            if let (Some(to), Some(from)) = (b["spec"].as_object_mut(), spec.as_object()) {
                to.extend(from.clone());
            }
            serde_json::from_value(b).expect("a binding")
        };
        let api = [json!({"kind": "Deployment", "name": "api"})];
        for b in [
            binding(
                "at-admission",
                json!({"injection": "Admission", "workloads": api}),
            ),
            binding("in-template", json!({"workloads": api})),
            binding(
                "bare",
                json!({"workloads": [{"kind": "Pod", "selector": {"matchLabels": {"app": "api"}}}]}),
            ),
            binding(
                "other",
                json!({"injection": "Admission", "workloads": [{"kind": "Deployment", "name": "web"}]}),
            ),
        ] {
            apply(&mut w.bindings, b);
        }
        let owner = |kind: &str, name: &str| json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": name, "controller": true}]);
        apply(
            &mut w.deployments,
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "api", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "api"}},
                         "template": {"metadata": {"labels": {"app": "api"}},
                                      "spec": {"containers": [{"name": "app", "image": "app"}]}}}
            }))
            .expect("a deployment"),
        );
        apply(
            &mut w.replica_sets,
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": "api-1", "namespace": "shop", "ownerReferences": owner("Deployment", "api")},
                "spec": {"selector": {"matchLabels": {"app": "api"}}}
            }))
            .expect("a replica set"),
        );
        let pod: kube::api::PartialObjectMeta<Pod> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-1-x", "namespace": "shop", "labels": {"app": "api"},
                         "ownerReferences": owner("ReplicaSet", "api-1")}
        }))
        .expect("a pod");
        let mut names: Vec<String> = bindings_for_pod(&stores, &pod)
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        assert_eq!(names, ["at-admission", "bare"]);
    }

    #[tokio::test]
    async fn only_changes_beyond_status_and_deletions_pass_the_filter() {
        let (store, mut writer) = reflector::store::<CloudSqlBinding>();
        let binding: CloudSqlBinding = serde_json::from_value(serde_json::json!({
            "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
            "metadata": {"name": "api", "namespace": "shop", "uid": "u1", "generation": 1},
            "spec": {"instanceRef": {"name": "orders"},
                     "database": {"name": "orders", "user": "app"},
                     "workloads": [{"kind": "Pod", "selector": {"matchLabels": {"app": "api"}}}]}
        }))
        .expect("a binding");
        // Its own status write (a new pod count).
        let mut counted = binding.clone();
        counted.status = Some(crate::api::CloudSqlBindingStatus {
            workloads_summary: Some("25/25".into()),
            ..Default::default()
        });
        // A spec change (generation), a label, a finalizer.
        let mut edited = counted.clone();
        edited.metadata.generation = Some(2);
        let mut labelled = edited.clone();
        labelled.metadata.labels = Some([("team".to_owned(), "a".to_owned())].into());
        let mut held = labelled.clone();
        held.metadata.finalizers = Some(vec!["example.com/hold".to_owned()]);
        // Recreated under the same name: a new uid.
        let mut recreated = binding.clone();
        recreated.metadata.uid = Some("u2".into());
        let events = vec![
            watcher::Event::Apply(binding.clone()),
            watcher::Event::Apply(counted.clone()),
            watcher::Event::Apply(edited.clone()),
            watcher::Event::Apply(labelled.clone()),
            watcher::Event::Apply(held.clone()),
            watcher::Event::Delete(held.clone()),
            watcher::Event::Apply(recreated.clone()),
        ];
        // What the reflector does upstream: apply each event to the store.
        let touched = futures::stream::iter(events).map(move |e| {
            writer.apply_watcher_event(&e);
            Ok::<_, watcher::Error>(match e {
                watcher::Event::Apply(o) | watcher::Event::Delete(o) => o,
                _ => unreachable!("only applies and deletes are sent"),
            })
        });
        let deleted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let passed: Vec<(Option<String>, Option<i64>)> = on_deletion(touched, store, {
            let deleted = deleted.clone();
            move |b: &CloudSqlBinding| {
                if let Ok(mut d) = deleted.lock() {
                    d.push(b.metadata.uid.clone());
                }
            }
        })
        .predicate_filter(beyond_status(), PredicateConfig::default())
        .map(|b| {
            let b = b.expect("no errors");
            (b.metadata.uid.clone(), b.metadata.generation)
        })
        .collect()
        .await;
        let u = |s: &str| Some(s.to_owned());
        assert_eq!(
            passed,
            [
                (u("u1"), Some(1)), // new
                (u("u1"), Some(2)), // generation
                (u("u1"), Some(2)), // labels
                (u("u1"), Some(2)), // finalizers
                (u("u2"), Some(1)), // recreated
            ],
            "the status write and the deletion must not pass the filter"
        );
        assert_eq!(*deleted.lock().expect("lock"), [u("u1")]);
    }

    #[test]
    fn an_object_that_does_not_deserialize_is_left_out_and_the_watch_goes_on() {
        let good: CloudSqlInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
            "metadata": {"name": "orders"},
            "spec": {"connectionName": "p:r:orders"}
        }))
        .expect("an instance");
        let bad: DeserializeGuard<CloudSqlInstance> = serde_json::from_value(serde_json::json!({
            "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlInstance",
            "metadata": {"name": "broken"},
            "spec": {"connectionName": 42}
        }))
        .expect("a guard always deserializes");
        assert!(bad.0.is_err());
        let event = |g| Ok(watcher::Event::InitApply(g));
        assert!(unguard(event(bad)).is_none());
        let kept = unguard(event(DeserializeGuard(Ok(good.clone()))));
        assert!(matches!(kept, Some(Ok(watcher::Event::InitApply(i))) if i == good));
        assert!(matches!(
            unguard::<CloudSqlInstance>(Ok(watcher::Event::InitDone)),
            Some(Ok(watcher::Event::InitDone))
        ));
    }

    #[test]
    fn cached_objects_keep_only_which_top_level_fields_we_own() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "shop", "managedFields": [
                {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                {"manager": "cloudsql-binder", "operation": "Apply", "fieldsType": "FieldsV1",
                 "time": "2026-01-01T00:00:00Z",
                 "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:initContainers": {}}}}}}
            ]}
        }))
        .expect("a deployment");
        assert!(carries_our_fields(&d.metadata));
        trim(&mut d);
        let fields = d.metadata.managed_fields.clone().expect("ours kept");
        assert_eq!(fields.len(), 1);
        assert_eq!(
            fields[0].fields_v1.as_ref().map(|f| f.0.clone()),
            Some(serde_json::json!({"f:spec": {}}))
        );
        assert!(
            carries_our_fields(&d.metadata),
            "still proves the injection"
        );
    }
}
