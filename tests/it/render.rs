//! What `cloudsql-binder render` prints is accepted by a real API server: every
//! rendered workload passes a server-side dry-run with nothing of ours dropped,
//! and rendered Pods are admitted under Pod Security `restricted`.

use std::path::{Path, PathBuf};

use cloudsql_binder::api::WorkloadKind;
use cloudsql_binder::render::{RenderOptions, render};
use serde_json::Value;

use crate::support::{self, TestNamespace, kubectl};

/// Pods bound in every proxy shape we generate (Unix socket as a native
/// sidecar, Unix socket as a classic sidecar, TCP, two proxies on one pod),
/// whose app containers are themselves `restricted`-compliant: one sets it all
/// per container, the other two partly at pod level.
const RESTRICTED_INPUT: &str = r#"
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlInstance
metadata: { name: orders }
spec:
  connectionName: my-project:europe-west1:orders
  databaseVersion: POSTGRES_16
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlInstance
metadata: { name: billing }
spec:
  connectionName: my-project:europe-west1:billing
  databaseVersion: POSTGRES_16
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata: { name: unix-native, namespace: psa }
spec:
  instanceRef: { name: orders }
  workloads: [{ kind: Pod, selector: { matchLabels: { proxy: unix-native } } }]
  database: { name: orders, user: orders-app }
  proxy: { sidecar: Native }
  pool: { maxPerPod: 4 }
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata: { name: unix-classic, namespace: psa }
spec:
  instanceRef: { name: orders }
  workloads: [{ kind: Pod, selector: { matchLabels: { proxy: unix-classic } } }]
  database: { name: orders, user: orders-app@my-project.iam, iamAuth: true }
  network: Private
  proxy: { sidecar: Container }
  pool: { maxPerPod: 4 }
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata: { name: tcp, namespace: psa }
spec:
  instanceRef: { name: orders }
  workloads: [{ kind: Pod, selector: { matchLabels: { proxy: tcp } } }]
  database: { name: orders, user: orders-app }
  network: PSC
  proxy: { socket: TCP }
  pool: { maxPerPod: 4 }
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata: { name: two-orders, namespace: psa }
spec:
  instanceRef: { name: orders }
  workloads: [{ kind: Pod, name: psa-two-proxies }]
  database: { name: orders, user: orders-app }
  pool: { maxPerPod: 2 }
---
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata: { name: two-billing, namespace: psa }
spec:
  instanceRef: { name: billing }
  workloads: [{ kind: Pod, name: psa-two-proxies }]
  database: { name: billing, user: billing-app }
  pool: { maxPerPod: 1 }
  env:
    unixSocket: BILLING_UNIX_SOCKET
    database: BILLING_DB_NAME
    user: BILLING_DB_USER
    poolMax: BILLING_POOL_MAX_CONNS
---
apiVersion: v1
kind: Pod
metadata:
  name: psa-unix-native
  namespace: psa
  labels: { proxy: unix-native }
spec:
  containers:
    - name: app
      image: example.com/shop/orders-api:1
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        allowPrivilegeEscalation: false
        capabilities: { drop: [ALL] }
        seccompProfile: { type: RuntimeDefault }
---
apiVersion: v1
kind: Pod
metadata:
  name: psa-unix-classic
  namespace: psa
  labels: { proxy: unix-classic }
spec:
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    seccompProfile: { type: RuntimeDefault }
  containers:
    - name: app
      image: example.com/shop/orders-api:1
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: { drop: [ALL] }
---
apiVersion: v1
kind: Pod
metadata:
  name: psa-tcp
  namespace: psa
  labels: { proxy: tcp }
spec:
  securityContext:
    runAsNonRoot: true
    seccompProfile: { type: RuntimeDefault }
  containers:
    - name: app
      image: example.com/shop/orders-api:1
      securityContext:
        runAsUser: 10001
        allowPrivilegeEscalation: false
        capabilities: { drop: [ALL] }
---
apiVersion: v1
kind: Pod
metadata:
  name: psa-two-proxies
  namespace: psa
spec:
  containers:
    - name: app
      image: example.com/shop/orders-api:1
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        allowPrivilegeEscalation: false
        capabilities: { drop: [ALL] }
        seccompProfile: { type: RuntimeDefault }
"#;

/// One render: its inputs and options.
struct Case {
    name: String,
    inputs: Vec<(String, String)>,
    options: RenderOptions,
}

fn read(path: &Path) -> (String, String) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path.display().to_string(), text)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Options from a golden input's first-lines comment
/// `# render: --remove --native-sidecars=false` (as the golden unit test reads it).
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

