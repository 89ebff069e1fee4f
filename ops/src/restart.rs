//! Rolling restart (`POST /v1/restart`, docs/ops-api.md): one gateway after another asks
//! itself to restart by hand-off (PROTOCOL.md 10.7 `restart`), and the next starts only once
//! the previous one is healthy again: the successor answers `restart_status` as `serving`,
//! its heartbeat comes from the successor's pid, and it holds again at least the
//! connections it took over. A gateway that fails stops the roll with its reason.
//!
//! The roll's progress is in the cluster view (`restart`, live on the dashboard), at
//! `GET /v1/restart`, and in the audit log (one entry per gateway and one at the end).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tether_schemas::ErrorCode;
use tether_schemas::bus::{GatewayControl, RestartState, RestartStatus, unix_now_ms, valid_id};

use crate::actions::Ops;
use crate::audit::AuditEntry;
use crate::error::ApiError;

/// How often a restarting gateway and the view are checked.
const POLL: Duration = Duration::from_millis(200);

/// `POST /v1/restart`: `{"gateways":["gw-1","gw-2"]}` or `{"all":true}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    /// These gateways, in this order.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Every live gateway, by id.
    #[serde(default)]
    pub all: bool,
}

/// Where one gateway of a roll stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Not started yet.
    #[default]
    Pending,
    /// Its successor was started; the hand-off is not done.
    Restarting,
    /// Handed off; waiting for the successor's heartbeat and connections.
    Checking,
    /// Restarted and healthy.
    Done,
    /// Failed (`error`); the roll stopped here.
    Failed,
    /// Not restarted because an earlier gateway failed.
    Skipped,
}

/// One gateway of a roll.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayRestart {
    /// Gateway id.
    pub gw: String,
    /// Where it stands.
    pub step: Step,
    /// Process id before the restart.
    pub old_pid: u32,
    /// The successor's process id, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_pid: Option<u32>,
    /// Connections its last heartbeat before the restart reported.
    pub connections_before: u64,
    /// Connections the successor took over.
    pub moved: u64,
    /// Connections the successor's heartbeat reports (while checking and after).
    pub connections_after: u64,
    /// When its restart started and ended, ms since the epoch (0: not yet).
    pub started_ms: u64,
    /// 0 until done or failed.
    pub finished_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A rolling restart: the last one stays visible after it ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollStatus {
    /// True until every gateway is done or one failed.
    pub running: bool,
    /// Who asked (`token-<n>` or `loopback`).
    pub actor: String,
    /// When it started, ms since the epoch.
    pub started_ms: u64,
    /// When it ended; 0 while running.
    pub finished_ms: u64,
    /// The gateways in order.
    pub gateways: Vec<GatewayRestart>,
    /// Why it stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Checks `request` and starts the roll in the background; returns its first status.
pub fn begin(ops: &Arc<Ops>, request: &Value, actor: &str) -> Result<Value, ApiError> {
    let request: RestartRequest =
        serde_json::from_value(request.clone()).map_err(|e| bad(format!("restart: {e}")))?;
    let gateways = match (request.all, request.gateways.is_empty()) {
        (true, true) => ops
            .view
            .snapshot()
            .gateways
            .into_iter()
            .map(|g| g.heartbeat.id)
            .collect(),
        (false, false) => request.gateways,
        (true, false) => return Err(bad("give either gateways or all, not both")),
        (false, true) => return Err(bad("give gateways (a list of ids) or all: true")),
    };
    if gateways.is_empty() {
        return Err(ApiError::new(ErrorCode::NotFound, "no live gateway"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for gw in &gateways {
        if !valid_id(gw) {
            return Err(bad("invalid gateway id"));
        }
        if !seen.insert(gw) {
            return Err(bad(format!("gateway {gw} is listed twice")));
        }
        if !ops.view.has_gateway(gw) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("gateway {gw} is not live"),
            ));
        }
    }
    let status = RollStatus {
        running: true,
        actor: actor.to_string(),
        started_ms: unix_now_ms(),
        gateways: gateways
            .iter()
            .map(|gw| GatewayRestart {
                gw: gw.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if let Err(running) = ops.view.begin_restart(status.clone()) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "a rolling restart is running (started by {} at {})",
                running.actor, running.started_ms
            ),
        ));
    }
    tokio::spawn(roll(ops.clone(), status.clone()));
    Ok(json!(status))
}

