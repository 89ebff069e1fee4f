//! Partition workers under supervision.
//!
//! Every partition this instance owns has one worker. A worker that fails (an error such
//! as a 503 during a leader election, or a panic) is restarted with backoff; after
//! [`GIVE_UP_AFTER`] failures in a row the lease is given up so another instance serves
//! the partition. A released partition's worker is stopped and awaited before its lease is
//! deleted, and a new worker for a partition starts only once the previous one has ended:
//! two workers never serve one partition. `/healthz` names the partitions failing now.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tether_service::Shutdown;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::context::StateCtx;
use crate::leases::Leases;
use crate::partition::Partition;

/// Consecutive failures after which a worker gives its partition up.
pub const GIVE_UP_AFTER: u32 = 5;

/// Partitions whose workers are failing right now (for `/healthz`).
#[derive(Clone, Default)]
pub struct Failing(Arc<Mutex<BTreeSet<u16>>>);

impl Failing {
    fn set(&self, partition: u16, failing: bool) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if failing {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }

    /// The failing partitions.
    pub fn now(&self) -> BTreeSet<u16> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The `/healthz` check: ok when no partition is failing.
    pub fn check(&self) -> (bool, String) {
        let failing = self.now();
        if failing.is_empty() {
            (true, "all owned partitions served".into())
        } else {
            (false, format!("partitions failing: {failing:?}"))
        }
    }
}

/// Runs workers for the partitions this instance owns until `shutdown`.
pub async fn manage_partitions(
    ctx: Arc<StateCtx>,
    leases: Leases,
    workers: watch::Sender<BTreeSet<u16>>,
    failing: Failing,
    shutdown: Shutdown,
) {
    let leases = Arc::new(leases);
    let mut owned_rx = leases.owned.clone();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<u16>();
    // Running workers (owned) and stopping ones (released, not yet ended).
    let mut running: BTreeMap<u16, Shutdown> = BTreeMap::new();
    let mut alive: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
    loop {
        let owned: BTreeSet<u16> = owned_rx.borrow_and_update().clone();
        running.retain(|partition, stop| {
            let keep = owned.contains(partition);
            if !keep {
                tracing::info!(partition, "partition released, stopping its worker");
                stop.cancel();
            }
            keep
        });
        for partition in owned {
            // A new worker waits until the previous one for the partition has ended.
            if running.contains_key(&partition) || alive.contains_key(&partition) {
                continue;
            }
            let stop = shutdown.child_token();
            let task = tokio::spawn(supervise(
                ctx.clone(),
                partition,
                stop.clone(),
                leases.clone(),
                failing.clone(),
                ended_tx.clone(),
            ));
            running.insert(partition, stop);
            alive.insert(partition, task);
        }
        workers.send_replace(alive.keys().copied().collect());
        ctx.metrics.partitions.set(running.len() as i64);
        tokio::select! {
            changed = owned_rx.changed() => if changed.is_err() { break },
            Some(partition) = ended_rx.recv() => {
                alive.remove(&partition);
                running.remove(&partition);
            }
            _ = shutdown.cancelled() => break,
        }
    }
    for stop in running.values() {
        stop.cancel();
    }
    for (_, task) in std::mem::take(&mut alive) {
        let _ = task.await;
    }
    workers.send_replace(BTreeSet::new());
    drop(owned_rx);
    if let Ok(leases) = Arc::try_unwrap(leases) {
        leases.stopped().await;
    }
}

/// A worker attempt that served this long before failing resets the failure count.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs one partition's worker until `stop`, restarting it after failures.
async fn supervise(
    ctx: Arc<StateCtx>,
    partition: u16,
    stop: Shutdown,
    leases: Arc<Leases>,
    failing: Failing,
    ended: mpsc::UnboundedSender<u16>,
) {
    let mut failures = 0u32;
    let mut restarted = false;
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        let started = tokio::time::Instant::now();
        let first_attempt = failures == 0 && !restarted;
        restarted = true;
        let attempt = tokio::spawn(Partition::run(
            ctx.clone(),
            partition,
            stop.clone(),
            first_attempt,
        ));
        let outcome = attempt.await;
        if started.elapsed() >= HEALTHY_RUN {
            // A worker that served for a while before failing starts a new count: only
            // failures close together give the lease up.
            failures = 0;
            backoff = Duration::from_millis(500);
        }
        let error = match outcome {
            Ok(Ok(())) => break,
            Ok(Err(error)) => error,
            Err(join) if join.is_panic() => "worker panicked".to_string(),
            Err(join) => join.to_string(),
        };
        failures += 1;
        ctx.metrics.partition_failures.inc();
        failing.set(partition, true);
        ctx.metrics
            .partitions_failing
            .set(failing.now().len() as i64);
        tracing::error!(partition, failures, %error, retry_in = ?backoff, "partition worker failed");
        if failures >= GIVE_UP_AFTER {
            tracing::error!(partition, "partition keeps failing; giving its lease up");
            leases.give_up(partition);
            stop.cancelled().await;
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    failing.set(partition, false);
    ctx.metrics
        .partitions_failing
        .set(failing.now().len() as i64);
    let _ = ended.send(partition);
}
