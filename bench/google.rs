//! Google's cloud-sql-proxy-operator, run out of cluster against the bench's
//! control plane: built by bench/google-operator/build.sh from its Go module,
//! its CRD installed, its webhooks registered with a `url` client config and
//! our own CA (it normally gets certificates from cert-manager).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::cluster::{Cluster, pids_dir};
use crate::process::{Proc, free_port, listening};
use crate::stats::{self, Sample};

/// The webhook port; hard-coded in the operator's main.go (`webhook.Options{Port: 9443}`).
pub const WEBHOOK_PORT: u16 = 9443;

/// What build.sh produced.
#[derive(Debug, Clone)]
pub struct Build {
    pub binary: PathBuf,
    pub crds: PathBuf,
    pub version: String,
}

/// Builds (or finds in the cache) the operator.
pub fn build(repo: &Path) -> anyhow::Result<Build> {
    let out = std::process::Command::new("bash")
        .arg(repo.join("bench/google-operator/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running bench/google-operator/build.sh")?;
    if !out.status.success() {
        bail!("bench/google-operator/build.sh failed (its output is above)");
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let version = std::fs::read_to_string(dir.join("version"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Build {
        binary: dir.join("bin/cloud-sql-proxy-operator"),
        crds: dir.join("crds"),
        version,
    })
}

/// The operator, running.
pub struct Operator {
    pub proc: Proc,
    pub metrics_url: String,
    /// Process start until its readiness probe answered and the webhook listened.
    pub startup: Duration,
}

/// Installs the AuthProxyWorkload CRD.
pub async fn install(cluster: &Cluster, build: &Build) -> anyhow::Result<()> {
    let mut yaml = String::new();
    for entry in std::fs::read_dir(&build.crds)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            yaml.push_str(&std::fs::read_to_string(&path)?);
            yaml.push_str("\n---\n");
        }
    }
    cluster.install_crds(&yaml).await
}

/// A CA and a serving certificate for 127.0.0.1: (ca pem, cert pem, key pem).
fn certificates() -> anyhow::Result<(String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cloudsql-binder-bench webhook CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// Registers the operator's three webhooks (config/webhook/manifests.yaml and
/// core_webhook.yaml of its module, same rules and failure policies) with a
/// `url` client config at 127.0.0.1 instead of its in-cluster Service.
async fn register_webhooks(cluster: &Cluster, ca_pem: &str) -> anyhow::Result<()> {
    let base = format!("https://127.0.0.1:{WEBHOOK_PORT}");
    let apw_rules = json!([{
        "apiGroups": ["cloudsql.cloud.google.com"], "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"], "resources": ["authproxyworkloads"],
    }]);
    let mut mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "cloud-sql-proxy-operator-mutating" },
        "webhooks": [
            {
                "name": "mauthproxyworkload.kb.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": { "url": format!("{base}/mutate-cloudsql-cloud-google-com-v1-authproxyworkload") },
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "rules": apw_rules,
            },
            {
                "name": "pods.proxy.cloudsql.google.com",
                "admissionReviewVersions": ["v1"],
                "clientConfig": { "url": format!("{base}/mutate-pods") },
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "namespaceSelector": { "matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"],
                }]},
                "rules": [{
                    "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                    "resources": ["pods"], "scope": "*",
                }],
                "timeoutSeconds": 2,
                "sideEffects": "None",
            },
        ],
    }))?;
    let mut validating: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": "cloud-sql-proxy-operator-validating" },
        "webhooks": [{
            "name": "vauthproxyworkload.kb.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": { "url": format!("{base}/validate-cloudsql-cloud-google-com-v1-authproxyworkload") },
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "rules": apw_rules,
        }],
    }))?;
    let ca = ByteString(ca_pem.as_bytes().to_vec());
    for w in mutating.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ca.clone());
    }
    for w in validating.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ca.clone());
    }
    let params = PatchParams::apply("cloudsql-binder-bench").force();
    Api::<MutatingWebhookConfiguration>::all(cluster.client.clone())
        .patch(
            "cloud-sql-proxy-operator-mutating",
            &params,
            &Patch::Apply(&mutating),
        )
        .await
        .context("registering the operator's mutating webhooks")?;
    Api::<ValidatingWebhookConfiguration>::all(cluster.client.clone())
        .patch(
            "cloud-sql-proxy-operator-validating",
            &params,
            &Patch::Apply(&validating),
        )
        .await
        .context("registering the operator's validating webhook")?;
    Ok(())
}

/// Starts the operator out of cluster: certificates where controller-runtime
/// looks by default (`$TMPDIR/k8s-webhook-server/serving-certs/tls.{crt,key}`),
/// webhooks registered, metrics and probes on free local ports. Returns once
/// its readiness probe answers and its webhook server accepts connections.
pub async fn start(
    cluster: &Cluster,
    build: &Build,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<Operator> {
    if listening(WEBHOOK_PORT) {
        bail!(
            "port {WEBHOOK_PORT} is already in use on 127.0.0.1; the operator's webhook port is hard-coded in its main.go"
        );
    }
    let tmp = cluster.dir.join("google-tmp");
    let certs = tmp.join("k8s-webhook-server/serving-certs");
    std::fs::create_dir_all(&certs)?;
    let (ca, cert, key) = certificates()?;
    std::fs::write(certs.join("tls.crt"), cert)?;
    std::fs::write(certs.join("tls.key"), key)?;
    register_webhooks(cluster, &ca).await?;

    let metrics = free_port()?;
    let probes = free_port()?;
    let args = vec![
        format!("--metrics-bind-address=127.0.0.1:{metrics}"),
        format!("--health-probe-bind-address=127.0.0.1:{probes}"),
    ];
    let envs = vec![
        (
            "KUBECONFIG".to_string(),
            cluster.kubeconfig.display().to_string(),
        ),
        ("TMPDIR".to_string(), tmp.display().to_string()),
    ];
    let mut proc = Proc::spawn(
        "cloud-sql-proxy-operator",
        &build.binary,
        &args,
        &envs,
        log,
        &pids_dir(&cluster.dir),
    )?;
    proc.wait_http_ok(&format!("http://127.0.0.1:{probes}/readyz"), timeout)
        .await?;
    let deadline = std::time::Instant::now() + timeout;
    while !listening(WEBHOOK_PORT) {
        if !proc.alive() || std::time::Instant::now() > deadline {
            bail!(
                "the operator's webhook server never listened on {WEBHOOK_PORT}; last log lines:\n{}",
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let startup = proc.started.elapsed();
    Ok(Operator {
        proc,
        metrics_url: format!("http://127.0.0.1:{metrics}/metrics"),
        startup,
    })
}

/// Requests the operator's client sent, from its own metrics
/// (`rest_client_requests_total` of client-go): (writes, reads).
pub fn requests(samples: &[Sample]) -> (f64, f64) {
    let by = |write: bool| {
        stats::sum(samples, "rest_client_requests_total", |l| {
            let m = l.get("method").map(String::as_str).unwrap_or("");
            matches!(m, "POST" | "PUT" | "PATCH" | "DELETE") == write
        })
    };
    (by(true), by(false))
}
