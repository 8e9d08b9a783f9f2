//! The measurements. Each step starts its own control plane, creates its
//! workload, runs one operator as a separate process and measures it from
//! outside (watches, /proc, /metrics), then stops everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::{Value, json};

use cloudsql_binder::api::{CloudSqlBinding, CloudSqlInstance, FIELD_MANAGER, WorkloadKind};
use cloudsql_binder::budget::{PoolRequest, allocate};
use cloudsql_binder::plan::{Grant, InjectionPlan, PodInjection, TargetCapabilities};

use crate::cluster::{self, Cluster, pids_dir};
use crate::google;
use crate::objects::{self, Burst, DeploymentShape, workload_name};
use crate::process::{Proc, Usage, free_port, scrape};
use crate::stats::{self, percentile};
use crate::track::{self, Outcome, Watch};

/// What every step needs.
pub struct Ctx {
    pub repo: PathBuf,
    pub cluster_dir: PathBuf,
    pub logs: PathBuf,
    pub binary: PathBuf,
    pub google: Result<google::Build, String>,
    pub shape: DeploymentShape,
    pub create_concurrency: usize,
    pub timeout: Duration,
    pub limit_levels: Vec<usize>,
    /// Ok when `cloudsql-binder run` has the webhook flags; else why not.
    pub webhook: Result<(), String>,
    /// Flags every `cloudsql-binder run` gets (see `binder_base_args`).
    pub binder_args: Vec<String>,
    pub crds_yaml: String,
    pub idle: Duration,
    pub run: usize,
    /// The API server's version, as the first cluster reported it.
    pub kubernetes: std::sync::Mutex<String>,
}

/// What one step measured: figures (numbers aggregated over runs), details
/// (kept per run) and notes (what could not be measured, and why).
#[derive(Debug, Default, Serialize)]
pub struct Record {
    pub figures: BTreeMap<String, f64>,
    pub details: BTreeMap<String, Value>,
    pub notes: Vec<String>,
}

impl Record {
    fn fig(&mut self, key: impl Into<String>, value: f64) {
        if value.is_finite() {
            self.figures.insert(key.into(), value);
        }
    }
    fn detail(&mut self, key: impl Into<String>, value: impl Serialize) {
        self.details.insert(
            key.into(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
    }
    fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("bench: note: {note}");
        self.notes.push(note);
    }
    fn usage(&mut self, prefix: &str, usage: Usage) {
        self.fig(format!("{prefix}.peak_rss_mib"), usage.peak_rss_mib);
        self.fig(format!("{prefix}.cpu_s"), usage.cpu_s);
    }
}

const NS: &str = "bench";

/// Pause between an operator becoming ready and the first apply, so one-off
/// startup work (Google's operator re-checks every AuthProxyWorkload once
/// at start) does not overlap the measurement. Both operators get it.
const SETTLE: Duration = Duration::from_secs(2);

/// cloudsql-binder, running.
struct Binder {
    proc: Proc,
    metrics: String,
    startup: Duration,
}

impl Ctx {
    fn log(&self, label: &str) -> PathBuf {
        self.logs.join(format!("run{}-{label}.log", self.run))
    }

