//! Drain and migration by REDIRECT (PROTOCOL.md 10.7, DESIGN.md flow 8).
//!
//! A migration chooses connections (some dids, a share, or all), and at most `rate` per
//! second asks ipconfig for tokens bound to a target gateway (`tether.gw.<gw>.redirect.req`),
//! then queues REDIRECT to each device. A redirected connection keeps serving until it
//! leaves: state's `close` for it (the device's new login was registered elsewhere) closes it
//! without an ERROR frame, or the device closes it after its new LOGIN_ACK. One that has not
//! left after `migrate_timeout_secs` is closed with `going_away`. At most
//! `migrate_window` redirected connections are on their way at once. A drain marks the gateway
//! draining and migrates every connection, newcomers included, until none is left.
//! One migration runs at a time; starting one replaces the running one.
//!
//! After a hand-off (docs/handoff.md "TLS") the old process migrates the connections that
//! could not move (TLS) back to its own gateway id, whose listeners the successor now
//! serves (`handoff` redirect tokens), or to another gateway when ipconfig cannot offer it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rand::seq::SliceRandom;
use tether_nats::subjects;
use tether_schemas::bus::{
    DrainRequest, MigrateRequest, MigrationStatus, RedirectDevice, RedirectGrant, RedirectReply,
    RedirectRequest, migrate::MAX_REDIRECT_BATCH, migrate::TARGET_IPCONFIG,
};
use tether_schemas::{ErrorCode, Frame, pb};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::{CloseReason, ConnShared};
use crate::context::GatewayCtx;
use crate::heartbeat::Heartbeat;

/// How often a migration sends a batch and checks its redirected connections.
const TICK: Duration = Duration::from_millis(50);
/// How long a redirect-token request may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What started a migration (the REDIRECT `reason` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The `migrate` op.
    Migrate,
    /// The `drain` op.
    Drain,
    /// The gateway is stopping (SIGTERM).
    Shutdown,
    /// The old process after a hand-off: its TLS connections go to the successor.
    Handoff,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Migrate => "migrate",
            Kind::Drain => "drain",
            Kind::Shutdown => "shutdown",
            Kind::Handoff => "handoff",
        }
    }
}

/// Which connections a migration moves.
#[derive(Debug, Clone)]
enum Selection {
    Dids {
        app: String,
        dids: Vec<String>,
    },
    Share {
        app: Option<String>,
        share: f64,
    },
    /// Every connection (of the app), newcomers too.
    All {
        app: Option<String>,
    },
    /// These connections (those still here).
    Conns(Vec<Arc<ConnShared>>),
}

/// A redirected connection still here.
struct Pending {
    conn: Arc<ConnShared>,
    deadline: Instant,
}

#[derive(Default)]
struct Inner {
    status: MigrationStatus,
    job: Option<CancellationToken>,
    pending: HashMap<u64, Pending>,
}

/// The gateway's migration: at most one running, its status, its redirected connections.
#[derive(Default)]
pub struct Migration {
    heartbeat: OnceLock<Arc<Heartbeat>>,
    inner: Mutex<Inner>,
}

