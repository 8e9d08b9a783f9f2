//! The Helm chart on the real control plane: it installs; its RBAC is enough
//! for the whole bind flow and no more (the operator runs out of cluster as the
//! chart's ServiceAccount); two operator processes elect one leader, which
//! hands over on SIGTERM. Also, without a cluster: the chart's CRDs are the
//! generated ones and the binary accepts every argument the chart renders.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams};
use kube::config::Kubeconfig;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, TestNamespace, eventually};

fn chart_dir() -> PathBuf {
    support::repo_root().join("charts/cloudsql-binder")
}

/// The project-built helm (tools/build-controlplane.sh builds it when missing).
fn helm() -> PathBuf {
    let out = Command::new("bash")
        .arg(support::repo_root().join("tools/build-controlplane.sh"))
        .output()
        .expect("running tools/build-controlplane.sh");
    assert!(
        out.status.success(),
        "building helm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("helm")
}

fn run_helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm())
        .env("KUBECONFIG", support::kubeconfig_path())
        .args(args)
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_charts_crds_are_the_generated_crds() {
    let chart_copy = std::fs::read_to_string(chart_dir().join("crds/cloudsql.dev_crds.yaml"))
        .expect("reading the chart's CRDs");
    let generated = cloudsql_binder::api::crds_yaml().expect("generating the CRDs");
    assert!(
        chart_copy == generated,
        "charts/cloudsql-binder/crds/cloudsql.dev_crds.yaml is stale: run `make crds && \
         cp crds/cloudsql.dev_crds.yaml charts/cloudsql-binder/crds/`"
    );
}

/// The operator container's args as `helm template` renders them.
fn rendered_args(values: &[&str]) -> Vec<String> {
    rendered_args_for("csb", "cloudsql-binder", values)
}

/// The operator container's args for release `release` in `namespace`.
fn rendered_args_for(release: &str, namespace: &str, values: &[&str]) -> Vec<String> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().expect("a UTF-8 path"),
        "--namespace",
        namespace,
        "--show-only",
        "templates/deployment.yaml",
    ];
    args.extend_from_slice(values);
    let (ok, out, err) = run_helm(&args);
    assert!(ok, "helm template {values:?} failed: {err}");
    let deployment: Value = serde_saphyr::from_str(&out).expect("the Deployment is YAML");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the operator container has args")
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_string())
        .collect()
}

