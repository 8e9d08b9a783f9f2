//! An operator run as a separate process, measured from outside: its peak
//! resident memory (`VmHWM`) and CPU time (`utime + stime`) from /proc, its
//! own `/metrics`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::stats::{self, Sample};

/// Resource use of a process so far.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Peak resident set size (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Current resident set size (VmRSS), MiB.
    pub rss_mib: f64,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
}

/// A child process we started; killed on drop if still running.
pub struct Proc {
    pub name: String,
    child: Child,
    pub pid: u32,
    pidfile: PathBuf,
    pub log: PathBuf,
    pub started: Instant,
    clock_ticks: f64,
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux everywhere).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

impl Proc {
    /// Starts `program args` with `envs`, output to `log` (truncated); records the
    /// pid in `pids_dir` so an interrupted bench's leftovers can be stopped.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: &Path,
        pids_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        std::fs::create_dir_all(pids_dir)?;
        let pidfile = pids_dir.join(format!("{name}-{pid}.pid"));
        std::fs::write(&pidfile, pid.to_string())?;
        Ok(Proc {
            name: name.to_string(),
            child,
            pid,
            pidfile,
            log: log.to_path_buf(),
            started: Instant::now(),
            clock_ticks: clock_ticks(),
        })
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Memory and CPU used so far.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("reading /proc/{}/status", self.pid))?;
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line (11 and 12 after the name).
        let after_name = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
        Ok(Usage {
            peak_rss_mib: kib("VmHWM:") / 1024.0,
            rss_mib: kib("VmRSS:") / 1024.0,
            cpu_s: (ticks(11) + ticks(12)) / self.clock_ticks,
        })
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Polls `url` until it answers 200; returns the time since the process started.
    pub async fn wait_http_ok(&mut self, url: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if !self.alive() {
                bail!("{} exited; last log lines:\n{}", self.name, self.log_tail());
            }
            if let Ok(resp) = http.get(url).send().await
                && resp.status().is_success()
            {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer {url} within {timeout:?}; last log lines:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s) and returns its
    /// final usage, read just before the signal.
    pub async fn stop(mut self) -> Usage {
        let usage = self.usage().unwrap_or_default();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        usage
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Fetches and parses a `/metrics` endpoint.
pub async fn scrape(url: &str) -> anyhow::Result<Vec<Sample>> {
    let text = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(stats::parse_prometheus(&text))
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}
