//! Apps (tenants): their records in the `tether_apps` KV bucket, the in-memory table
//! ipconfig answers from, and the operations behind `tether app add|list|rotate-secret|remove`.
//!
//! The bucket is the one place apps and secrets are configured; every ipconfig instance
//! watches it, so a change reaches all of them within moments. Apps listed in ipconfig's
//! config file serve a first start; a bucket record with the same id wins.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_nats::jetstream::kv;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tether_nats::keys;
use tether_schemas::bus::AppPipeline;
use tether_service::Shutdown;

/// Secrets kept per app: the newest plus older ones still accepted during a rotation.
pub const MAX_SECRETS: usize = 2;

/// One app, as JSON in `tether_apps` under `app.<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppRecord {
    /// App id.
    pub id: String,
    /// HS256 secrets, newest first; a credential signed with any of them is accepted
    /// (so a rotation does not cut off credentials already out).
    pub secrets: Vec<String>,
    /// Ed25519 public keys (SPKI PEM) that verify EdDSA credentials.
    pub public_keys: Vec<String>,
    /// Dedicated gateway pool; `None` (or `"shared"`) is the shared pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Lifetime of this app's gateway tokens in seconds; 0 uses ipconfig's `token_ttl_secs`.
    pub token_ttl_secs: u64,
    /// Gateway tokens of this app carry the `rooms` right (room cursors at LOGIN resume
    /// recoverable rooms).
    #[serde(default)]
    pub rooms: bool,
    /// Pipeline settings gateways and state apply live (paused, limits, broadcast
    /// threshold; PROTOCOL.md 12.4).
    #[serde(skip_serializing_if = "is_default_pipeline")]
    pub pipeline: AppPipeline,
    /// When the record was last changed, unix milliseconds.
    pub updated_ms: u64,
}

fn is_default_pipeline(pipeline: &AppPipeline) -> bool {
    *pipeline == AppPipeline::default()
}

/// Record settings `tether app set` changes besides the pipeline ones.
pub const RECORD_KEYS: &[(&str, &str)] = &[
    (
        "pool",
        "dedicated gateway pool (empty or shared = the shared pool)",
    ),
    ("rooms", "true|false: gateway tokens carry the rooms right"),
    (
        "token_ttl_secs",
        "lifetime of the app's gateway tokens (0 = ipconfig's)",
    ),
];

impl AppRecord {
    /// Sets one setting from its text form: a record setting ([`RECORD_KEYS`]) or a
    /// pipeline setting ([`tether_schemas::bus::PIPELINE_KEYS`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let value = value.trim();
        match key {
            "pool" => {
                self.pool = Some(value)
                    .filter(|v| !v.is_empty() && *v != "shared")
                    .map(str::to_string)
            }
            "rooms" => {
                self.rooms = match value {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    other => return Err(format!("rooms: {other:?} is not true or false")),
                }
            }
            "token_ttl_secs" => {
                self.token_ttl_secs = value
                    .parse()
                    .map_err(|_| format!("token_ttl_secs: {value:?} is not a number"))?
            }
            _ => return self.pipeline.set(key, value),
        }
        Ok(())
    }

    /// Checks the id, that some key exists, that public keys parse and the pipeline
    /// settings ([`tether_schemas::bus::AppPipeline::check`], and that `business_subject`
    /// is one of the app's own `biz` subjects).
    pub fn validate(&self) -> Result<(), String> {
        use ed25519_dalek::pkcs8::DecodePublicKey as _;
        if !tether_auth::valid_id(&self.id) {
            return Err(format!(
                "app id {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                self.id
            ));
        }
        if self.id == tether_nats::subjects::GATEWAY_TOKEN {
            return Err(format!(
                "app id {:?} is reserved (gateway subjects are tether.{}.<gw>.…)",
                self.id, self.id
            ));
        }
        if self.id == tether_nats::subjects::RELAY_TOKEN {
            return Err(format!(
                "app id {:?} is reserved (cross-region relay subjects are tether.{}.…)",
                self.id, self.id
            ));
        }
        if self.secrets.is_empty() && self.public_keys.is_empty() {
            return Err(format!("app {}: needs a secret or a public key", self.id));
        }
        if self.secrets.iter().any(|s| s.len() < 16) {
            return Err(format!(
                "app {}: secrets must be at least 16 characters",
                self.id
            ));
        }
        for pem in &self.public_keys {
            ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim())
                .map_err(|e| format!("app {}: public key: {e}", self.id))?;
        }
        if let Some(pool) = &self.pool
            && !tether_auth::valid_id(pool)
        {
            return Err(format!("app {}: pool {pool:?} is not a valid id", self.id));
        }
        self.pipeline.check()?;
        match &self.pipeline.business_subject {
            Some(subject) => tether_nats::subjects::check_business_subject(&self.id, subject),
            None => Ok(()),
        }
    }

    /// The dedicated pool, if any (`"shared"` counts as none).
    pub fn dedicated_pool(&self) -> Option<&str> {
        self.pool
            .as_deref()
            .filter(|p| !p.is_empty() && *p != "shared")
    }
}