    async fn start_binder(
        &self,
        cluster: &Cluster,
        label: &str,
        extra: &[String],
    ) -> anyhow::Result<Binder> {
        let port = free_port()?;
        let mut args = vec![
            "run".to_string(),
            "--metrics-addr".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend_from_slice(&self.binder_args);
        args.extend_from_slice(extra);
        let envs = vec![(
            "KUBECONFIG".to_string(),
            cluster.kubeconfig.display().to_string(),
        )];
        let mut proc = Proc::spawn(
            "cloudsql-binder",
            &self.binary,
            &args,
            &envs,
            &self.log(label),
            &pids_dir(&cluster.dir),
        )?;
        let startup = proc
            .wait_http_ok(&format!("http://127.0.0.1:{port}/readyz"), self.timeout)
            .await?;
        Ok(Binder {
            proc,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            startup,
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    async fn cluster(&self) -> anyhow::Result<Cluster> {
        let cluster = Cluster::up(&self.repo, &self.cluster_dir).await?;
        let known = self
            .kubernetes
            .lock()
            .map(|k| !k.is_empty())
            .unwrap_or(true);
        if !known {
            let version = cluster.version().await;
            if let Ok(mut k) = self.kubernetes.lock() {
                *k = version;
            }
        }
        Ok(cluster)
    }

    async fn binder_cluster(&self) -> anyhow::Result<Cluster> {
        let cluster = self.cluster().await?;
        cluster.install_crds(&self.crds_yaml).await?;
        cluster.namespace(NS).await?;
        Ok(cluster)
    }

    fn google_build(&self) -> anyhow::Result<&google::Build> {
        self.google.as_ref().map_err(|why| anyhow!("{why}"))
    }

    async fn google_cluster(&self) -> anyhow::Result<Cluster> {
        let build = self.google_build()?;
        let cluster = self.cluster().await?;
        google::install(&cluster, build).await?;
        cluster.namespace(NS).await?;
        Ok(cluster)
    }

    /// Creates `n` Deployments labelled `group` in `ns` and waits until
    /// kube-controller-manager has seen them all (so its own writes do not
    /// overlap the measurement). Returns the created objects.
    async fn deployments(
        &self,
        cluster: &Cluster,
        ns: &str,
        group: &str,
        n: usize,
    ) -> anyhow::Result<Vec<DynamicObject>> {
        let objects = (0..n)
            .map(|i| objects::deployment(&workload_name(i), group, self.shape))
            .collect();
        let (burst, created) = objects::create_all(
            &cluster.client,
            &objects::deployments(),
            Some(ns),
            objects,
            self.create_concurrency,
        )
        .await?;
        let api = Api::namespaced_with(cluster.client.clone(), ns, &objects::deployments());
        let names = (0..n).map(workload_name).collect();
        let settle = Watch::start(api, names, observed, self.deadline()).await?;
        let outcome = settle.finish().await;
        if outcome.done_at.is_none() {
            bail!(
                "kube-controller-manager observed only {} of {} Deployments",
                outcome.done,
                outcome.total
            );
        }
        eprintln!(
            "bench: created {n} Deployments in {ns} in {:.1}s",
            burst.seconds()
        );
        Ok(created)
    }
}

fn observed(o: &DynamicObject) -> bool {
    o.data
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64)
        == o.metadata.generation
}

async fn binder_writes(url: &str) -> f64 {
    match scrape(url).await {
        Ok(samples) => stats::sum(&samples, "cloudsql_binder_api_writes_total", |_| true),
        Err(_) => f64::NAN,
    }
}

async fn google_writes(url: &str) -> (f64, f64) {
    match scrape(url).await {
        Ok(samples) => google::requests(&samples),
        Err(_) => (f64::NAN, f64::NAN),
    }
}

/// The metrics that explain an operator's behaviour (reconciles, errors,
/// durations, client requests), as `name{labels}` → value.
async fn operator_metrics(url: &str, prefixes: &[&str]) -> BTreeMap<String, f64> {
    let Ok(samples) = scrape(url).await else {
        return BTreeMap::new();
    };
    samples
        .iter()
        .filter(|s| prefixes.iter().any(|p| s.name.starts_with(p)) && !s.name.ends_with("_bucket"))
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            (format!("{}{{{}}}", s.name, labels.join(",")), s.value)
        })
        .collect()
}

const BINDER_METRICS: &[&str] = &["cloudsql_binder_"];
const GOOGLE_METRICS: &[&str] = &[
    "controller_runtime_reconcile_total",
    "controller_runtime_reconcile_errors_total",
    "controller_runtime_reconcile_time_seconds_sum",
    "controller_runtime_reconcile_time_seconds_count",
    "controller_runtime_webhook_requests_total",
    "rest_client_requests_total",
];

async fn server_writes(cluster: &Cluster) -> BTreeMap<String, f64> {
    match cluster.apiserver_metrics().await {
        Ok(samples) => cluster::server_writes(&samples),
        Err(err) => {
            eprintln!("bench: cannot read the API server's metrics: {err:#}");
            BTreeMap::new()
        }
    }
}

/// The operator's write counter once it stopped writing.
struct Quiet {
    writes: f64,
    /// When the counter last moved (± one poll).
    last_write: Instant,
    /// False when it was still writing after [`QUIET_CAP`].
    reached: bool,
}

/// How long without a new write counts as done.
const QUIET: Duration = Duration::from_secs(2);

/// How long after convergence the bench waits for an operator to stop writing.
const QUIET_CAP: Duration = Duration::from_secs(15);

async fn writes_of(url: &str, google: bool) -> f64 {
    if google {
        google_writes(url).await.0
    } else {
        binder_writes(url).await
    }
}

/// Polls the operator's write counter until it has not moved for [`QUIET`]
/// (at most [`QUIET_CAP`]): the writes that trail convergence.
async fn quiesce(url: &str, google: bool) -> Quiet {
    let mut writes = writes_of(url, google).await;
    let mut last_write = Instant::now();
    let limit = Instant::now() + QUIET_CAP;
    while last_write.elapsed() < QUIET && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = writes_of(url, google).await;
        if now != writes {
            writes = now;
            last_write = Instant::now();
        }
    }
    Quiet {
        writes,
        last_write,
        reached: last_write.elapsed() >= QUIET,
    }
}

/// Records the writes until convergence (`api_writes`), the writes until the
/// operator went quiet (or [`QUIET_CAP`] ran out), whether it did, and when
/// its last write came.
fn record_writes(
    record: &mut Record,
    prefix: &str,
    before: f64,
    at_convergence: f64,
    quiet: &Quiet,
    first_apply: Instant,
) {
    record.fig(format!("{prefix}.api_writes"), at_convergence - before);
    record.fig(
        format!("{prefix}.api_writes_until_quiet"),
        quiet.writes - before,
    );
    record.fig(
        format!("{prefix}.quiet"),
        f64::from(u8::from(quiet.reached)),
    );
    if !quiet.reached {
        record.note(format!(
            "{prefix}: the operator was still writing {} s after its end state was reached (see api_writes_until_quiet and, in the footprint, idle_api_writes)",
            QUIET_CAP.as_secs()
        ));
    }
    if quiet.reached {
        record.fig(
            format!("{prefix}.last_write_after_first_apply_s"),
            quiet
                .last_write
                .saturating_duration_since(first_apply)
                .as_secs_f64(),
        );
    }
}

/// Times from a burst of applies to the moment every watch was done.
struct Converged {
    after_last_apply: f64,
    from_first_apply: f64,
    apply_burst: f64,
}

fn converged(burst: Burst, outcomes: &[Outcome]) -> Result<Converged, String> {
    let mut done = burst.last_done;
    for o in outcomes {
        match o.done_at {
            Some(at) => done = done.max(at),
            None => return Err(format!("{} of {}", o.done, o.total)),
        }
    }
    Ok(Converged {
        after_last_apply: done
            .saturating_duration_since(burst.last_done)
            .as_secs_f64(),
        from_first_apply: (done - burst.first_sent).as_secs_f64(),
        apply_burst: burst.seconds(),
    })
}

fn record_converged(record: &mut Record, prefix: &str, c: &Converged) {
    record.fig(format!("{prefix}.after_last_apply_s"), c.after_last_apply);
    record.fig(format!("{prefix}.from_first_apply_s"), c.from_first_apply);
    record.fig(format!("{prefix}.apply_burst_s"), c.apply_burst);
}

/// Creates `pods` bare, unbound Pods in the bench namespace.
async fn filler_pods(ctx: &Ctx, cluster: &Cluster, pods: usize) -> anyhow::Result<()> {
    if pods == 0 {
        return Ok(());
    }
    let filler = (0..pods)
        .map(|i| objects::pod(&format!("filler-{i:05}"), &format!("filler-{i:05}")))
        .collect();
    let (burst, _) = objects::create_all(
        &cluster.client,
        &objects::pods(),
        Some(NS),
        filler,
        ctx.create_concurrency,
    )
    .await?;
    eprintln!("bench: created {pods} Pods in {:.1}s", burst.seconds());
    Ok(())
}

/// The footprint figures of a converged, quiet operator: an idle window
/// (its CPU and writes), then memory and CPU over the process's life so far.
async fn idle_window(
    ctx: &Ctx,
    record: &mut Record,
    prefix: &str,
    proc: &Proc,
    metrics: &str,
    google: bool,
) -> anyhow::Result<()> {
    let before = proc.usage()?;
    let writes_before = writes_of(metrics, google).await;
    tokio::time::sleep(ctx.idle).await;
    let after = proc.usage()?;
    record.fig(format!("{prefix}.idle_cpu_s"), after.cpu_s - before.cpu_s);
    record.fig(
        format!("{prefix}.idle_api_writes"),
        writes_of(metrics, google).await - writes_before,
    );
    record.fig(format!("{prefix}.rss_idle_mib"), after.rss_mib);
    record.usage(prefix, after);
    Ok(())
}

/// The footprint figures taken in a convergence step that had `pods` Pods present.
#[allow(clippy::too_many_arguments)]
async fn footprint_in_step(
    ctx: &Ctx,
    record: &mut Record,
    subject: Subject,
    proc: &Proc,
    metrics: &str,
    startup: Duration,
    rss_at_ready: f64,
    converged_prefix: &str,
) -> anyhow::Result<()> {
    let prefix = format!("footprint.{}", subject.key());
    record.fig(format!("{prefix}.startup_s"), startup.as_secs_f64());
    record.fig(format!("{prefix}.rss_at_ready_mib"), rss_at_ready);
    for what in ["from_first_apply_s", "api_writes", "api_writes_until_quiet"] {
        if let Some(v) = record
            .figures
            .get(&format!("{converged_prefix}.{what}"))
            .copied()
        {
            record.fig(format!("{prefix}.{what}"), v);
        }
    }
    idle_window(
        ctx,
        record,
        &prefix,
        proc,
        metrics,
        subject == Subject::Google,
    )
    .await
}

/// Max pods of one bench Deployment, as the operator counts them.
fn max_pods(shape: DeploymentShape) -> anyhow::Result<u32> {
    let d: Deployment = serde_json::from_value(objects::deployment("x", "x", shape))?;
    Ok(cloudsql_binder::budget::max_pods::deployment(&d, None).count)
}

/// A capacity under which every binding gets its whole `maxPerPod`.
fn ample_capacity(total_max_pods: u32) -> u32 {
    total_max_pods * objects::MAX_PER_POD + objects::RESERVED + 100
}

fn api(cluster: &Cluster, ns: &str, ar: &kube::api::ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(cluster.client.clone(), ns, ar)
}

/// Convergence of `n` Deployments each bound by its own CloudSqlBinding, then
/// (operator still running) the budget re-grant, then (operator stopped) the
/// limit: the same server-side applies from a minimal client.
pub async fn binder_size(
    ctx: &Ctx,
    n: usize,
    converge: bool,
    budget: bool,
    limit: bool,
    pods: usize,
) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let cluster = ctx.binder_cluster().await?;
    let key = format!("n{n}");
    let per_deployment = max_pods(ctx.shape)?;
    let total_max_pods = per_deployment * n as u32;
    if converge || budget {
        objects::create_all(
            &cluster.client,
            &objects::instances(),
            None,
            vec![objects::instance(ample_capacity(total_max_pods))],
            1,
        )
        .await?;
        filler_pods(ctx, &cluster, pods).await?;
        ctx.deployments(&cluster, NS, "size", n).await?;
        let binder = ctx
            .start_binder(&cluster, &format!("binder-{key}"), &[])
            .await?;
        let rss_at_ready = binder.proc.usage()?.rss_mib;
        let prefix = format!("converge.{key}.binder");
        record.fig(format!("{prefix}.startup_s"), binder.startup.as_secs_f64());
        tokio::time::sleep(SETTLE).await;

        let names: BTreeSet<String> = (0..n).map(workload_name).collect();
        let deployments = Watch::start(
            api(&cluster, NS, &objects::deployments()),
            names.clone(),
            track::binder_injected,
            ctx.deadline(),
        )
        .await?;
        let bindings = Watch::start(
            api(&cluster, NS, &objects::bindings()),
            names.clone(),
            track::binder_ready,
            ctx.deadline(),
        )
        .await?;
        let writes_before = binder_writes(&binder.metrics).await;
        let server_before = server_writes(&cluster).await;
        let objects = names
            .iter()
            .map(|name| objects::binding_by_name(name, "Deployment", name))
            .collect();
        let (burst, _) = objects::create_all(
            &cluster.client,
            &objects::bindings(),
            Some(NS),
            objects,
            ctx.create_concurrency,
        )
        .await?;
        let outcomes = [deployments.finish().await, bindings.finish().await];
        let usage = binder.proc.usage()?;
        let converged_ok = match converged(burst, &outcomes) {
            Ok(c) => {
                record_converged(&mut record, &prefix, &c);
                let at_convergence = binder_writes(&binder.metrics).await;
                let quiet = quiesce(&binder.metrics, false).await;
                record_writes(
                    &mut record,
                    &prefix,
                    writes_before,
                    at_convergence,
                    &quiet,
                    burst.first_sent,
                );
                record.usage(&prefix, usage);
                record.fig(
                    format!("{prefix}.cpu_until_quiet_s"),
                    binder.proc.usage()?.cpu_s,
                );
                let server = server_writes(&cluster).await;
                record.detail(
                    format!("{prefix}.server_writes"),
                    cluster::delta(&server_before, &server),
                );
                record.detail(
                    format!("{prefix}.operator_metrics"),
                    operator_metrics(&binder.metrics, BINDER_METRICS).await,
                );
                eprintln!(
                    "bench: cloudsql-binder, {n} bindings: converged {:.2}s after the last apply ({:.2}s from the first)",
                    c.after_last_apply, c.from_first_apply
                );
                if pods > 0 {
                    footprint_in_step(
                        ctx,
                        &mut record,
                        Subject::Binder,
                        &binder.proc,
                        &binder.metrics,
                        binder.startup,
                        rss_at_ready,
                        &prefix,
                    )
                    .await?;
                }
                true
            }
            Err(progress) => {
                record.note(format!(
                    "converge {key}: cloudsql-binder did not converge within {:?} (deployments injected / bindings ready: {progress}, {}/{}); log: {}",
                    ctx.timeout,
                    outcomes[1].done,
                    outcomes[1].total,
                    binder.proc.log.display()
                ));
                false
            }
        };

        if budget && converged_ok {
            if let Err(err) =
                budget_regrant(ctx, &cluster, &binder, n, per_deployment, &mut record).await
            {
                record.note(format!("budget {key}: {err:#}"));
            }
        } else if budget {
            record.note(format!(
                "budget {key}: skipped, the bindings never converged"
            ));
        }
        let final_usage = binder.proc.stop().await;
        record.fig(
            format!("converge.{key}.binder.total_cpu_s"),
            final_usage.cpu_s,
        );
    }
    if limit {
        limit_floor(ctx, &cluster, n, &mut record).await?;
        let best = record.figures.get(&format!("limit.{key}.best_s")).copied();
        let ours = record
            .figures
            .get(&format!("converge.{key}.binder.from_first_apply_s"))
            .copied();
        let ours_after = record
            .figures
            .get(&format!("converge.{key}.binder.after_last_apply_s"))
            .copied();
        if let (Some(best), Some(ours)) = (best, ours) {
            record.fig(format!("ratio.{key}.binder_over_limit"), ours / best);
        }
        if let (Some(best), Some(ours)) = (best, ours_after) {
            record.fig(
                format!("ratio.{key}.binder_after_last_over_limit"),
                ours / best,
            );
        }
    }
    cluster.down();
    Ok(record)
}

