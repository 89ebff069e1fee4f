//! What every connection task of one gateway shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_auth::CachedVerifier;

use crate::config::GatewayConfig;
use crate::metrics::GatewayMetrics;
use crate::outbound::Outbound;
use crate::registry::Registry;
use crate::sessions::Sessions;
use crate::timers::{Clock, Timers};

/// The gateway's shared context.
pub struct GatewayCtx {
    /// Configuration.
    pub config: GatewayConfig,
    /// Verifies LOGIN tokens (remembering the ones it verified).
    pub verifier: Arc<CachedVerifier>,
    /// Logged-in connections by device.
    pub registry: Registry,
    /// Session → local members.
    pub sessions: Sessions,
    /// Login and idle deadlines.
    pub timers: Arc<Timers>,
    /// The gateway's second clock.
    pub clock: Clock,
    /// NATS publishing.
    pub outbound: Outbound,
    /// Metrics.
    pub metrics: GatewayMetrics,
    /// Logins waiting for state's registration.
    pub logins: crate::logins::PendingLogins,
    /// Per-app pipeline settings (paused, limits) from `tether_apps`.
    pub app_limits: crate::app_limits::AppLimits,
    /// Messages in and out per app (the heartbeat's per-app rates).
    pub app_traffic: crate::app_traffic::AppTraffic,
    /// Drain and migration by REDIRECT.
    pub migration: crate::migrate::Migration,
    /// Restart by hand-off: downlink gate, parked connections, accept pause.
    pub handoff: crate::handoff::Handoff,
    /// A restart this process started itself (control op `restart`).
    pub restart: crate::restart::Restart,
    /// Silent connections without a task ([`crate::conn::dormant`]).
    pub dormant: Arc<crate::conn::dormant::Dormant>,
    conn_ids: AtomicU64,
}

impl GatewayCtx {
    /// A context; connection ids start at a random 32-bit prefix, so ids stay unique across
    /// gateway restarts. `taking_over`: the gateway receives a hand-off (downlinks held
    /// and accepting paused until it commits).
    pub fn new(
        config: GatewayConfig,
        verifier: Arc<CachedVerifier>,
        outbound: Outbound,
        metrics: GatewayMetrics,
        taking_over: bool,
    ) -> Self {
        let clock = Clock::default();
        let timers = Arc::new(Timers::new(
            clock,
            config.login_timeout_secs,
            config.idle_timeout_secs,
        ));
        // 21 random bits above a 32-bit counter: unique, and exact in JSON numbers (< 2^53).
        let prefix = u64::from(rand::random::<u32>() & 0x1F_FFFF) << 32;
        let dormant = Arc::new(crate::conn::dormant::Dormant::new(
            config.dormant_after_secs,
        ));
        Self {
            config,
            verifier,
            registry: Registry::default(),
            sessions: Sessions::default(),
            timers,
            clock,
            outbound,
            metrics,
            logins: Default::default(),
            app_limits: Default::default(),
            app_traffic: Default::default(),
            migration: Default::default(),
            handoff: crate::handoff::Handoff::new(taking_over),
            restart: Default::default(),
            dormant,
            conn_ids: AtomicU64::new(prefix | 1),
        }
    }

    /// A new connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }
}
