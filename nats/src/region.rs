//! Regions: the streams that carry pushes between regions (the "dedicated MQ line").
//!
//! Each region is its own NATS cluster with its own JetStream domain, joined to the others
//! by leaf nodes (docs/multi-region.md). A push for a device routed in another region is
//! appended in the origin region to [`relay_stream_name`]`(origin)` on
//! [`subjects::relay`]`(origin, target, app, did)`; every region's
//! [`RELAY_IN_STREAM`] sources the relay streams of its peers across domains (the
//! `$JS.<domain>.API` external prefix) with a filter on the subjects towards it, and the
//! region's state delivers from it with the device's per-device sequence. Both streams use
//! limits retention (sourcing from work-queue streams lost messages during link outages),
//! so a cut link delays relayed pushes for up to the relay max age, never loses them.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

use crate::connect::BusError;
use crate::subjects;

/// The stream of a region that receives the pushes relayed to it by other regions.
pub const RELAY_IN_STREAM: &str = "TETHER_XR_IN";

/// The durable consumer state delivers relayed pushes from (one per region).
pub const RELAY_IN_CONSUMER: &str = "state-xr-in";

/// A peer region: its name (the region of its gateways' routes) and JetStream domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Region name, `[A-Za-z0-9_-]` (the `region` of that region's gateways).
    pub name: String,
    /// Its JetStream domain (`jetstream { domain: … }` of its servers).
    pub domain: String,
}

impl Region {
    /// The JetStream API prefix of this region's domain: `$JS.<domain>.API`.
    pub fn api_prefix(&self) -> String {
        format!("$JS.{}.API", self.domain)
    }
}

/// The relay stream written in region `origin`: `TETHER_XR_<origin>`.
pub fn relay_stream_name(origin: &str) -> String {
    format!("TETHER_XR_{origin}")
}

/// Settings of the relay streams of one region.
#[derive(Debug, Clone)]
pub struct RelayLayout {
    /// This region's name.
    pub region: String,
    /// The other regions, sourced into [`RELAY_IN_STREAM`].
    pub peers: Vec<Region>,
    /// How long relayed pushes are kept: the longest link outage that loses nothing.
    pub max_age: Duration,
    /// Replicas of both streams.
    pub replicas: usize,
}

impl RelayLayout {
    fn base(&self) -> stream::Config {
        stream::Config {
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        }
    }

    /// `TETHER_XR_<region>`: pushes written here for devices of other regions.
    pub fn outgoing(&self) -> stream::Config {
        stream::Config {
            name: relay_stream_name(&self.region),
            description: Some(format!("pushes from {} to other regions", self.region)),
            subjects: vec![subjects::relay_from(&self.region)],
            ..self.base()
        }
    }

    /// `TETHER_XR_IN`: the peers' relay streams, filtered to the subjects towards this
    /// region, sourced across domains.
    pub fn incoming(&self) -> stream::Config {
        let sources = self
            .peers
            .iter()
            .map(|peer| stream::Source {
                name: relay_stream_name(&peer.name),
                filter_subject: Some(subjects::relay_towards(&peer.name, &self.region)),
                external: Some(stream::External {
                    api_prefix: peer.api_prefix(),
                    delivery_prefix: None,
                }),
                ..Default::default()
            })
            .collect();
        stream::Config {
            name: RELAY_IN_STREAM.into(),
            description: Some(format!(
                "pushes relayed to {} by other regions",
                self.region
            )),
            sources: Some(sources),
            ..self.base()
        }
    }