/// Patches the instance's capacity so every grant drops from `maxPerPod` to
/// 4, and times until every template carries its new grant.
async fn budget_regrant(
    ctx: &Ctx,
    cluster: &Cluster,
    binder: &Binder,
    n: usize,
    per_deployment: u32,
    record: &mut Record,
) -> anyhow::Result<()> {
    let key = format!("n{n}");
    if per_deployment == 0 {
        bail!(
            "not measurable with replicas {}: a Deployment with no pods holds no connections, so no grant depends on the capacity",
            ctx.shape.replicas
        );
    }
    let total = per_deployment * n as u32;
    let usable = total * 4;
    let requests: Vec<PoolRequest> = (0..n)
        .map(|i| PoolRequest {
            key: format!("{NS}/{}", workload_name(i)),
            max_pods: per_deployment,
            min_per_pod: objects::MIN_PER_POD,
            max_per_pod: objects::MAX_PER_POD,
            weight: 1,
        })
        .collect();
    let allocation = allocate(usable, &requests).map_err(|e| anyhow!("{e}"))?;
    let expected: Arc<HashMap<String, String>> = Arc::new(
        allocation
            .grants
            .iter()
            .map(|(k, g)| {
                (
                    k.trim_start_matches(&format!("{NS}/")).to_string(),
                    g.to_string(),
                )
            })
            .collect(),
    );
    let names: BTreeSet<String> = (0..n).map(workload_name).collect();
    let wanted = {
        let expected = expected.clone();
        move |o: &DynamicObject| {
            let name = o.name_any();
            track::binder_grant(o).as_ref() == expected.get(&name)
        }
    };
    let watch = Watch::start(
        api(cluster, NS, &objects::deployments()),
        names,
        wanted,
        ctx.deadline(),
    )
    .await?;
    let writes_before = binder_writes(&binder.metrics).await;
    let instances: Api<DynamicObject> =
        Api::all_with(cluster.client.clone(), &objects::instances());
    let first_sent = Instant::now();
    instances
        .patch(
            objects::INSTANCE,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "spec": { "capacity": { "maxConnections": usable + objects::RESERVED } } }),
            ),
        )
        .await
        .context("patching the instance's capacity")?;
    let burst = Burst {
        first_sent,
        last_done: Instant::now(),
    };
    let outcome = watch.finish().await;
    match converged(burst, &[outcome]) {
        Ok(c) => {
            record.fig(format!("budget.{key}.regrant_s"), c.from_first_apply);
            let at_convergence = binder_writes(&binder.metrics).await;
            let quiet = quiesce(&binder.metrics, false).await;
            record_writes(
                record,
                &format!("budget.{key}"),
                writes_before,
                at_convergence,
                &quiet,
                first_sent,
            );
            let grants: BTreeSet<&String> = expected.values().collect();
            record.detail(
                format!("budget.{key}.grants"),
                json!({
                    "before": objects::MAX_PER_POD,
                    "after": grants,
                    "usable_before": ample_capacity(total) - objects::RESERVED,
                    "usable_after": usable,
                }),
            );
            eprintln!(
                "bench: cloudsql-binder re-granted {n} bindings in {:.2}s",
                c.from_first_apply
            );
            Ok(())
        }
        Err(progress) => bail!(
            "templates did not all carry their new grant within {:?} ({progress})",
            ctx.timeout
        ),
    }
}

