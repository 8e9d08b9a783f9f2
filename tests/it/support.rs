//! Shared helpers of the integration tests: the real control plane (started
//! through tools/cluster-up.sh when it is not up), a client, and a fresh
//! namespace per test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

static CLUSTER: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn install_crypto_provider() {
    // Ignore the error: another test in this process installed it already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The directory of the tests' control plane: `CLOUDSQL_BINDER_CLUSTER_DIR`
/// (`make test` sets it to `.cluster-test/`), else `.cluster-test/` in the
/// repository. Never `.cluster/` by default: that is the demo's cluster, where
/// `make demo` leaves a cluster-wide operator running that would fight the
/// tests' operators.
pub fn cluster_dir() -> PathBuf {
    std::env::var_os("CLOUDSQL_BINDER_CLUSTER_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cluster-test"))
}

/// Makes sure the control plane is up (starting it when it is not) and returns
/// the path of its admin kubeconfig. Panics with the script's reason when it
/// cannot: a test without a control plane fails, it never skips.
pub fn kubeconfig_path() -> PathBuf {
    let mut guard = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = guard.as_ref() {
        return path.clone();
    }
    let root = repo_root();
    let dir = cluster_dir();
    let output = Command::new("bash")
        .arg(root.join("tools/cluster-up.sh"))
        .env("CLOUDSQL_BINDER_CLUSTER_DIR", &dir)
        .output()
        .expect("running tools/cluster-up.sh");
    assert!(
        output.status.success(),
        "the control plane could not be started by tools/cluster-up.sh in {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.join("kubeconfig");
    assert!(path.exists(), "{} was not written", path.display());
    *guard = Some(path.clone());
    path
}

/// A client for the control plane's admin user.
pub async fn client() -> Client {
    install_crypto_provider();
    let path = kubeconfig_path();
    client_for(&path).await
}

/// A client from a kubeconfig file.
pub async fn client_for(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a valid kubeconfig");
    Client::try_from(config).expect("building a client")
}

/// A namespace created for one test and deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Creates `prefix-<random>` with the given labels and waits until its
    /// default ServiceAccount exists (pods cannot be created before).
    pub async fn new(prefix: &str, labels: &[(&str, &str)]) -> TestNamespace {
        let client = client().await;
        let name = format!("{prefix}-{:08x}", rand_suffix());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating the test namespace");
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually(
            Duration::from_secs(30),
            "the default ServiceAccount",
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok().flatten().is_some() }
            },
        )
        .await;
        TestNamespace { name, client }
    }

    /// An `Api` of a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_NAMESPACES").is_some() {
            return;
        }
        let kubeconfig = kubeconfig_path();
        let _ = Command::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .output();
    }
}

fn rand_suffix() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// Polls `check` until it is true, or panics after `timeout` naming `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs (server-side apply) the project's CRDs and waits until both are Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in cloudsql_binder::api::crds() {
        let name = crd.metadata.name.clone().expect("a CRD has a name");
        crds.patch(
            &name,
            &PatchParams::apply("cloudsql-binder-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("applying a CRD");
        wait_established(&crds, &name).await;
    }
}

/// Waits until the named CRD is Established. Polls the object itself: right after a create its
/// `status.conditions` is `null` until the API server's establishing controller runs, which
/// `kubectl wait --for=condition=Established` reports as an error instead of waiting.
pub async fn wait_established(crds: &Api<CustomResourceDefinition>, name: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("CRD {name} Established"),
        || {
            let crds = crds.clone();
            let name = name.to_string();
            async move {
                crds.get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            }
        },
    )
    .await;
}

/// Runs kubectl against the test control plane; returns (success, stdout, stderr).
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig_path()).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("running kubectl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("waiting for kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Installs the Knative Serving `Service` CRD from the pinned `knative.dev/serving`
/// Go module (no Knative controller runs) and waits until it is Established.
pub async fn install_knative_serving_crd() {
    let output = Command::new("bash")
        .arg(repo_root().join("tools/knative-crd.sh"))
        .output()
        .expect("running tools/knative-crd.sh");
    assert!(
        output.status.success(),
        "tools/knative-crd.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let (ok, _, err) = kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", &path],
        None,
    );
    assert!(ok, "installing the Knative Service CRD: {err}");
    wait_established(&Api::all(client().await), "services.serving.knative.dev").await;
}

/// The operator running in this test process, limited to the given namespaces.
pub struct Operator {
    pub metrics: std::sync::Arc<cloudsql_binder::telemetry::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// Starts the controllers for `namespaces` and waits until their caches synced.
    pub async fn start(namespaces: &[&str]) -> Operator {
        Operator::start_with(cloudsql_binder::controller::Options {
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            reporter_instance: Some("integration-test".into()),
            ..Default::default()
        })
        .await
    }

