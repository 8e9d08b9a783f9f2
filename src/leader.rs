//! Leader election on a `coordination.k8s.io/v1` Lease: of several replicas
//! exactly one runs the controllers, while every replica keeps its caches warm
//! and serves health, readiness, metrics and admission.
//!
//! The semantics are client-go's `leaderelection`, so `kubectl get lease`
//! reads the same as for any Kubernetes controller:
//! - a candidate takes the lease when it has no holder, or when its record has
//!   not changed for `leaseDurationSeconds` *as measured on the candidate's own
//!   clock since it first saw that record* (so clock skew between nodes does
//!   not matter);
//! - every write is an update carrying the `resourceVersion` just read: of two
//!   candidates racing for a free lease, one gets 409 Conflict and stays a
//!   candidate;
//! - the holder renews every [`RENEW_INTERVAL`]; when it has not renewed for
//!   [`RENEW_DEADLINE`] (shorter than [`LEASE_DURATION`]) it stops its
//!   controllers before any other replica may take over;
//! - on shutdown the holder stops its controllers first, then releases the
//!   lease (no holder), so the next candidate takes it at its next look, within
//!   [`RETRY_INTERVAL`], instead of waiting for the lease to expire.
//!
//! Written here rather than taken from `kube-lease-manager` (0.13, the crate
//! that supports kube 5): there a candidate sleeps until the holder's lease
//! would have expired even when the holder released it (a rolling update would
//! leave no leader for up to a lease duration), and a holder whose renewals
//! fail keeps reporting itself the leader.
//!
//! The decision — given the lease as read and the time, may this replica take
//! it? — is the pure [`Observer`]; [`Elector`] does the I/O and [`run`] the
//! candidate/leader loop.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// How long a lease stays valid after its holder's last renewal: the longest a
/// crashed leader leaves the cluster without a leader. client-go's default.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews: two renewals may fail before the deadline.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// A holder that has not renewed for this long stops leading. Shorter than
/// [`LEASE_DURATION`] by more than [`CONTROLLERS_STOP_TIMEOUT`], so its
/// controllers have stopped before another replica may take the lease.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a candidate looks at the lease again, and how soon a failed
/// renewal is retried: the takeover time after a release.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// The longest one read-and-write of the lease may take (the client's own
/// timeout is minutes: a hung request must not outlive the deadline).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long stopping controllers may take (in-flight reconciles finish) before
/// they are aborted.
pub const CONTROLLERS_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Which lease, and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity, written as `holderIdentity`.
    pub identity: String,
}

impl LeaseConfig {
    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// This replica's identity: `POD_NAME` (set from the downward API by the
/// chart), else the hostname with a random suffix (two processes on one
/// machine must differ).
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.trim().is_empty()
    {
        return pod.trim().to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cloudsql-binder".to_string());
    format!("{host}-{:08x}", random_u32())
}

fn random_u32() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// Errors talking to the API server about the lease. All are retried except
/// [`Error::NamespaceMissing`] (see [`Error::is_fatal`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Lease's namespace does not exist: no retry can succeed until
    /// someone changes the cluster or the flags (an operator run from a
    /// laptop against a cluster without the `cloudsql-binder` namespace).
    #[error(
        "the leader-election Lease namespace {namespace:?} does not exist: create it (kubectl create namespace {namespace}), pass --leader-election-namespace=<ns>, or run a single replica with --leader-election=false"
    )]
    NamespaceMissing {
        /// The namespace asked for.
        namespace: String,
        /// The API server's answer (404 on `namespaces`).
        #[source]
        source: Box<kube::core::Status>,
    },
    /// A call failed (a 403 names the missing RBAC verb).
    #[error("{action} Lease {lease}: {}", crate::telemetry::KubeError(source))]
    Kube {
        /// What we were doing (`reading`, `creating`, `updating`).
        action: &'static str,
        /// `namespace/name`.
        lease: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The call did not answer in time.
    #[error("{action} Lease {lease}: no answer within {timeout:?}")]
    Timeout {
        /// What we were doing.
        action: &'static str,
        /// `namespace/name`.
        lease: String,
        /// How long we waited.
        timeout: Duration,
    },
}