/// The server-side-apply partial cloudsql-binder applies to Deployment `d`
/// on first injection, computed by the operator's own library.
fn partial_for(d: &DynamicObject, ns: &str, instance: &CloudSqlInstance) -> anyhow::Result<Value> {
    let name = d.name_any();
    let deployment: Deployment = serde_json::from_value(serde_json::to_value(d)?)?;
    let mut binding: CloudSqlBinding =
        serde_json::from_value(objects::binding_by_name(&name, "Deployment", &name))?;
    binding.metadata.namespace = Some(ns.to_string());
    let plan = InjectionPlan::new(
        &binding,
        instance,
        Grant {
            per_pod: objects::MAX_PER_POD,
        },
        TargetCapabilities {
            native_sidecars: true,
        },
    )
    .map_err(|e| anyhow!("{e}"))?;
    let template = deployment.spec.map(|s| s.template).unwrap_or_default();
    let spec = template.spec.unwrap_or_default();
    let annotations = template
        .metadata
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    PodInjection::new(vec![plan])
        .ssa_partial(WorkloadKind::Deployment, &name, ns, &spec, &annotations)
        .map_err(|conflicts| anyhow!("the partial conflicts: {conflicts:?}"))
}

/// The floor: `n` server-side applies of the operator's partial object to `n`
/// fresh Deployments, from a minimal client, at each concurrency level.
async fn limit_floor(
    ctx: &Ctx,
    cluster: &Cluster,
    n: usize,
    record: &mut Record,
) -> anyhow::Result<()> {
    let key = format!("n{n}");
    let instance: CloudSqlInstance =
        serde_json::from_value(objects::instance(ample_capacity(n as u32 * 2)))?;
    let client = cluster::client_for(&cluster.kubeconfig).await?;
    let mut best: Option<(usize, f64)> = None;
    for &level in &ctx.limit_levels {
        let ns = format!("limit-c{level}");
        cluster.namespace(&ns).await?;
        let created = ctx.deployments(cluster, &ns, "limit", n).await?;
        let partials = created
            .iter()
            .map(|d| Ok((d.name_any(), partial_for(d, &ns, &instance)?)))
            .collect::<anyhow::Result<Vec<(String, Value)>>>()?;
        if let Some((_, p)) = partials.first() {
            record.fig(
                format!("limit.{key}.partial_bytes"),
                serde_json::to_vec(p)?.len() as f64,
            );
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &objects::deployments());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let started = Instant::now();
        let results: Vec<Result<DynamicObject, kube::Error>> = futures::stream::iter(partials)
            .map(|(name, partial)| {
                let api = api.clone();
                let params = params.clone();
                async move { api.patch(&name, &params, &Patch::Apply(&partial)).await }
            })
            .buffer_unordered(level)
            .collect()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
            record.note(format!(
                "limit {key} concurrency {level}: {failed} of {n} applies failed, e.g. {err}"
            ));
            continue;
        }
        record.fig(format!("limit.{key}.c{level}_s"), seconds);
        eprintln!("bench: limit, {n} applies at concurrency {level}: {seconds:.2}s");
        if best.is_none_or(|(_, b)| seconds < b) {
            best = Some((level, seconds));
        }
    }
    if let Some((level, seconds)) = best {
        record.fig(format!("limit.{key}.best_s"), seconds);
        record.fig(format!("limit.{key}.best_concurrency"), level as f64);
    }
    Ok(())
}

