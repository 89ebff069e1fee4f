//! The cluster view: what ops knows about the platform, in memory, and the snapshot it
//! serves (`GET /v1/cluster`, the dashboard's live stream).
//!
//! Filled by [`crate::watch`] from KV watches (gateway heartbeats, state leases, app records)
//! and the NATS monitoring endpoints. Every ops instance builds its own from the same
//! sources, so any number can run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tether_schemas::bus::{AppPipeline, GatewayHeartbeat, IpconfigHeartbeat, MigrationStatus};

use crate::restart::RollStatus;

/// A record and when it was last received.
#[derive(Debug, Clone)]
struct Seen<T> {
    value: T,
    at: Instant,
}

/// One gateway in the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GatewayView {
    /// Its last heartbeat.
    #[serde(flatten)]
    pub heartbeat: GatewayHeartbeat,
    /// Milliseconds since that heartbeat arrived.
    pub age_ms: u64,
}

/// One state instance and the partitions it leases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateView {
    /// Instance id.
    pub id: String,
    /// Partitions it owns.
    pub partitions: Vec<u16>,
}

/// One app: its settings and where its devices are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppView {
    /// App id.
    pub id: String,
    /// Dedicated gateway pool, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Pipeline settings (paused, limits, broadcast threshold).
    #[serde(default)]
    pub pipeline: AppPipeline,
    /// Connections on all live gateways.
    pub connections: u64,
    /// Connections per gateway.
    pub gateways: BTreeMap<String, u64>,
    /// UP frames per second from the app's devices, on all live gateways.
    pub msgs_in_per_sec: f64,
    /// Frames per second to the app's devices, on all live gateways.
    pub msgs_out_per_sec: f64,
}

/// One ipconfig instance in the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpconfigView {
    /// Its last record.
    #[serde(flatten)]
    pub heartbeat: IpconfigHeartbeat,
    /// Milliseconds since that record arrived.
    pub age_ms: u64,
}

/// The NATS servers, from their monitoring endpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsView {
    /// One entry per monitoring endpoint.
    pub servers: Vec<NatsServerView>,
    /// JetStream streams (from the first endpoint that answered), with their consumers.
    pub streams: Vec<StreamView>,
}

/// One NATS server (`/varz`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsServerView {
    /// The monitoring URL.
    pub url: String,
    /// Server name (empty when it did not answer).
    pub name: String,
    /// Version.
    pub version: String,
    /// Client connections.
    pub connections: u64,
    /// Messages in / out since start.
    pub in_msgs: u64,
    /// Messages out since start.
    pub out_msgs: u64,
    /// Resident memory, bytes.
    pub mem: u64,
    /// CPU percent.
    pub cpu: f64,
    /// JetStream storage used, bytes.
    pub js_storage: u64,
    /// JetStream memory used, bytes.
    pub js_memory: u64,
    /// Why the endpoint could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One JetStream stream (`/jsz?streams=true&consumers=true`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamView {
    /// Stream name.
    pub name: String,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Consumers with their lag.
    pub consumers: Vec<ConsumerView>,
}

/// One consumer's lag.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConsumerView {
    /// Consumer name.
    pub name: String,
    /// Messages not yet delivered (lag).
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
}

/// Platform totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    /// Connections on all live gateways.
    pub connections: u64,
    /// Capacity of all live gateways.
    pub capacity: u64,
    /// Uplink messages per second.
    pub msgs_in_per_sec: f64,
    /// Frames per second to clients.
    pub msgs_out_per_sec: f64,
}

/// Everything the view holds, at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterSnapshot {
    /// When it was taken, unix milliseconds.
    pub at_ms: u64,
    /// Totals over the live gateways.
    pub totals: Totals,
    /// Live gateways, by id.
    pub gateways: Vec<GatewayView>,
    /// Live state instances, by id.
    pub states: Vec<StateView>,
    /// Owner of each partition (index = partition; `null` = not leased now).
    pub partitions: Vec<Option<String>>,
    /// Apps with a record, by id.
    pub apps: Vec<AppView>,
    /// Live ipconfig instances, by id.
    #[serde(default)]
    pub ipconfigs: Vec<IpconfigView>,
    /// The last migration status of each gateway an operator drained or migrated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub migrations: BTreeMap<String, MigrationStatus>,
    /// The NATS servers, when monitoring endpoints are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsView>,
    /// The running or last rolling restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RollStatus>,
}

