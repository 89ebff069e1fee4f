//! Partition ownership for state instances (leases in a JetStream KV bucket).
//!
//! Device work is split into [`PARTITIONS`] partitions. Each live state instance runs
//! [`start`]; together they keep every partition owned by exactly one live instance, move the
//! partitions of a dead instance to the others within about the lease TTL, and rebalance to
//! about `PARTITIONS / live_instances` each when an instance joins or leaves.
//!
//! # Bucket layout
//!
//! One KV bucket (default `tether_leases`) with `history = 1` and `max_age = ttl`, so a key
//! that is not rewritten disappears after `ttl`:
//!
//! - `member.<instance_id>`: heartbeat of a live instance (value: the instance id);
//! - `part.<n>`: the lease of partition `n` (value: the owner's instance id).
//!
//! # Protocol (JetStream arbitrates, DESIGN.md "Bus rules")
//!
//! Every `ttl / 3` each instance:
//!
//! 1. puts its `member.` key;
//! 2. renews each partition it owns with a revision-checked update (compare-and-set); a failed
//!    CAS means someone else holds the key now, and the partition is dropped at once;
//! 3. lists the live members and the existing `part.` keys; the target share is
//!    `ceil(PARTITIONS / members)` (skipped in the first round whose heartbeat is stored
//!    after rounds whose heartbeat failed: the others' member keys may have expired too);
//! 4. above the target it releases the excess: it publishes the smaller owned set first, then
//!    deletes the keys with a revision check, so the caller stops working on a partition before
//!    anyone else can take it;
//! 5. below the target it takes free partitions (keys missing, deleted or expired) with
//!    `create`, which fails if the key exists; candidates are tried in a random order per
//!    instance to spread the race.
//!
//! # Safety against stale owners
//!
//! A renewal sent at local time `t` keeps the server-side key alive until at least `t + ttl`
//! (the server stamps the message after we sent it). The instance counts the lease as valid
//! only until `t + ttl * 2/3` and drops the partition from the owned set at that moment if no
//! later renewal succeeded (NATS unreachable, slow server, ...). The remaining `ttl / 3` is the
//! margin for the caller to notice the change. Every NATS operation is bounded by a timeout
//! well below the TTL, so a hung request never delays the drop.
//!
//! This is a lease, not a lock: a process that is frozen longer than the margin (stopped VM,
//! swap storm) can still act on a partition it no longer owns. Writes that must not fork state
//! should keep using revision-checked appends (`Nats-Expected-Last-Subject-Sequence`).
//!
//! On shutdown the instance publishes an empty owned set, then deletes its partition keys and
//! its member key, so the others take over at their next round instead of after the TTL.
//!
//! # Taking over a dead incarnation
//!
//! An instance restarted after a crash (`kill -9`, OOM) with the same stable id finds the
//! keys of its previous process still in the bucket, with its own id as value; nobody may
//! take them before they expire (one TTL after the last renewal), so its partitions are
//! served by no one meanwhile. With [`LeaseConfig::previous_incarnations_dead`] the caller
//! states that it has *proved* that no earlier process with this id is alive: it holds
//! the instance lock (`instance_lock.rs`), which the kernel releases only when the process
//! holding it has ended. Then, once at start, every key whose value is this instance's id
//! is taken over at once with a compare-and-set on the revision read (a key someone else
//! rewrote meanwhile stays theirs).
//!
//! Why this cannot make two live owners: a key with our id as value was written by a
//! process with our id, i.e. by this process or an earlier one; the lock proves the earlier
//! ones are dead, so nothing else works on those partitions (a dead process acts on
//! nothing; the ack-waits and revision checks of its last writes, still on the wire when it
//! died, are the same as after any crash). A key written by another instance has another
//! value and is untouched. Without the proof (no lock directory, or a random id) the keys
//! are left to expire as before.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::seq::SliceRandom;
use tether_nats::subjects::PARTITIONS;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// Default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(6);
/// Default name of the lease bucket.
pub const DEFAULT_BUCKET: &str = tether_nats::layout::LEASES_BUCKET;
/// Smallest TTL accepted: below it the rounds (TTL / 3) race with network round trips.
pub const MIN_TTL: Duration = Duration::from_millis(600);

