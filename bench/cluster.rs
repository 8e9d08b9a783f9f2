//! A private control plane for one measurement: started with
//! tools/cluster-up.sh in the bench's own directory (never the demo's
//! `.cluster/` nor the tests' `.cluster-test/`), stopped with tools/cluster-down.sh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::stats::{self, Sample};

/// A running control plane; stopped (and its state removed) on drop.
pub struct Cluster {
    repo: PathBuf,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: Client,
    stopped: bool,
}

/// Where the bench records the pids of the processes it starts against the
/// cluster in `dir`, so a later run can stop what an interrupted one left.
pub fn pids_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".pids");
    dir.with_file_name(name)
}

/// Stops processes an interrupted bench left running against the cluster in
/// `dir`: only those whose pid file is ours and whose environment still
/// points at that cluster's kubeconfig (a reused pid is left alone).
fn stop_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pids_dir(dir)) else {
        return;
    };
    let marker = format!("KUBECONFIG={}", dir.join("kubeconfig").display());
    for entry in entries.flatten() {
        let path = entry.path();
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let ours = environ
                .split(|b| *b == 0)
                .any(|var| var == marker.as_bytes());
            if ours {
                eprintln!("bench: stopping process {pid} left by an earlier run");
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = std::fs::remove_file(path);
    }
}

impl Cluster {
    /// Starts a fresh control plane in `dir` (any leftover there is stopped first).
    pub async fn up(repo: &Path, dir: &Path) -> anyhow::Result<Cluster> {
        stop_stale(dir);
        let started = Instant::now();
        let script = |name: &str| {
            Command::new("bash")
                .arg(repo.join("tools").join(name))
                .env("CLOUDSQL_BINDER_CLUSTER_DIR", dir)
                .output()
        };
        // A clean start every time: cluster-up.sh reuses a healthy cluster.
        let _ = script("cluster-down.sh");
        let out = script("cluster-up.sh").context("running tools/cluster-up.sh")?;
        if !out.status.success() {
            bail!(
                "tools/cluster-up.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kubeconfig = dir.join("kubeconfig");
        let client = client_for(&kubeconfig).await?;
        let cluster = Cluster {
            repo: repo.to_path_buf(),
            dir: dir.to_path_buf(),
            kubeconfig,
            client,
            stopped: false,
        };
        // The service-account controller must be running before pods can be created.
        cluster.wait_default_service_account("default").await?;
        eprintln!(
            "bench: control plane up in {:.1}s ({})",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(cluster)
    }

    /// Stops the control plane and removes its state.
    pub fn down(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let out = Command::new("bash")
            .arg(self.repo.join("tools/cluster-down.sh"))
            .env("CLOUDSQL_BINDER_CLUSTER_DIR", &self.dir)
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "bench: tools/cluster-down.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs kubectl against this cluster, with `stdin` piped in.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(mut pipe) = child.stdin.take() {
            if let Some(text) = stdin {
                pipe.write_all(text.as_bytes()).await?;
            }
            drop(pipe);
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies YAML (server-side) and waits until every CRD in it is established.
    pub async fn install_crds(&self, yaml: &str) -> anyhow::Result<()> {
        let applied = self
            .kubectl(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "-o",
                    "name",
                    "-f",
                    "-",
                ],
                Some(yaml),
            )
            .await?;
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for line in applied.lines() {
            let Some(name) = line
                .trim()
                .strip_prefix("customresourcedefinition.apiextensions.k8s.io/")
            else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let established = crds.get_opt(name).await.ok().flatten().is_some_and(|crd| {
                    crd.status
                        .and_then(|s| s.conditions)
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} was not established within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The API server's own metrics.
    pub async fn apiserver_metrics(&self) -> anyhow::Result<Vec<Sample>> {
        let text = self.kubectl(&["get", "--raw", "/metrics"], None).await?;
        Ok(stats::parse_prometheus(&text))
    }

    /// The API server's version (`gitVersion`).
    pub async fn version(&self) -> String {
        match self.client.apiserver_version().await {
            Ok(info) => info.git_version,
            Err(err) => format!("unknown ({err})"),
        }
    }

    /// Creates namespace `name` and waits until pods can be created in it.
    pub async fn namespace(&self, name: &str) -> anyhow::Result<()> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_string());
        match Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err).context(format!("creating namespace {name}")),
        }
        self.wait_default_service_account(name).await
    }

    async fn wait_default_service_account(&self, ns: &str) -> anyhow::Result<()> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if sas.get_opt("default").await.ok().flatten().is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the default ServiceAccount of namespace {ns} did not appear within 60 s")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client from a kubeconfig file.
pub async fn client_for(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).context("reading the kubeconfig")?;
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(120));
    Ok(Client::try_from(config)?)
}

/// Write requests the API server counted, by `VERB group/resource[/subresource]`
/// (`apiserver_request_total`, every client: both operators and
/// kube-controller-manager alike).
pub fn server_writes(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == "apiserver_request_total")
    {
        let verb = s.labels.get("verb").map(String::as_str).unwrap_or("");
        if !matches!(
            verb,
            "CREATE"
                | "POST"
                | "APPLY"
                | "PATCH"
                | "UPDATE"
                | "PUT"
                | "DELETE"
                | "DELETECOLLECTION"
        ) {
            continue;
        }
        let get = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let group = get("group");
        let mut resource = if group.is_empty() {
            get("resource")
        } else {
            format!("{group}/{}", get("resource"))
        };
        let sub = get("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        *out.entry(format!("{verb} {resource}")).or_insert(0.0) += s.value;
    }
    out
}

/// `after - before`, keeping only what changed.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}
