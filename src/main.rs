//! The `cloudsql-binder` binary: thin subcommands over the library.

// No unwrap() outside tests: external input must fail with a message.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Binds Kubernetes and Cloud Run workloads to Cloud SQL and keeps their
/// connection pools within the instance's max_connections.
#[derive(Parser)]
#[command(name = "cloudsql-binder", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the crate version and the Kubernetes API version it is built against.
    Version,
    /// Print the CloudSqlInstance and CloudSqlBinding CRDs as multi-document YAML.
    Crd,
    /// Apply bindings to workload YAML offline and print the result.
    #[command(long_about = RENDER_LONG_ABOUT)]
    Render(RenderArgs),
    /// Run the operator: keep bound workloads injected and budgets current.
    Run(Box<RunArgs>),
}

/// Options of `cloudsql-binder run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Handle bindings only in these namespaces (repeatable; default: all).
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    namespaces: Vec<String>,
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: cloudsql_binder::telemetry::LogFormat,
    /// Force native sidecars on or off (default: detected from the API server version).
    #[arg(long)]
    native_sidecars: Option<bool>,
    /// Cloud SQL Admin API endpoint used to discover instances' tier, version and flags.
    #[arg(long, default_value = cloudsql_binder::gcp::DEFAULT_ENDPOINT)]
    sqladmin_endpoint: String,
    /// Service-account key file for the Admin API (default: Application Default
    /// Credentials, e.g. GKE Workload Identity).
    #[arg(long, value_name = "FILE")]
    sqladmin_credentials: Option<std::path::PathBuf>,
    /// Extra PEM root CA(s) to trust for the Admin API endpoint.
    #[arg(long, value_name = "FILE")]
    sqladmin_ca_file: Option<std::path::PathBuf>,
    /// Seconds an Admin API answer is used before the instance is asked again
    /// (a spec change asks at once).
    #[arg(long, default_value_t = 600)]
    sqladmin_refresh_seconds: u64,
    /// Elect one leader among replicas through a Lease; only the leader runs the controllers.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudsql-binder")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "cloudsql-binder")]
    leader_election_lease: String,
    /// This installation's identity, written into every status it writes
    /// (`status.reconciledBy`) so that two installations on one cluster find
    /// each other instead of fighting. Default: the Lease
    /// (`NAMESPACE/NAME`, or the host name without leader election), the
    /// version and a hash of the flags that change what is written.
    #[arg(long, env = "CLOUDSQL_BINDER_OPERATOR_ID")]
    operator_id: Option<String>,
    /// Seconds between two reconciles of every object whatever the watches
    /// said (the backstop of level-triggering).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    resync_seconds: u64,
    /// Serve the admission webhook on this address (default with --webhook-url
    /// or --webhook-service: 0.0.0.0:9443). No webhook flag: no webhook.
    #[arg(long, value_name = "ADDR")]
    webhook_listen: Option<std::net::SocketAddr>,
    /// Register the webhook configurations with clientConfig.url = URL + path
    /// (an operator running outside the cluster: tests, the demo).
    #[arg(long, value_name = "URL", conflicts_with = "webhook_service")]
    webhook_url: Option<String>,
    /// Register the webhook configurations with this Service (what the Helm chart uses).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    webhook_service: Option<String>,
    /// Port of the --webhook-service Service.
    #[arg(long, default_value_t = 443)]
    webhook_service_port: i32,
    /// Name of both webhook configurations.
    #[arg(long, default_value = cloudsql_binder::webhook::DEFAULT_CONFIGURATION_NAME)]
    webhook_configuration_name: String,
    /// Namespace of the webhook's certificate Secret (the operator's own
    /// namespace, which the webhook never intercepts).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudsql-binder")]
    webhook_secret_namespace: String,
    /// Name of the webhook's certificate Secret.
    #[arg(long, default_value = cloudsql_binder::webhook::DEFAULT_SECRET_NAME)]
    webhook_secret_name: String,
    /// Validity of the webhook's serving certificate (renewed at 2/3 of it), e.g. 90d, 12h, 20s.
    #[arg(long, default_value = "90d", value_parser = cloudsql_binder::webhook::parse_duration)]
    webhook_cert_validity: std::time::Duration,
    /// After SIGTERM, how long the webhook goes on answering (closing each
    /// connection after its answer) while the endpoints drop this replica.
    #[arg(long, default_value = "5s", value_parser = cloudsql_binder::webhook::parse_duration)]
    webhook_drain: std::time::Duration,
}

