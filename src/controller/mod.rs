//! The reconcilers: bindings keep their workloads' pod templates injected;
//! instances resolve their capacity and budget. Level-triggered: every
//! reconcile starts from the stores (what the API server says now), applies
//! only what differs, with server-side apply and the `cloudsql-binder` field
//! manager, and writes status only when it says something new.

mod backoff;
mod binding;
mod binding_status;
pub use binding::MAX_LISTED_PODS;
mod instance;
pub(crate) mod missed;
pub mod operators;
mod subset;
mod sweeper;

pub use backoff::Backoff;
pub use operators::Operators;

use crate::index::{self as world, AdmissionScope, Cluster, Orphans, Stores};

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tracing::warn;

use crate::api::{CloudSqlBinding, CloudSqlInstance};
use crate::plan::TargetCapabilities;
use crate::telemetry::{Metrics, Readiness};

/// Errors of a reconcile; each says what failed on which object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{action}: {}", crate::telemetry::KubeError(source))]
    Kube {
        /// What we were doing.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A patch could not be built.
    #[error("building the patch for {object}: {source}")]
    Patch {
        /// The object.
        object: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Cleanup is not finished yet (a workload still carries the injection).
    #[error("{0}")]
    CleanupPending(String),
}

/// Options of the controllers.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces whose bindings are handled (empty: all).
    pub namespaces: Vec<String>,
    /// The reporting instance in Events (the pod name).
    pub reporter_instance: Option<String>,
    /// Whether to force classic sidecars (for API servers without native sidecars).
    pub native_sidecars: Option<bool>,
    /// The Cloud SQL Admin API (`None`: no discovery; instances asking for it
    /// report `Discovered=False` and use their spec).
    pub discovery: Option<Arc<crate::gcp::CapacityDiscovery>>,
    /// How long an Admin API answer is used before it is asked again.
    pub discovery_refresh: Duration,
    /// This operator installation's identity, written into the statuses it
    /// writes (`status.reconciledBy`): replicas of one installation share it,
    /// two installations must not.
    pub identity: String,
    /// How often every object is reconciled again, whatever the watches said
    /// (the backstop of level-triggering).
    pub resync: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespaces: Vec::new(),
            reporter_instance: None,
            native_sidecars: None,
            discovery: None,
            discovery_refresh: Duration::from_secs(600),
            identity: "cloudsql-binder".into(),
            resync: Duration::from_secs(600),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub caps: TargetCapabilities,
    pub options: Options,
    /// Asks the instance controller to look at an instance again.
    pub instance_trigger: broadcast::Sender<ObjectRef<CloudSqlInstance>>,
    /// Asks the binding controller to look at a binding again.
    pub binding_trigger: broadcast::Sender<ObjectRef<CloudSqlBinding>>,
    /// What each instance's last reconcile saw: its number of bindings and
    /// its budget. A binding reconcile asks for an instance reconcile only
    /// when that moved (during a burst of bindings, every binding reconcile
    /// would otherwise cost an instance reconcile over all its bindings).
    pub instance_seen: std::sync::Mutex<std::collections::HashMap<String, InstanceSeen>>,
    /// The status each binding reconcile last wrote, until the store has
    /// caught up with that write (see [`StatusWrites`]).
    pub status_writes: StatusWrites,
    /// Failures in a row per object, for exponential backoff.
    pub backoff: Backoff,
    /// Which objects another operator installation writes too.
    pub operators: Operators,
    /// Workloads that may carry an injection no binding wants any more.
    pub orphans: Arc<Orphans>,
    /// The namespaces this process's admission webhook serves.
    pub admission: AdmissionScope,
}

/// Status writes the binding store may not have seen yet. A reconcile that
/// runs before the watch delivered the previous reconcile's status write
/// (its Deployment's event often comes first) compares against the old
/// status and would write the same status again. Each entry is keyed by the
/// binding's uid and holds the resourceVersion the write was made over and
/// what was written: while the store still shows that resourceVersion, the
/// written status is what the object has.
#[derive(Default)]
pub struct StatusWrites {
    written: std::sync::Mutex<
        std::collections::HashMap<String, (String, crate::api::CloudSqlBindingStatus)>,
    >,
}