/// Google's operator on `n` Deployments, one AuthProxyWorkload each by name.
pub async fn google_size(ctx: &Ctx, n: usize, pods: usize) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let build = ctx.google_build()?;
    let cluster = ctx.google_cluster().await?;
    let key = format!("n{n}");
    let prefix = format!("converge.{key}.google");
    filler_pods(ctx, &cluster, pods).await?;
    ctx.deployments(&cluster, NS, "size", n).await?;
    let log = ctx.log(&format!("google-{key}"));
    let op = google::start(&cluster, build, &log, ctx.timeout).await?;
    let rss_at_ready = op.proc.usage()?.rss_mib;
    record.fig(format!("{prefix}.startup_s"), op.startup.as_secs_f64());
    tokio::time::sleep(SETTLE).await;
    let names: BTreeSet<String> = (0..n).map(workload_name).collect();
    let deployments = Watch::start(
        api(&cluster, NS, &objects::deployments()),
        names.clone(),
        |o| track::google_annotated(o, &o.name_any()),
        ctx.deadline(),
    )
    .await?;
    let apws = Watch::start(
        api(&cluster, NS, &objects::auth_proxy_workloads()),
        names.clone(),
        track::google_up_to_date,
        ctx.deadline(),
    )
    .await?;
    let (writes_before, reads_before) = google_writes(&op.metrics_url).await;
    let server_before = server_writes(&cluster).await;
    let objects = names
        .iter()
        .map(|name| objects::apw_by_name(name, "Deployment", name))
        .collect();
    let (burst, _) = objects::create_all(
        &cluster.client,
        &objects::auth_proxy_workloads(),
        Some(NS),
        objects,
        ctx.create_concurrency,
    )
    .await?;
    let outcomes = [deployments.finish().await, apws.finish().await];
    let usage = op.proc.usage()?;
    match converged(burst, &outcomes) {
        Ok(c) => {
            record_converged(&mut record, &prefix, &c);
            let (at_convergence, _) = google_writes(&op.metrics_url).await;
            let quiet = quiesce(&op.metrics_url, true).await;
            record_writes(
                &mut record,
                &prefix,
                writes_before,
                at_convergence,
                &quiet,
                burst.first_sent,
            );
            let (_, reads) = google_writes(&op.metrics_url).await;
            record.fig(format!("{prefix}.api_reads"), reads - reads_before);
            record.usage(&prefix, usage);
            record.fig(
                format!("{prefix}.cpu_until_quiet_s"),
                op.proc.usage()?.cpu_s,
            );
            let server = server_writes(&cluster).await;
            record.detail(
                format!("{prefix}.server_writes"),
                cluster::delta(&server_before, &server),
            );
            record.detail(
                format!("{prefix}.operator_metrics"),
                operator_metrics(&op.metrics_url, GOOGLE_METRICS).await,
            );
            eprintln!(
                "bench: Google's operator, {n} AuthProxyWorkloads: done {:.2}s after the last apply ({:.2}s from the first)",
                c.after_last_apply, c.from_first_apply
            );
            if pods > 0 {
                footprint_in_step(
                    ctx,
                    &mut record,
                    Subject::Google,
                    &op.proc,
                    &op.metrics_url,
                    op.startup,
                    rss_at_ready,
                    &prefix,
                )
                .await?;
            }
        }
        Err(progress) => record.note(format!(
            "converge {key}: Google's operator did not finish within {:?} (deployments annotated: {progress}; AuthProxyWorkloads up to date: {}/{}); log: {}",
            ctx.timeout,
            outcomes[1].done,
            outcomes[1].total,
            log.display()
        )),
    }
    let final_usage = op.proc.stop().await;
    record.fig(format!("{prefix}.total_cpu_s"), final_usage.cpu_s);
    cluster.down();
    Ok(record)
}