/// The webhook's options from the flags; `None` without any webhook flag.
fn webhook_options(
    args: &RunArgs,
) -> anyhow::Result<Option<cloudsql_binder::webhook::WebhookOptions>> {
    use cloudsql_binder::webhook::{Endpoint, WebhookOptions};
    let endpoint = match (&args.webhook_url, &args.webhook_service) {
        (Some(url), _) => Endpoint::Url(url.clone()),
        (None, Some(service)) => {
            let (namespace, name) = service
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("--webhook-service {service:?} must be NAMESPACE/NAME")
                })?;
            Endpoint::Service {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port: args.webhook_service_port,
            }
        }
        (None, None) if args.webhook_listen.is_some() => anyhow::bail!(
            "--webhook-listen needs --webhook-url or --webhook-service: how does the API server reach the webhook?"
        ),
        (None, None) => return Ok(None),
    };
    endpoint.subject_alt_names()?;
    Ok(Some(WebhookOptions {
        listen: args
            .webhook_listen
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 9443))),
        endpoint,
        configuration_name: args.webhook_configuration_name.clone(),
        namespaces: args.namespaces.clone(),
        excluded_namespaces: vec![args.webhook_secret_namespace.clone()],
        secret_namespace: args.webhook_secret_namespace.clone(),
        secret_name: args.webhook_secret_name.clone(),
        cert_validity: args.webhook_cert_validity,
        drain: args.webhook_drain,
    }))
}

