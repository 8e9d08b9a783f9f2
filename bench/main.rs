//! `cloudsql-binder-bench`: how fast, how small, against the limit and against
//! Google's cloud-sql-proxy-operator. See bench/README.md.
//!
//! Every step brings up its own control plane (tools/cluster-up.sh in the
//! bench's own directory), runs one operator as a separate process, creates
//! the workload and measures from outside: watches for the end state, /proc
//! for memory and CPU, the operators' and the API server's /metrics for
//! writes. Results go to bench/results/*.json; benchmarks report, they never
//! fail on a time.

mod cluster;
mod google;
mod objects;
mod process;
mod report;
mod scenarios;
mod stats;
mod track;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use futures::FutureExt;
use serde_json::{Value, json};

use objects::DeploymentShape;
use scenarios::{Ctx, Record, Subject};

/// What the bench can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N Deployments, each with its own binding: time until all are injected and Ready.
    Converge,
    /// The same server-side applies from a minimal client: the floor.
    Limit,
    /// Re-granting N bindings of one instance after its capacity changes.
    Budget,
    /// One selector binding over many Deployments.
    Selector,
    /// Peak RSS and CPU with N bindings, N Deployments and many Pods.
    Footprint,
    /// Pod creation latency through the admission webhook.
    Admission,
    /// Google's cloud-sql-proxy-operator side by side (converge, selector,
    /// footprint and admission, where those are selected).
    Google,
}

/// Benchmarks cloudsql-binder against a real local control plane.
#[derive(Parser, Debug)]
#[command(name = "cloudsql-binder-bench", version)]
struct Args {
    /// How many times each measurement is repeated (figures report median, min, max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Workload sizes N for converge, limit, budget and Google's side by side.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    sizes: Vec<usize>,
    /// What to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "converge,limit,budget,selector,footprint,admission,google"
    )]
    scenarios: Vec<Scenario>,
    /// Deployments under the one selector binding.
    #[arg(long, default_value_t = 1000)]
    selector_size: usize,
    /// Bindings and Deployments in the footprint step.
    #[arg(long, default_value_t = 1000)]
    footprint_size: usize,
    /// Bare, unbound Pods present in the footprint step.
    #[arg(long, default_value_t = 5000)]
    footprint_pods: usize,
    /// Pods created one by one in the admission step.
    #[arg(long, default_value_t = 1000)]
    admission_pods: usize,
    /// `spec.replicas` of every Deployment.
    #[arg(long, default_value_t = 1)]
    replicas: i32,
    /// `spec.paused` of every Deployment (paused: no ReplicaSets, no Pods).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    paused: bool,
    /// Concurrency levels the limit client tries (the best counts).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    limit_concurrency: Vec<usize>,
    /// Requests in flight while the bench creates objects.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// The operator binary (default: target/release/cloudsql-binder, else target/debug).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The bench's working directory: its own control plane (`<dir>/cluster`,
    /// never .cluster/ or .cluster-test/) and the operators' logs (`<dir>/logs`).
    /// Default: bench/work in the repository (git-ignored).
    #[arg(long, env = "CLOUDSQL_BINDER_BENCH_DIR")]
    work_dir: Option<PathBuf>,
    /// Where the results JSON goes (default: bench/results/<date>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rewrite the results table in this README (between its bench markers).
    #[arg(long)]
    update_readme: Option<PathBuf>,
    /// Give up waiting for one convergence after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Seconds of idle observed after convergence in the footprint step.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Measure nothing: print the table of this results JSON (and with
    /// --update-readme write it there), e.g. after the report gained a column.
    #[arg(long, value_name = "RESULTS_JSON")]
    report: Option<PathBuf>,
}

/// `--report`: the table of an existing results file.
fn report_only(json: &std::path::Path, readme: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let result: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    publish_table(&result, json, readme)
}