impl StatusWrites {
    /// The status last written over the version of `binding` the store still
    /// holds, if the store has not caught up; forgets writes it has seen past.
    pub fn pending(&self, binding: &CloudSqlBinding) -> Option<crate::api::CloudSqlBindingStatus> {
        let uid = binding.metadata.uid.as_deref()?;
        let mut written = self.written.lock().ok()?;
        match written.get(uid) {
            Some((over, status)) if binding.metadata.resource_version.as_deref() == Some(over) => {
                Some(status.clone())
            }
            Some(_) => {
                written.remove(uid);
                None
            }
            None => None,
        }
    }

    /// Records that `status` was written over the version of `binding` the
    /// reconcile read.
    pub fn record(&self, binding: &CloudSqlBinding, status: &crate::api::CloudSqlBindingStatus) {
        let (Some(uid), Some(over)) = (
            binding.metadata.uid.clone(),
            binding.metadata.resource_version.clone(),
        ) else {
            return;
        };
        if let Ok(mut written) = self.written.lock() {
            written.insert(uid, (over, status.clone()));
        }
    }
}

/// See [`Context::instance_seen`].
#[derive(Clone)]
pub struct InstanceSeen {
    /// Bindings that name the instance.
    pub bindings: usize,
    /// Its budget.
    pub budget: Arc<world::Budget>,
}

impl Context {
    /// Asks for a reconcile of instance `name` if what it would see differs
    /// from what its last reconcile saw.
    pub fn instance_may_have_moved(&self, name: &str) {
        let seen = self
            .instance_seen
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned());
        let moved = match (seen, self.stores.instances.get(&ObjectRef::new(name))) {
            (Some(seen), Some(instance)) => {
                let capacity = self
                    .stores
                    .capacity(&instance, self.stores.discovered(&instance));
                seen.bindings != self.stores.bindings_of_any_order(name).len()
                    || *seen.budget != *self.stores.budget(&instance, &capacity)
            }
            _ => true,
        };
        if moved {
            let _ = self.instance_trigger.send(ObjectRef::new(name));
        }
    }

    /// Whether bindings of this namespace are handled by this operator.
    pub fn watches_namespace(&self, ns: &str) -> bool {
        self.options.namespaces.is_empty() || self.options.namespaces.iter().any(|n| n == ns)
    }
}

/// A reconcile trigger stream from a broadcast channel. When the controller
/// falls behind by more than the channel holds, every known object is
/// reconciled again (level-triggered: nothing is lost, only repeated).
fn triggers<K>(
    rx: broadcast::Receiver<ObjectRef<K>>,
    all: impl Fn() -> Vec<ObjectRef<K>> + Send + 'static,
) -> impl Stream<Item = ObjectRef<K>> + Send
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    BroadcastStream::new(rx).flat_map(move |item| {
        futures::stream::iter(match item {
            Ok(r) => vec![r],
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "reconcile triggers overflowed; resyncing every object"
                );
                all()
            }
        })
    })
}

/// Every object of a store now, and again every `period`: the first tick
/// reconciles everything the stores hold when the controllers start (objects
/// created, changed or deleted while no leader ran; triggers sent before
/// this leader subscribed), the later ones are the resync backstop.
fn every_object_now_and_every(period: Duration) -> impl Stream<Item = ()> + Send {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio_stream::wrappers::IntervalStream::new(interval).map(|_| ())
}