fn main() -> ExitCode {
    // Exactly one rustls provider per process: kube's client panics when it
    // finds none or cannot pick between two.
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("cloudsql-binder: a rustls crypto provider was already installed");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cloudsql-binder: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!(
                "cloudsql-binder {} (Kubernetes API {})",
                env!("CARGO_PKG_VERSION"),
                cloudsql_binder::KUBERNETES_API_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            print!("{}", cloudsql_binder::api::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Render(args) => Ok(render_command(args)),
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_operator(*args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The Admin API client, or `None` (with a warning) when it cannot be set up:
/// instances that ask for discovery then report it and use their spec.
fn sqladmin_discovery(
    endpoint: &str,
    credentials: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> Option<std::sync::Arc<cloudsql_binder::gcp::CapacityDiscovery>> {
    use cloudsql_binder::gcp::{AdminApi, CapacityDiscovery};
    let ca = match ca_file.map(std::fs::read).transpose() {
        Ok(ca) => ca,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read --sqladmin-ca-file; Admin API discovery is off");
            return None;
        }
    };
    let api = match credentials {
        Some(key) => AdminApi::from_key_file(key, endpoint, ca.as_deref()),
        None => AdminApi::new(endpoint).and_then(|api| match &ca {
            Some(pem) => api.with_root_ca_pem(pem),
            None => Ok(api),
        }),
    };
    match api {
        Ok(api) => Some(std::sync::Arc::new(CapacityDiscovery::new(api))),
        Err(err) => {
            tracing::warn!(error = %err, "Cloud SQL Admin API discovery is off");
            None
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use anyhow::Context as _;
    use cloudsql_binder::{controller, leader, telemetry};
    use futures::FutureExt;

    telemetry::init_tracing(args.log_format);
    // Bind the metrics port before anything else: a port in use fails at
    // once and names the address, not after the caches have synced.
    drop(
        std::net::TcpListener::bind(args.metrics_addr).with_context(|| {
            format!(
                "cannot listen on {} (--metrics-addr): is another process using the port?",
                args.metrics_addr
            )
        })?,
    );
    let webhook = webhook_options(&args)?;
    let webhook_listener = match &webhook {
        Some(w) => {
            let listener = std::net::TcpListener::bind(w.listen).with_context(|| {
                format!(
                    "cannot listen on {} (--webhook-listen): is another process using the port?",
                    w.listen
                )
            })?;
            listener.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(listener)?)
        }
        None => None,
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or the in-cluster service account)")?;
    let metrics = Arc::new(telemetry::Metrics::default());
    let readiness = Arc::new(telemetry::Readiness::default());
    let shutdown = shutdown_signal().shared();
    let admin = tokio::spawn(telemetry::serve_admin(
        args.metrics_addr,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    let identity = args
        .operator_id
        .clone()
        .unwrap_or_else(|| default_operator_id(&args));
    let options = controller::Options {
        namespaces: args.namespaces,
        reporter_instance: std::env::var("POD_NAME").ok(),
        native_sidecars: args.native_sidecars,
        discovery: sqladmin_discovery(
            &args.sqladmin_endpoint,
            args.sqladmin_credentials.as_deref(),
            args.sqladmin_ca_file.as_deref(),
        ),
        discovery_refresh: std::time::Duration::from_secs(args.sqladmin_refresh_seconds),
        identity,
        resync: std::time::Duration::from_secs(args.resync_seconds),
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), metrics = %args.metrics_addr, "starting");
    // Every replica keeps the caches and is ready once they synced; only the
    // leader runs the controllers.
    let cluster = tokio::select! {
        cluster = cloudsql_binder::index::Cluster::start(
            client.clone(),
            options.native_sidecars,
            options.discovery.clone(),
        ) => cluster,
        _ = shutdown.clone() => return Ok(()),
    };
    readiness.set_ready();
    // The admission webhook: every replica serves it from its caches and the
    // certificate its Secret holds. Writing that Secret and the webhook
    // configurations' caBundle is the leader's job, with the controllers.
    let mut webhook_server = None;
    if let (Some(webhook), Some(listener)) = (&webhook, webhook_listener) {
        let serving = cloudsql_binder::webhook::serve_on(
            listener,
            client.clone(),
            cluster.clone(),
            webhook.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        webhook_server = Some(tokio::spawn(async move {
            if let Err(err) = serving.await {
                tracing::error!(error = %err, "the admission webhook failed");
            }
        }));
    }
    let lease_client = client.clone();
    let leading = move |stop: futures::future::BoxFuture<'static, ()>| {
        lead(
            client.clone(),
            cluster.clone(),
            options.clone(),
            metrics.clone(),
            webhook.clone(),
            stop,
        )
    };
    if args.leader_election {
        let lease = leader::LeaseConfig {
            namespace: args.leader_election_namespace,
            name: args.leader_election_lease,
            identity: leader::default_identity(),
        };
        leader::run(lease_client, lease, shutdown.clone(), move |stop| {
            leading(stop.boxed())
        })
        .await?;
    } else {
        leading(shutdown.clone().boxed()).await;
    }
    // The webhook drains after the signal (--webhook-drain): exiting before
    // it has would reset the connections the API server is still using.
    if let Some(server) = webhook_server {
        let _ = server.await;
    }
    match admin.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err).context(format!("serving metrics on {}", args.metrics_addr)),
        Err(err) => Err(err).context("the metrics server panicked"),
    }
}

/// The default `--operator-id`: who we are (the Lease, or the host without
/// leader election), which version, and a hash of the flags that change what
/// is written, so that two installations that would write different things
/// never share an identity while replicas and restarts of one do.
fn default_operator_id(args: &RunArgs) -> String {
    use sha2::{Digest, Sha256};
    let who = if args.leader_election {
        format!(
            "{}/{}",
            args.leader_election_namespace, args.leader_election_lease
        )
    } else {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    };
    let flags = format!(
        "{:?}|{:?}|{}|{}",
        args.namespaces,
        args.native_sidecars,
        args.sqladmin_endpoint,
        args.sqladmin_credentials.is_some()
    );
    let digest = Sha256::digest(flags.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{who}@{}+{hash}", env!("CARGO_PKG_VERSION"))
}

/// What the leader runs until `stop`: the controllers and, with a webhook,
/// its certificate manager (one writer of the Secret and the caBundle).
async fn lead(
    client: kube::Client,
    cluster: std::sync::Arc<cloudsql_binder::index::Cluster>,
    options: cloudsql_binder::controller::Options,
    metrics: std::sync::Arc<cloudsql_binder::telemetry::Metrics>,
    webhook: Option<cloudsql_binder::webhook::WebhookOptions>,
    stop: futures::future::BoxFuture<'static, ()>,
) {
    use futures::FutureExt;
    let stop = stop.shared();
    let certificates = {
        let (client, stop, admission) = (client.clone(), stop.clone(), cluster.admission.clone());
        async move {
            let Some(webhook) = webhook else { return };
            if let Err(err) =
                cloudsql_binder::webhook::run_certificate_manager(client, webhook, &admission, stop)
                    .await
            {
                tracing::error!(error = %err, "the webhook certificate manager failed");
            }
        }
    };
    tokio::join!(
        cloudsql_binder::controller::run_controllers(client, cluster, options, metrics, stop),
        certificates
    );
}

/// `cloudsql-binder render --help`.
const RENDER_LONG_ABOUT: &str = "Reads multi-document YAML holding CloudSqlInstances, CloudSqlBindings and workloads \
(Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod, Knative/Cloud Run Service) and prints \
every document back, with the injection of the bindings that select each workload applied. A binding matches \
workloads in its own namespace (missing = default) by kind and name or label selector.\n\n\
The pool granted per pod comes from the same connection budget the operator computes, over the objects \
in the input: the instance's capacity from its spec (capacity.maxConnections, else capacity.tier with the \
tier table; the Admin API is not asked offline), each binding's max pods from the workloads and \
HorizontalPodAutoscalers in the input (a DaemonSet counts as one node), shared by weighted fair share. \
An instance whose spec gives no capacity grants each binding its maxPerPod (render cannot ask the \
Admin API; set capacity.maxConnections or capacity.tier to render with the budget).\n\n\
On any error (invalid YAML, a binding whose instance is not in the input, an unknown kind, a conflict) \
nothing is printed; each problem goes to stderr on one line and the exit status is non-zero.";

/// Options of `cloudsql-binder render`.
#[derive(clap::Args)]
struct RenderArgs {
    /// Input file (repeatable; `-` or none: stdin).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    files: Vec<String>,
    /// Take our injection out of every workload instead of injecting.
    #[arg(long)]
    remove: bool,
    /// Whether the target cluster supports native sidecars (decides proxy.sidecar: Auto).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecars: bool,
}

/// `cloudsql-binder render`: I/O around `cloudsql_binder::render::render`.
fn render_command(args: RenderArgs) -> ExitCode {
    use std::io::Read;
    let files = if args.files.is_empty() {
        vec!["-".to_owned()]
    } else {
        args.files
    };
    let mut inputs = Vec::new();
    let mut failed = false;
    for file in files {
        let read = if file == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map(|_| ("<stdin>".to_owned(), text))
        } else {
            std::fs::read_to_string(&file).map(|text| (file.clone(), text))
        };
        match read {
            Ok(input) => inputs.push(input),
            Err(err) => {
                eprintln!("cloudsql-binder render: cannot read {file}: {err}");
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::FAILURE;
    }
    let options = cloudsql_binder::render::RenderOptions {
        remove: args.remove,
        native_sidecars: args.native_sidecars,
    };
    match cloudsql_binder::render::render(&inputs, &options) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in errors {
                eprintln!("cloudsql-binder render: {error}");
            }
            ExitCode::FAILURE
        }
    }
}