/// Which operator a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Binder,
    Google,
}

impl Subject {
    fn key(self) -> &'static str {
        match self {
            Subject::Binder => "binder",
            Subject::Google => "google",
        }
    }
}

/// Either operator, running.
enum Running {
    Binder(Binder),
    Google(google::Operator),
}

impl Running {
    fn proc(&mut self) -> &mut Proc {
        match self {
            Running::Binder(b) => &mut b.proc,
            Running::Google(g) => &mut g.proc,
        }
    }
    fn startup(&self) -> Duration {
        match self {
            Running::Binder(b) => b.startup,
            Running::Google(g) => g.startup,
        }
    }
    async fn writes(&self) -> f64 {
        match self {
            Running::Binder(b) => binder_writes(&b.metrics).await,
            Running::Google(g) => google_writes(&g.metrics_url).await.0,
        }
    }
    fn proc_ref(&self) -> &Proc {
        match self {
            Running::Binder(b) => &b.proc,
            Running::Google(g) => &g.proc,
        }
    }
    fn metrics_url(&self) -> (String, bool) {
        match self {
            Running::Binder(b) => (b.metrics.clone(), false),
            Running::Google(g) => (g.metrics_url.clone(), true),
        }
    }
    async fn quiesce(&self) -> Quiet {
        match self {
            Running::Binder(b) => quiesce(&b.metrics, false).await,
            Running::Google(g) => quiesce(&g.metrics_url, true).await,
        }
    }
    async fn metrics(&self) -> BTreeMap<String, f64> {
        match self {
            Running::Binder(b) => operator_metrics(&b.metrics, BINDER_METRICS).await,
            Running::Google(g) => operator_metrics(&g.metrics_url, GOOGLE_METRICS).await,
        }
    }
    async fn stop(self) -> Usage {
        match self {
            Running::Binder(b) => b.proc.stop().await,
            Running::Google(g) => g.proc.stop().await,
        }
    }
}

async fn start(
    ctx: &Ctx,
    cluster: &Cluster,
    subject: Subject,
    label: &str,
) -> anyhow::Result<Running> {
    let running = match subject {
        Subject::Binder => Running::Binder(ctx.start_binder(cluster, label, &[]).await?),
        Subject::Google => Running::Google(
            google::start(cluster, ctx.google_build()?, &ctx.log(label), ctx.timeout).await?,
        ),
    };
    tokio::time::sleep(SETTLE).await;
    Ok(running)
}

async fn subject_cluster(
    ctx: &Ctx,
    subject: Subject,
    total_max_pods: u32,
) -> anyhow::Result<Cluster> {
    match subject {
        Subject::Binder => {
            let cluster = ctx.binder_cluster().await?;
            objects::create_all(
                &cluster.client,
                &objects::instances(),
                None,
                vec![objects::instance(ample_capacity(total_max_pods))],
                1,
            )
            .await?;
            Ok(cluster)
        }
        Subject::Google => ctx.google_cluster().await,
    }
}

/// One binding (or AuthProxyWorkload) selecting `n` Deployments by label.
pub async fn selector(ctx: &Ctx, subject: Subject, n: usize) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let cluster = subject_cluster(ctx, subject, max_pods(ctx.shape)? * n as u32).await?;
    let prefix = format!("selector.n{n}.{}", subject.key());
    ctx.deployments(&cluster, NS, "selected", n).await?;
    let mut op = start(
        ctx,
        &cluster,
        subject,
        &format!("selector-{}", subject.key()),
    )
    .await?;
    record.fig(format!("{prefix}.startup_s"), op.startup().as_secs_f64());
    let names: BTreeSet<String> = (0..n).map(workload_name).collect();
    let one = BTreeSet::from(["selected".to_string()]);
    let (deployments, owner, object, ar) = match subject {
        Subject::Binder => (
            Watch::start(
                api(&cluster, NS, &objects::deployments()),
                names,
                track::binder_injected,
                ctx.deadline(),
            )
            .await?,
            Watch::start(
                api(&cluster, NS, &objects::bindings()),
                one,
                track::binder_ready,
                ctx.deadline(),
            )
            .await?,
            objects::binding_by_selector("selected", "Deployment", "bench-group", "selected"),
            objects::bindings(),
        ),
        Subject::Google => (
            Watch::start(
                api(&cluster, NS, &objects::deployments()),
                names,
                |o| track::google_annotated(o, "selected"),
                ctx.deadline(),
            )
            .await?,
            Watch::start(
                api(&cluster, NS, &objects::auth_proxy_workloads()),
                one,
                track::google_up_to_date,
                ctx.deadline(),
            )
            .await?,
            objects::apw_by_selector("selected", "Deployment", "bench-group", "selected"),
            objects::auth_proxy_workloads(),
        ),
    };
    let writes_before = op.writes().await;
    let (burst, _) = objects::create_all(&cluster.client, &ar, Some(NS), vec![object], 1).await?;
    let outcomes = [deployments.finish().await, owner.finish().await];
    let usage = op.proc().usage()?;
    match converged(burst, &outcomes) {
        Ok(c) => {
            record.fig(format!("{prefix}.after_last_apply_s"), c.after_last_apply);
            let at_convergence = op.writes().await;
            let quiet = op.quiesce().await;
            record_writes(
                &mut record,
                &prefix,
                writes_before,
                at_convergence,
                &quiet,
                burst.first_sent,
            );
            record.usage(&prefix, usage);
            record.detail(format!("{prefix}.operator_metrics"), op.metrics().await);
            eprintln!(
                "bench: {}, one selector over {n} Deployments: {:.2}s",
                subject.key(),
                c.after_last_apply
            );
        }
        Err(progress) => record.note(format!(
            "selector n{n}: {} did not finish within {:?} (workloads done: {progress}; selecting object done: {}/1)",
            subject.key(),
            ctx.timeout,
            outcomes[1].done
        )),
    }
    op.stop().await;
    cluster.down();
    Ok(record)
}