use tether_nats::keys::{
    LEASE_MEMBER_PREFIX as MEMBER_PREFIX, LEASE_PARTITION_PREFIX as PART_PREFIX,
};

/// Configuration of the lease loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Unique id of this instance among the live ones (letters, digits, `-`, `_`, `=`).
    /// Two live processes with the same id would both believe they own the same partitions.
    pub instance_id: String,
    /// Lease TTL: the bucket's `max_age`; renewals run every `ttl / 3`; a partition that could
    /// not be renewed for `ttl * 2/3` is dropped from the owned set.
    pub ttl: Duration,
    /// Name of the KV bucket (created or updated on start).
    pub bucket: String,
    /// Replicas of the bucket (3 on a cluster).
    pub replicas: usize,
    /// Set ONLY when the caller proved that no earlier process with this `instance_id` is
    /// alive (it holds the instance lock): keys still held under this id at start are
    /// taken over at once instead of after they expire ("Taking over a dead incarnation").
    pub previous_incarnations_dead: bool,
}

impl LeaseConfig {
    /// A configuration with the default TTL, bucket and one replica.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), LeaseError> {
        let id = &self.instance_id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '='))
        {
            return Err(LeaseError::InvalidConfig(format!(
                "instance_id {id:?} must be non-empty and use only letters, digits, '-', '_', '='"
            )));
        }
        if self.ttl < MIN_TTL {
            return Err(LeaseError::InvalidConfig(format!(
                "ttl {:?} is below the minimum {MIN_TTL:?}",
                self.ttl
            )));
        }
        if self.replicas == 0 {
            return Err(LeaseError::InvalidConfig(
                "replicas must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            ttl: DEFAULT_TTL,
            bucket: DEFAULT_BUCKET.into(),
            replicas: 1,
            previous_incarnations_dead: false,
        }
    }
}

/// Errors of [`start`].
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The configuration cannot work (bad instance id, TTL too short, ...).
    #[error("invalid lease configuration: {0}")]
    InvalidConfig(String),
    /// The lease bucket could not be created or updated.
    #[error("lease bucket: {0}")]
    Bucket(#[from] jetstream::context::CreateKeyValueError),
}

/// A running lease loop.
pub struct Leases {
    /// The partitions this instance owns right now. A partition leaves the set before its
    /// lease can be taken by another instance; stop working on it when it does.
    pub owned: watch::Receiver<BTreeSet<u16>>,
    give_up: mpsc::UnboundedSender<u16>,
    task: JoinHandle<()>,
}

impl Leases {
    /// The partitions owned right now.
    pub fn owned_now(&self) -> BTreeSet<u16> {
        self.owned.borrow().clone()
    }

    /// Gives `partition` up (its worker keeps failing): the lease is released at the next
    /// round and not taken again by this instance for a while, so another one serves it.
    pub fn give_up(&self, partition: u16) {
        let _ = self.give_up.send(partition);
    }

    /// Waits until the loop has stopped: after the shutdown token fired and the leases were
    /// released (or the release attempts timed out).
    pub async fn stopped(self) {
        if let Err(err) = self.task.await
            && err.is_panic()
        {
            tracing::error!(error = %err, "lease loop panicked");
        }
    }

