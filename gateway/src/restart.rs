//! Restart by hand-off started by the gateway itself (PROTOCOL.md 10.7 `restart`): the
//! gateway re-executes its own binary as `gateway --takeover <its handoff_socket>` with the
//! arguments, environment and working directory it was started with, in a session of its
//! own (so it outlives this process), and reports how the hand-off went
//! (`restart_status`). A refused or failed takeover leaves this process serving.
//!
//! Only a gateway run as its own process (`tether gateway`, which calls
//! [`allow_reexec`]) can restart itself; an embedded one (`tether up`, tests) answers
//! the op with an error.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tether_schemas::bus::{RestartState, RestartStatus, unix_now_ms};

use crate::context::GatewayCtx;

/// The command line arguments a successor is started with (before `--takeover`).
static LAUNCH: OnceLock<Vec<OsString>> = OnceLock::new();

/// Allows the `restart` op in this process: a successor runs the current executable with
/// `args` (this process's arguments without `--takeover`, see [`without_takeover`]).
pub fn allow_reexec(args: Vec<OsString>) {
    let _ = LAUNCH.set(args);
}

/// `args` without any `--takeover <path>` or `--takeover=<path>`.
pub fn without_takeover(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if arg == OsStr::new("--takeover") {
            skip_next = true;
        } else if !arg.to_string_lossy().starts_with("--takeover=") {
            kept.push(arg);
        }
    }
    kept
}

/// The executable to run: this one's path; when the file was replaced since this process
/// started (an upgrade), Linux reports `<path> (deleted)` and the new file at `<path>` runs.
fn executable() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

#[derive(Default)]
struct Inner {
    state: RestartState,
    successor_pid: Option<u32>,
    moved: u64,
    started_ms: u64,
    finished_ms: u64,
    error: Option<String>,
}

/// This process's restart: at most one successor at a time.
#[derive(Default)]
pub struct Restart {
    inner: Mutex<Inner>,
}

impl Restart {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the restart stands, as this process sees it.
    pub fn status(&self, ctx: &GatewayCtx) -> RestartStatus {
        let inner = self.lock();
        RestartStatus {
            gw: ctx.config.id.clone(),
            pid: std::process::id(),
            state: inner.state,
            successor_pid: inner.successor_pid,
            moved: inner.moved,
            connections: ctx.registry.len() as u64,
            started_ms: inner.started_ms,
            finished_ms: inner.finished_ms,
            error: inner.error.clone(),
        }
    }

    /// This process took `moved` connections over from its predecessor and serves.
    pub fn took_over(&self, moved: usize) {
        let now = unix_now_ms();
        *self.lock() = Inner {
            state: RestartState::Serving,
            moved: moved as u64,
            started_ms: now,
            finished_ms: now,
            ..Inner::default()
        };
    }

    /// A hand-off this process offered was aborted (refused by the successor, timed out,
    /// …): a running restart failed with `reason`.
    pub fn handoff_aborted(&self, reason: &str) {
        let mut inner = self.lock();
        if inner.state == RestartState::Started {
            inner.state = RestartState::Failed;
            inner.error = Some(reason.to_string());
            inner.finished_ms = unix_now_ms();
        }
    }

    /// Starts the successor (the `restart` op); its status, or why it cannot start.
    pub fn start(&self, ctx: &Arc<GatewayCtx>) -> Result<RestartStatus, String> {
        if ctx.handoff.handed_over.is_cancelled() {
            return Err("this process has handed over already".into());
        }
        let socket =
            ctx.config.handoff_socket.clone().ok_or(
                "no handoff_socket configured: this gateway cannot hand its connections over",
            )?;
        let args = LAUNCH.get().ok_or(
            "this gateway does not run as its own process (`tether gateway`): restart it by hand (docs/handoff.md)",
        )?;
        let mut inner = self.lock();
        if inner.state == RestartState::Started {
            return Err(format!(
                "a restart is running already (successor pid {})",
                inner.successor_pid.unwrap_or(0)
            ));
        }
        let child = spawn(ctx, &executable()?, args, &socket)?;
        let pid = child.id().unwrap_or(0);
        *inner = Inner {
            state: RestartState::Started,
            successor_pid: Some(pid),
            started_ms: unix_now_ms(),
            ..Inner::default()
        };
        drop(inner);
        tracing::info!(gw = %ctx.config.id, successor = pid, "restart: successor started");
        tokio::spawn(watch(ctx.clone(), child));
        Ok(self.status(ctx))
    }
}

