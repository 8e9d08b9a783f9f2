//! The HTTPS server every replica runs: tokio-rustls in front of an axum
//! router, the certificate followed from the Secret.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::review::{AdmissionContext, ReviewError, Route, answer};
use super::tls::{ReloadingResolver, certified_key, server_config};
use super::{Error, MAX_REVIEW_BYTES, WebhookOptions};
use crate::index::Cluster;
use crate::telemetry::Metrics;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the webhook on `options.listen` until `shutdown` resolves, then
/// drains for `options.drain`: it goes on answering, but closes each
/// connection after its answer (`Connection: close`) and keeps none alive, so
/// the API server never sends a review down a kept-alive connection the
/// moment we close it (a `broken pipe` it counts as a webhook failure: with
/// `failurePolicy: Ignore`, a pod created without its injection). By the end
/// of the drain the endpoints no longer name this replica. Every replica runs
/// it (it only reads: its stores and the certificate Secret).
pub async fn serve(
    client: Client,
    cluster: Arc<Cluster>,
    options: WebhookOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: options.listen,
            source,
        })?;
    serve_on(listener, client, cluster, options, metrics, shutdown).await
}

/// [`serve`] on a listener already bound (tests bind port 0 first).
pub async fn serve_on(
    listener: TcpListener,
    client: Client,
    cluster: Arc<Cluster>,
    options: WebhookOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let resolver = Arc::new(ReloadingResolver::default());
    let acceptor = TlsAcceptor::from(Arc::new(server_config(resolver.clone())?));
    let follower = AbortOnDrop(tokio::spawn(follow_secret(
        client,
        options.clone(),
        resolver.clone(),
    )));
    let ctx = Arc::new(AdmissionContext {
        stores: cluster.stores.clone(),
        caps: cluster.caps,
        options: options.clone(),
        metrics: Some(metrics),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let router = router(ctx).layer(axum::middleware::map_response({
        let draining = draining.clone();
        move |mut response: Response| {
            let draining = draining.load(Ordering::Relaxed);
            async move {
                if draining {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }));
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
          "serving the admission webhook");

    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let drained = tokio::time::sleep(Duration::MAX);
    let mut drained = std::pin::pin!(drained);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause, go on.
                        warn!(error = %err, "webhook: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(router.clone());
                let watcher = graceful.watcher();
                let keep_alive = !draining.load(Ordering::Relaxed);
                connections.spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            debug!(%peer, error = %err, "webhook: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http1().keep_alive(keep_alive);
                    let connection = builder.serve_connection(TokioIo::new(tls), service).into_owned();
                    if let Err(err) = watcher.watch(connection).await {
                        debug!(%peer, error = %err, "webhook: connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut shutdown, if !draining.load(Ordering::Relaxed) => {
                if options.drain.is_zero() {
                    break;
                }
                info!(drain = ?options.drain, "webhook: draining (answers close their connections)");
                draining.store(true, Ordering::Relaxed);
                drained.as_mut().reset(tokio::time::Instant::now() + options.drain);
            }
            _ = &mut drained => break,
        }
    }
    drop(listener);
    drop(follower);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    connections.abort_all();
    info!("the admission webhook stopped");
    Ok(())
}

/// The routes: one POST per webhook, and `/healthz`.
fn router(ctx: Arc<AdmissionContext>) -> Router {
    let mut router = Router::new().route("/healthz", get(|| async { "ok" }));
    for route in Route::ALL {
        router = router.route(
            route.path(),
            post(
                move |State(ctx): State<Arc<AdmissionContext>>, body: Body| {
                    handle(ctx, route, body)
                },
            ),
        );
    }
    router.with_state(ctx)
}

async fn handle(ctx: Arc<AdmissionContext>, route: Route, body: Body) -> Response {
    let started = std::time::Instant::now();
    let (response, outcome) = respond(&ctx, route, body).await;
    if let Some(metrics) = &ctx.metrics {
        metrics.admission(route.name(), outcome, started.elapsed().as_secs_f64());
    }
    response
}

/// The HTTP answer to one request, and its outcome label.
async fn respond(ctx: &AdmissionContext, route: Route, body: Body) -> (Response, &'static str) {
    let bytes = match axum::body::to_bytes(body, MAX_REVIEW_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            let message = ReviewError::TooLarge {
                size: MAX_REVIEW_BYTES + 1,
                limit: MAX_REVIEW_BYTES,
            };
            debug!(error = %err, "webhook: cannot read the request body");
            return (
                (StatusCode::BAD_REQUEST, format!("{message} ({err})")).into_response(),
                "bad_request",
            );
        }
    };
    // `review` never panics by design (and by property test); should it
    // still, one request fails, not the connection or the server.
    match std::panic::catch_unwind(AssertUnwindSafe(|| answer(route, &bytes, ctx))) {
        Ok(Ok((answer, outcome))) => (
            (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                answer,
            )
                .into_response(),
            outcome.label(),
        ),
        Ok(Err(err)) => (
            (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
            "bad_request",
        ),
        Err(_) => (
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the webhook failed on this request",
            )
                .into_response(),
            "failed",
        ),
    }
}

/// Loads the serving certificate from the Secret, and again whenever it
/// changes.
async fn follow_secret(client: Client, options: WebhookOptions, resolver: Arc<ReloadingResolver>) {
    let api: Api<Secret> = Api::namespaced(client, &options.secret_namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", options.secret_name));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    while let Some(event) = stream.next().await {
        let secret = match event {
            Ok(secret) => secret,
            Err(err) => {
                warn!(error = %crate::telemetry::WatchError(&err), "webhook: watching the certificate Secret");
                continue;
            }
        };
        let Some(data) = secret.data.as_ref() else {
            continue;
        };
        let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
            continue;
        };
        match certified_key(&cert.0, &key.0) {
            Ok(key) => {
                resolver.set(Arc::new(key));
                info!(secret = %format!("{}/{}", options.secret_namespace, options.secret_name),
                      "webhook: serving certificate loaded");
            }
            Err(err) => warn!(error = %err, "webhook: the certificate Secret is unusable"),
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
