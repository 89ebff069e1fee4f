//! Restart of a gateway by hand-off, started by the gateway itself (PROTOCOL.md 10.7
//! `restart`, `restart_status`), and the status that answers both ops.

use serde::{Deserialize, Serialize};

/// Where a gateway's self-restart stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartState {
    /// No restart asked of this process, and it did not take over from another one.
    #[default]
    Idle,
    /// The successor process was started; the hand-off is not done yet.
    Started,
    /// This (old) process handed everything to its successor and is stopping.
    HandedOff,
    /// This process took over from its predecessor and serves (answered by the successor).
    Serving,
    /// The restart failed (`error` says why); this process keeps serving.
    Failed,
}

/// The answer to `restart` and `restart_status`: the answering process's view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartStatus {
    /// The gateway id.
    pub gw: String,
    /// The process id of the answering process.
    pub pid: u32,
    /// Where the restart stands.
    pub state: RestartState,
    /// The successor's process id (`started`, `handed_off`, `failed` after a start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor_pid: Option<u32>,
    /// Connections handed over (`serving`: this process adopted them).
    #[serde(default)]
    pub moved: u64,
    /// Logged-in connections on the answering process now.
    #[serde(default)]
    pub connections: u64,
    /// When the restart started (or, for `serving`, the takeover finished), ms since the epoch.
    #[serde(default)]
    pub started_ms: u64,
    /// When it ended (`handed_off`, `failed`, `serving`); 0 while `started`.
    #[serde(default)]
    pub finished_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_snake_case_and_optional_fields_stay_out() {
        let status = RestartStatus {
            gw: "gw1".into(),
            pid: 7,
            state: RestartState::HandedOff,
            ..Default::default()
        };
        let text = serde_json::to_string(&status).expect("encode");
        assert!(text.contains("\"state\":\"handed_off\""), "{text}");
        assert!(!text.contains("error"), "{text}");
        let back: RestartStatus = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, status);
    }
}