/// A new random secret: 32 bytes from the OS, base64url (43 characters).
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What failed in an app operation.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The record is invalid.
    #[error("{0}")]
    Invalid(String),
    /// `add` of an id that exists.
    #[error("app {0} already exists")]
    Exists(String),
    /// The app is not in the bucket.
    #[error("app {0} not found")]
    NotFound(String),
    /// The bucket could not be read or written.
    #[error("tether_apps bucket: {0}")]
    Bucket(String),
    /// A record in the bucket is not valid JSON.
    #[error("app record {key}: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The parse error.
        reason: String,
    },
}

fn bucket_error(e: impl std::fmt::Display) -> AppError {
    AppError::Bucket(e.to_string())
}

/// Operations on the `tether_apps` bucket (the CLI's side).
pub struct AppAdmin {
    store: kv::Store,
}

impl AppAdmin {
    /// Opens the bucket (it must exist: every role creates it at start).
    pub async fn open(client: async_nats::Client) -> Result<AppAdmin, AppError> {
        let js = async_nats::jetstream::new(client);
        let store = js
            .get_key_value(tether_nats::layout::APPS_BUCKET)
            .await
            .map_err(bucket_error)?;
        Ok(AppAdmin { store })
    }

    /// Creates `record`; fails if the id exists.
    pub async fn add(&self, mut record: AppRecord) -> Result<AppRecord, AppError> {
        record.validate().map_err(AppError::Invalid)?;
        record.updated_ms = tether_auth::unix_now_ms();
        let json = serde_json::to_vec(&record).map_err(bucket_error)?;
        match self.store.create(keys::app(&record.id), json.into()).await {
            Ok(_) => Ok(record),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(AppError::Exists(record.id))
            }
            Err(e) => Err(bucket_error(e)),
        }
    }

    /// Every app record, sorted by id.
    pub async fn list(&self) -> Result<Vec<AppRecord>, AppError> {
        let mut keys = self.store.keys().await.map_err(bucket_error)?;
        let mut records = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(bucket_error)?;
            if let Some(record) = self.read(&key).await? {
                records.push(record.0);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// One app record.
    pub async fn get(&self, id: &str) -> Result<AppRecord, AppError> {
        self.read(&keys::app(id))
            .await?
            .map(|(record, _)| record)
            .ok_or_else(|| AppError::NotFound(id.to_string()))
    }

    async fn read(&self, key: &str) -> Result<Option<(AppRecord, u64)>, AppError> {
        let Some(entry) = self.store.entry(key).await.map_err(bucket_error)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value).map_err(|e| AppError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some((record, entry.revision)))
    }

    /// Puts a new secret first; keeps the previous one (still accepted) unless `drop_old`.
    /// Returns the new secret. Compare-and-set on the record's revision, so two operators
    /// rotating at once cannot lose a secret silently.
    pub async fn rotate_secret(&self, id: &str, drop_old: bool) -> Result<String, AppError> {
        let key = keys::app(id);
        let (mut record, revision) = self
            .read(&key)
            .await?
            .ok_or_else(|| AppError::NotFound(id.to_string()))?;
        let secret = generate_secret();
        record.secrets.insert(0, secret.clone());
        record
            .secrets
            .truncate(if drop_old { 1 } else { MAX_SECRETS });
        record.updated_ms = tether_auth::unix_now_ms();
        let json = serde_json::to_vec(&record).map_err(bucket_error)?;
        self.store
            .update(&key, json.into(), revision)
            .await
            .map_err(bucket_error)?;
        Ok(secret)
    }

    /// Applies `changes` (`key`, `value` text pairs, see [`AppRecord::set`]) to an app's
    /// record, all or none, with compare-and-set on its revision (retried when another
    /// writer came first). Returns the new record.
    pub async fn set(&self, id: &str, changes: &[(String, String)]) -> Result<AppRecord, AppError> {
        let key = keys::app(id);
        let mut attempts = 0;
        loop {
            let (mut record, revision) = self
                .read(&key)
                .await?
                .ok_or_else(|| AppError::NotFound(id.to_string()))?;
            for (name, value) in changes {
                record.set(name, value).map_err(AppError::Invalid)?;
            }
            record.validate().map_err(AppError::Invalid)?;
            record.updated_ms = tether_auth::unix_now_ms();
            let json = serde_json::to_vec(&record).map_err(bucket_error)?;
            match self.store.update(&key, json.into(), revision).await {
                Ok(_) => return Ok(record),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision && attempts < 5 => {
                    attempts += 1;
                }
                Err(e) => return Err(bucket_error(e)),
            }
        }
    }

    /// Deletes an app.
    pub async fn remove(&self, id: &str) -> Result<(), AppError> {
        let key = keys::app(id);
        if self.read(&key).await?.is_none() {
            return Err(AppError::NotFound(id.to_string()));
        }
        self.store.delete(&key).await.map_err(bucket_error)
    }
}