    /// Stops the loop at once WITHOUT releasing anything, as a crash would: the keys stay until
    /// they expire (one TTL). For tests and emergencies; use the shutdown token normally.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Creates (or updates) the lease bucket and starts the lease loop in a task.
///
/// The loop runs until `shutdown` fires, then releases this instance's partitions and its
/// membership. `owned` starts empty and follows the partitions this instance owns.
pub async fn start(
    js: jetstream::Context,
    config: LeaseConfig,
    shutdown: CancellationToken,
) -> Result<Leases, LeaseError> {
    let (_never, workers) = watch::channel(BTreeSet::new());
    start_with_workers(js, config, shutdown, workers).await
}

/// Like [`start`], with the set of partitions whose workers still run: a released lease
/// is deleted only after its worker stopped (or after half a TTL; then it expires on its
/// own), so the next owner never runs beside the previous one.
pub async fn start_with_workers(
    js: jetstream::Context,
    config: LeaseConfig,
    shutdown: CancellationToken,
    workers: watch::Receiver<BTreeSet<u16>>,
) -> Result<Leases, LeaseError> {
    config.validate()?;
    // On a fresh replicated cluster the bucket's stream needs a leader first: retry
    // unavailability with backoff (about 30 s in all) before giving up.
    let mut backoff = Duration::from_millis(250);
    let store = loop {
        let created = js
            .create_or_update_key_value(tether_nats::layout::leases_bucket(
                &config.bucket,
                config.ttl,
                config.replicas,
            ))
            .await;
        match created {
            Ok(store) => break store,
            Err(error) if backoff < Duration::from_secs(8) && !shutdown.is_cancelled() => {
                tracing::warn!(%error, retry_in = ?backoff, "lease bucket not ready, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(error) => return Err(error.into()),
        }
    };
    let (tx, rx) = watch::channel(BTreeSet::new());
    let (give_up, given_up) = mpsc::unbounded_channel();
    let looper = Looper::new(store, &config, tx, workers, given_up);
    let task = tokio::spawn(looper.run(shutdown));
    Ok(Leases {
        owned: rx,
        give_up,
        task,
    })
}

/// A held lease.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Revision of our last write of the key (for the next CAS).
    revision: u64,
    /// Local instant after which the lease may be near expiry on the server.
    valid_until: Instant,
}

/// The owned set and its publication; kept apart from the KV handle so futures may borrow the
/// store while the table is updated.
struct Table {
    owned: BTreeMap<u16, Held>,
    tx: watch::Sender<BTreeSet<u16>>,
}

impl Table {
    fn publish(&self) {
        self.tx.send_if_modified(|set| {
            let now: BTreeSet<u16> = self.owned.keys().copied().collect();
            if *set == now {
                false
            } else {
                *set = now;
                true
            }
        });
    }

    fn earliest_expiry(&self) -> Option<Instant> {
        self.owned.values().map(|held| held.valid_until).min()
    }

    /// Drops every lease whose validity ended.
    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.owned.len();
        self.owned.retain(|partition, held| {
            let keep = held.valid_until > now;
            if !keep {
                tracing::warn!(partition, "lease not renewed in time, dropping partition");
            }
            keep
        });
        if self.owned.len() != before {
            self.publish();
        }
    }

    /// Runs `fut` until it completes (`Some`) or `deadline` passes (`None`), dropping leases
    /// at their expiry meanwhile.
    async fn guard<T>(&mut self, fut: impl Future<Output = T>, deadline: Instant) -> Option<T> {
        tokio::pin!(fut);
        loop {
            let wake = self
                .earliest_expiry()
                .map_or(deadline, |expiry| expiry.min(deadline));
            tokio::select! {
                biased;
                () = sleep_until(wake) => {
                    self.expire();
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                out = &mut fut => return Some(out),
            }
        }
    }
}

/// Outcome of one renewal.
enum Renewal {
    /// Renewed: new revision, instant the update was sent.
    Renewed(u64, Instant),
    /// Someone else holds the key, or it expired: the partition is lost.
    Lost,
    /// Transient error: keep the lease until it expires, retry next round.
    Failed,
}

struct Looper {
    store: kv::Store,
    id: String,
    member_key: String,
    ttl: Duration,
    /// Local validity of a lease after the renewal was sent.
    valid_for: Duration,
    /// Interval between rounds.
    period: Duration,
    /// Bound of one phase of NATS operations.
    op_timeout: Duration,
    table: Table,
    /// Partitions whose workers still run.
    workers: watch::Receiver<BTreeSet<u16>>,
    /// Partitions the workers gave up on.
    given_up: mpsc::UnboundedReceiver<u16>,
    /// Partitions not to take again before the instant.
    cooldown: BTreeMap<u16, Instant>,
    /// Take over the keys of a dead earlier process with this id in the first round.
    adopt: bool,
    /// Whether the previous round's heartbeat was stored (see `round`).
    last_beat_ok: bool,
}

fn part_key(partition: u16) -> String {
    tether_nats::keys::lease_partition(partition)
}

impl Looper {
    fn new(
        store: kv::Store,
        config: &LeaseConfig,
        tx: watch::Sender<BTreeSet<u16>>,
        workers: watch::Receiver<BTreeSet<u16>>,
        given_up: mpsc::UnboundedReceiver<u16>,
    ) -> Self {
        let ttl = config.ttl;
        Self {
            store,
            id: config.instance_id.clone(),
            member_key: tether_nats::keys::lease_member(&config.instance_id),
            ttl,
            valid_for: ttl * 2 / 3,
            period: ttl / 3,
            op_timeout: ttl / 4,
            table: Table {
                owned: BTreeMap::new(),
                tx,
            },
            workers,
            given_up,
            cooldown: BTreeMap::new(),
            adopt: config.previous_incarnations_dead,
            last_beat_ok: true,
        }
    }

    /// Takes over, by compare-and-set, the partition keys whose value is this instance's
    /// id: written by a dead earlier process with this id (see the module doc; only called
    /// with that proof). Returns how many were taken.
    async fn adopt_previous(&mut self) -> usize {
        let deadline = Instant::now() + self.op_timeout;
        let listed = self.table.guard(list(&self.store), deadline).await;
        let Some(Ok((_, taken))) = listed else {
            tracing::warn!(
                "listing lease bucket failed; an earlier process's leases expire instead"
            );
            return 0;
        };
        let store = &self.store;
        let id = &self.id;
        let mut pending: FuturesUnordered<_> = taken
            .into_iter()
            .map(|partition| async move {
                let key = part_key(partition);
                let entry = match store.entry(key.as_str()).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() == id.as_bytes() =>
                    {
                        entry
                    }
                    _ => return None,
                };
                let sent = Instant::now();
                store
                    .update(&key, id.as_bytes().to_vec().into(), entry.revision)
                    .await
                    .ok()
                    .map(|revision| (partition, revision, sent))
            })
            .collect();
        let deadline = Instant::now() + self.op_timeout;
        let mut adopted = 0;
        while let Some(Some(outcome)) = self.table.guard(pending.next(), deadline).await {
            if let Some((partition, revision, sent)) = outcome {
                self.table.owned.insert(
                    partition,
                    Held {
                        revision,
                        valid_until: sent + self.valid_for,
                    },
                );
                self.table.publish();
                adopted += 1;
            }
        }
        adopted
    }

    /// Waits (at most half a TTL) until none of `partitions` has a running worker.
    async fn wait_workers_stopped(&mut self, partitions: &[u16]) {
        let deadline = Instant::now() + self.ttl / 2;
        loop {
            let running = {
                let workers = self.workers.borrow_and_update();
                partitions.iter().any(|p| workers.contains(p))
            };
            if !running {
                return;
            }
            let workers = &mut self.workers;
            match self.table.guard(workers.changed(), deadline).await {
                Some(Ok(())) => {}
                // No manager (plain `start`) or the deadline: the keys expire on their own.
                Some(Err(_)) => return,
                None => {
                    tracing::warn!(
                        ?partitions,
                        "workers still running after half a ttl; leases left to expire"
                    );
                    return;
                }
            }
        }
    }

    /// Releases the partitions whose workers gave up, and keeps them for a cooldown.
    async fn release_given_up(&mut self) {
        let mut released = Vec::new();
        while let Ok(partition) = self.given_up.try_recv() {
            self.cooldown
                .insert(partition, Instant::now() + self.ttl * 5);
            if let Some(held) = self.table.owned.remove(&partition) {
                released.push((partition, held.revision));
            }
        }
        if released.is_empty() {
            return;
        }
        self.table.publish();
        tracing::warn!(partitions = ?released.iter().map(|(p, _)| *p).collect::<Vec<_>>(), "releasing leases of failing partitions");
        let partitions: Vec<u16> = released.iter().map(|(p, _)| *p).collect();
        self.wait_workers_stopped(&partitions).await;
        self.delete_keys(&released).await;
    }

    async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(instance = %self.id, ttl = ?self.ttl, "lease loop started");
        if std::mem::take(&mut self.adopt) {
            let adopted = self.adopt_previous().await;
            if adopted > 0 {
                tracing::info!(
                    adopted,
                    "took over the leases of a dead earlier process of this instance"
                );
            }
        }
        let mut next_round = Instant::now();
        loop {
            if self
                .table
                .guard(shutdown.cancelled(), next_round)
                .await
                .is_some()
            {
                break;
            }
            let started = Instant::now();
            self.round(&shutdown).await;
            // Rounds start on a fixed cadence; a slow round does not push the next one out.
            next_round = (next_round + self.period).max(started);
            if next_round < Instant::now() {
                next_round = Instant::now();
            }
        }
        self.release_all().await;
        tracing::info!(instance = %self.id, "lease loop stopped");
    }

