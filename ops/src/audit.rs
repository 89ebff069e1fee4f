//! The audit log: every operation (through the API, or `tether app set`) as one JSON entry
//! in the `tether_audit` KV bucket, key `<unix_ms>-<random>`, kept 90 days.

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// One operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditEntry {
    /// When, unix milliseconds.
    pub at_ms: u64,
    /// Who: `token-<n>` (the n-th admin token), `loopback` (no tokens configured) or
    /// `cli` (`tether app set`).
    pub actor: String,
    /// The operation (`drain`, `kick`, `app.set`, …).
    pub op: String,
    /// What it was applied to (gateway, app, `app/did`).
    pub target: String,
    /// Its parameters.
    pub params: serde_json::Value,
    /// `ok` or `error`.
    pub outcome: String,
    /// The error, or a short result.
    pub message: String,
}

/// Writing and reading the log.
#[derive(Clone)]
pub struct AuditLog {
    store: kv::Store,
}

/// The bucket could not be used.
#[derive(Debug, thiserror::Error)]
#[error("audit log: {0}")]
pub struct AuditError(String);

impl AuditLog {
    /// Opens the bucket, creating it when missing.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<AuditLog, AuditError> {
        let store = match js.get_key_value(tether_nats::layout::AUDIT_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(tether_nats::layout::audit_bucket(replicas))
                .await
                .map_err(|e| AuditError(e.to_string()))?,
        };
        Ok(AuditLog { store })
    }

    /// Appends `entry` (its `at_ms` is set now).
    pub async fn record(&self, mut entry: AuditEntry) -> Result<(), AuditError> {
        entry.at_ms = tether_schemas::bus::unix_now_ms();
        let key = format!("{:013}-{:08x}", entry.at_ms, rand::random::<u32>());
        let json = serde_json::to_vec(&entry).map_err(|e| AuditError(e.to_string()))?;
        self.store
            .put(key, json.into())
            .await
            .map(|_| ())
            .map_err(|e| AuditError(e.to_string()))
    }

    /// The newest `limit` entries, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
        let mut names = Vec::new();
        match self.store.keys().await {
            Ok(mut keys) => {
                while let Some(key) = keys.next().await {
                    names.push(key.map_err(|e| AuditError(e.to_string()))?);
                }
            }
            Err(e) => return Err(AuditError(e.to_string())),
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        let mut entries = Vec::new();
        for key in names.into_iter().take(limit) {
            if let Ok(Some(value)) = self.store.get(&key).await
                && let Ok(entry) = serde_json::from_slice(&value)
            {
                entries.push(entry);
            }
        }
        Ok(entries)
    }
}