/// Runs both controllers and the sweeper (the leader's job) until
/// `shutdown` resolves.
pub async fn run_controllers(
    client: Client,
    cluster: Arc<Cluster>,
    options: Options,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let stores = cluster.stores.clone();
    // Subscribed before the first bulk reconcile reads the stores: a change
    // is either in the store that reconcile reads, or arrives as a trigger.
    let binding_triggers = triggers(cluster.binding_events.subscribe(), {
        let stores = stores.clone();
        move || {
            stores
                .bindings
                .state()
                .iter()
                .map(|b| ObjectRef::from_obj(&**b))
                .collect()
        }
    });
    let instance_triggers = triggers(cluster.instance_events.subscribe(), {
        let stores = stores.clone();
        move || {
            stores
                .instances
                .state()
                .iter()
                .map(|i| ObjectRef::from_obj(&**i))
                .collect()
        }
    });
    // The controllers read the stores every replica keeps, and reconcile on
    // the triggers above, on start and on resync (no watch of their own: one
    // that passed their own status writes back to them would loop).
    let binding_controller = Controller::for_stream(
        futures::stream::pending::<Result<CloudSqlBinding, watcher::Error>>(),
        stores.bindings.clone(),
    );
    let instance_controller = Controller::for_stream(
        futures::stream::pending::<Result<CloudSqlInstance, watcher::Error>>(),
        stores.instances.clone(),
    );
    let reporter = Reporter {
        controller: "cloudsql-binder".into(),
        instance: options.reporter_instance.clone(),
    };
    let resync = options.resync;
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        stores,
        caps: cluster.caps,
        options,
        instance_trigger: cluster.instance_events.clone(),
        binding_trigger: cluster.binding_events.clone(),
        instance_seen: Default::default(),
        status_writes: Default::default(),
        backoff: Default::default(),
        operators: Default::default(),
        orphans: cluster.orphans.clone(),
        admission: cluster.admission.clone(),
    });

    let shutdown = shutdown.shared();
    let config = kube::runtime::controller::Config::default().concurrency(16);
    let bindings = binding_controller
        .with_config(config.clone())
        .reconcile_all_on(every_object_now_and_every(resync))
        .reconcile_on(binding_triggers)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |binding, ctx: Arc<Context>| async move {
                let key = world::binding_key(&binding);
                let result = binding::reconcile(binding, ctx.clone()).await;
                if result.is_ok() {
                    ctx.backoff.succeeded(&key);
                }
                result
            },
            binding::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(err) = res {
                log_controller_error("binding", &err);
            }
        });
    let instances = instance_controller
        .with_config(config)
        .reconcile_all_on(every_object_now_and_every(resync))
        .reconcile_on(instance_triggers)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |instance, ctx: Arc<Context>| async move {
                let key = format!("instance {}", instance.name_any());
                let result = instance::reconcile(instance, ctx.clone()).await;
                if result.is_ok() {
                    ctx.backoff.succeeded(&key);
                }
                result
            },
            instance::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(err) = res {
                log_controller_error("instance", &err);
            }
        });
    let sweeper = sweeper::sweep(ctx, shutdown);
    tokio::join!(bindings, instances, sweeper);
}

/// Logs a failure of the controller machinery on one line, with our own
/// error's message (kube's wrapper names only the object).
fn log_controller_error(
    controller: &str,
    err: &kube::runtime::controller::Error<Error, watcher::Error>,
) {
    use kube::runtime::controller::Error as Failed;
    match err {
        Failed::ReconcilerFailed(err, obj) => {
            warn!(controller, object = %obj, error = %err, "reconcile failed");
        }
        Failed::ObjectNotFound(obj) => {
            // Deleted between its trigger and its reconcile: nothing to do.
            tracing::debug!(controller, object = %obj, "gone before its reconcile");
        }
        Failed::QueueError(err) => {
            warn!(controller, error = %crate::telemetry::WatchError(err), "trigger stream failed");
        }
        other => warn!(controller, error = %other, "controller error"),
    }
}

/// Starts the stores, marks the process ready, and runs the controllers until
/// `shutdown` resolves (a single replica without leader election).
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let cluster = Cluster::start(
        client.clone(),
        options.native_sidecars,
        options.discovery.clone(),
    )
    .await;
    readiness.set_ready();
    run_controllers(client, cluster, options, metrics, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_write_counts_until_the_store_has_seen_past_it() {
        let at = |rv: &str| -> CloudSqlBinding {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cloudsql.dev/v1alpha1", "kind": "CloudSqlBinding",
                "metadata": {"name": "api", "namespace": "shop", "uid": "u1", "resourceVersion": rv},
                "spec": {"instanceRef": {"name": "orders"},
                         "database": {"name": "orders", "user": "app"},
                         "workloads": [{"kind": "Deployment", "name": "api"}]}
            }))
            .expect("a binding")
        };
        let writes = StatusWrites::default();
        let status = crate::api::CloudSqlBindingStatus {
            workloads_summary: Some("1/1".into()),
            ..Default::default()
        };
        assert_eq!(writes.pending(&at("10")), None, "nothing written yet");
        writes.record(&at("10"), &status);
        // The store still holds version 10: the write is what the object has.
        assert_eq!(writes.pending(&at("10")), Some(status.clone()));
        // The store moved past it (our write, or anyone's): forgotten.
        assert_eq!(writes.pending(&at("11")), None);
        assert_eq!(writes.pending(&at("10")), None);
    }
}