    async fn round(&mut self, shutdown: &CancellationToken) {
        // 1. Heartbeat.
        let deadline = Instant::now() + self.op_timeout;
        let put = self
            .store
            .put(&self.member_key, self.id.clone().into_bytes().into());
        let beat = match self.table.guard(put, deadline).await {
            Some(Ok(_)) => true,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "lease heartbeat failed");
                false
            }
            None => {
                tracing::warn!("lease heartbeat timed out");
                false
            }
        };
        // After rounds whose heartbeat failed (the bucket had no leader, or NATS was out of
        // reach), the other instances' member keys may have expired as ours did: a listing
        // now would count too few members and take too many partitions, only to release
        // them again a round later (partitions served by no one meanwhile). So the first
        // round with a heartbeat again does not rebalance; by the next one every live
        // instance has put its member key again.
        let rebalance = beat && self.last_beat_ok;
        self.last_beat_ok = beat;

        // 2. Renew what we own (after letting go of partitions whose workers gave up).
        self.release_given_up().await;
        self.renew_all().await;
        if shutdown.is_cancelled() {
            return;
        }

        if !rebalance {
            return;
        }

        // 3. Who is alive, which partitions are taken.
        let deadline = Instant::now() + self.op_timeout;
        let (members, taken) = match self.table.guard(list(&self.store), deadline).await {
            Some(Ok(listing)) => listing,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "listing lease bucket failed, no rebalance this round");
                return;
            }
            None => {
                tracing::warn!("listing lease bucket timed out, no rebalance this round");
                return;
            }
        };
        let mut members = members;
        members.insert(self.id.clone());
        let target = usize::from(PARTITIONS).div_ceil(members.len());
        tracing::trace!(
            members = members.len(),
            target,
            owned = self.table.owned.len(),
            "lease round"
        );

        // 4./5. Rebalance.
        if self.table.owned.len() > target {
            self.release_excess(target).await;
        } else if self.table.owned.len() < target {
            self.acquire(target, &taken, shutdown).await;
        }
    }

    async fn renew_all(&mut self) {
        if self.table.owned.is_empty() {
            return;
        }
        let store = &self.store;
        let id = &self.id;
        let mut pending: FuturesUnordered<_> = self
            .table
            .owned
            .iter()
            .map(|(&partition, held)| {
                let revision = held.revision;
                async move { (partition, renew(store, id, partition, revision).await) }
            })
            .collect();
        let deadline = Instant::now() + self.op_timeout;
        while let Some(Some((partition, outcome))) =
            self.table.guard(pending.next(), deadline).await
        {
            match outcome {
                Renewal::Renewed(revision, sent) => {
                    // Re-inserting after an expiry drop is safe: the write we just made keeps
                    // the key ours until at least `sent + ttl`.
                    self.table.owned.insert(
                        partition,
                        Held {
                            revision,
                            valid_until: sent + self.valid_for,
                        },
                    );
                }
                Renewal::Lost => {
                    tracing::warn!(partition, "lease lost to another instance or expired");
                    self.table.owned.remove(&partition);
                }
                Renewal::Failed => {}
            }
            self.table.publish();
        }
        drop(pending);
        self.table.expire();
        self.table.publish();
    }

    async fn release_excess(&mut self, target: usize) {
        let excess = self.table.owned.len().saturating_sub(target);
        let mut owned: Vec<u16> = self.table.owned.keys().copied().collect();
        owned.shuffle(&mut rand::thread_rng());
        let mut released = Vec::with_capacity(excess);
        for partition in owned.into_iter().take(excess) {
            if let Some(held) = self.table.owned.remove(&partition) {
                released.push((partition, held.revision));
            }
        }
        // The caller hears about the release before anyone else can take the partitions,
        // and the keys go only once its workers stopped.
        self.table.publish();
        tracing::info!(partitions = ?released.iter().map(|(p, _)| *p).collect::<Vec<_>>(), target, "releasing leases for rebalance");
        let partitions: Vec<u16> = released.iter().map(|(p, _)| *p).collect();
        self.wait_workers_stopped(&partitions).await;
        self.delete_keys(&released).await;
    }

    async fn acquire(
        &mut self,
        target: usize,
        taken: &BTreeSet<u16>,
        shutdown: &CancellationToken,
    ) {
        let now = Instant::now();
        self.cooldown.retain(|_, until| *until > now);
        let mut candidates: Vec<u16> = (0..PARTITIONS)
            .filter(|p| {
                !taken.contains(p)
                    && !self.table.owned.contains_key(p)
                    && !self.cooldown.contains_key(p)
            })
            .collect();
        candidates.shuffle(&mut rand::thread_rng());
        // Taking stops in time for the next round's renewals.
        let phase_end = Instant::now() + self.period;
        for partition in candidates {
            if self.table.owned.len() >= target || shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if now >= phase_end {
                break;
            }
            let key = part_key(partition);
            let create = self.store.create(&key, self.id.clone().into_bytes().into());
            match self.table.guard(create, now + self.op_timeout).await {
                Some(Ok(revision)) => {
                    self.table.owned.insert(
                        partition,
                        Held {
                            revision,
                            valid_until: now + self.valid_for,
                        },
                    );
                    self.table.publish();
                    tracing::debug!(partition, "lease taken");
                }
                Some(Err(err)) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Some(Err(err)) => {
                    tracing::warn!(partition, error = %err, "taking lease failed");
                    break;
                }
                None => {
                    // The create may still land: the key then expires after one TTL.
                    tracing::warn!(partition, "taking lease timed out");
                    break;
                }
            }
        }
    }

    /// Deletes partition keys with a revision check (a key someone else rewrote stays theirs).
    async fn delete_keys(&mut self, keys: &[(u16, u64)]) {
        if keys.is_empty() {
            return;
        }
        let store = &self.store;
        let mut pending: FuturesUnordered<_> = keys
            .iter()
            .map(|&(partition, revision)| async move {
                let result = store
                    .delete_expect_revision(part_key(partition), Some(revision))
                    .await;
                (partition, result)
            })
            .collect();
        let deadline = Instant::now() + self.op_timeout;
        while let Some(Some((partition, result))) = self.table.guard(pending.next(), deadline).await
        {
            if let Err(err) = result {
                // It expires on its own within one TTL.
                tracing::debug!(partition, error = %err, "releasing lease failed");
            }
        }
    }

    async fn release_all(&mut self) {
        let released: Vec<(u16, u64)> = self
            .table
            .owned
            .iter()
            .map(|(&partition, held)| (partition, held.revision))
            .collect();
        self.table.owned.clear();
        self.table.publish();
        let partitions: Vec<u16> = released.iter().map(|(p, _)| *p).collect();
        self.wait_workers_stopped(&partitions).await;
        self.delete_keys(&released).await;
        let deadline = Instant::now() + self.op_timeout;
        let delete = self.store.delete(&self.member_key);
        match self.table.guard(delete, deadline).await {
            Some(Ok(())) => {}
            Some(Err(err)) => tracing::debug!(error = %err, "removing membership failed"),
            None => tracing::debug!("removing membership timed out"),
        }
        tracing::info!(released = released.len(), "leases released");
    }
}