/// Restarts the gateways of `status` in order, stopping at the first failure.
async fn roll(ops: Arc<Ops>, mut status: RollStatus) {
    let timeout = Duration::from_secs(ops.restart_timeout_secs);
    for i in 0..status.gateways.len() {
        let outcome = restart_one(&ops, &mut status, i, timeout).await;
        let step = &mut status.gateways[i];
        step.finished_ms = unix_now_ms();
        match outcome {
            Ok(()) => step.step = Step::Done,
            Err(error) => {
                step.step = Step::Failed;
                step.error = Some(error.clone());
                status.error = Some(format!("{}: {error}", step.gw));
                for later in &mut status.gateways[i + 1..] {
                    later.step = Step::Skipped;
                }
            }
        }
        let step = status.gateways[i].clone();
        audit(
            &ops,
            &status.actor,
            "restart.gateway",
            &step.gw,
            json!(step),
            step.error.clone(),
        )
        .await;
        ops.view.put_restart(status.clone());
        if status.error.is_some() {
            break;
        }
    }
    status.running = false;
    status.finished_ms = unix_now_ms();
    ops.view.put_restart(status.clone());
    let names: Vec<&str> = status.gateways.iter().map(|g| g.gw.as_str()).collect();
    audit(
        &ops,
        &status.actor,
        "restart.done",
        &names.join(","),
        json!({"gateways": names}),
        status.error.clone(),
    )
    .await;
}

/// One gateway: ask it to restart, follow the hand-off, wait for health.
async fn restart_one(
    ops: &Ops,
    status: &mut RollStatus,
    i: usize,
    timeout: Duration,
) -> Result<(), String> {
    let gw = status.gateways[i].gw.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let before = ops
        .view
        .gateway(&gw)
        .ok_or_else(|| format!("gateway {gw} is not live"))?;
    {
        let step = &mut status.gateways[i];
        step.step = Step::Restarting;
        step.old_pid = before.pid;
        step.connections_before = before.connections;
        step.started_ms = unix_now_ms();
    }
    ops.view.put_restart(status.clone());
    let started = restart_status(ops, &gw, GatewayControl::Restart)
        .await
        .map_err(|e| e.message)?;
    let successor = started
        .successor_pid
        .filter(|_| started.state == RestartState::Started)
        .ok_or_else(|| format!("unexpected answer: {started:?}"))?;
    status.gateways[i].new_pid = Some(successor);
    ops.view.put_restart(status.clone());

    // The hand-off: the old process answers until it commits, the successor after.
    let moved = loop {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no hand-off within {}s", timeout.as_secs()));
        }
        tokio::time::sleep(POLL).await;
        let Ok(now) = restart_status(ops, &gw, GatewayControl::RestartStatus).await else {
            continue; // between the two processes, or busy: ask again
        };
        match now.state {
            RestartState::Serving if now.pid == successor => break now.moved,
            RestartState::Failed => {
                return Err(now
                    .error
                    .unwrap_or_else(|| "the restart failed".to_string()));
            }
            _ => {}
        }
    };
    {
        let step = &mut status.gateways[i];
        step.step = Step::Checking;
        step.moved = moved;
    }
    ops.view.put_restart(status.clone());

    // Health: a heartbeat from the successor, not draining, with the connections it took.
    loop {
        if let Some(heartbeat) = ops.view.gateway(&gw).filter(|h| h.pid == successor) {
            status.gateways[i].connections_after = heartbeat.connections;
            ops.view.put_restart(status.clone());
            if heartbeat.connections >= moved && !heartbeat.draining {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let after = status.gateways[i].connections_after;
            return Err(format!(
                "not healthy within {}s: heartbeat of pid {successor} reports {after} connections, {moved} were handed over",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends a restart op to `gw` and reads its status answer.
async fn restart_status(
    ops: &Ops,
    gw: &str,
    op: GatewayControl,
) -> Result<RestartStatus, ApiError> {
    let value = ops.request(gw, op).await?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("gateway {gw} status: {e}")))
}

/// Writes one audit entry of the roll (a failure to write is logged).
async fn audit(
    ops: &Ops,
    actor: &str,
    op: &str,
    target: &str,
    params: Value,
    error: Option<String>,
) {
    let entry = AuditEntry {
        actor: actor.to_string(),
        op: op.to_string(),
        target: target.to_string(),
        params,
        outcome: if error.is_some() { "error" } else { "ok" }.to_string(),
        message: error.unwrap_or_default(),
        ..Default::default()
    };
    tracing::info!(actor = %entry.actor, op = %entry.op, target = %entry.target, outcome = %entry.outcome, message = %entry.message, "operation");
    if let Err(error) = ops.audit.record(entry).await {
        tracing::warn!(%error, %op, "audit entry not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_snake_case() {
        let step = GatewayRestart {
            gw: "gw1".into(),
            step: Step::Checking,
            ..Default::default()
        };
        let text = serde_json::to_string(&step).expect("encode");
        assert!(text.contains("\"step\":\"checking\""), "{text}");
    }
}