/// Every input that renders: the golden inputs whose expected output is not a
/// refusal, all of examples/ together, the data-path inputs and the Pod
/// Security input. A golden input expected to be refused must still be
/// refused (a conflict is not a case to dry-run).
fn cases() -> Vec<Case> {
    let root = support::repo_root();
    let mut cases = Vec::new();
    let mut refused = Vec::new();
    for path in yaml_files(&root.join("tests/golden")) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".in.yaml") else {
            continue;
        };
        let input = read(&path);
        let options = options_of(&input.1);
        let expected = std::fs::read_to_string(path.with_file_name(format!("{stem}.out.yaml")))
            .unwrap_or_else(|e| panic!("{stem}.out.yaml: {e}"));
        if expected.starts_with("# render fails") {
            assert!(
                render(std::slice::from_ref(&input), &options).is_err(),
                "golden {file} is expected to be refused, but it renders"
            );
            refused.push(stem.to_owned());
            continue;
        }
        cases.push(Case {
            name: format!("tests/golden/{file}"),
            inputs: vec![input],
            options,
        });
    }
    // The refusals are named so (conflict-*, *-refused); a golden output that is a
    // refusal for an input not named so means an injection stopped rendering.
    for stem in &refused {
        assert!(
            stem.starts_with("conflict-") || stem.ends_with("-refused"),
            "golden {stem}.in.yaml no longer renders"
        );
    }
    for known in [
        "conflict-two-bindings",
        "conflict-user-env",
        "knative-tcp-refused",
    ] {
        assert!(refused.iter().any(|r| r == known), "golden {known} renders");
    }
    assert!(cases.len() >= 10, "golden inputs are missing");

    cases.push(Case {
        name: "examples/".to_owned(),
        inputs: yaml_files(&root.join("examples"))
            .iter()
            .map(|p| read(p))
            .collect(),
        options: RenderOptions::default(),
    });
    let datapath = root.join("e2e/datapath/testdata");
    let mut e2e = vec![datapath.join("input.yaml")];
    let proxyargs = datapath.join("proxyargs");
    if proxyargs.is_dir() {
        e2e.extend(yaml_files(&proxyargs));
    }
    for path in e2e {
        cases.push(Case {
            name: path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .display()
                .to_string(),
            inputs: vec![read(&path)],
            options: RenderOptions::default(),
        });
    }
    cases.push(Case {
        name: "the Pod Security input".to_owned(),
        inputs: vec![("restricted.yaml".to_owned(), RESTRICTED_INPUT.to_owned())],
        options: RenderOptions::default(),
    });
    cases
}