/// Memory and CPU with `n` bindings, `n` Deployments and `pods` bare Pods present.
pub async fn footprint(
    ctx: &Ctx,
    subject: Subject,
    n: usize,
    pods: usize,
) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let cluster = subject_cluster(ctx, subject, max_pods(ctx.shape)? * n as u32).await?;
    let prefix = format!("footprint.{}", subject.key());
    filler_pods(ctx, &cluster, pods).await?;
    ctx.deployments(&cluster, NS, "footprint", n).await?;
    let mut op = start(
        ctx,
        &cluster,
        subject,
        &format!("footprint-{}", subject.key()),
    )
    .await?;
    record.fig(format!("{prefix}.startup_s"), op.startup().as_secs_f64());
    record.fig(
        format!("{prefix}.rss_at_ready_mib"),
        op.proc().usage()?.rss_mib,
    );
    let names: BTreeSet<String> = (0..n).map(workload_name).collect();
    let (deployments, owners, objects, ar) = match subject {
        Subject::Binder => (
            Watch::start(
                api(&cluster, NS, &objects::deployments()),
                names.clone(),
                track::binder_injected,
                ctx.deadline(),
            )
            .await?,
            Watch::start(
                api(&cluster, NS, &objects::bindings()),
                names.clone(),
                track::binder_ready,
                ctx.deadline(),
            )
            .await?,
            names
                .iter()
                .map(|name| objects::binding_by_name(name, "Deployment", name))
                .collect::<Vec<_>>(),
            objects::bindings(),
        ),
        Subject::Google => (
            Watch::start(
                api(&cluster, NS, &objects::deployments()),
                names.clone(),
                |o| track::google_annotated(o, &o.name_any()),
                ctx.deadline(),
            )
            .await?,
            Watch::start(
                api(&cluster, NS, &objects::auth_proxy_workloads()),
                names.clone(),
                track::google_up_to_date,
                ctx.deadline(),
            )
            .await?,
            names
                .iter()
                .map(|name| objects::apw_by_name(name, "Deployment", name))
                .collect::<Vec<_>>(),
            objects::auth_proxy_workloads(),
        ),
    };
    let writes_before = op.writes().await;
    let (burst, _) = objects::create_all(
        &cluster.client,
        &ar,
        Some(NS),
        objects,
        ctx.create_concurrency,
    )
    .await?;
    let outcomes = [deployments.finish().await, owners.finish().await];
    match converged(burst, &outcomes) {
        Ok(c) => {
            record.fig(format!("{prefix}.from_first_apply_s"), c.from_first_apply);
            let writes_at_convergence = op.writes().await;
            let quiet = op.quiesce().await;
            record_writes(
                &mut record,
                &prefix,
                writes_before,
                writes_at_convergence,
                &quiet,
                burst.first_sent,
            );
            let (metrics, google) = op.metrics_url();
            idle_window(ctx, &mut record, &prefix, op.proc_ref(), &metrics, google).await?;
            record.detail(format!("{prefix}.operator_metrics"), op.metrics().await);
        }
        Err(progress) => record.note(format!(
            "footprint: {} did not finish within {:?} ({progress}; owners done {}/{})",
            subject.key(),
            ctx.timeout,
            outcomes[1].done,
            outcomes[1].total
        )),
    }
    op.stop().await;
    cluster.down();
    Ok(record)
}