impl Error {
    /// Whether retrying is pointless: the candidate gives up and
    /// [`run`] returns the error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::NamespaceMissing { .. })
    }
}

/// Whether the answer to creating a Lease in `namespace` says the namespace
/// does not exist (404 `namespaces "NAME" not found`), rather than anything
/// a retry may fix.
fn namespace_missing(status: &kube::core::Status, namespace: &str) -> bool {
    status.code == 404
        && status
            .details
            .as_ref()
            .is_none_or(|d| d.kind == "namespaces" && (d.name.is_empty() || d.name == namespace))
}

/// What a replica may do with the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The lease names this replica: renew it.
    Ours,
    /// No holder (never held, or released), or the holder let it expire: take it.
    Free,
    /// Another replica holds it and may still be renewing.
    HeldBy {
        /// The holder's identity.
        holder: String,
        /// How long until it counts as expired, unless renewed.
        expires_in: Duration,
    },
}

/// The parts of a lease whose change proves its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    acquire_time: Option<Timestamp>,
    renew_time: Option<Timestamp>,
    duration_seconds: Option<i32>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Record {
        let spec = spec.cloned().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            acquire_time: spec.acquire_time.map(|t| t.0),
            renew_time: spec.renew_time.map(|t| t.0),
            duration_seconds: spec.lease_duration_seconds,
            transitions: spec.lease_transitions,
        }
    }
}

/// What this replica has seen of the lease, and since when (on its own clock):
/// the pure decision of leader election.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Notes the lease as read at `now` and says what `me` may do with it.
    /// A record held by another replica expires `leaseDurationSeconds` after
    /// this observer first saw it unchanged.
    pub fn observe(&mut self, spec: Option<&LeaseSpec>, me: &str, now: Instant) -> Verdict {
        let record = Record::of(spec);
        let since = match &self.last {
            Some((seen, since)) if *seen == record => *since,
            _ => now,
        };
        self.last = Some((record.clone(), since));
        let Some(holder) = record.holder else {
            return Verdict::Free;
        };
        if holder == me {
            return Verdict::Ours;
        }
        let duration = record
            .duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(LEASE_DURATION);
        let expires_at = since + duration;
        if now >= expires_at {
            Verdict::Free
        } else {
            Verdict::HeldBy {
                holder,
                expires_in: expires_at - now,
            }
        }
    }
}

/// The spec that makes `me` the holder at `now`, from the spec read.
fn taken_spec(read: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseSpec {
    let read = read.cloned().unwrap_or_default();
    let previous = read.holder_identity.clone().filter(|h| !h.is_empty());
    let transitions = read.lease_transitions.unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        // Counted like client-go: every change of holder, a first take included.
        lease_transitions: Some(if previous.as_deref() == Some(me) {
            transitions
        } else {
            transitions + 1
        }),
        ..read
    }
}

/// The spec that renews `me`'s hold at `now`.
fn renewed_spec(read: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        ..read.clone()
    }
}

/// The spec that hands the lease back: no holder, so a candidate takes it at
/// once (client-go writes the same on `ReleaseOnCancel`).
fn released_spec(read: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(1),
        ..read.clone()
    }
}

/// Bounds one read-and-write of the lease by [`ATTEMPT_TIMEOUT`].
async fn within<T>(
    lease: String,
    action: &'static str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, call)
        .await
        .unwrap_or(Err(Error::Timeout {
            action,
            lease,
            timeout: ATTEMPT_TIMEOUT,
        }))
}

/// The outcome of one look at the lease as a candidate.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// We hold it now.
    Acquired,
    /// Someone else holds it (or won the race for it).
    Held(Option<String>),
}

/// The outcome of one renewal.
#[derive(Debug, PartialEq, Eq)]
enum Renewal {
    Renewed,
    /// The lease no longer names us.
    Lost(Option<String>),
}

/// Reads and writes the lease for one replica.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observer: Observer,
}