impl Migration {
    /// Connects the draining flag (set once the heartbeat exists).
    pub fn set_heartbeat(&self, heartbeat: Arc<Heartbeat>) {
        let _ = self.heartbeat.set(heartbeat);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn draining(&self) -> bool {
        self.heartbeat.get().is_some_and(|h| h.is_draining())
    }

    fn set_draining(&self, draining: bool) {
        if let Some(heartbeat) = self.heartbeat.get() {
            heartbeat.set_draining(draining);
        }
    }

    /// Where the migration stands (redirected connections that left are counted first).
    pub fn status(&self, ctx: &GatewayCtx) -> MigrationStatus {
        self.sweep(ctx);
        let inner = self.lock();
        let mut status = inner.status.clone();
        status.gw = ctx.config.id.clone();
        status.draining = self.draining();
        status.running = inner.job.is_some();
        status.pending = inner.pending.len() as u64;
        status.connections = ctx.registry.len() as u64;
        status
    }

    /// Whether `conn` was redirected and has not left yet.
    pub fn is_pending(&self, conn: u64) -> bool {
        self.lock().pending.contains_key(&conn)
    }

    /// Whether a migration is running.
    pub fn is_running(&self) -> bool {
        self.lock().job.is_some()
    }

    /// Starts a `migrate` op (replacing a running migration).
    pub fn migrate(
        &self,
        ctx: &Arc<GatewayCtx>,
        request: &MigrateRequest,
    ) -> Result<MigrationStatus, String> {
        request.validate()?;
        let selection = if request.all {
            Selection::All {
                app: request.app.clone(),
            }
        } else if let Some(share) = request.share {
            Selection::Share {
                app: request.app.clone(),
                share,
            }
        } else {
            Selection::Dids {
                app: request.app.clone().unwrap_or_default(),
                dids: request.dids.clone(),
            }
        };
        self.start(
            ctx,
            Kind::Migrate,
            selection,
            request.target(),
            request.rate,
        );
        Ok(self.status(ctx))
    }

    /// Marks the gateway draining and moves every connection away.
    pub fn drain(
        &self,
        ctx: &Arc<GatewayCtx>,
        request: &DrainRequest,
        kind: Kind,
    ) -> Result<MigrationStatus, String> {
        let target = request.target.as_deref().unwrap_or(TARGET_IPCONFIG);
        if target != TARGET_IPCONFIG && !tether_schemas::bus::valid_id(target) {
            return Err(format!(
                "target {target:?} is not a gateway id or \"ipconfig\""
            ));
        }
        if request.rate == Some(0) {
            return Err("rate must be positive".into());
        }
        self.set_draining(true);
        self.start(
            ctx,
            kind,
            Selection::All { app: None },
            target,
            request.rate,
        );
        Ok(self.status(ctx))
    }

    /// The old process after a hand-off: redirects `conns` (its TLS connections) to this
    /// gateway id, now served by the successor, or elsewhere when that cannot be granted.
    pub fn hand_off(&self, ctx: &Arc<GatewayCtx>, conns: Vec<Arc<ConnShared>>) {
        let target = ctx.config.id.clone();
        self.start(ctx, Kind::Handoff, Selection::Conns(conns), &target, None);
    }

    /// Stops a running migration and clears the draining flag.
    pub fn undrain(&self, ctx: &GatewayCtx) -> MigrationStatus {
        self.stop();
        self.set_draining(false);
        self.status(ctx)
    }

    /// Waits until no connection is left, the migration is over, or `bound` has passed;
    /// then stops it and returns its status (what the shutdown drain and a hand-off's
    /// TLS redirects report).
    pub async fn finish_within(&self, ctx: &GatewayCtx, bound: Duration) -> MigrationStatus {
        let deadline = tokio::time::Instant::now() + bound;
        while !ctx.registry.is_empty()
            && self.is_running()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
        self.status(ctx)
    }

    /// Stops a running migration (redirected connections stay pending).
    pub fn stop(&self) {
        let mut inner = self.lock();
        if let Some(job) = inner.job.take() {
            job.cancel();
            inner.status.finished_ms = tether_auth::unix_now_ms();
        }
    }

    fn start(
        &self,
        ctx: &Arc<GatewayCtx>,
        kind: Kind,
        selection: Selection,
        target: &str,
        rate: Option<u32>,
    ) {
        let rate = rate.unwrap_or(ctx.config.migrate_rate).max(1);
        let token = CancellationToken::new();
        {
            let mut inner = self.lock();
            if let Some(job) = inner.job.replace(token.clone()) {
                job.cancel();
            }
            inner.status = MigrationStatus {
                kind: kind.as_str().into(),
                target: target.into(),
                rate,
                started_ms: tether_auth::unix_now_ms(),
                ..MigrationStatus::default()
            };
        }
        let job = Job {
            ctx: ctx.clone(),
            kind,
            selection,
            target: target.into(),
            rate,
            token,
        };
        let queue = job.choose(&HashSet::new());
        self.lock().status.selected = queue.len() as u64;
        tracing::info!(gw = %ctx.config.id, kind = kind.as_str(), target, rate, selected = queue.len(), "migration started");
        tokio::spawn(job.run(queue));
    }

    /// Counts and forgets redirected connections that left; closes those past their deadline
    /// with `going_away`. Returns how many are still pending.
    fn sweep(&self, ctx: &GatewayCtx) -> usize {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut moved = 0;
        let mut late = Vec::new();
        inner.pending.retain(|_, pending| {
            let conn = &pending.conn;
            let here = conn.identity().is_some_and(|id| {
                ctx.registry
                    .get(id.app(), id.did())
                    .is_some_and(|c| c.id == conn.id)
            });
            if !here {
                moved += 1;
                return false;
            }
            if now >= pending.deadline {
                if !conn.is_closing() {
                    late.push(conn.clone());
                }
                return false;
            }
            true
        });
        inner.status.moved += moved;
        inner.status.timed_out += late.len() as u64;
        let left = inner.pending.len();
        drop(inner);
        for _ in 0..moved {
            ctx.metrics.migration("moved");
        }
        for conn in late {
            ctx.metrics.migration("timed_out");
            ctx.metrics.error(ErrorCode::GoingAway);
            conn.close(CloseReason::error(
                ErrorCode::GoingAway,
                "did not follow the redirect in time",
            ));
        }
        left
    }

    /// Ends the job `token` (if it is still the running one).
    fn finish(&self, token: &CancellationToken, error: Option<String>) {
        let mut inner = self.lock();
        if inner.job.as_ref().is_some_and(|j| j == token) {
            inner.job = None;
            inner.status.finished_ms = tether_auth::unix_now_ms();
            inner.status.error = error;
        }
    }
}

/// One running migration.
struct Job {
    ctx: Arc<GatewayCtx>,
    kind: Kind,
    selection: Selection,
    target: String,
    rate: u32,
    token: CancellationToken,
}

impl Job {
    async fn run(self, mut queue: VecDeque<Arc<ConnShared>>) {
        let migration = &self.ctx.migration;
        // A connection still logging in is put back and chosen again by a refill.
        let refill = matches!(self.selection, Selection::All { .. } | Selection::Conns(_));
        let everyone = matches!(self.selection, Selection::All { .. });
        let mut tried: HashSet<u64> = queue.iter().map(|c| c.id).collect();
        let mut budget = 0.0_f64;
        let burst = (f64::from(self.rate) / 5.0).max(1.0);
        let mut last = Instant::now();
        let mut error = None;
        let mut sending = true;
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            let now = Instant::now();
            budget = (budget + f64::from(self.rate) * (now - last).as_secs_f64()).min(burst);
            last = now;
            let pending = migration.sweep(&self.ctx);
            if sending && queue.is_empty() && refill {
                let more = self.choose(&tried);
                tried.extend(more.iter().map(|c| c.id));
                migration.lock().status.selected += more.len() as u64;
                queue = more;
            }
            if !sending || queue.is_empty() {
                let done = if everyone && sending {
                    self.ctx.registry.is_empty()
                } else {
                    pending == 0
                };
                if done {
                    break;
                }
                continue;
            }
            // At most `migrate_window` devices on their way at once: when the targets log
            // them in slower than `rate`, the migration slows down instead of piling up
            // logins that time out.
            let room = self.ctx.config.migrate_window.saturating_sub(pending);
            let most = (budget.floor() as usize).min(room).min(MAX_REDIRECT_BATCH);
            let mut batch = Vec::new();
            while batch.len() < most {
                let Some(conn) = queue.pop_front() else { break };
                if self.ctx.logins.is_waiting(conn.id) {
                    // No LOGIN_ACK yet, and nothing may precede it: try again later.
                    tried.remove(&conn.id);
                    continue;
                }
                if !conn.is_closing() && !migration.is_pending(conn.id) {
                    batch.push(conn);
                }
            }
            if batch.is_empty() {
                continue;
            }
            budget -= batch.len() as f64;
            if let Err(why) = self.redirect(batch).await {
                tracing::warn!(gw = %self.ctx.config.id, error = %why, "migration stops sending");
                error = Some(why);
                sending = false;
                queue.clear();
            }
        }
        migration.sweep(&self.ctx);
        tracing::info!(gw = %self.ctx.config.id, kind = self.kind.as_str(), ?error, "migration finished");
        migration.finish(&self.token, error);
    }