/// Renews one lease by compare-and-set. A CAS that fails because our own previous write was
/// applied but its acknowledgement lost (timeout) is recovered by reading the key back.
async fn renew(store: &kv::Store, id: &str, partition: u16, revision: u64) -> Renewal {
    let key = part_key(partition);
    let sent = Instant::now();
    match store
        .update(&key, id.as_bytes().to_vec().into(), revision)
        .await
    {
        Ok(revision) => Renewal::Renewed(revision, sent),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            match store.entry(key.as_str()).await {
                Ok(Some(entry))
                    if entry.operation == kv::Operation::Put
                        && entry.value.as_ref() == id.as_bytes() =>
                {
                    let sent = Instant::now();
                    match store
                        .update(&key, id.as_bytes().to_vec().into(), entry.revision)
                        .await
                    {
                        Ok(revision) => Renewal::Renewed(revision, sent),
                        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            Renewal::Lost
                        }
                        Err(_) => Renewal::Failed,
                    }
                }
                Ok(_) => Renewal::Lost,
                Err(_) => Renewal::Failed,
            }
        }
        Err(err) => {
            tracing::debug!(partition, error = %err, "lease renewal failed");
            Renewal::Failed
        }
    }
}

/// Live members and taken partitions, from the keys of the bucket.
async fn list(
    store: &kv::Store,
) -> Result<(BTreeSet<String>, BTreeSet<u16>), Box<dyn std::error::Error + Send + Sync>> {
    let mut keys = store.keys().await?;
    let mut members = BTreeSet::new();
    let mut taken = BTreeSet::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(member) = key.strip_prefix(MEMBER_PREFIX) {
            members.insert(member.to_owned());
        } else if let Some(partition) = key.strip_prefix(PART_PREFIX)
            && let Ok(partition) = partition.parse::<u16>()
        {
            taken.insert(partition);
        }
    }
    Ok((members, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(LeaseConfig::new("state-1").validate().is_ok());
        assert!(LeaseConfig::new("").validate().is_err());
        assert!(LeaseConfig::new("a.b").validate().is_err());
        assert!(LeaseConfig::new("a b").validate().is_err());
        let short = LeaseConfig {
            ttl: Duration::from_millis(100),
            ..LeaseConfig::new("x")
        };
        assert!(short.validate().is_err());
    }

    #[test]
    fn target_share() {
        let target = |members: usize| usize::from(PARTITIONS).div_ceil(members);
        assert_eq!(target(1), 32);
        assert_eq!(target(2), 16);
        assert_eq!(target(3), 11);
        assert!(target(3) * 3 >= usize::from(PARTITIONS));
    }
}
