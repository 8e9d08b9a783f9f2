//! Tracing setup, Prometheus metrics, and the health/readiness/metrics server.
//!
//! Metrics carry no per-object labels (cardinality): only the controller, the
//! verb, and for budget gauges the CloudSqlInstance name (cluster-scoped and few).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `binding` or `instance`.
    pub controller: String,
}

/// Label of API write counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    /// The controller that wrote.
    pub controller: String,
    /// `apply`, `apply_status`, `event`, `finalizer`.
    pub verb: String,
}

/// Label of per-instance budget gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    /// CloudSqlInstance name.
    pub instance: String,
}

/// Label of admission webhook requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabel {
    /// The webhook's path without the slash: `mutate-pods`, `validate-bindings`, `validate-scale`.
    pub webhook: String,
    /// `allowed` (unchanged), `patched`, `warned` (allowed with warnings),
    /// `denied`, `bad_request` (not a review we can answer), `failed` (a bug).
    pub outcome: String,
}

/// Label of admission latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    /// As in [`AdmissionLabel::webhook`].
    pub webhook: String,
}

/// The label values known in advance: [`Metrics::default`] creates their
/// series at zero, so a fresh process lists every family (HELP and TYPE) and
/// `rate()` starts from 0 instead of from the first event.
pub mod known {
    /// [`ControllerLabel::controller`](super::ControllerLabel::controller).
    pub const CONTROLLERS: [&str; 2] = ["binding", "instance"];
    /// The `(controller, verb)` pairs of [`Metrics::write`](super::Metrics::write).
    pub const WRITES: [(&str, &str); 8] = [
        ("binding", "apply"),
        ("binding", "apply_status"),
        ("binding", "event"),
        ("binding", "finalizer"),
        ("binding", "annotate"),
        ("binding", "roll"),
        ("instance", "apply_status"),
        ("instance", "event"),
    ];
    /// [`AdmissionLabel::webhook`](super::AdmissionLabel::webhook): the
    /// webhook routes' names.
    pub const WEBHOOKS: [&str; 3] = ["mutate-pods", "validate-bindings", "validate-scale"];
    /// [`AdmissionLabel::outcome`](super::AdmissionLabel::outcome).
    pub const OUTCOMES: [&str; 6] = [
        "allowed",
        "patched",
        "warned",
        "denied",
        "bad_request",
        "failed",
    ];
}

/// A family listed (HELP and TYPE) even before it has a series: the
/// per-instance gauges, whose label values (instance names) are not known in
/// advance. prometheus-client skips empty families otherwise.
#[derive(Debug)]
struct AlwaysListed<M>(M);

impl<M: EncodeMetric> EncodeMetric for AlwaysListed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }
    fn is_empty(&self) -> bool {
        false
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, by controller.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that failed, by controller.
    pub errors: Family<ControllerLabel, Counter>,
    /// Reconcile durations in seconds, by controller.
    pub durations: Family<ControllerLabel, Histogram>,
    /// Writes sent to the API server (PATCH/PUT/POST/DELETE), by controller and verb.
    pub writes: Family<WriteLabel, Counter>,
    /// Usable connections per instance.
    pub usable: Family<InstanceLabel, Gauge>,
    /// Allocated connections per instance.
    pub allocated: Family<InstanceLabel, Gauge>,
    /// Admission requests answered, by webhook and outcome.
    pub admissions: Family<AdmissionLabel, Counter>,
    /// Time to answer an admission request (body read to answer), by webhook.
    pub admission_durations: Family<WebhookLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cloudsql_binder");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ControllerLabel, Counter>::default();
        let durations = Family::<ControllerLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 14))) as fn() -> Histogram,
        );
        let writes = Family::<WriteLabel, Counter>::default();
        let usable = Family::<InstanceLabel, Gauge>::default();
        let allocated = Family::<InstanceLabel, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed", errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            durations.clone(),
        );
        registry.register(
            "api_writes",
            "Writes sent to the API server",
            writes.clone(),
        );
        registry.register(
            "instance_usable_connections",
            "Connections usable by bound workloads",
            AlwaysListed(usable.clone()),
        );
        registry.register(
            "instance_allocated_connections",
            "Connections granted to bound workloads (grant x max pods)",
            AlwaysListed(allocated.clone()),
        );
        let admissions = Family::<AdmissionLabel, Counter>::default();
        // From 100 µs: an answer from the caches takes well under a millisecond.
        let admission_durations = Family::<WebhookLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "admission_requests",
            "Admission requests answered by the webhook",
            admissions.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time the webhook took to answer, from the body read to the answer",
            admission_durations.clone(),
        );
        for controller in known::CONTROLLERS {
            let label = ControllerLabel {
                controller: controller.to_owned(),
            };
            let _ = reconciles.get_or_create(&label);
            let _ = errors.get_or_create(&label);
            let _ = durations.get_or_create(&label);
        }
        for (controller, verb) in known::WRITES {
            let _ = writes.get_or_create(&WriteLabel {
                controller: controller.to_owned(),
                verb: verb.to_owned(),
            });
        }
        for webhook in known::WEBHOOKS {
            for outcome in known::OUTCOMES {
                let _ = admissions.get_or_create(&AdmissionLabel {
                    webhook: webhook.to_owned(),
                    outcome: outcome.to_owned(),
                });
            }
            let _ = admission_durations.get_or_create(&WebhookLabel {
                webhook: webhook.to_owned(),
            });
        }
        Metrics {
            registry,
            reconciles,
            errors,
            durations,
            writes,
            usable,
            allocated,
            admissions,
            admission_durations,
        }
    }
}