    /// Starts the controllers with `options` and waits until their caches synced.
    pub async fn start_with(options: cloudsql_binder::controller::Options) -> Operator {
        let client = client().await;
        let metrics = std::sync::Arc::new(cloudsql_binder::telemetry::Metrics::default());
        let readiness = std::sync::Arc::new(cloudsql_binder::telemetry::Readiness::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(cloudsql_binder::controller::run(
            client,
            options,
            metrics.clone(),
            readiness.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        eventually(
            Duration::from_secs(60),
            "the operator's caches to sync",
            || {
                let readiness = readiness.clone();
                async move { readiness.is_ready() }
            },
        )
        .await;
        Operator {
            metrics,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the controllers and waits for them to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// The operator with its admission webhook, in this process, for one test
/// namespace: the controllers, the HTTPS webhook server on 127.0.0.1 (a free
/// port) and the certificate manager (Secret in the test namespace). Its
/// webhook configurations are named `cloudsql-binder-<namespace>` and select
/// only that namespace, so tests running in parallel never see each other's
/// webhooks; they are deleted when the operator is dropped.
pub struct AdmissionOperator {
    pub options: cloudsql_binder::webhook::WebhookOptions,
    /// The metrics of its controllers and webhook.
    pub metrics: std::sync::Arc<cloudsql_binder::telemetry::Metrics>,
    client: Client,
    cluster: std::sync::Arc<cloudsql_binder::index::Cluster>,
    tasks: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    webhook: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl AdmissionOperator {
    /// Starts everything for namespace `ns`, with serving certificates valid
    /// for `cert_validity`, once the caches synced.
    pub async fn start(ns: &str, cert_validity: Duration) -> AdmissionOperator {
        use cloudsql_binder::webhook::{self, Endpoint, WebhookOptions};
        let client = client().await;
        let metrics = std::sync::Arc::new(cloudsql_binder::telemetry::Metrics::default());
        let controller_options = cloudsql_binder::controller::Options {
            namespaces: vec![ns.to_owned()],
            reporter_instance: Some("integration-test".into()),
            ..Default::default()
        };
        let cluster = cloudsql_binder::index::Cluster::start(client.clone(), None, None).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a free port for the webhook");
        let addr = listener.local_addr().expect("the webhook's address");
        let options = WebhookOptions {
            listen: addr,
            endpoint: Endpoint::Url(format!("https://127.0.0.1:{}", addr.port())),
            configuration_name: format!("cloudsql-binder-{ns}"),
            namespaces: vec![ns.to_owned()],
            excluded_namespaces: vec![],
            secret_namespace: ns.to_owned(),
            secret_name: webhook::DEFAULT_SECRET_NAME.to_owned(),
            cert_validity,
            drain: Duration::ZERO,
        };
        let mut operator = AdmissionOperator {
            options: options.clone(),
            metrics: metrics.clone(),
            client: client.clone(),
            cluster: cluster.clone(),
            tasks: Vec::new(),
            webhook: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(cloudsql_binder::controller::run_controllers(
            client.clone(),
            cluster.clone(),
            controller_options,
            metrics.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        operator.tasks.push((tx, handle));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let admission = cluster.admission.clone();
        let handle = tokio::spawn(async move {
            webhook::run_certificate_manager(client, options, &admission, async move {
                let _ = rx.await;
            })
            .await
            .expect("the certificate manager");
        });
        operator.tasks.push((tx, handle));
        operator.serve(listener);
        operator
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(cloudsql_binder::webhook::serve_on(
            listener,
            self.client.clone(),
            self.cluster.clone(),
            self.options.clone(),
            self.metrics.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        self.webhook = Some((
            tx,
            tokio::spawn(async move {
                handle
                    .await
                    .expect("the webhook server task")
                    .expect("the webhook server");
            }),
        ));
    }

    /// The stores the operator answers from.
    pub fn stores(&self) -> cloudsql_binder::index::Stores {
        self.cluster.stores.clone()
    }

    /// Stops the webhook server only (connections refused; the controllers
    /// and the certificate manager go on).
    pub async fn stop_webhook(&mut self) {
        if let Some((tx, handle)) = self.webhook.take() {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
        }
    }

    /// Starts the webhook server again on the same port.
    pub async fn start_webhook(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.options.listen)
            .await
            .expect("binding the webhook's port again");
        self.serve(listener);
    }

    /// Stops everything and deletes the webhook configurations.
    pub async fn stop(mut self) {
        self.stop_webhook().await;
        for (tx, handle) in self.tasks.drain(..) {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
        }
    }
}

impl Drop for AdmissionOperator {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.webhook.take() {
            handle.abort();
        }
        for (_, handle) in self.tasks.drain(..) {
            handle.abort();
        }
        let name = &self.options.configuration_name;
        let _ = kubectl(
            &[
                "delete",
                "mutatingwebhookconfiguration,validatingwebhookconfiguration",
                name,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}