    /// The connections to move now, leaving out `tried` ones.
    fn choose(&self, tried: &HashSet<u64>) -> VecDeque<Arc<ConnShared>> {
        let registry = &self.ctx.registry;
        let mut chosen: Vec<Arc<ConnShared>> = match &self.selection {
            Selection::Dids { app, dids } => dids
                .iter()
                .filter_map(|did| registry.get(app, did))
                .collect(),
            Selection::Share { app, share } => {
                let mut all = match app {
                    Some(app) => registry.app_connections(app),
                    None => registry.all(),
                };
                all.shuffle(&mut rand::thread_rng());
                let take = (all.len() as f64 * share).round() as usize;
                all.truncate(take);
                all
            }
            Selection::All { app } => match app {
                Some(app) => registry.app_connections(app),
                None => registry.all(),
            },
            Selection::Conns(conns) => conns
                .iter()
                .filter(|c| {
                    c.identity().is_some_and(|id| {
                        registry
                            .get(id.app(), id.did())
                            .is_some_and(|here| here.id == c.id)
                    })
                })
                .cloned()
                .collect(),
        };
        chosen.retain(|c| !tried.contains(&c.id));
        chosen.into()
    }

    /// Asks ipconfig for tokens to `target` for `devices` (one grant per device, in order).
    async fn ask(
        &self,
        target: &str,
        handoff: bool,
        devices: Vec<RedirectDevice>,
    ) -> Result<Vec<RedirectGrant>, String> {
        let ctx = &self.ctx;
        let request = RedirectRequest {
            target: target.into(),
            region: ctx.config.region.clone(),
            devices,
            handoff,
        };
        let body = serde_json::to_vec(&request).map_err(|e| format!("encode: {e}"))?;
        let asked = ctx
            .outbound
            .client()
            .request(subjects::gateway_redirect(&ctx.config.id), body.into());
        let answer = match tokio::time::timeout(TOKEN_TIMEOUT, asked).await {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => return Err(format!("cannot ask ipconfig for tokens: {error}")),
            Err(_) => return Err("ipconfig did not answer in time".into()),
        };
        let reply: RedirectReply = serde_json::from_slice(&answer.payload).map_err(|_| {
            format!(
                "ipconfig refused: {}",
                String::from_utf8_lossy(&answer.payload)
            )
        })?;
        Ok(reply.grants)
    }