/// The apps ipconfig knows: the bucket's records over the config file's.
#[derive(Clone, Default)]
pub struct AppTable {
    inner: Arc<RwLock<Tables>>,
}

#[derive(Default)]
struct Tables {
    configured: HashMap<String, Arc<AppRecord>>,
    bucket: HashMap<String, Arc<AppRecord>>,
}

impl AppTable {
    /// A table holding the config file's apps.
    pub fn new(configured: &[AppRecord]) -> AppTable {
        let table = AppTable::default();
        table.write().configured = configured
            .iter()
            .map(|r| (r.id.clone(), Arc::new(r.clone())))
            .collect();
        table
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record of app `id`.
    pub fn get(&self, id: &str) -> Option<Arc<AppRecord>> {
        let tables = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        tables
            .bucket
            .get(id)
            .or_else(|| tables.configured.get(id))
            .cloned()
    }

    /// Number of apps known.
    pub fn len(&self) -> usize {
        let tables = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let extra = tables
            .configured
            .keys()
            .filter(|id| !tables.bucket.contains_key(*id))
            .count();
        tables.bucket.len() + extra
    }

    /// Whether no app is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one bucket entry (put, delete or purge).
    fn apply(&self, entry: &kv::Entry) {
        let Some(id) = entry.key.strip_prefix("app.") else {
            return;
        };
        if entry.operation != kv::Operation::Put {
            self.write().bucket.remove(id);
            tracing::info!(app = id, "app removed");
            return;
        }
        match serde_json::from_slice::<AppRecord>(&entry.value) {
            Ok(record) if record.id == id && record.validate().is_ok() => {
                tracing::debug!(app = id, "app record loaded");
                self.write().bucket.insert(id.to_string(), Arc::new(record));
            }
            Ok(_) => tracing::warn!(app = id, "app record invalid, ignored"),
            Err(error) => tracing::warn!(app = id, %error, "app record unreadable, ignored"),
        }
    }

    /// Loads every record now, then follows changes until `shutdown`.
    pub async fn follow(&self, store: kv::Store, shutdown: Shutdown) -> Result<(), AppError> {
        let mut keys = store.keys().await.map_err(bucket_error)?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(bucket_error)?);
        }
        for key in names {
            if let Some(entry) = store.entry(&key).await.map_err(bucket_error)? {
                self.apply(&entry);
            }
        }
        // The watch replays current values first, so a re-created watch misses nothing.
        let table = self.clone();
        tokio::spawn(tether_nats::serve::watch_kv(
            store,
            keys::APPS.to_string(),
            None,
            shutdown,
            move |entry| table.apply(&entry),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_pools() {
        let mut record = AppRecord {
            id: "demo".into(),
            secrets: vec![generate_secret()],
            ..Default::default()
        };
        assert!(record.validate().is_ok());
        assert_eq!(record.dedicated_pool(), None);
        record.pool = Some("shared".into());
        assert_eq!(record.dedicated_pool(), None);
        record.pool = Some("vip".into());
        assert_eq!(record.dedicated_pool(), Some("vip"));
        record.secrets = vec!["short".into()];
        assert!(record.validate().is_err());
        record.secrets.clear();
        assert!(record.validate().is_err());
        record.secrets = vec![generate_secret()];
        record.id = "a.b".into();
        assert!(record.validate().is_err());
        assert_eq!(generate_secret().len(), 43);
    }

    #[test]
    fn bucket_records_override_configured_ones() {
        let configured = AppRecord {
            id: "demo".into(),
            secrets: vec!["configured-secret-1".into()],
            ..Default::default()
        };
        let table = AppTable::new(std::slice::from_ref(&configured));
        assert_eq!(table.get("demo").as_deref(), Some(&configured));
        let from_bucket = AppRecord {
            secrets: vec!["bucket-secret-0001".into()],
            ..configured.clone()
        };
        table
            .write()
            .bucket
            .insert("demo".into(), Arc::new(from_bucket.clone()));
        assert_eq!(table.get("demo").as_deref(), Some(&from_bucket));
        assert_eq!(table.len(), 1);
        assert!(table.get("other").is_none());
    }
}