impl Elector {
    /// An elector for `config`'s lease.
    pub fn new(client: Client, config: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observer: Observer::default(),
        }
    }

    fn kube(&self, action: &'static str) -> impl FnOnce(kube::Error) -> Error + '_ {
        move |source| Error::Kube {
            action,
            lease: self.config.lease(),
            source,
        }
    }

    /// One look as a candidate: creates the lease when missing, takes it when free.
    async fn look(&mut self) -> Result<Look, Error> {
        within(self.config.lease(), "acquiring", self.look_inner()).await
    }

    async fn look_inner(&mut self) -> Result<Look, Error> {
        let me = self.config.identity.clone();
        let read = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(self.kube("reading"))?;
        let Some(lease) = read else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..Default::default()
                },
                spec: Some(taken_spec(None, &me, Timestamp::now())),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Look::Acquired),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Look::Held(None)),
                Err(kube::Error::Api(e)) if namespace_missing(&e, &self.config.namespace) => {
                    Err(Error::NamespaceMissing {
                        namespace: self.config.namespace.clone(),
                        source: e,
                    })
                }
                Err(e) => Err(self.kube("creating")(e)),
            };
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty());
        match self
            .observer
            .observe(lease.spec.as_ref(), &me, Instant::now())
        {
            Verdict::HeldBy { holder, .. } => Ok(Look::Held(Some(holder))),
            Verdict::Ours | Verdict::Free => {
                let spec = taken_spec(lease.spec.as_ref(), &me, Timestamp::now());
                match self.write(lease, spec).await {
                    Ok(()) => Ok(Look::Acquired),
                    // Another candidate wrote first: it won.
                    Err(Error::Kube {
                        source: kube::Error::Api(e),
                        ..
                    }) if e.code == 409 => Ok(Look::Held(holder)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Replaces the lease's spec, guarded by the resourceVersion read.
    async fn write(&self, mut lease: Lease, spec: LeaseSpec) -> Result<(), Error> {
        lease.spec = Some(spec);
        lease.metadata.managed_fields = None;
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(self.kube("updating"))
    }

    async fn renew(&mut self) -> Result<Renewal, Error> {
        within(self.config.lease(), "renewing", self.renew_inner()).await
    }

    async fn renew_inner(&mut self) -> Result<Renewal, Error> {
        let me = self.config.identity.clone();
        let Some(lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(self.kube("reading"))?
        else {
            return Ok(Renewal::Lost(None));
        };
        match self
            .observer
            .observe(lease.spec.as_ref(), &me, Instant::now())
        {
            Verdict::Ours => {
                let spec = renewed_spec(
                    lease.spec.as_ref().expect("a lease we hold has a spec"),
                    Timestamp::now(),
                );
                self.write(lease, spec).await.map(|()| Renewal::Renewed)
            }
            Verdict::Free => Ok(Renewal::Lost(None)),
            Verdict::HeldBy { holder, .. } => Ok(Renewal::Lost(Some(holder))),
        }
    }

    /// Waits until this replica holds the lease, looking every
    /// [`RETRY_INTERVAL`]; returns early only on a [fatal](Error::is_fatal) error.
    pub async fn acquire(&mut self) -> Result<(), Error> {
        let mut last_holder: Option<Option<String>> = None;
        loop {
            match self.look().await {
                Ok(Look::Acquired) => return Ok(()),
                Ok(Look::Held(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        info!(
                            lease = %self.config.lease(),
                            identity = %self.config.identity,
                            leader = holder.as_deref().unwrap_or("<none>"),
                            "another replica leads; standing by"
                        );
                        last_holder = Some(holder);
                    }
                }
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => warn!(error = %err, "cannot acquire the leader lease; retrying"),
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// Renews the lease until it is lost; returns why. Gives up when the lease
    /// names someone else, or when no renewal succeeded for [`RENEW_DEADLINE`].
    pub async fn hold(&mut self) -> String {
        let mut last_renewal = Instant::now();
        let mut next = RENEW_INTERVAL;
        let mut last_error: Option<String> = None;
        loop {
            let deadline = tokio::time::Instant::from_std(last_renewal + RENEW_DEADLINE);
            let attempt = async {
                tokio::time::sleep(next).await;
                self.renew().await
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return format!(
                        "no renewal for {}s (last error: {})",
                        RENEW_DEADLINE.as_secs(),
                        last_error.as_deref().unwrap_or("none")
                    );
                }
                outcome = attempt => match outcome {
                    Ok(Renewal::Renewed) => {
                        last_renewal = Instant::now();
                        last_error = None;
                        next = RENEW_INTERVAL;
                    }
                    Ok(Renewal::Lost(holder)) => {
                        return match holder {
                            Some(h) => format!("the lease is now held by {h}"),
                            None => "the lease was released by someone else".to_string(),
                        };
                    }
                    Err(err) => {
                        warn!(error = %err, "renewing the leader lease failed; retrying");
                        last_error = Some(err.to_string());
                        next = RETRY_INTERVAL;
                    }
                },
            }
        }
    }

    /// Hands the lease back if it still names us, so a candidate takes over at once.
    pub async fn release(&mut self) -> Result<(), Error> {
        within(self.config.lease(), "releasing", async {
            let Some(lease) = self
                .api
                .get_opt(&self.config.name)
                .await
                .map_err(self.kube("reading"))?
            else {
                return Ok(());
            };
            let ours = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.config.identity.as_str());
            if !ours {
                return Ok(());
            }
            let spec = released_spec(
                lease.spec.as_ref().expect("a lease we hold has a spec"),
                Timestamp::now(),
            );
            self.write(lease, spec).await
        })
        .await
    }
}

/// Resolves when this replica stops leading: the shutdown future handed to
/// the controllers.
pub struct LeadershipEnded(oneshot::Receiver<()>);

impl Future for LeadershipEnded {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// Why a term as leader ended.
enum TermEnd {
    Shutdown,
    Lost(String),
    LeadReturned,
}

/// Runs `lead` whenever this replica holds the lease, until `shutdown`
/// resolves. `lead` gets a future that resolves when leadership ends; it must
/// stop then. On losing the lease the replica stops `lead` and becomes a
/// candidate again; on shutdown it stops `lead`, then releases the lease.
///
/// Returns an error only when the lease cannot be had at all (its namespace
/// does not exist): every other failure is logged and retried.
pub async fn run<F, Fut>(
    client: Client,
    config: LeaseConfig,
    shutdown: impl Future<Output = ()>,
    mut lead: F,
) -> Result<(), Error>
where
    F: FnMut(LeadershipEnded) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease = config.lease();
    let identity = config.identity.clone();
    let mut elector = Elector::new(client, config);
    let mut shutdown = std::pin::pin!(shutdown);
    info!(%lease, %identity, "leader election: candidate");
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            acquired = elector.acquire() => acquired?,
        }
        let since = Instant::now();
        info!(%lease, %identity, "became the leader; starting the controllers");
        let (stop, ended) = oneshot::channel();
        let mut task = tokio::spawn(lead(LeadershipEnded(ended)));
        let end = tokio::select! {
            _ = &mut shutdown => TermEnd::Shutdown,
            why = elector.hold() => TermEnd::Lost(why),
            _ = &mut task => TermEnd::LeadReturned,
        };
        let _ = stop.send(());
        if !matches!(end, TermEnd::LeadReturned)
            && tokio::time::timeout(CONTROLLERS_STOP_TIMEOUT, &mut task)
                .await
                .is_err()
        {
            warn!(
                "the controllers did not stop within {}s; aborting them",
                CONTROLLERS_STOP_TIMEOUT.as_secs()
            );
            task.abort();
        }
        let led_for = since.elapsed().as_secs();
        match end {
            TermEnd::Shutdown => {
                match elector.release().await {
                    Ok(()) => {
                        info!(%lease, %identity, led_for, "controllers stopped; released the lease")
                    }
                    Err(err) => {
                        warn!(error = %err, "controllers stopped; releasing the lease failed (it expires by itself)")
                    }
                }
                return Ok(());
            }
            TermEnd::Lost(why) => {
                warn!(%lease, %identity, led_for, reason = %why, "lost the leadership; controllers stopped, candidate again");
            }
            TermEnd::LeadReturned => {
                error!(%lease, %identity, "the controllers ended on their own; releasing the lease, candidate again");
                if let Err(err) = elector.release().await {
                    warn!(error = %err, "releasing the lease failed (it expires by itself)");
                }
                // Leave the lease to another replica for a moment.
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renew_secs: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(
                Timestamp::from_second(1_700_000_000 + renew_secs).unwrap(),
            )),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_without_holder_is_free() {
        let mut observer = Observer::default();
        let now = Instant::now();
        assert_eq!(observer.observe(None, "me", now), Verdict::Free);
        let released = LeaseSpec {
            holder_identity: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(observer.observe(Some(&released), "me", now), Verdict::Free);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let mut observer = Observer::default();
        assert_eq!(
            observer.observe(Some(&held_by("me", 0, 15)), "me", Instant::now()),
            Verdict::Ours
        );
    }

    #[test]
    fn another_holders_lease_expires_a_lease_duration_after_we_first_saw_it_unchanged() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        let lease = held_by("other", 0, 15);
        assert!(matches!(
            observer.observe(Some(&lease), "me", t0),
            Verdict::HeldBy { ref holder, expires_in } if holder == "other" && expires_in == Duration::from_secs(15)
        ));
        assert!(matches!(
            observer.observe(Some(&lease), "me", t0 + Duration::from_secs(14)),
            Verdict::HeldBy { .. }
        ));
        assert_eq!(
            observer.observe(Some(&lease), "me", t0 + Duration::from_secs(15)),
            Verdict::Free
        );
    }

    #[test]
    fn a_renewal_restarts_the_clock_whatever_the_timestamps_say() {
        // The holder's clock may be far off ours: only the change counts.
        let mut observer = Observer::default();
        let t0 = Instant::now();
        observer.observe(Some(&held_by("other", -3600, 15)), "me", t0);
        let renewed = held_by("other", -3595, 15);
        let verdict = observer.observe(Some(&renewed), "me", t0 + Duration::from_secs(12));
        assert!(
            matches!(verdict, Verdict::HeldBy { expires_in, .. } if expires_in == Duration::from_secs(15))
        );
        assert!(matches!(
            observer.observe(Some(&renewed), "me", t0 + Duration::from_secs(26)),
            Verdict::HeldBy { .. }
        ));
        assert_eq!(
            observer.observe(Some(&renewed), "me", t0 + Duration::from_secs(27)),
            Verdict::Free
        );
    }

    #[test]
    fn a_lease_first_seen_by_a_new_replica_is_not_taken_at_once() {
        // A restarted candidate cannot know how old the record is: it waits.
        let mut observer = Observer::default();
        let ancient = held_by("crashed", -86_400, 15);
        assert!(matches!(
            observer.observe(Some(&ancient), "me", Instant::now()),
            Verdict::HeldBy { .. }
        ));
    }

    #[test]
    fn the_holders_own_duration_counts_and_a_missing_one_defaults() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        let short = held_by("other", 0, 1);
        observer.observe(Some(&short), "me", t0);
        assert_eq!(
            observer.observe(Some(&short), "me", t0 + Duration::from_secs(1)),
            Verdict::Free
        );
        let mut no_duration = held_by("other", 5, 0);
        no_duration.lease_duration_seconds = None;
        let mut observer = Observer::default();
        assert!(matches!(
            observer.observe(Some(&no_duration), "me", t0),
            Verdict::HeldBy { expires_in, .. } if expires_in == LEASE_DURATION
        ));
    }

    #[test]
    fn taking_a_lease_counts_a_transition_only_on_a_change_of_holder() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let from_other = taken_spec(Some(&held_by("other", 0, 15)), "me", now);
        assert_eq!(from_other.holder_identity.as_deref(), Some("me"));
        assert_eq!(from_other.lease_transitions, Some(4));
        assert_eq!(from_other.renew_time, Some(MicroTime(now)));
        assert_eq!(from_other.acquire_time, Some(MicroTime(now)));
        assert_eq!(from_other.lease_duration_seconds, Some(15));
        let again = taken_spec(Some(&held_by("me", 0, 15)), "me", now);
        assert_eq!(again.lease_transitions, Some(3));
        assert_eq!(taken_spec(None, "me", now).lease_transitions, Some(1));
    }

    #[test]
    fn releasing_clears_the_holder_so_a_candidate_takes_it_at_once() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let released = released_spec(&held_by("me", 0, 15), now);
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_transitions, Some(3));
        let mut observer = Observer::default();
        assert_eq!(
            observer.observe(Some(&released), "next", Instant::now()),
            Verdict::Free
        );
    }

    #[test]
    fn renewing_moves_only_the_renew_time() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let read = held_by("me", 0, 15);
        let renewed = renewed_spec(&read, now);
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));
        assert_eq!(renewed.holder_identity, read.holder_identity);
        assert_eq!(renewed.lease_transitions, read.lease_transitions);
    }

    #[test]
    fn the_deadline_leaves_time_to_stop_before_the_lease_expires() {
        const { assert!(RENEW_INTERVAL.as_secs() < RENEW_DEADLINE.as_secs()) };
        const {
            assert!(
                RENEW_DEADLINE.as_secs() + CONTROLLERS_STOP_TIMEOUT.as_secs()
                    < LEASE_DURATION.as_secs()
            )
        };
    }

    fn status(
        code: u16,
        reason: &str,
        message: &str,
        kind: &str,
        name: &str,
    ) -> Box<kube::core::Status> {
        Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: message.into(),
            details: Some(kube::core::response::StatusDetails {
                name: name.into(),
                group: String::new(),
                kind: kind.into(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            }),
            ..Default::default()
        })
    }

    #[test]
    fn a_missing_lease_namespace_is_told_apart_from_other_not_founds() {
        let missing = status(
            404,
            "NotFound",
            r#"namespaces "cloudsql-binder" not found"#,
            "namespaces",
            "cloudsql-binder",
        );
        assert!(namespace_missing(&missing, "cloudsql-binder"));
        assert!(!namespace_missing(&missing, "other"));
        let forbidden = status(403, "Forbidden", "no", "leases", "x");
        assert!(!namespace_missing(&forbidden, "cloudsql-binder"));
        let lease = status(404, "NotFound", "no", "leases", "x");
        assert!(!namespace_missing(&lease, "cloudsql-binder"));
    }

    #[test]
    fn a_missing_lease_namespace_names_the_three_fixes_on_one_line() {
        let source = status(
            404,
            "NotFound",
            r#"namespaces "cloudsql-binder" not found"#,
            "namespaces",
            "cloudsql-binder",
        );
        let error = Error::NamespaceMissing {
            namespace: "cloudsql-binder".into(),
            source,
        };
        assert!(error.is_fatal());
        let text = error.to_string();
        assert!(
            text.contains("kubectl create namespace cloudsql-binder"),
            "{text}"
        );
        assert!(text.contains("--leader-election-namespace="), "{text}");
        assert!(text.contains("--leader-election=false"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn other_lease_errors_are_retried_and_display_without_the_status_dump() {
        let error = Error::Kube {
            action: "creating",
            lease: "ns/lease".into(),
            source: kube::Error::Api(status(
                403,
                "Forbidden",
                r#"leases.coordination.k8s.io is forbidden: User "x" cannot create resource "leases""#,
                "leases",
                "",
            )),
        };
        assert!(!error.is_fatal());
        let text = error.to_string();
        assert_eq!(
            text,
            r#"creating Lease ns/lease: leases.coordination.k8s.io is forbidden: User "x" cannot create resource "leases" (HTTP 403 Forbidden)"#
        );
        assert!(!text.contains("Status {"), "{text}");
    }

    #[test]
    fn the_identity_is_the_pod_name_or_unique() {
        // POD_NAME is not set in unit tests.
        if std::env::var_os("POD_NAME").is_none() {
            assert_ne!(default_identity(), default_identity());
        }
    }
}