#[test]
fn the_binary_accepts_every_argument_the_chart_renders() {
    let full = chart_dir().join("ci/full-values.yaml");
    let full = full.to_str().expect("a UTF-8 path");
    for values in [
        &[][..],
        &["-f", full][..],
        &[
            "--set",
            "webhook.enabled=false,leaderElection.enabled=false",
        ][..],
    ] {
        let args = rendered_args(values);
        assert_eq!(args.first().map(String::as_str), Some("run"));
        // clap parses every argument before acting on --help: an unknown flag,
        // a repeated one or a bad value fails here.
        let out = Command::new(env!("CARGO_BIN_EXE_cloudsql-binder"))
            .args(&args)
            .arg("--help")
            .output()
            .expect("running cloudsql-binder");
        assert!(
            out.status.success(),
            "cloudsql-binder rejects the chart's args {args:?} (values {values:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Helm release of the chart in a test namespace; uninstalled when dropped
/// (its ClusterRole and ClusterRoleBinding outlive the namespace otherwise).
struct Release {
    name: String,
    namespace: String,
}

impl Release {
    fn install(ns: &TestNamespace, sets: &[&str]) -> Release {
        let chart = chart_dir();
        let name = ns.name.clone();
        let mut args = vec![
            "install",
            &name,
            chart.to_str().expect("a UTF-8 path"),
            "--namespace",
            &ns.name,
        ];
        for set in sets {
            args.extend_from_slice(&["--set", set]);
        }
        let (ok, out, err) = run_helm(&args);
        assert!(
            ok,
            "helm install failed:\n{out}\n{err}\n(a conflict on a CRD means the chart's copy is \
             stale: cp crds/cloudsql.dev_crds.yaml charts/cloudsql-binder/crds/)"
        );
        assert!(
            out.contains("kubectl get sqlinstances,sqlbindings"),
            "helm install printed no NOTES:\n{out}"
        );
        Release {
            name,
            namespace: ns.name.clone(),
        }
    }

    /// The chart's ServiceAccount (and every object's) name.
    fn fullname(&self) -> String {
        format!("{}-cloudsql-binder", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_NAMESPACES").is_some() {
            return;
        }
        let _ = run_helm(&["uninstall", &self.name, "--namespace", &self.namespace]);
        // Defensive: a failed uninstall must not leave webhook
        // configurations behind for other tests.
        let name = self.fullname();
        for kind in [
            "mutatingwebhookconfiguration",
            "validatingwebhookconfiguration",
        ] {
            let _ = support::kubectl(&["delete", kind, &name, "--ignore-not-found"], None);
        }
    }
}

/// A kubeconfig that authenticates as `sa` with a TokenRequest token, against
/// the test cluster's server and CA.
fn service_account_kubeconfig(dir: &Path, namespace: &str, sa: &str) -> PathBuf {
    let (ok, token, err) = support::kubectl(
        &["create", "token", sa, "-n", namespace, "--duration=2h"],
        None,
    );
    assert!(ok, "kubectl create token {sa}: {err}");
    let admin = Kubeconfig::read_from(support::kubeconfig_path()).expect("the admin kubeconfig");
    let cluster = admin.clusters[0]
        .cluster
        .as_ref()
        .expect("the admin kubeconfig has a cluster");
    let server = cluster.server.as_deref().expect("a server");
    let ca = cluster
        .certificate_authority_data
        .as_deref()
        .expect("embedded CA data");
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n- name: {sa}\n  user:\n    token: {}\n\
             contexts:\n- name: {sa}\n  context:\n    cluster: local\n    user: {sa}\n    namespace: {namespace}\n\
             current-context: {sa}\n",
            token.trim()
        ),
    )
    .expect("writing the ServiceAccount's kubeconfig");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET http://addr/path` → (status, body).
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// `cloudsql-binder run` as a child process, out of cluster, limited to one
/// namespace; killed when dropped.
struct OperatorProcess {
    identity: String,
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(
        identity: &str,
        kubeconfig: &Path,
        namespace: &str,
        lease: &str,
        dir: &Path,
    ) -> OperatorProcess {
        let args = [
            "run",
            "--namespace",
            namespace,
            "--leader-election-namespace",
            namespace,
            "--leader-election-lease",
            lease,
        ]
        .map(String::from);
        OperatorProcess::start_with(identity, kubeconfig, &args, dir)
    }

    /// Starts `cloudsql-binder ARGS --metrics-addr 127.0.0.1:<free>`.
    fn start_with(
        identity: &str,
        kubeconfig: &Path,
        args: &[String],
        dir: &Path,
    ) -> OperatorProcess {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("{identity}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_cloudsql-binder"))
            .args(args)
            .args(["--metrics-addr", &metrics])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("NO_COLOR", "1")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the operator's log"))
            .spawn()
            .expect("starting cloudsql-binder run");
        OperatorProcess {
            identity: identity.to_string(),
            child,
            metrics,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "operator {} exited ({status}); its log:\n{}",
                self.identity,
                self.log()
            );
        }
    }

    /// Waits until /readyz answers 200 (caches synced).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            if let Some((200, _)) = http_get(&self.metrics, "/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "operator {} never became ready; its log:\n{}",
                self.identity,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The API writes it made, from its /metrics.
    async fn writes(&self) -> u64 {
        let (status, body) = http_get(&self.metrics, "/metrics")
            .await
            .unwrap_or_else(|| panic!("operator {}'s /metrics does not answer", self.identity));
        assert_eq!(status, 200, "GET /metrics of {}", self.identity);
        cloudsql_binder::telemetry::parse_total(&body, "cloudsql_binder_api_writes_total")
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {}", self.child.id());
    }

    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the operator") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "operator {} did not exit within {timeout:?} of SIGTERM; its log:\n{}",
                self.identity,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ar(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("cloudsql.dev", "v1alpha1", kind))
}

fn apply(namespace: Option<&str>, yaml: &str) {
    let mut args = vec![
        "apply",
        "--server-side",
        "--field-manager=chart-test",
        "-f",
        "-",
    ];
    if let Some(ns) = namespace {
        args.extend_from_slice(&["-n", ns]);
    }
    let (ok, _, err) = support::kubectl(&args, Some(yaml));
    assert!(ok, "kubectl apply failed: {err}\n{yaml}");
}

/// A CloudSqlInstance (cluster-scoped) named after the test namespace; deleted when dropped.
struct TestInstance(String);