    /// Gets tokens for `batch` and queues their REDIRECTs. An error stops the migration:
    /// ipconfig cannot be asked, or there is no gateway to move any of them to. After a
    /// hand-off, devices the successor cannot be granted for are offered elsewhere.
    async fn redirect(&self, batch: Vec<Arc<ConnShared>>) -> Result<(), String> {
        let ctx = &self.ctx;
        let mut conns = Vec::with_capacity(batch.len());
        let mut devices = Vec::with_capacity(batch.len());
        for conn in batch {
            let Some(id) = conn.identity() else { continue };
            devices.push(RedirectDevice {
                app: id.app().to_string(),
                uid: id.uid().to_string(),
                did: id.did().to_string(),
                transport: id.transport.as_str().into(),
                rights: id.rights.iter().map(|r| r.as_str().to_string()).collect(),
            });
            conns.push(conn);
        }
        let handoff = self.kind == Kind::Handoff;
        let mut grants = self.ask(&self.target, handoff, devices.clone()).await?;
        if handoff {
            // Only grants that answer a device asked for (ipconfig's reply is not trusted).
            let refused: Vec<usize> = grants
                .iter()
                .take(devices.len())
                .enumerate()
                .filter(|(_, grant)| grant.token.is_none())
                .map(|(i, _)| i)
                .collect();
            if !refused.is_empty() {
                let again = refused
                    .iter()
                    .filter_map(|i| devices.get(*i).cloned())
                    .collect();
                let elsewhere = self.ask(TARGET_IPCONFIG, false, again).await?;
                for (i, grant) in refused.into_iter().zip(elsewhere) {
                    if let Some(slot) = grants.get_mut(i) {
                        *slot = grant;
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(ctx.config.migrate_timeout_secs);
        let (mut sent, mut failed, mut last_error) = (0_u64, 0_u64, None);
        let mut inner = ctx.migration.lock();
        for (conn, grant) in conns.into_iter().zip(grants) {
            let same = conn
                .identity()
                .is_some_and(|id| id.did() == grant.did && id.app() == grant.app);
            let (Some(endpoint), Some(token), true) = (grant.endpoint, grant.token, same) else {
                failed += 1;
                last_error = grant.error.map(|e| e.to_string());
                continue;
            };
            let frame = Frame::Redirect(pb::Redirect {
                endpoint,
                token,
                reason: self.kind.as_str().into(),
            });
            let _ = conn.push(frame.encode(), true, ctx.config.max_queued_frames);
            inner.pending.insert(conn.id, Pending { conn, deadline });
            sent += 1;
        }
        inner.status.redirected += sent;
        inner.status.failed += failed;
        drop(inner);
        for _ in 0..sent {
            ctx.metrics.migration("redirected");
        }
        for _ in 0..failed {
            ctx.metrics.migration("failed");
        }
        if sent == 0 && failed > 0 {
            return Err(last_error.unwrap_or_else(|| "no gateway to move to".into()));
        }
        Ok(())
    }
}
