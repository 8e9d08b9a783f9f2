//! The results as Markdown tables (printed, and kept in bench/README.md
//! between its markers).

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

const BEGIN: &str = "<!-- bench:results:begin -->";
const END: &str = "<!-- bench:results:end -->";

struct Summary<'a>(&'a Value);

impl Summary<'_> {
    fn get(&self, key: &str) -> Option<(f64, f64, f64)> {
        let s = self.0.get(key)?;
        Some((
            s.get("median")?.as_f64()?,
            s.get("min")?.as_f64()?,
            s.get("max")?.as_f64()?,
        ))
    }

    /// `median [min–max]` with `decimals`, or `—`.
    fn fmt(&self, key: &str, decimals: usize) -> String {
        match self.get(key) {
            Some((median, min, max)) if (max - min).abs() < f64::EPSILON => {
                format!("{median:.decimals$}")
            }
            Some((median, min, max)) => {
                format!("{median:.decimals$} [{min:.decimals$}–{max:.decimals$}]")
            }
            None => "—".to_string(),
        }
    }

    fn ratio(&self, key: &str) -> String {
        match self.get(key) {
            Some(_) => format!("{}×", self.fmt(key, 2)),
            None => "—".to_string(),
        }
    }
}

fn sizes(result: &Value) -> Vec<u64> {
    result["config"]["sizes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

/// The tables for `result` (written to `out`).
pub fn markdown(result: &Value, out: &Path, repo: &Path) -> String {
    let s = Summary(&result["summary"]);
    let config = &result["config"];
    let machine = &result["machine"];
    let versions = &result["versions"];
    let runs = config["runs"].as_u64().unwrap_or(0);
    let file = out.strip_prefix(repo).unwrap_or(out).display().to_string();
    let load = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let mut md = String::new();
    md.push_str(&format!(
        "Measured {} ({} s) with `{}`: {} cores ({}), {} GiB; load average {} at the start, {} at the end. \
         {}; Kubernetes {}; Google's operator: {}. Deployments: replicas {}, paused {}. \
         Figures: median [min–max] over {runs} run(s); ratios are taken within each run, then summarised. \
         JSON: `{file}`.\n\n",
        result["started"].as_str().unwrap_or(""),
        result["seconds"].as_f64().unwrap_or(0.0).round(),
        result["command"].as_str().unwrap_or(""),
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or(""),
        machine["memory_gib"],
        load(&result["load_average_start"]),
        load(&result["load_average_end"]),
        versions["cloudsql_binder"].as_str().unwrap_or(""),
        versions["kubernetes"].as_str().unwrap_or(""),
        versions["google_operator"].as_str().unwrap_or(""),
        config["deployment"]["replicas"],
        config["deployment"]["paused"],
    ));

    md.push_str("#### Convergence (seconds)\n\n");
    md.push_str("| Workload | cloudsql-binder, after the last apply | cloudsql-binder, from the first apply | limit: the same applies from a minimal client (best concurrency) | cloudsql-binder / limit | Google's operator, from the first apply | Google / cloudsql-binder |\n");
    md.push_str("|---|---|---|---|---|---|---|\n");
    for n in sizes(result) {
        md.push_str(&format!(
            "| {n} Deployments, {n} bindings by name | {} | {} | {} (c={}) | {} | {} | {} |\n",
            s.fmt(&format!("converge.n{n}.binder.after_last_apply_s"), 2),
            s.fmt(&format!("converge.n{n}.binder.from_first_apply_s"), 2),
            s.fmt(&format!("limit.n{n}.best_s"), 2),
            s.fmt(&format!("limit.n{n}.best_concurrency"), 0),
            s.ratio(&format!("ratio.n{n}.binder_over_limit")),
            s.fmt(&format!("converge.n{n}.google.from_first_apply_s"), 2),
            s.ratio(&format!("ratio.n{n}.google_over_binder.from_first_apply_s")),
        ));
    }
    let sel = config["selector_size"].as_u64().unwrap_or(0);
    md.push_str(&format!(
        "| 1 selector binding over {sel} Deployments | {} | — | — | — | {} (after the apply) | {} |\n\n",
        s.fmt(&format!("selector.n{sel}.binder.after_last_apply_s"), 2),
        s.fmt(&format!("selector.n{sel}.google.after_last_apply_s"), 2),
        s.ratio("ratio.selector.google_over_binder.after_last_apply_s"),
    ));

    md.push_str(
        "#### Limit: seconds for N server-side applies by concurrency\n\n| N | bytes per apply |",
    );
    let levels: Vec<u64> = config["limit_concurrency"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    for c in &levels {
        md.push_str(&format!(" c={c} |"));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(levels.len()));
    md.push('\n');
    for n in sizes(result) {
        md.push_str(&format!(
            "| {n} | {} |",
            s.fmt(&format!("limit.n{n}.partial_bytes"), 0)
        ));
        for c in &levels {
            md.push_str(&format!(" {} |", s.fmt(&format!("limit.n{n}.c{c}_s"), 2)));
        }
        md.push('\n');
    }

    md.push_str("\n#### Resources to converge (peak RSS and CPU since process start; writes since the first apply)\n\n| N | cloudsql-binder peak RSS (MiB) | CPU (s) | API writes | Google peak RSS (MiB) | CPU (s) | API writes | API writes until quiet: cloudsql-binder / Google |\n|---|---|---|---|---|---|---|---|\n");
    for n in sizes(result) {
        md.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            s.fmt(&format!("converge.n{n}.binder.peak_rss_mib"), 1),
            s.fmt(&format!("converge.n{n}.binder.cpu_s"), 2),
            s.fmt(&format!("converge.n{n}.binder.api_writes"), 0),
            s.fmt(&format!("converge.n{n}.google.peak_rss_mib"), 1),
            s.fmt(&format!("converge.n{n}.google.cpu_s"), 2),
            s.fmt(&format!("converge.n{n}.google.api_writes"), 0),
            s.fmt(&format!("converge.n{n}.binder.api_writes_until_quiet"), 0),
            s.fmt(&format!("converge.n{n}.google.api_writes_until_quiet"), 0),
        ));
    }

    md.push_str("\n#### Budget: re-grant after the instance's capacity changes\n\n| Bindings on one instance | seconds until every template carries its new grant | API writes |\n|---|---|---|\n");
    for n in sizes(result) {
        md.push_str(&format!(
            "| {n} | {} | {} |\n",
            s.fmt(&format!("budget.n{n}.regrant_s"), 2),
            s.fmt(&format!("budget.n{n}.api_writes"), 0),
        ));
    }

    md.push_str(&format!(
        "\n#### Footprint: {} bindings, {} Deployments, {} bare Pods\n\n| | cloudsql-binder | Google's operator | Google / cloudsql-binder |\n|---|---|---|---|\n",
        config["footprint_size"], config["footprint_size"], config["footprint_pods"]
    ));
    let idle = config["idle_secs"].as_u64().unwrap_or(0);
    for (label, key, decimals, ratio) in [
        ("peak RSS, VmHWM (MiB)", "peak_rss_mib", 1, true),
        ("CPU, start → converged + idle (s)", "cpu_s", 2, true),
        ("RSS once ready (MiB)", "rss_at_ready_mib", 1, false),
        ("RSS idle after converging (MiB)", "rss_idle_mib", 1, false),
        ("start until ready (s)", "startup_s", 2, false),
        (
            "convergence from the first apply (s)",
            "from_first_apply_s",
            2,
            true,
        ),
        ("API writes to converge", "api_writes", 0, false),
        (
            "API writes until quiet (2 s without one, at most 15 s)",
            "api_writes_until_quiet",
            0,
            false,
        ),
        ("idle: CPU (s)", "idle_cpu_s", 3, false),
        ("idle: API writes", "idle_api_writes", 0, false),
    ] {
        let label = label.replace("idle:", &format!("idle {idle} s:"));
        md.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            s.fmt(&format!("footprint.binder.{key}"), decimals),
            s.fmt(&format!("footprint.google.{key}"), decimals),
            if ratio {
                s.ratio(&format!("ratio.footprint.google_over_binder.{key}"))
            } else {
                "".to_string()
            },
        ));
    }

    md.push_str(&format!(
        "\n#### Admission: {} Pod creations, one at a time (ms)\n\nThe webhook's own time is the mean of its answer-time histogram (`cloudsql_binder_admission_duration_seconds`, controller-runtime's `controller_runtime_webhook_latency_seconds`): the rest of a creation's latency is the API server, its call to the webhook and TLS.\n\n| Path | p50 | p99 | max | webhook's own time, mean | operator CPU, whole step (s) | Pods injected |\n|---|---|---|---|---|---|---|\n",
        config["admission_pods"]
    ));
    for (label, key) in [
        ("no webhook (baseline)", "admission.none"),
        ("cloudsql-binder webhook", "admission.binder"),
        ("Google's pod webhook", "admission.google"),
    ] {
        let webhook = key != "admission.none";
        md.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} |\n",
            s.fmt(&format!("{key}.p50_ms"), 2),
            s.fmt(&format!("{key}.p99_ms"), 2),
            s.fmt(&format!("{key}.max_ms"), 2),
            if webhook {
                s.fmt(&format!("{key}.handler_mean_ms"), 2)
            } else {
                "—".to_string()
            },
            if webhook {
                s.fmt(&format!("{key}.cpu_s"), 2)
            } else {
                "—".to_string()
            },
            s.fmt(&format!("{key}.injected"), 0),
        ));
    }
    let notes: Vec<&str> = result["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !notes.is_empty() {
        md.push_str("\n#### Not measured, and why\n\n");
        for n in notes {
            md.push_str(&format!("- {}\n", n.replace('\n', " ")));
        }
    }
    md
}

/// Replaces the text between the bench markers of `readme` with `table`.
pub fn update_readme(readme: &Path, table: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} … {END} markers", readme.display());
    };
    if end < begin {
        bail!("{}: the bench markers are out of order", readme.display());
    }
    let updated = format!("{}{BEGIN}\n{table}{}", &text[..begin], &text[end..]);
    std::fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}