impl Metrics {
    /// Counts one write.
    pub fn write(&self, controller: &str, verb: &str) {
        self.writes
            .get_or_create(&WriteLabel {
                controller: controller.to_string(),
                verb: verb.to_string(),
            })
            .inc();
    }

    /// Records one admission request answered by `webhook` with `outcome`,
    /// which took `seconds`.
    pub fn admission(&self, webhook: &str, outcome: &str, seconds: f64) {
        self.admissions
            .get_or_create(&AdmissionLabel {
                webhook: webhook.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.admission_durations
            .get_or_create(&WebhookLabel {
                webhook: webhook.to_owned(),
            })
            .observe(seconds);
    }

    /// Starts timing a reconcile; the duration is recorded when the guard drops.
    pub fn reconcile_timer(&self, controller: &str) -> ReconcileTimer<'_> {
        let label = ControllerLabel {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            metrics: self,
            label,
            start: Instant::now(),
        }
    }

    /// Total writes by every controller, as the tests read it.
    pub fn total_writes(&self) -> u64 {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return 0;
        }
        parse_total(&text, "cloudsql_binder_api_writes_total")
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Sums every sample of a counter in Prometheus text.
pub fn parse_total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    label: ControllerLabel,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Readiness: true once every cache has synced.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
}

impl Readiness {
    /// Marks the process ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz_handler))
        .with_state(AdminState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz_handler(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// A Kubernetes client error on one line, for logs and error messages.
///
/// kube's own `Display` of an API error appends the `Debug` dump of the whole
/// `Status`; the API server's message, HTTP code and reason say it all.
pub struct KubeError<'a>(pub &'a kube::Error);

impl std::fmt::Display for KubeError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            kube::Error::Api(status) => write!(
                f,
                "{} (HTTP {} {})",
                status.message, status.code, status.reason
            ),
            other => other.fmt(f),
        }
    }
}

/// A watch error on one line (see [`KubeError`]).
pub struct WatchError<'a>(pub &'a kube::runtime::watcher::Error);

impl std::fmt::Display for WatchError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use kube::runtime::watcher::Error;
        match self.0 {
            Error::InitialListFailed(e) => write!(f, "initial list failed: {}", KubeError(e)),
            Error::WatchStartFailed(e) => write!(f, "starting the watch failed: {}", KubeError(e)),
            Error::WatchError(status) => write!(
                f,
                "the API server ended the watch: {} (HTTP {} {})",
                status.message, status.code, status.reason
            ),
            Error::WatchFailed(e) => write!(f, "the watch failed: {}", KubeError(e)),
            other => other.fmt(f),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_process_lists_every_family() {
        let text = Metrics::default().encode();
        for family in [
            "cloudsql_binder_reconciles",
            "cloudsql_binder_reconcile_errors",
            "cloudsql_binder_reconcile_duration_seconds",
            "cloudsql_binder_api_writes",
            "cloudsql_binder_instance_usable_connections",
            "cloudsql_binder_instance_allocated_connections",
            "cloudsql_binder_admission_requests",
            "cloudsql_binder_admission_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}:\n{text}"
            );
        }
        // The known series start at zero.
        assert!(
            text.contains(
                r#"cloudsql_binder_api_writes_total{controller="binding",verb="apply"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cloudsql_binder_reconcile_errors_total{controller="instance"} 0"#),
            "{text}"
        );
        assert_eq!(Metrics::default().total_writes(), 0);
    }

    #[test]
    fn the_known_webhook_names_are_the_routes() {
        let routes: Vec<&str> = crate::webhook::Route::ALL.map(|r| r.name()).to_vec();
        assert_eq!(routes, known::WEBHOOKS);
    }

    #[test]
    fn api_errors_are_one_line_without_the_status_dump() {
        let error = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            reason: "NotFound".into(),
            message: r#"namespaces "x" not found"#.into(),
            ..Default::default()
        }));
        assert_eq!(
            KubeError(&error).to_string(),
            r#"namespaces "x" not found (HTTP 404 NotFound)"#
        );
        let watch = kube::runtime::watcher::Error::InitialListFailed(error);
        assert_eq!(
            WatchError(&watch).to_string(),
            r#"initial list failed: namespaces "x" not found (HTTP 404 NotFound)"#
        );
    }

    #[test]
    fn writes_are_counted_across_labels() {
        let metrics = Metrics::default();
        metrics.write("binding", "apply");
        metrics.write("binding", "apply");
        metrics.write("instance", "apply_status");
        assert_eq!(metrics.total_writes(), 3);
        assert!(
            metrics
                .encode()
                .contains("cloudsql_binder_api_writes_total")
        );
    }
}
