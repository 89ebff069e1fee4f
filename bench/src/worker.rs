//! Load-generator worker processes: the tool re-executes itself as
//! `tether bench conns-worker '<spec json>'` to hold more sockets than one process may
//! (20,000 fds here).
//!
//! A worker opens its share of the connections, prints `P <ok> <failed>` lines while it
//! goes and one `R <json>` line with its results, then holds the sockets until its stdin
//! closes (or it is killed). The parent kills its workers when it drops [`Workers`].

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tether_auth::TokenSigner;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::stack::locate_tether;
use crate::{BenchError, procfs, stats};

/// What one worker opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The connections' plan (this worker's share of the rate).
    pub plan: Plan,
    /// Token signing key for Tether LOGINs.
    pub key: Option<std::path::PathBuf>,
    /// First connection index.
    pub start: usize,
    /// One past the last connection index.
    pub end: usize,
}

/// What a worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResult {
    /// Connections accepted and held.
    pub ok: usize,
    /// Connections that failed.
    pub failed: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// First connect → last completion, seconds.
    pub elapsed_s: f64,
    /// Login latency histogram ([`stats::encode`]).
    pub latency: String,
    /// The worker's RSS after opening, KiB.
    pub rss_kb: u64,
}

/// Body of `tether bench conns-worker`.
pub async fn worker_main(spec_json: &str) -> Result<(), BenchError> {
    let spec: WorkerSpec = serde_json::from_str(spec_json)
        .map_err(|e| BenchError::Args(format!("worker spec: {e}")))?;
    rlimit::increase_nofile_limit(u64::MAX).map_err(BenchError::io("raise RLIMIT_NOFILE"))?;
    let signer = spec
        .key
        .as_deref()
        .map(TokenSigner::from_file)
        .transpose()
        .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?;
    let last = std::sync::Mutex::new(Instant::now());
    let opened = fleet::open(
        &spec.plan,
        signer.as_ref(),
        spec.start..spec.end,
        |ok, failed| {
            if let Ok(mut last) = last.lock()
                && last.elapsed() > Duration::from_millis(200)
            {
                *last = Instant::now();
                println!("P {ok} {failed}");
            }
        },
    )
    .await?;
    let result = WorkerResult {
        ok: opened.conns.len(),
        failed: opened.failed,
        first_error: opened.first_error.clone(),
        elapsed_s: opened.elapsed.as_secs_f64(),
        latency: stats::encode(&opened.latency),
        rss_kb: procfs::self_rss_kb().unwrap_or(0),
    };
    println!("P {} {}", result.ok, result.failed);
    println!(
        "R {}",
        serde_json::to_string(&result).map_err(|e| BenchError::Setup(e.to_string()))?
    );
    // Hold the sockets until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(opened);
    Ok(())
}

/// Running workers and their results; dropping it kills them.
pub struct Workers {
    _children: Vec<Child>,
    results: Vec<WorkerResult>,
}

impl Workers {
    /// (held, failed, first error, merged latency, slowest elapsed, summed RSS KiB)
    pub fn summary(&self) -> (usize, usize, Option<String>, Histogram<u64>, Duration, u64) {
        let mut latency = stats::histogram();
        for r in &self.results {
            if let Some(h) = stats::decode(&r.latency) {
                let _ = latency.add(&h);
            }
        }
        (
            self.results.iter().map(|r| r.ok).sum(),
            self.results.iter().map(|r| r.failed).sum(),
            self.results.iter().find_map(|r| r.first_error.clone()),
            latency,
            Duration::from_secs_f64(self.results.iter().map(|r| r.elapsed_s).fold(0.0, f64::max)),
            self.results.iter().map(|r| r.rss_kb).sum(),
        )
    }
}

/// Starts `workers` processes that together open `total` connections of `plan`, and
/// waits until each has reported.
pub async fn spawn_all(
    plan: &Plan,
    key: Option<&Path>,
    total: usize,
    workers: usize,
    progress: &Progress,
) -> Result<Workers, BenchError> {
    let tether = locate_tether()?;
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let mut children = Vec::with_capacity(workers);
    let mut pending = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut share = plan.clone();
        share.rate = plan.rate.div_ceil(workers as u32).max(1);
        let spec = WorkerSpec {
            plan: share,
            key: key.map(Path::to_path_buf),
            start: w * total / workers,
            end: (w + 1) * total / workers,
        };
        let json = serde_json::to_string(&spec).map_err(|e| BenchError::Setup(e.to_string()))?;
        let mut child = Command::new(&tether)
            .args(["bench", "conns-worker", &json])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(BenchError::io(format!("start worker {}", tether.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Setup("worker without stdout".into()))?;
        let (tx, rx) = oneshot::channel();
        let (done, progress) = (done.clone(), progress.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("P ") {
                    let n: u64 = rest.split(' ').filter_map(|x| x.parse::<u64>().ok()).sum();
                    done[w].store(n, Ordering::Relaxed);
                    progress.set(done.iter().map(|d| d.load(Ordering::Relaxed)).sum());
                } else if let Some(json) = line.strip_prefix("R ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(serde_json::from_str::<WorkerResult>(json));
                }
            }
        });
        children.push(child);
        pending.push(rx);
    }
    let mut results = Vec::with_capacity(workers);
    for (w, rx) in pending.into_iter().enumerate() {
        match rx.await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(e)) => {
                return Err(BenchError::Setup(format!("worker {w}: bad report: {e}")));
            }
            Err(_) => {
                return Err(BenchError::Setup(format!(
                    "worker {w} ended without a report"
                )));
            }
        }
    }
    Ok(Workers {
        _children: children,
        results,
    })
}