/// Prints the results table of `result` (from the file `json`), and writes it
/// into `readme` when given.
fn publish_table(
    result: &serde_json::Value,
    json: &std::path::Path,
    readme: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let table = report::markdown(result, json, &repo_root());
    println!("{table}");
    if let Some(readme) = readme {
        report::update_readme(readme, &table)?;
        eprintln!("bench: table updated in {}", readme.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("bench: a rustls crypto provider was already installed");
    }
    let args = Args::parse();
    if let Some(json) = &args.report {
        return match report_only(json, args.update_readme.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bench: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository: the parent of this package's directory (bench/).
fn repo_root() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).to_path_buf()
}

/// `/proc/loadavg`'s three averages.
fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn machine() -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn default_binary(repo: &Path) -> anyhow::Result<PathBuf> {
    for profile in ["release", "debug"] {
        let path = repo.join("target").join(profile).join("cloudsql-binder");
        if path.exists() {
            return Ok(path);
        }
    }
    bail!(
        "no cloudsql-binder binary in target/; run `cargo build --release --bin cloudsql-binder` or pass --binary"
    )
}

/// Whether `cloudsql-binder run` (whose `--help` is `help`) has the admission
/// webhook flags.
fn webhook_support(help: &str) -> Result<(), String> {
    let missing: Vec<&str> = ["--webhook-listen", "--webhook-url"]
        .into_iter()
        .filter(|f| !help.contains(f))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`cloudsql-binder run --help` has no {} flag (the admission webhook is not in this build)",
            missing.join(" / ")
        ))
    }
}

/// Flags every `cloudsql-binder run` of the bench gets: a single replica
/// without leader election (like Google's operator, whose `--leader-elect`
/// is off by default), so no Lease renewals count as writes.
fn binder_base_args(help: &str) -> Vec<String> {
    if help.contains("--leader-election ") || help.contains("--leader-election <") {
        vec!["--leader-election=false".to_string()]
    } else {
        Vec::new()
    }
}

/// One step of a run.
struct Step {
    name: String,
    action: StepAction,
}

enum StepAction {
    BinderSize {
        n: usize,
        converge: bool,
        budget: bool,
        limit: bool,
        /// Bare Pods created first: the footprint is measured in this step.
        pods: usize,
    },
    GoogleSize(usize, usize),
    Selector(Subject, usize),
    Footprint(Subject),
    AdmissionBinder,
    AdmissionGoogle,
}

fn plan(args: &Args) -> Vec<Step> {
    let has = |s: Scenario| args.scenarios.contains(&s);
    let google = has(Scenario::Google);
    // The footprint is taken in the convergence step of its size when there
    // is one (its Pods are created first): one 1,000-binding convergence
    // per operator and run instead of two.
    let footprint_in_size = has(Scenario::Footprint)
        && has(Scenario::Converge)
        && args.sizes.contains(&args.footprint_size);
    let mut steps = Vec::new();
    for &n in &args.sizes {
        let pods = if footprint_in_size && n == args.footprint_size {
            args.footprint_pods
        } else {
            0
        };
        let (converge, budget, limit) = (
            has(Scenario::Converge),
            has(Scenario::Budget),
            has(Scenario::Limit),
        );
        if converge || budget || limit {
            steps.push(Step {
                name: format!("cloudsql-binder n={n}"),
                action: StepAction::BinderSize {
                    n,
                    converge: converge || budget,
                    budget,
                    limit,
                    pods,
                },
            });
        }
        if google && converge {
            steps.push(Step {
                name: format!("google n={n}"),
                action: StepAction::GoogleSize(n, pods),
            });
        }
    }
    let subjects: Vec<Subject> = if google {
        vec![Subject::Binder, Subject::Google]
    } else {
        vec![Subject::Binder]
    };
    if has(Scenario::Selector) {
        for &s in &subjects {
            steps.push(Step {
                name: format!("selector {s:?} n={}", args.selector_size),
                action: StepAction::Selector(s, args.selector_size),
            });
        }
    }
    if has(Scenario::Footprint) && !footprint_in_size {
        for &s in &subjects {
            steps.push(Step {
                name: format!("footprint {s:?}"),
                action: StepAction::Footprint(s),
            });
        }
    }
    if has(Scenario::Admission) {
        steps.push(Step {
            name: "admission cloudsql-binder".into(),
            action: StepAction::AdmissionBinder,
        });
        if google {
            steps.push(Step {
                name: "admission google".into(),
                action: StepAction::AdmissionGoogle,
            });
        }
    }
    steps
}