/// Waits (at most 60 s) until the API server calls a webhook that injects a
/// Pod labelled `app`, probing with dry-run creations (nothing is stored): a
/// webhook configuration the API server has not picked up yet, or an
/// operator whose caches lack the binding, would leave the first timed Pods
/// uninjected and make them look fast. Whether it got there.
async fn until_injecting(cluster: &Cluster, ns: &str, app: &str) -> anyhow::Result<bool> {
    let pods: Api<DynamicObject> = api(cluster, ns, &objects::pods());
    let probe: DynamicObject = serde_json::from_value(objects::pod("probe", app))?;
    let dry_run = PostParams {
        dry_run: true,
        field_manager: None,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match pods.create(&dry_run, &probe).await {
            Ok(p) if track::pod_injected(&p) => return Ok(true),
            Ok(_) => {}
            // A webhook that refuses dry runs: the timed pods will tell.
            Err(kube::Error::Api(status)) if status.code == 400 => return Ok(false),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates `count` Pods one after the other; returns each creation's latency
/// (ms) and how many came back injected.
async fn timed_pods(
    cluster: &Cluster,
    ns: &str,
    prefix: &str,
    app: &str,
    count: usize,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let pods: Api<DynamicObject> = api(cluster, ns, &objects::pods());
    let mut latencies = Vec::with_capacity(count);
    let mut injected = 0;
    for i in 0..count {
        let pod: DynamicObject =
            serde_json::from_value(objects::pod(&format!("{prefix}-{i:05}"), app))?;
        let started = Instant::now();
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {prefix}-{i:05}"))?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        if track::pod_injected(&created) {
            injected += 1;
        }
    }
    Ok((latencies, injected))
}

fn record_latencies(record: &mut Record, prefix: &str, latencies: &[f64], injected: usize) {
    record.fig(format!("{prefix}.p50_ms"), percentile(latencies, 50.0));
    record.fig(format!("{prefix}.p99_ms"), percentile(latencies, 99.0));
    record.fig(
        format!("{prefix}.max_ms"),
        latencies.iter().copied().fold(0.0, f64::max),
    );
    record.fig(format!("{prefix}.injected"), injected as f64);
    eprintln!(
        "bench: admission {prefix}: p50 {:.2} ms, p99 {:.2} ms, {injected}/{} injected",
        percentile(latencies, 50.0),
        percentile(latencies, 99.0),
        latencies.len()
    );
}

/// The mean time the operator's own handler took per Pod admission (ms),
/// from its latency histogram `<histogram>_sum` / `_count` over the webhooks
/// whose `webhook` label `pods` keeps: what of the creation latency is the
/// handler, the rest being the API server, its call and TLS.
async fn handler_mean_ms(url: &str, histogram: &str, pods: impl Fn(&str) -> bool) -> Option<f64> {
    let samples = scrape(url).await.ok()?;
    let keep = |l: &BTreeMap<String, String>| l.get("webhook").is_some_and(|w| pods(w));
    let sum = stats::sum(&samples, &format!("{histogram}_sum"), keep);
    let count = stats::sum(&samples, &format!("{histogram}_count"), keep);
    (count > 0.0).then(|| sum / count * 1000.0)
}

/// Records, under `prefix`, the webhook's own mean answer time for the Pod
/// webhook `pods` (label `webhook` of `histogram`) and the operator's metrics.
async fn record_webhook_metrics(
    record: &mut Record,
    prefix: &str,
    url: &str,
    histogram: &str,
    pods: &str,
    metrics: &[&str],
) {
    match handler_mean_ms(url, histogram, |w| w == pods).await {
        Some(ms) => record.fig(format!("{prefix}.handler_mean_ms"), ms),
        None => record.note(format!(
            "{prefix}: the operator's /metrics has no {histogram} for {pods}"
        )),
    }
    record.detail(
        format!("{prefix}.operator_metrics"),
        operator_metrics(url, metrics).await,
    );
}

/// Pod creation latency with no webhook, then through cloudsql-binder's
/// webhook when the binary has one.
pub async fn admission_binder(ctx: &Ctx, count: usize) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let cluster = subject_cluster(ctx, Subject::Binder, 1000).await?;
    let (latencies, _) = timed_pods(&cluster, NS, "plain", "plain", count).await?;
    record_latencies(&mut record, "admission.none", &latencies, 0);
    if let Err(why) = &ctx.webhook {
        record.note(format!("admission cloudsql-binder: not available: {why}"));
        cluster.down();
        return Ok(record);
    }
    // The webhook keeps its certificate in a Secret of the operator's own
    // namespace (--webhook-secret-namespace, default `cloudsql-binder`).
    cluster.namespace("cloudsql-binder").await?;
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}");
    let extra = vec![
        "--webhook-listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--webhook-url".to_string(),
        url.clone(),
    ];
    let mut binder = match ctx.start_binder(&cluster, "admission-binder", &extra).await {
        Ok(b) => b,
        Err(err) => {
            record.note(format!(
                "admission cloudsql-binder: not available: `run {}` failed: {err:#}",
                extra.join(" ")
            ));
            cluster.down();
            return Ok(record);
        }
    };
    // The operator registers its own MutatingWebhookConfiguration (no cert-manager).
    let configs: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let registered = loop {
        let found = configs
            .list(&Default::default())
            .await
            .ok()
            .is_some_and(|l| {
                l.items.iter().any(|c| {
                    c.webhooks.iter().flatten().any(|w| {
                        w.client_config
                            .url
                            .as_deref()
                            .is_some_and(|u| u.starts_with(&url))
                    })
                })
            });
        if found || Instant::now() > deadline || !binder.proc.alive() {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !registered {
        record.note(format!(
            "admission cloudsql-binder: not available: started with {} but no MutatingWebhookConfiguration pointing at {url} appeared within 60 s; log: {}",
            extra.join(" "),
            binder.proc.log.display()
        ));
        binder.proc.stop().await;
        cluster.down();
        return Ok(record);
    }
    // A binding of every Pod labelled app=admitted; wait until the operator has seen it.
    let bindings = api(&cluster, NS, &objects::bindings());
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(objects::binding_by_selector(
                "admitted", "Pod", "app", "admitted",
            ))?,
        )
        .await
        .context("creating the Pod binding")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let seen = bindings
            .get("admitted")
            .await
            .ok()
            .and_then(|b| b.data.pointer("/status/observedGeneration").cloned())
            .is_some();
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !until_injecting(&cluster, NS, "admitted").await? {
        record.note("admission cloudsql-binder: no dry-run Pod came back injected within 60 s");
    }
    let (latencies, injected) = timed_pods(&cluster, NS, "admitted", "admitted", count).await?;
    record_latencies(&mut record, "admission.binder", &latencies, injected);
    record_webhook_metrics(
        &mut record,
        "admission.binder",
        &binder.metrics,
        "cloudsql_binder_admission_duration_seconds",
        "mutate-pods",
        BINDER_METRICS,
    )
    .await;
    if injected == 0 {
        record
            .note("admission cloudsql-binder: the webhook answered but injected none of the Pods");
    }
    record.usage("admission.binder", binder.proc.stop().await);
    cluster.down();
    Ok(record)
}

/// Pod creation latency through Google's pod webhook, for Pods its
/// AuthProxyWorkload selects.
pub async fn admission_google(ctx: &Ctx, count: usize) -> anyhow::Result<Record> {
    let mut record = Record::default();
    let cluster = ctx.google_cluster().await?;
    let op = google::start(
        &cluster,
        ctx.google_build()?,
        &ctx.log("admission-google"),
        ctx.timeout,
    )
    .await?;
    let apws = api(&cluster, NS, &objects::auth_proxy_workloads());
    let watch = Watch::start(
        apws.clone(),
        BTreeSet::from(["admitted".to_string()]),
        track::google_up_to_date,
        ctx.deadline(),
    )
    .await?;
    apws.create(
        &PostParams::default(),
        &serde_json::from_value(objects::apw_by_selector(
            "admitted", "Pod", "app", "admitted",
        ))?,
    )
    .await
    .context("creating the Pod AuthProxyWorkload")?;
    if watch.finish().await.done_at.is_none() {
        record.note("admission google: its AuthProxyWorkload never became UpToDate");
    }
    if !until_injecting(&cluster, NS, "admitted").await? {
        record.note("admission google: no dry-run Pod came back injected within 60 s");
    }
    let (latencies, injected) = timed_pods(&cluster, NS, "admitted", "admitted", count).await?;
    record_latencies(&mut record, "admission.google", &latencies, injected);
    // controller-runtime's histogram of its webhook server, by path.
    record_webhook_metrics(
        &mut record,
        "admission.google",
        &op.metrics_url,
        "controller_runtime_webhook_latency_seconds",
        "/mutate-pods",
        GOOGLE_METRICS,
    )
    .await;
    record.usage("admission.google", op.proc.usage()?);
    op.proc.stop().await;
    cluster.down();
    Ok(record)
}