/// Renders a case and returns its workload documents, in order.
fn rendered_workloads(case: &Case) -> Vec<(WorkloadKind, Value)> {
    let out = render(&case.inputs, &case.options).unwrap_or_else(|errors| {
        panic!(
            "{} does not render:\n{}",
            case.name,
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let docs: Vec<Value> = serde_saphyr::from_multiple(&out)
        .unwrap_or_else(|e| panic!("{}: render printed invalid YAML: {e}\n{out}", case.name));
    docs.into_iter()
        .filter_map(|doc| {
            let kind = WorkloadKind::from_object(
                doc["apiVersion"].as_str().unwrap_or_default(),
                doc["kind"].as_str().unwrap_or_default(),
            )?;
            Some((kind, doc))
        })
        .collect()
}

/// The pod template's metadata and spec (the Pod itself for a Pod).
fn template(kind: WorkloadKind, doc: &Value) -> &Value {
    match kind {
        WorkloadKind::Pod => doc,
        WorkloadKind::CronJob => &doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => &doc["spec"]["template"],
    }
}

fn is_injected(kind: WorkloadKind, doc: &Value) -> bool {
    template(kind, doc)["metadata"]["annotations"]["cloudsql.dev/injected"].is_string()
}

fn object_name(doc: &Value) -> String {
    format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn in_namespace(mut doc: Value, namespace: &str) -> Value {
    doc["metadata"]["namespace"] = Value::String(namespace.to_owned());
    doc
}

/// Where `sent` is not found in `got`: every key sent must come back with an
/// equal value (scalars compared as text, so `cpu: 1` matches `"1"`) and every
/// list item at its index; what the server adds (defaults, metadata, and the
/// service-account token volume and mounts appended to a Pod) is ignored.
fn dropped(sent: &Value, got: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, got) {
        (Value::Null, _) => {}
        (Value::Object(sent), Value::Object(got)) => {
            for (key, value) in sent {
                let at = format!("{path}.{key}");
                match got.get(key) {
                    Some(back) => dropped(value, back, &at, out),
                    None if value.is_null() => {}
                    None => out.push(format!("{at} was dropped")),
                }
            }
        }
        (Value::Array(sent), Value::Array(got)) if sent.len() <= got.len() => {
            for (i, (a, b)) in sent.iter().zip(got).enumerate() {
                dropped(a, b, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Array(_) | Value::Object(_), _) => {
            out.push(format!("{path}: sent {sent}, got back {got}"));
        }
        (a, b) => {
            let text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if text(a) != text(b) {
                out.push(format!("{path}: sent {a}, got back {b}"));
            }
        }
    }
}

#[tokio::test]
async fn every_rendered_manifest_passes_a_server_side_dry_run() {
    let ns = TestNamespace::new("render-dryrun", &[]).await;
    support::install_knative_serving_crd().await;
    let cases = cases();

    let mut failures = Vec::new();
    let mut checked = 0;
    for case in &cases {
        let workloads = rendered_workloads(case);
        assert!(!workloads.is_empty(), "{} renders no workload", case.name);
        if !case.options.remove {
            assert!(
                workloads.iter().any(|(kind, doc)| is_injected(*kind, doc)),
                "{}: no rendered workload carries an injection",
                case.name
            );
        }
        for (_, doc) in workloads {
            let doc = in_namespace(doc, &ns.name);
            let what = format!("{}: {}", case.name, object_name(&doc));
            let sent = serde_json::to_string(&doc).expect("JSON");
            let (ok, out, err) = kubectl(
                &[
                    "apply",
                    "--server-side",
                    "--dry-run=server",
                    "-n",
                    &ns.name,
                    "-o",
                    "json",
                    "-f",
                    "-",
                ],
                Some(&sent),
            );
            checked += 1;
            if !ok {
                failures.push(format!("{what}: {}", err.trim()));
                continue;
            }
            let back: Value = match serde_json::from_str(&out) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{what}: kubectl printed no object ({e}): {out}"));
                    continue;
                }
            };
            let mut lost = Vec::new();
            dropped(&doc, &back, "", &mut lost);
            if !lost.is_empty() {
                failures.push(format!(
                    "{what}: the API server did not keep it as rendered:\n  {}",
                    lost.join("\n  ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} rendered workloads failed a server-side dry-run:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 20, "only {checked} workloads were dry-run");
}

/// A namespace enforcing Pod Security `restricted` (latest).
async fn restricted_namespace(prefix: &str) -> TestNamespace {
    TestNamespace::new(
        prefix,
        &[
            ("pod-security.kubernetes.io/enforce", "restricted"),
            ("pod-security.kubernetes.io/enforce-version", "latest"),
        ],
    )
    .await
}

/// Creates (for real, no dry-run) one object; returns (success, stderr).
fn create(namespace: &str, doc: &Value) -> (bool, String) {
    let (ok, _, err) = kubectl(
        &["create", "-n", namespace, "-f", "-"],
        Some(&serde_json::to_string(doc).expect("JSON")),
    );
    (ok, err)
}

fn restricted_pods() -> Vec<Value> {
    let case = Case {
        name: "the Pod Security input".to_owned(),
        inputs: vec![("restricted.yaml".to_owned(), RESTRICTED_INPUT.to_owned())],
        options: RenderOptions::default(),
    };
    rendered_workloads(&case)
        .into_iter()
        .map(|(kind, doc)| {
            assert_eq!(kind, WorkloadKind::Pod);
            assert!(
                is_injected(kind, &doc),
                "{} is not bound",
                object_name(&doc)
            );
            doc
        })
        .collect()
}

/// A proxy container of a pod.
#[derive(Debug, PartialEq)]
struct ProxyContainer {
    name: String,
    /// An initContainer with `restartPolicy: Always`.
    native: bool,
    args: Vec<String>,
}

impl ProxyContainer {
    fn has(&self, prefix: &str) -> bool {
        self.args.iter().any(|a| a.starts_with(prefix))
    }
}

/// The proxy containers of a pod.
fn proxies(pod: &Value) -> Vec<ProxyContainer> {
    let mut found = Vec::new();
    for (list, native) in [("initContainers", true), ("containers", false)] {
        for c in pod["spec"][list].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default();
            if name.starts_with("cloud-sql-proxy") {
                assert_eq!(
                    c["restartPolicy"].as_str() == Some("Always"),
                    native,
                    "{name}"
                );
                let args = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                found.push(ProxyContainer {
                    name: name.to_owned(),
                    native,
                    args,
                });
            }
        }
    }
    found
}

#[tokio::test]
async fn rendered_pods_are_admitted_under_pod_security_restricted() {
    let ns = restricted_namespace("render-psa").await;
    let pods = restricted_pods();

    // The input covers every proxy shape we generate.
    let all: Vec<_> = pods.iter().flat_map(proxies).collect();
    assert!(
        all.iter().any(|p| p.native && p.has("--unix-socket=")),
        "native Unix"
    );
    assert!(
        all.iter().any(|p| !p.native && p.has("--quitquitquit")),
        "classic"
    );
    assert!(all.iter().any(|p| p.has("--port=")), "TCP");
    assert!(
        pods.iter().any(|p| proxies(p).len() == 2),
        "two proxies on one pod"
    );

    let mut refused = Vec::new();
    for pod in &pods {
        let pod = in_namespace(pod.clone(), &ns.name);
        let (ok, err) = create(&ns.name, &pod);
        if !ok {
            refused.push(format!("{}: {}", object_name(&pod), err.trim()));
        } else {
            assert!(
                !err.contains("PodSecurity"),
                "{} was admitted with a Pod Security warning: {err}",
                object_name(&pod)
            );
        }
    }
    assert!(
        refused.is_empty(),
        "rendered Pods were refused under Pod Security restricted:\n{}",
        refused.join("\n")
    );

    // They exist, with our proxies as rendered.
    let (ok, out, err) = kubectl(&["get", "pods", "-n", &ns.name, "-o", "json"], None);
    assert!(ok, "listing the pods: {err}");
    let list: Value = serde_json::from_str(&out).expect("a pod list");
    let mut created: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            let sent = pods
                .iter()
                .find(|s| s["metadata"]["name"] == name)
                .expect("a pod we created");
            assert_eq!(proxies(p), proxies(sent), "pod {name}");
            name.to_owned()
        })
        .collect();
    created.sort();
    assert_eq!(
        created,
        [
            "psa-tcp",
            "psa-two-proxies",
            "psa-unix-classic",
            "psa-unix-native"
        ]
    );
}

/// The reasons Pod Security gives, and that it names `container` and no proxy.
fn assert_refused_for(err: &str, container: &str) {
    assert!(
        err.contains("violates PodSecurity \"restricted:latest\""),
        "not refused by Pod Security: {err}"
    );
    assert!(
        err.contains(&format!("\"{container}\"")),
        "the refusal does not name the app container {container:?}: {err}"
    );
    assert!(
        !err.contains("cloud-sql-proxy"),
        "Pod Security objects to our proxy container: {err}"
    );
}

#[tokio::test]
async fn a_pod_whose_app_is_not_restricted_is_refused_for_the_app_not_the_proxy() {
    let ns = restricted_namespace("render-psa-deny").await;

    // A rendered Pod of the Pod Security input, its app's hardening taken out.
    let mut pod = in_namespace(
        restricted_pods()
            .into_iter()
            .find(|p| p["metadata"]["name"] == "psa-unix-native")
            .expect("psa-unix-native"),
        &ns.name,
    );
    pod["metadata"]["name"] = Value::String("psa-unhardened-app".to_owned());
    let app = &mut pod["spec"]["containers"][0];
    assert_eq!(app["name"], "app");
    app.as_object_mut()
        .expect("a container")
        .remove("securityContext");
    let (ok, err) = create(&ns.name, &pod);
    assert!(!ok, "a Pod whose app runs unhardened was admitted");
    assert_refused_for(&err, "app");

    // The golden Pod with two proxies, whose app sets nothing: refused, for the app alone.
    let golden = support::repo_root().join("tests/golden/pod-two-bindings.in.yaml");
    let case = Case {
        name: golden.display().to_string(),
        inputs: vec![read(&golden)],
        options: RenderOptions::default(),
    };
    let (_, pod) = rendered_workloads(&case)
        .into_iter()
        .find(|(kind, _)| *kind == WorkloadKind::Pod)
        .expect("the golden Pod");
    assert_eq!(proxies(&pod).len(), 2);
    let (ok, err) = create(&ns.name, &in_namespace(pod, &ns.name));
    assert!(!ok, "the golden debug-shell Pod was admitted");
    assert_refused_for(&err, "shell");

    let (ok, out, err) = kubectl(&["get", "pods", "-n", &ns.name, "-o", "name"], None);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "", "a refused Pod exists");
}