impl TestInstance {
    fn create(ns: &TestNamespace) -> TestInstance {
        let name = format!("{}-db", ns.name);
        apply(
            None,
            &format!(
                "apiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlInstance\nmetadata:\n  name: {name}\n\
                 spec:\n  connectionName: my-project:europe-west1:orders\n  databaseVersion: POSTGRES_16\n\
                 \x20 capacity: {{maxConnections: 200, reservedConnections: 0}}\n  discovery: None\n"
            ),
        );
        TestInstance(name)
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let _ = support::kubectl(
            &[
                "delete",
                "cloudsqlinstance",
                &self.0,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// A Deployment and a binding of it to `instance`, both named `name`.
fn bind_deployment(ns: &TestNamespace, instance: &str, name: &str) {
    apply(
        Some(&ns.name),
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 2\n\
             \x20 selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n\
             \x20   spec:\n      containers: [{{name: app, image: example.com/{name}:1}}]\n\
             ---\n\
             apiVersion: cloudsql.dev/v1alpha1\nkind: CloudSqlBinding\nmetadata:\n  name: {name}\nspec:\n\
             \x20 instanceRef: {{name: {instance}}}\n  workloads: [{{kind: Deployment, name: {name}}}]\n\
             \x20 database: {{name: orders, user: {name}}}\n  pool: {{maxPerPod: 5, minPerPod: 1}}\n"
        ),
    );
}

/// Waits until binding `name` is Ready=True for its current generation and
/// its Deployment's template carries the proxy.
async fn wait_bound(ns: &TestNamespace, name: &str, operators: &mut [&mut OperatorProcess]) {
    let bindings: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ar("CloudSqlBinding"));
    let deployments: Api<Deployment> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for op in operators.iter_mut() {
            op.assert_running();
        }
        let binding = bindings
            .get_opt(name)
            .await
            .expect("reading the binding")
            .map(|b| serde_json::to_value(b).expect("json"))
            .unwrap_or(Value::Null);
        let ready = binding["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            && binding["status"]["observedGeneration"] == binding["metadata"]["generation"];
        let injected = deployments
            .get_opt(name)
            .await
            .expect("reading the Deployment")
            .and_then(|d| d.spec)
            .and_then(|s| s.template.spec)
            .is_some_and(|spec| {
                spec.init_containers
                    .iter()
                    .flatten()
                    .chain(spec.containers.iter())
                    .any(|c| c.name.starts_with("cloud-sql-proxy"))
            });
        if ready && injected {
            return;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = operators
                .iter()
                .map(|o| format!("--- {} ---\n{}", o.identity, o.log()))
                .collect();
            panic!(
                "binding {name} never became Ready with its Deployment injected (injected: {injected}); \
                 last status: {:#}\n{}",
                binding["status"],
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn lease_holder(ns: &TestNamespace, lease: &str) -> Option<String> {
    let leases: Api<Lease> = ns.api();
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// `kubectl auth can-i VERB RESOURCE [flags] --as=<sa>`: whether allowed.
fn can_i(sa: &str, args: &[&str]) -> bool {
    let as_sa = format!("--as={sa}");
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.push(&as_sa);
    let (_, out, _) = support::kubectl(&all, None);
    out.trim() == "yes"
}

#[tokio::test]
async fn the_chart_installs_and_its_rbac_is_enough_for_the_bind_flow_and_no_more() {
    // Pod Security `restricted` enforced: the chart's own pod must pass it.
    let ns = TestNamespace::new(
        "chart-rbac",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await;
    support::install_crds(&ns.client).await;
    let lease = "chart-rbac-leader";
    // No kubelet runs the in-cluster pod, so nothing serves the webhook.
    let release = Release::install(
        &ns,
        &[
            "webhook.enabled=false",
            "replicas=1",
            &format!("leaderElection.leaseName={lease}"),
        ],
    );
    let sa = release.fullname();
    let sa_user = format!("system:serviceaccount:{}:{sa}", ns.name);

    // The ReplicaSet controller creates the operator's Pod: admitted under
    // Pod Security restricted with the chart's security context.
    let pods: Api<Pod> = ns.api();
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    eventually(
        Duration::from_secs(60),
        "the chart's Pod created under Pod Security restricted",
        || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                pods.list(&ListParams::default().labels(&selector))
                    .await
                    .is_ok_and(|l| !l.items.is_empty())
            }
        },
    )
    .await;

    // What the ServiceAccount may not do: no Secrets anywhere, no deletes.
    assert!(!can_i(&sa_user, &["list", "secrets", "--all-namespaces"]));
    assert!(!can_i(&sa_user, &["get", "secrets", "-n", &ns.name]));
    assert!(!can_i(&sa_user, &["get", "secrets", "-n", "kube-system"]));
    assert!(!can_i(&sa_user, &["delete", "deployments", "-n", &ns.name]));
    assert!(!can_i(
        &sa_user,
        &["update", "leases/some-other-lease", "-n", &ns.name]
    ));
    assert!(!can_i(
        &sa_user,
        &["patch", "mutatingwebhookconfigurations"]
    ));
    // What it needs.
    assert!(can_i(
        &sa_user,
        &["patch", "deployments", "--all-namespaces"]
    ));
    assert!(can_i(
        &sa_user,
        &["update", &format!("leases/{lease}"), "-n", &ns.name]
    ));

    let dir = tempfile::tempdir().expect("a temp dir");
    let kubeconfig = service_account_kubeconfig(dir.path(), &ns.name, &sa);
    let (ok, _, err) = std::process::Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "secrets", "-n", "kube-system"])
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .expect("running kubectl");
    assert!(
        !ok && err.contains("Forbidden"),
        "the ServiceAccount could read Secrets in kube-system: {err}"
    );

    let mut operator =
        OperatorProcess::start("chart-rbac-op", &kubeconfig, &ns.name, lease, dir.path());
    operator.wait_ready().await;
    let instance = TestInstance::create(&ns);
    bind_deployment(&ns, &instance.0, "orders-api");
    wait_bound(&ns, "orders-api", &mut [&mut operator]).await;
    assert_eq!(
        lease_holder(&ns, lease).await.as_deref(),
        Some("chart-rbac-op")
    );
    // Events are written (events.k8s.io), about the injected Deployment.
    let events: Api<Event> = ns.api();
    eventually(Duration::from_secs(30), "an Injected Event", || {
        let events = events.clone();
        async move {
            events.list(&ListParams::default()).await.is_ok_and(|l| {
                l.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("Injected"))
            })
        }
    })
    .await;
    let log = operator.log();
    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "the operator hit an RBAC denial; its log:\n{log}"
    );

    // SIGTERM: a clean exit that hands the lease back.
    operator.terminate();
    let status = operator.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "the operator exited with {status}; log:\n{}",
        operator.log()
    );
    assert_eq!(
        lease_holder(&ns, lease).await,
        None,
        "the lease was not released"
    );
}

#[tokio::test]
async fn two_operators_elect_one_leader_which_hands_over_on_sigterm() {
    let ns = TestNamespace::new("chart-leader", &[]).await;
    support::install_crds(&ns.client).await;
    let lease = "chart-leader-election";
    let release = Release::install(
        &ns,
        &[
            "webhook.enabled=false",
            "replicas=0",
            &format!("leaderElection.leaseName={lease}"),
        ],
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let kubeconfig = service_account_kubeconfig(dir.path(), &ns.name, &release.fullname());

    let mut first = OperatorProcess::start("replica-a", &kubeconfig, &ns.name, lease, dir.path());
    first.wait_ready().await;
    eventually(Duration::from_secs(20), "replica-a to lead", || {
        let ns = &ns;
        async move { lease_holder(ns, lease).await.as_deref() == Some("replica-a") }
    })
    .await;
    let mut second = OperatorProcess::start("replica-b", &kubeconfig, &ns.name, lease, dir.path());
    second.wait_ready().await;

    let instance = TestInstance::create(&ns);
    bind_deployment(&ns, &instance.0, "before");
    wait_bound(&ns, "before", &mut [&mut first, &mut second]).await;
    assert!(first.writes().await > 0, "the leader wrote nothing");
    assert_eq!(
        second.writes().await,
        0,
        "the standby replica wrote to the API server; its log:\n{}",
        second.log()
    );
    assert_eq!(lease_holder(&ns, lease).await.as_deref(), Some("replica-a"));

    // SIGTERM the leader: it stops its controllers and releases the lease;
    // the standby takes it within its retry interval, far within a lease duration.
    let killed = Instant::now();
    first.terminate();
    let mut handover = None;
    while killed.elapsed() < cloudsql_binder::leader::LEASE_DURATION {
        if lease_holder(&ns, lease).await.as_deref() == Some("replica-b") {
            handover = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handover = handover.unwrap_or_else(|| {
        panic!(
            "replica-b did not take the lease within {:?}; logs:\n{}\n{}",
            cloudsql_binder::leader::LEASE_DURATION,
            first.log(),
            second.log()
        )
    });
    eprintln!("leader handover after SIGTERM took {handover:?}");
    let status = first.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "replica-a exited with {status}");
    assert!(
        first.log().contains("released the lease"),
        "replica-a's log:\n{}",
        first.log()
    );

    // Work applied after the handover is done by the new leader.
    bind_deployment(&ns, &instance.0, "after");
    wait_bound(&ns, "after", &mut [&mut second]).await;
    assert!(second.writes().await > 0, "the new leader wrote nothing");
    assert!(
        second.log().contains("became the leader"),
        "replica-b's log:\n{}",
        second.log()
    );
}

#[tokio::test]
async fn the_charts_rbac_is_enough_for_the_webhook_certificates() {
    let ns = TestNamespace::new("chart-webhook", &[]).await;
    support::install_crds(&ns.client).await;
    // watchNamespaces limits every webhook to the test namespace: the
    // configurations point at a Service no pod backs here.
    let values = [
        "replicas=0".to_string(),
        format!("watchNamespaces={{{}}}", ns.name),
    ];
    let sets: Vec<&str> = values.iter().map(String::as_str).collect();
    let release = Release::install(&ns, &sets);
    let name = release.fullname();
    let dir = tempfile::tempdir().expect("a temp dir");
    let kubeconfig = service_account_kubeconfig(dir.path(), &ns.name, &name);

    // Two replicas with exactly the arguments the chart gives the operator,
    // but for the addresses: local ports.
    let set = values.join(",");
    let mut args = rendered_args_for(&release.name, &ns.name, &["--set", &set]);
    args.retain(|a| !a.starts_with("--metrics-addr=") && !a.starts_with("--webhook-listen="));
    assert!(
        args.iter().any(|a| a.starts_with("--webhook-service=")),
        "the chart renders no webhook args: {args:?}"
    );
    let start = |identity: &str| {
        let port = free_port();
        let mut args = args.clone();
        args.push(format!("--webhook-listen=127.0.0.1:{port}"));
        (
            OperatorProcess::start_with(identity, &kubeconfig, &args, dir.path()),
            port,
        )
    };
    let (mut operator, _) = start("chart-webhook-op");
    operator.wait_ready().await;
    // The first is the leader before the second starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !operator.log().contains("became the leader") {
        operator.assert_running();
        assert!(
            Instant::now() < deadline,
            "the first replica never led; log:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut follower, follower_port) = start("chart-webhook-follower");
    follower.wait_ready().await;

    // The operator created its certificate Secret and wrote its CA into every
    // webhook of both configurations the chart installed.
    let secret = format!("{name}-webhook-tls");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        operator.assert_running();
        let (has_secret, _, _) =
            support::kubectl(&["get", "secret", &secret, "-n", &ns.name], None);
        let bundles: Vec<bool> = [
            "mutatingwebhookconfiguration",
            "validatingwebhookconfiguration",
        ]
        .iter()
        .flat_map(|kind| {
            let (_, out, _) = support::kubectl(&["get", kind, &name, "-o", "json"], None);
            let config: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            config["webhooks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|w| {
                    w["clientConfig"]["caBundle"]
                        .as_str()
                        .is_some_and(|b| !b.is_empty())
                })
                .collect::<Vec<_>>()
        })
        .collect();
        if has_secret && bundles.len() == 3 && bundles.iter().all(|b| *b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate Secret {secret} or caBundle (webhooks with one: {bundles:?}); log:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The follower serves the leader's certificate, which the caBundle trusts,
    // under the Service's name; it issued nothing itself.
    let (_, ca, _) = support::kubectl(
        &[
            "get",
            "secret",
            &secret,
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ],
        None,
    );
    let ca = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca.trim())
        .expect("ca.crt is base64");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca).expect("writing ca.crt");
    let host = format!("{name}.{}.svc", ns.name);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        follower.assert_running();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&ca_file)
            .arg("--connect-to")
            .arg(format!("{host}:443:127.0.0.1:{follower_port}"))
            .arg(format!("https://{host}/healthz"))
            .output()
            .expect("running curl");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower does not serve a certificate the caBundle trusts for {host}: {}; log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            follower.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (leader_log, follower_log) = (operator.log(), follower.log());
    assert!(
        leader_log.contains("webhook serving certificate issued"),
        "the leader issued no certificate; log:\n{leader_log}"
    );
    for (who, log) in [("leader", &leader_log), ("follower", &follower_log)] {
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "the {who} hit an RBAC denial; its log:\n{log}"
        );
    }
    assert!(
        !follower_log.contains("became the leader")
            && !follower_log.contains("certificate issued")
            && !follower_log.contains("applied the webhook configuration"),
        "the follower wrote webhook certificates or configurations; log:\n{follower_log}"
    );
    for mut replica in [follower, operator] {
        replica.terminate();
        let status = replica.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "replica {} exited with {status}; log:\n{}",
            replica.identity,
            replica.log()
        );
    }
}