async fn run_step(ctx: &Ctx, args: &Args, step: &Step) -> anyhow::Result<Record> {
    match step.action {
        StepAction::BinderSize {
            n,
            converge,
            budget,
            limit,
            pods,
        } => scenarios::binder_size(ctx, n, converge, budget, limit, pods).await,
        StepAction::GoogleSize(n, pods) => scenarios::google_size(ctx, n, pods).await,
        StepAction::Selector(s, n) => scenarios::selector(ctx, s, n).await,
        StepAction::Footprint(s) => {
            scenarios::footprint(ctx, s, args.footprint_size, args.footprint_pods).await
        }
        StepAction::AdmissionBinder => scenarios::admission_binder(ctx, args.admission_pods).await,
        StepAction::AdmissionGoogle => scenarios::admission_google(ctx, args.admission_pods).await,
    }
}

/// Ratios measured within one run.
fn ratios(figures: &mut BTreeMap<String, f64>, sizes: &[usize], selector: usize) {
    let put = |key: String, num: String, den: String, f: &BTreeMap<String, f64>| {
        if let (Some(a), Some(b)) = (f.get(&num), f.get(&den))
            && *b > 0.0
        {
            Some((key, a / b))
        } else {
            None
        }
    };
    let mut new = Vec::new();
    for n in sizes {
        for what in ["from_first_apply_s", "peak_rss_mib", "cpu_s", "api_writes"] {
            new.extend(put(
                format!("ratio.n{n}.google_over_binder.{what}"),
                format!("converge.n{n}.google.{what}"),
                format!("converge.n{n}.binder.{what}"),
                figures,
            ));
        }
    }
    for what in ["after_last_apply_s", "peak_rss_mib", "api_writes"] {
        new.extend(put(
            format!("ratio.selector.google_over_binder.{what}"),
            format!("selector.n{selector}.google.{what}"),
            format!("selector.n{selector}.binder.{what}"),
            figures,
        ));
    }
    for what in ["peak_rss_mib", "cpu_s", "from_first_apply_s"] {
        new.extend(put(
            format!("ratio.footprint.google_over_binder.{what}"),
            format!("footprint.google.{what}"),
            format!("footprint.binder.{what}"),
            figures,
        ));
    }
    figures.extend(new);
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let repo = repo_root();
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| repo.join("bench/work"));
    let cluster_dir = work.join("cluster");
    for shared in [".cluster", ".cluster-test"] {
        if cluster_dir.starts_with(repo.join(shared)) {
            bail!(
                "the bench never uses the demo's .cluster/ or the tests' .cluster-test/; pick another --work-dir"
            );
        }
    }
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => default_binary(&repo)?,
    };
    let binder_version = command_output(&binary.display().to_string(), &["version"]);
    let crds_yaml = command_output(&binary.display().to_string(), &["crd"]);
    if !crds_yaml.contains("CustomResourceDefinition") {
        bail!("`{} crd` printed no CRDs", binary.display());
    }
    let google = if args.scenarios.contains(&Scenario::Google) {
        google::build(&repo).map_err(|e| format!("{e:#}"))
    } else {
        Err("not selected (--scenarios without google)".to_string())
    };
    if let Err(why) = &google
        && args.scenarios.contains(&Scenario::Google)
    {
        eprintln!("bench: Google's operator cannot be run: {why}");
    }
    let help = command_output(&binary.display().to_string(), &["run", "--help"]);
    let webhook = webhook_support(&help);
    let binder_args = binder_base_args(&help);
    let started_at = k8s_openapi::jiff::Timestamp::now();
    let steps = plan(&args);
    eprintln!(
        "bench: {} run(s) of {} step(s); binary {}; logs in {}",
        args.runs,
        steps.len(),
        binary.display(),
        logs.display()
    );

    let mut ctx = Ctx {
        repo: repo.clone(),
        cluster_dir,
        logs: logs.clone(),
        binary: binary.clone(),
        google: google.clone(),
        shape: DeploymentShape {
            replicas: args.replicas,
            paused: args.paused,
        },
        create_concurrency: args.create_concurrency,
        timeout: Duration::from_secs(args.timeout_secs),
        limit_levels: args.limit_concurrency.clone(),
        webhook: webhook.clone(),
        binder_args,
        crds_yaml,
        idle: Duration::from_secs(args.idle_secs),
        run: 0,
        kubernetes: std::sync::Mutex::new(String::new()),
    };

    let out = match &args.out {
        Some(p) => p.clone(),
        None => {
            let stamp = started_at.strftime("%Y-%m-%dT%H-%M-%SZ").to_string();
            repo.join("bench/results").join(format!("{stamp}.json"))
        }
    };
    let meta = Meta {
        started_at,
        bench_started: Instant::now(),
        versions: json!({
            "cloudsql_binder": binder_version,
            "cloudsql_binder_binary": binary.display().to_string(),
            "google_operator": match &google {
                Ok(b) => json!(format!("github.com/GoogleCloudPlatform/cloud-sql-proxy-operator {}", b.version)),
                Err(why) => json!(format!("not run: {why}")),
            },
            "rustc": command_output("rustc", &["--version"]),
            "go": command_output("go", &["version"]),
        }),
        admission_webhook: match &webhook {
            Ok(()) => Value::Null,
            Err(why) => json!(why),
        },
        out: out.clone(),
    };

    // SIGINT, SIGTERM or SIGHUP end the bench cleanly: the current step is
    // dropped (its operator killed, its control plane stopped) and what was
    // measured so far is written.
    let interrupt = interrupted().shared();
    let mut progress = Progress::default();
    'runs: for run in 1..=args.runs {
        ctx.run = run;
        let run_started = Instant::now();
        let load_start = loadavg();
        eprintln!(
            "bench: run {run}/{} (load average {load_start:?})",
            args.runs
        );
        progress.runs.push(json!({
            "run": run,
            "load_average_start": load_start,
            "steps": [],
        }));
        progress.figures.push(BTreeMap::new());
        for step in &steps {
            let step_load_start = loadavg();
            let step_started = Instant::now();
            eprintln!("bench: run {run}: {}", step.name);
            let outcome = tokio::select! {
                r = run_step(&ctx, &args, step) => Some(r),
                signal = interrupt.clone() => {
                    let note = format!("interrupted by {signal} during run {run}, step {}: the figures stop there", step.name);
                    eprintln!("bench: {note}");
                    progress.note(note);
                    progress.interrupted = true;
                    None
                }
            };
            let record = match outcome {
                Some(Ok(r)) => r,
                Some(Err(err)) => {
                    let mut r = Record::default();
                    r.notes
                        .push(format!("{}: could not be measured: {err:#}", step.name));
                    eprintln!("bench: {}: could not be measured: {err:#}", step.name);
                    r
                }
                None => Record::default(),
            };
            if let Some(figures) = progress.figures.last_mut() {
                figures.extend(record.figures.clone());
                ratios(figures, &args.sizes, args.selector_size);
            }
            for n in &record.notes {
                progress.note(n.clone());
            }
            if let Some(current) = progress.runs.last_mut() {
                if let Some(steps) = current["steps"].as_array_mut() {
                    steps.push(json!({
                        "step": step.name,
                        "seconds": step_started.elapsed().as_secs_f64(),
                        "load_average_start": step_load_start,
                        "load_average_end": loadavg(),
                        "figures": record.figures,
                        "details": record.details,
                        "notes": record.notes,
                    }));
                }
                current["seconds"] = json!(run_started.elapsed().as_secs_f64());
                current["load_average_end"] = json!(loadavg());
                current["figures"] = json!(progress.figures.last());
            }
            let kubernetes = ctx.kubernetes.lock().map(|k| k.clone()).unwrap_or_default();
            write_results(&args, &meta, &progress, &kubernetes)?;
            if progress.interrupted {
                break 'runs;
            }
        }
    }
    let kubernetes = ctx.kubernetes.lock().map(|k| k.clone()).unwrap_or_default();
    let result = write_results(&args, &meta, &progress, &kubernetes)?;
    eprintln!("bench: results in {}", out.display());
    let readme = args.update_readme.as_deref().filter(|readme| {
        if progress.interrupted {
            eprintln!("bench: interrupted; {} left as it was", readme.display());
        }
        !progress.interrupted
    });
    publish_table(&result, &out, readme)?;
    let _ = std::fs::remove_dir_all(cluster::pids_dir(&ctx.cluster_dir));
    Ok(())
}