/// The in-memory view.
#[derive(Debug)]
pub struct ClusterView {
    gateway_stale: Duration,
    lease_stale: RwLock<Duration>,
    gateways: RwLock<HashMap<String, Seen<GatewayHeartbeat>>>,
    ipconfigs: RwLock<HashMap<String, Seen<IpconfigHeartbeat>>>,
    members: RwLock<HashMap<String, Instant>>,
    leases: RwLock<HashMap<u16, Seen<String>>>,
    apps: RwLock<BTreeMap<String, tether_ipconfig::AppRecord>>,
    nats: RwLock<Option<NatsView>>,
    migrations: RwLock<BTreeMap<String, MigrationStatus>>,
    restart: RwLock<Option<RollStatus>>,
    /// Bumped when an operation's progress changes, so live streams send it at once.
    progress: tokio::sync::watch::Sender<u64>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl ClusterView {
    /// An empty view; gateways silent for `gateway_stale` leave it.
    pub fn new(gateway_stale: Duration) -> ClusterView {
        ClusterView {
            gateway_stale,
            lease_stale: RwLock::new(Duration::from_secs(6)),
            gateways: RwLock::default(),
            ipconfigs: RwLock::default(),
            members: RwLock::default(),
            leases: RwLock::default(),
            apps: RwLock::default(),
            nats: RwLock::default(),
            migrations: RwLock::default(),
            restart: RwLock::default(),
            progress: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever a migration's or a rolling restart's progress changes (the
    /// dashboard's stream sends a snapshot then, besides once a second).
    pub fn progress(&self) -> tokio::sync::watch::Receiver<u64> {
        self.progress.subscribe()
    }

    fn progressed(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A heartbeat arrived.
    pub fn put_gateway(&self, heartbeat: GatewayHeartbeat) {
        write(&self.gateways).insert(
            heartbeat.id.clone(),
            Seen {
                value: heartbeat,
                at: Instant::now(),
            },
        );
    }

    /// A gateway deleted its record (clean stop).
    pub fn remove_gateway(&self, id: &str) {
        write(&self.gateways).remove(id);
    }

    /// An ipconfig instance's record arrived.
    pub fn put_ipconfig(&self, heartbeat: IpconfigHeartbeat) {
        write(&self.ipconfigs).insert(
            heartbeat.id.clone(),
            Seen {
                value: heartbeat,
                at: Instant::now(),
            },
        );
    }

    /// An ipconfig instance deleted its record (clean stop) or it expired.
    pub fn remove_ipconfig(&self, id: &str) {
        write(&self.ipconfigs).remove(id);
    }

    /// Whether `id` is a live gateway.
    pub fn has_gateway(&self, id: &str) -> bool {
        let stale = self.gateway_stale;
        read(&self.gateways)
            .get(id)
            .is_some_and(|s| s.at.elapsed() < stale)
    }

    /// Lease entries older than `ttl` are gone (the lease bucket's max age).
    pub fn set_lease_ttl(&self, ttl: Duration) {
        *write(&self.lease_stale) = ttl;
    }

    /// A state instance's member key was written.
    pub fn put_member(&self, instance: &str) {
        write(&self.members).insert(instance.to_string(), Instant::now());
    }

    /// A member key was deleted.
    pub fn remove_member(&self, instance: &str) {
        write(&self.members).remove(instance);
    }

    /// A partition lease was written.
    pub fn put_lease(&self, partition: u16, owner: String) {
        write(&self.leases).insert(
            partition,
            Seen {
                value: owner,
                at: Instant::now(),
            },
        );
    }

    /// A partition lease was released.
    pub fn remove_lease(&self, partition: u16) {
        write(&self.leases).remove(&partition);
    }

    /// An app record was written.
    pub fn put_app(&self, record: tether_ipconfig::AppRecord) {
        write(&self.apps).insert(record.id.clone(), record);
    }

    /// An app record was removed.
    pub fn remove_app(&self, id: &str) {
        write(&self.apps).remove(id);
    }

    /// A gateway's migration status (from an operation's answer or a poll).
    pub fn put_migration(&self, status: MigrationStatus) {
        write(&self.migrations).insert(status.gw.clone(), status);
        self.progressed();
    }

    /// The last heartbeat of live gateway `id`.
    pub fn gateway(&self, id: &str) -> Option<GatewayHeartbeat> {
        let stale = self.gateway_stale;
        read(&self.gateways)
            .get(id)
            .filter(|s| s.at.elapsed() < stale)
            .map(|s| s.value.clone())
    }

    /// Records a new rolling restart, unless one is running (returned then).
    pub fn begin_restart(&self, status: RollStatus) -> Result<(), RollStatus> {
        let mut restart = write(&self.restart);
        if let Some(running) = restart.as_ref().filter(|r| r.running) {
            return Err(running.clone());
        }
        *restart = Some(status);
        drop(restart);
        self.progressed();
        Ok(())
    }

    /// The rolling restart's progress.
    pub fn put_restart(&self, status: RollStatus) {
        *write(&self.restart) = Some(status);
        self.progressed();
    }

    /// The running or last rolling restart.
    pub fn restart(&self) -> Option<RollStatus> {
        read(&self.restart).clone()
    }

    /// Gateways with a migration running, as last seen.
    pub fn running_migrations(&self) -> Vec<String> {
        read(&self.migrations)
            .values()
            .filter(|s| s.running)
            .map(|s| s.gw.clone())
            .collect()
    }

    /// New figures from the NATS monitoring endpoints.
    pub fn set_nats(&self, nats: NatsView) {
        *write(&self.nats) = Some(nats);
    }

    /// The view now.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now = Instant::now();
        let gateways: Vec<GatewayView> = {
            let map = read(&self.gateways);
            let mut live: Vec<GatewayView> = map
                .values()
                .filter(|s| now.saturating_duration_since(s.at) < self.gateway_stale)
                .map(|s| GatewayView {
                    heartbeat: s.value.clone(),
                    age_ms: u64::try_from(now.saturating_duration_since(s.at).as_millis())
                        .unwrap_or(u64::MAX),
                })
                .collect();
            live.sort_by(|a, b| a.heartbeat.id.cmp(&b.heartbeat.id));
            live
        };
        let live_ids: std::collections::BTreeSet<String> =
            gateways.iter().map(|g| g.heartbeat.id.clone()).collect();
        let lease_stale = *read(&self.lease_stale);
        let fresh = |at: Instant| now.saturating_duration_since(at) < lease_stale;
        let mut partitions = vec![None; usize::from(tether_nats::subjects::PARTITIONS)];
        let mut states: BTreeMap<String, Vec<u16>> = read(&self.members)
            .iter()
            .filter(|(_, at)| fresh(**at))
            .map(|(id, _)| (id.clone(), Vec::new()))
            .collect();
        for (partition, lease) in read(&self.leases).iter() {
            if !fresh(lease.at) {
                continue;
            }
            if let Some(slot) = partitions.get_mut(usize::from(*partition)) {
                *slot = Some(lease.value.clone());
            }
            states
                .entry(lease.value.clone())
                .or_default()
                .push(*partition);
        }
        let states = states
            .into_iter()
            .map(|(id, mut partitions)| {
                partitions.sort_unstable();
                StateView { id, partitions }
            })
            .collect();
        let apps = read(&self.apps)
            .values()
            .map(|record| {
                let per_gateway: BTreeMap<String, u64> = gateways
                    .iter()
                    .filter_map(|g| {
                        g.heartbeat
                            .apps
                            .get(&record.id)
                            .map(|n| (g.heartbeat.id.clone(), *n))
                    })
                    .collect();
                let rates = gateways
                    .iter()
                    .filter_map(|g| g.heartbeat.app_rates.get(&record.id));
                AppView {
                    id: record.id.clone(),
                    pool: record.dedicated_pool().map(str::to_string),
                    pipeline: record.pipeline.clone(),
                    connections: per_gateway.values().sum(),
                    gateways: per_gateway,
                    msgs_in_per_sec: rates.clone().map(|r| r.msgs_in_per_sec).sum(),
                    msgs_out_per_sec: rates.map(|r| r.msgs_out_per_sec).sum(),
                }
            })
            .collect();
        let totals = Totals {
            connections: gateways.iter().map(|g| g.heartbeat.connections).sum(),
            capacity: gateways.iter().map(|g| g.heartbeat.capacity).sum(),
            msgs_in_per_sec: gateways.iter().map(|g| g.heartbeat.msgs_in_per_sec).sum(),
            msgs_out_per_sec: gateways.iter().map(|g| g.heartbeat.msgs_out_per_sec).sum(),
        };
        let mut ipconfigs: Vec<IpconfigView> = read(&self.ipconfigs)
            .values()
            .filter(|s| now.saturating_duration_since(s.at) < self.gateway_stale)
            .map(|s| IpconfigView {
                heartbeat: s.value.clone(),
                age_ms: u64::try_from(now.saturating_duration_since(s.at).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        ipconfigs.sort_by(|a, b| a.heartbeat.id.cmp(&b.heartbeat.id));
        ClusterSnapshot {
            at_ms: tether_schemas::bus::unix_now_ms(),
            totals,
            gateways,
            states,
            partitions,
            apps,
            ipconfigs,
            migrations: read(&self.migrations)
                .iter()
                .filter(|(gw, _)| live_ids.contains(*gw))
                .map(|(gw, s)| (gw.clone(), s.clone()))
                .collect(),
            nats: read(&self.nats).clone(),
            restart: read(&self.restart).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_groups_partitions_and_counts_apps() {
        let view = ClusterView::new(Duration::from_secs(10));
        let mut apps = BTreeMap::new();
        apps.insert("demo".to_string(), 3);
        view.put_gateway(GatewayHeartbeat {
            id: "gw1".into(),
            connections: 3,
            apps,
            ..Default::default()
        });
        view.put_member("s1");
        view.put_member("s2");
        view.put_lease(0, "s1".into());
        view.put_lease(5, "s2".into());
        view.put_app(tether_ipconfig::AppRecord {
            id: "demo".into(),
            ..Default::default()
        });
        let snap = view.snapshot();
        assert_eq!(snap.gateways.len(), 1);
        assert_eq!(snap.states.len(), 2);
        assert_eq!(snap.states[1].partitions, vec![5]);
        assert_eq!(snap.partitions[0].as_deref(), Some("s1"));
        assert_eq!(snap.apps[0].connections, 3);
        assert_eq!(snap.totals.connections, 3);
        view.remove_gateway("gw1");
        assert!(view.snapshot().gateways.is_empty());
    }
}
