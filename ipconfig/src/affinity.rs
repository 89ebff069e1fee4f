//! Home regions of users (PROTOCOL 12.7): a business service sets a user's home region on
//! `tether.<app>.affinity` (queue group `ipconfig`); the record goes into this region's
//! `tether_affinity` bucket, and every region's ipconfig follows its own bucket and its
//! peers' (the newest record of a user wins), so a device of that user is offered its home
//! region's gateways first whichever ipconfig it asks.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_nats::jetstream::kv;
use async_nats::{Client, Message};
use tether_nats::subjects::{self, Subject};
use tether_nats::{keys, serve};
use tether_schemas::ErrorCode;
use tether_schemas::bus::{AffinityRecord, AffinityReplyWire, AffinityRequest, unix_now_ms};
use tether_service::Shutdown;
use tokio::sync::Semaphore;

use crate::api::ApiState;
use crate::redirect::QUEUE_GROUP;

/// Requests answered at once; more get `unavailable`.
const MAX_IN_PROGRESS: usize = 256;

/// `(app, uid)` → the newest home-region record seen in any region.
#[derive(Clone, Default)]
pub struct AffinityTable {
    inner: Arc<RwLock<HashMap<(String, String), AffinityRecord>>>,
}

impl AffinityTable {
    /// The home region of `uid` of `app`, if one is set.
    pub fn home(&self, app: &str, uid: &str) -> Option<String> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&(app.to_string(), uid.to_string()))
            .map(|record| record.region.clone())
            .filter(|region| !region.is_empty())
    }

    /// Keeps `record` for the user unless a newer one is known.
    pub fn put(&self, app: &str, uid: &str, record: AffinityRecord) {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let key = (app.to_string(), uid.to_string());
        if map
            .get(&key)
            .is_none_or(|known| known.at_ms <= record.at_ms)
        {
            map.insert(key, record);
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        let Some((app, uid)) = entry
            .key
            .strip_prefix("a.")
            .and_then(|rest| rest.split_once('.'))
        else {
            return;
        };
        if entry.operation != kv::Operation::Put {
            return;
        }
        match serde_json::from_slice::<AffinityRecord>(&entry.value) {
            Ok(record) => self.put(app, uid, record),
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "affinity record unreadable, ignored")
            }
        }
    }

    /// Follows `store` (this region's bucket or a peer's) until `shutdown`.
    pub fn follow(&self, store: kv::Store, shutdown: Shutdown) {
        let table = self.clone();
        tokio::spawn(serve::watch_kv(
            store,
            ">".into(),
            None,
            shutdown,
            move |entry| table.apply(&entry),
        ));
    }
}

/// Answers home-region requests until `shutdown`, storing them in `store`.
pub async fn serve(
    client: Client,
    state: ApiState,
    store: kv::Store,
    shutdown: Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let subscription = client
        .queue_subscribe(subjects::affinity_all(), QUEUE_GROUP.into())
        .await?;
    let permits = Arc::new(Semaphore::new(MAX_IN_PROGRESS));
    tokio::spawn(serve::serve_subscription(
        subscription,
        shutdown,
        move |message| {
            let (client, state, store) = (client.clone(), state.clone(), store.clone());
            let permit = permits.clone().try_acquire_owned();
            tokio::spawn(async move {
                let reply = match permit {
                    Ok(_permit) => answer(&state, &store, &message).await,
                    Err(_) => {
                        AffinityReplyWire::error(ErrorCode::Unavailable, "ipconfig busy; retry")
                    }
                };
                if let Some(to) = message.reply
                    && let Err(error) = client.publish(to, reply.to_json()).await
                {
                    tracing::debug!(%error, "affinity answer not sent");
                }
            });
        },
    ));
    Ok(())
}

/// Checks and stores one request; answers only after the record is stored.
async fn answer(state: &ApiState, store: &kv::Store, message: &Message) -> AffinityReplyWire {
    let Some(app) = Subject::parse(&message.subject).and_then(|s| s.app()) else {
        return AffinityReplyWire::error(ErrorCode::BadRequest, "not an affinity subject");
    };
    if state.apps.get(app).is_none() {
        return AffinityReplyWire::error(ErrorCode::WrongApp, "unknown app");
    }
    let request = match AffinityRequest::from_json(&message.payload) {
        Ok(request) => request,
        Err(error) => return AffinityReplyWire::Error { error },
    };
    let config = &state.config;
    let known = request.region.is_empty()
        || request.region == config.default_region
        || config.peer_regions.iter().any(|p| p.name == request.region);
    if !known {
        return AffinityReplyWire::error(
            ErrorCode::BadRequest,
            format!(
                "region {:?} is neither this region nor a peer",
                request.region
            ),
        );
    }
    let record = AffinityRecord {
        region: request.region.clone(),
        at_ms: unix_now_ms(),
    };
    let value = match serde_json::to_vec(&record) {
        Ok(value) => value,
        Err(error) => return AffinityReplyWire::error(ErrorCode::Internal, error.to_string()),
    };
    if let Err(error) = store
        .put(keys::affinity(app, &request.uid), value.into())
        .await
    {
        return AffinityReplyWire::error(ErrorCode::Unavailable, format!("not stored: {error}"));
    }
    state.affinity.put(app, &request.uid, record);
    AffinityReplyWire::Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_record_wins_and_empty_clears() {
        let table = AffinityTable::default();
        let at = |region: &str, at_ms| AffinityRecord {
            region: region.into(),
            at_ms,
        };
        table.put("demo", "carol", at("eu", 10));
        table.put("demo", "carol", at("us", 5));
        assert_eq!(table.home("demo", "carol").as_deref(), Some("eu"));
        table.put("demo", "carol", at("", 20));
        assert_eq!(table.home("demo", "carol"), None);
        assert_eq!(table.home("other", "carol"), None);
    }
}