/// What a bench invocation knows before its first step.
struct Meta {
    started_at: k8s_openapi::jiff::Timestamp,
    bench_started: Instant,
    versions: Value,
    admission_webhook: Value,
    out: PathBuf,
}

/// What has been measured so far.
#[derive(Default)]
struct Progress {
    runs: Vec<Value>,
    /// Every run's figures (ratios included).
    figures: Vec<BTreeMap<String, f64>>,
    notes: Vec<String>,
    interrupted: bool,
}

impl Progress {
    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

/// Resolves with the signal's name on SIGINT, SIGTERM or SIGHUP.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let wait = |kind: SignalKind, name: &'static str| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
                name
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        n = wait(SignalKind::interrupt(), "SIGINT") => n,
        n = wait(SignalKind::terminate(), "SIGTERM") => n,
        n = wait(SignalKind::hangup(), "SIGHUP") => n,
    }
}

/// Writes the results JSON (after every step, so an interrupted bench keeps
/// what it measured) and returns it.
fn write_results(
    args: &Args,
    meta: &Meta,
    progress: &Progress,
    kubernetes: &str,
) -> anyhow::Result<Value> {
    let mut keys: Vec<&String> = progress.figures.iter().flat_map(|f| f.keys()).collect();
    keys.sort();
    keys.dedup();
    let summary: BTreeMap<String, stats::Spread> = keys
        .into_iter()
        .filter_map(|k| {
            let values: Vec<f64> = progress
                .figures
                .iter()
                .filter_map(|f| f.get(k).copied())
                .collect();
            stats::spread(&values).map(|s| (k.clone(), s))
        })
        .collect();
    let mut versions = meta.versions.clone();
    versions["kubernetes"] = json!(kubernetes);
    let result = json!({
        "schema": "cloudsql-binder-bench/1",
        "started": meta.started_at.to_string(),
        "finished": k8s_openapi::jiff::Timestamp::now().to_string(),
        "seconds": meta.bench_started.elapsed().as_secs_f64(),
        "complete": !progress.interrupted && progress.runs.len() == args.runs,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "load_average_start": progress.runs.first().map(|r| r["load_average_start"].clone()),
        "load_average_end": loadavg(),
        "versions": versions,
        "config": {
            "runs": args.runs,
            "sizes": args.sizes,
            "scenarios": args.scenarios.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
            "selector_size": args.selector_size,
            "footprint_size": args.footprint_size,
            "footprint_pods": args.footprint_pods,
            "admission_pods": args.admission_pods,
            "deployment": { "replicas": args.replicas, "paused": args.paused },
            "limit_concurrency": args.limit_concurrency,
            "create_concurrency": args.create_concurrency,
            "idle_secs": args.idle_secs,
            "timeout_secs": args.timeout_secs,
        },
        "admission_webhook": meta.admission_webhook,
        "summary": summary,
        "notes": progress.notes,
        "runs": progress.runs,
    });
    if let Some(dir) = meta.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = meta.out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &meta.out).with_context(|| format!("writing {}", meta.out.display()))?;
    Ok(result)
}