    /// The consumer state delivers from: one message in flight for the whole region, so
    /// relayed pushes are appended to inboxes in the order they were relayed, whichever
    /// state instance pulls them.
    pub fn consumer(&self, ack_wait: Duration) -> pull::Config {
        pull::Config {
            durable_name: Some(RELAY_IN_CONSUMER.into()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait,
            max_ack_pending: 1,
            ..Default::default()
        }
    }
}

/// Creates or updates both relay streams of `layout` in the domain `js` talks to.
pub async fn apply_relay_layout(
    js: &jetstream::Context,
    layout: &RelayLayout,
) -> Result<(), BusError> {
    for config in [layout.outgoing(), layout.incoming()] {
        let what = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| BusError::Layout {
                what,
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// A relay subject, parsed: `tether.xr.<origin>.<target>.<app>.<did>`, each a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySubject<'a> {
    /// The region that relayed the push.
    pub origin: &'a str,
    /// The region of the device.
    pub target: &'a str,
    /// App id.
    pub app: &'a str,
    /// Device id.
    pub did: &'a str,
}

impl<'a> RelaySubject<'a> {
    /// Parses a relay subject; `None` for anything else.
    pub fn parse(subject: &'a str) -> Option<Self> {
        let mut tokens = subject.split('.');
        if tokens.next()? != subjects::PREFIX || tokens.next()? != subjects::RELAY_TOKEN {
            return None;
        }
        let (origin, target, app, did) = (
            tokens.next()?,
            tokens.next()?,
            tokens.next()?,
            tokens.next()?,
        );
        if tokens.next().is_some() {
            return None;
        }
        let valid = tether_schemas::bus::valid_id;
        (valid(origin) && valid(target) && valid(app) && valid(did)).then_some(Self {
            origin,
            target,
            app,
            did,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_subjects_round_trip_and_reject_others() {
        let subject = subjects::relay("eu", "us", "chat", "phone-1");
        assert_eq!(subject, "tether.xr.eu.us.chat.phone-1");
        assert_eq!(
            RelaySubject::parse(&subject),
            Some(RelaySubject {
                origin: "eu",
                target: "us",
                app: "chat",
                did: "phone-1"
            })
        );
        for bad in [
            "tether.xr.eu.us.chat",
            "tether.xr.eu.us.chat.d.extra",
            "tether.chat.inbox.1.d",
            "tether.xr.eu.us.ch*t.d",
        ] {
            assert_eq!(RelaySubject::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn incoming_sources_each_peer_across_its_domain() {
        let layout = RelayLayout {
            region: "us".into(),
            peers: vec![Region {
                name: "eu".into(),
                domain: "region-eu".into(),
            }],
            max_age: Duration::from_secs(3600),
            replicas: 1,
        };
        let incoming = layout.incoming();
        let sources = incoming.sources.unwrap_or_default();
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].name, "TETHER_XR_eu");
        assert_eq!(
            sources[0].filter_subject.as_deref(),
            Some("tether.xr.eu.us.>")
        );
        assert_eq!(
            sources[0].external.as_ref().map(|e| e.api_prefix.as_str()),
            Some("$JS.region-eu.API")
        );
        assert_eq!(layout.outgoing().subjects, vec!["tether.xr.us.>"]);
    }

    #[test]
    fn regional_only_subjects_cover_every_stream_and_bucket() {
        let denied = subjects::regional_only();
        for stream in [
            subjects::uplink_stream(),
            subjects::events_stream(),
            subjects::inbox_stream(),
            subjects::rooms_stream(),
        ] {
            assert!(denied.contains(&stream), "{stream} must stay in its region");
        }
        assert!(denied.iter().any(|s| s == "$KV.>"));
        assert!(denied.iter().any(|s| s == "tether.xr.>"));
        assert!(!denied.iter().any(|s| s.ends_with(".push")));
    }

    #[test]
    fn production_leaf_configs_deny_the_regional_only_subjects() {
        for conf in [
            include_str!("../conf/leaf-region-a.conf"),
            include_str!("../conf/leaf-region-b.conf"),
        ] {
            for key in ["deny_imports", "deny_exports"] {
                let line = conf
                    .lines()
                    .find(|l| l.trim_start().starts_with(key))
                    .expect("a deny list");
                let list = line
                    .split_once('[')
                    .and_then(|(_, rest)| rest.split_once(']'))
                    .map(|(list, _)| list)
                    .expect("a [list]");
                let listed: Vec<String> = list
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .collect();
                assert_eq!(listed, subjects::regional_only(), "{key}");
            }
        }
    }
}