/// Starts `exe args --takeover <socket>` in a new session, output to `restart_log` or ours.
fn spawn(
    ctx: &GatewayCtx,
    exe: &std::path::Path,
    args: &[OsString],
    socket: &std::path::Path,
) -> Result<tokio::process::Child, String> {
    let mut command = tokio::process::Command::new(exe);
    command
        .args(args)
        .arg("--takeover")
        .arg(socket)
        .stdin(Stdio::null());
    if let Some(path) = &ctx.config.restart_log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open restart_log {}: {e}", path.display()))?;
        let copy = file
            .try_clone()
            .map_err(|e| format!("restart_log {}: {e}", path.display()))?;
        command.stdout(copy).stderr(file);
    }
    detach(&mut command);
    command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

/// The successor leads a session of its own: no signal meant for this process's group or
/// terminal (Ctrl-C, a supervisor killing the group) reaches it.
#[allow(unsafe_code)]
fn detach(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
}

/// How long, after the successor exited, the hand-off may take to report why it stopped.
const REASON_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Follows the successor until the hand-off commits or the successor exits first.
async fn watch(ctx: Arc<GatewayCtx>, mut child: tokio::process::Child) {
    let handed_over = ctx.handoff.handed_over.clone();
    tokio::select! {
        exited = child.wait() => {
            // A successor that refuses (its fd limit, say) says why over the hand-off socket
            // and exits: give the hand-off the moment it needs to record that reason, which
            // says more than the exit status.
            let deadline = tokio::time::Instant::now() + REASON_GRACE;
            while ctx.restart.lock().state == RestartState::Started
                && !handed_over.is_cancelled()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let mut inner = ctx.restart.lock();
            if inner.state == RestartState::Started && !handed_over.is_cancelled() {
                inner.state = RestartState::Failed;
                inner.finished_ms = unix_now_ms();
                inner.error = Some(match exited {
                    Ok(status) => format!("the successor exited ({status}) before the hand-off"),
                    Err(error) => format!("the successor cannot be followed: {error}"),
                });
                tracing::warn!(gw = %ctx.config.id, error = ?inner.error, "restart failed, this process keeps serving");
                return;
            }
        }
        _ = handed_over.cancelled() => {}
    }
    if handed_over.is_cancelled() {
        let mut inner = ctx.restart.lock();
        inner.state = RestartState::HandedOff;
        inner.finished_ms = unix_now_ms();
        tracing::info!(gw = %ctx.config.id, successor = ?inner.successor_pid, "restart: handed over to the successor");
    }
}

/// Writes this process's id to `pid_file`, if configured (a failure is logged).
pub fn write_pid_file(ctx: &GatewayCtx) {
    if let Some(path) = &ctx.config.pid_file
        && let Err(error) = std::fs::write(path, format!("{}\n", std::process::id()))
    {
        tracing::warn!(path = %path.display(), %error, "cannot write pid_file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_flags_are_left_out() {
        let args = [
            "gateway",
            "--id",
            "g",
            "--takeover",
            "/s",
            "--tcp",
            "a",
            "--takeover=/t",
        ];
        let kept = without_takeover(args.iter().map(OsString::from));
        let kept: Vec<_> = kept.iter().map(|a| a.to_string_lossy()).collect();
        assert_eq!(kept, ["gateway", "--id", "g", "--tcp", "a"]);
    }
}
