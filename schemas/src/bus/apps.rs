//! Per-app pipeline settings (PROTOCOL.md 12.4): the `pipeline` object of an app's record in
//! the `tether_apps` bucket (`app.<id>`), which gateways and state watch and apply live.
//!
//! ipconfig owns the whole record (secrets, keys, pool); gateways and state read only the
//! part they apply through [`AppPipelineView`], which ignores every other field, so a
//! record with newer fields never stops them.

use serde::{Deserialize, Serialize};

/// What an operator can change per app without a restart.
///
/// Unknown fields are ignored when read, so older gateways keep applying the settings they
/// know when a newer version adds some.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppPipeline {
    /// Paused by an operator: gateways refuse the app's logins and close its connections
    /// with `unavailable` (retryable), until resumed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Connections of the app on all gateways together (0 = no limit); each gateway
    /// enforces its share (limit / live gateways, rounded up), so the sum is approximate.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_connections: u64,
    /// Uplink messages per second of the app on all gateways together (0 = no limit); an
    /// UP over a gateway's share is answered UP_ACK `rate_limited` and not published.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_msgs_per_sec: u64,
    /// Uplink bytes per second (frame bytes) of the app on all gateways together (0 = no
    /// limit); enforced like `max_msgs_per_sec`.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_bytes_per_sec: u64,
    /// Session pushes to more members than this go out as one broadcast; overrides state's
    /// `broadcast_threshold` for the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast_threshold: Option<usize>,
    /// What an UP_ACK code 0 confirms for the app's uplinks (PROTOCOL 11.1).
    #[serde(skip_serializing_if = "ReceiptMode::is_business")]
    pub receipt_mode: ReceiptMode,
    /// Publish joined/left membership events on `tether.<app>.presence`; overrides
    /// state's `membership_events` for the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membership_events: Option<bool>,
    /// QoS of the app's pushes that carry no `Tether-Qos` header: 0 or 1 (absent = 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos_default: Option<u8>,
    /// The subject state sends the app's uplink requests to instead of
    /// `tether.<app>.biz.up`: `tether.<app>.biz.<token>[.<token>…]` (checked by
    /// `tether_nats::subjects::check_business_subject` where the record is written and
    /// where state reads it), so one NATS permission still confines the business.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_subject: Option<String>,
    /// Seconds the app's QoS1 messages stay in device inboxes (a per-message TTL, at most
    /// the INBOX stream's `max_age`); absent = the stream's `max_age`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_retention: Option<u64>,
}

/// The longest `inbox_retention` accepted (a year, in seconds).
pub const MAX_INBOX_RETENTION_SECS: u64 = 366 * 24 * 3600;

/// What an UP_ACK code 0 confirms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptMode {
    /// JetStream stored the uplink (the gateway sends the UP_ACK at once; state still
    /// delivers it to the business, whose answer no longer reaches the device).
    Stored,
    /// The business service answered `stored` (state sends the UP_ACK after its reply).
    /// Also what a mode this version does not know reads as (the stronger promise).
    #[default]
    #[serde(other)]
    Business,
}

impl ReceiptMode {
    fn is_business(&self) -> bool {
        *self == ReceiptMode::Business
    }

    /// The mode's name in records and headers (`business`, `stored`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptMode::Business => "business",
            ReceiptMode::Stored => "stored",
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The keys [`AppPipeline::set`] knows, with what each means (for help texts and errors).
pub const PIPELINE_KEYS: &[(&str, &str)] = &[
    (
        "paused",
        "true|false: refuse the app's logins and close its connections",
    ),
    (
        "max_connections",
        "connections on all gateways together (0 = no limit)",
    ),
    (
        "max_msgs_per_sec",
        "uplink messages per second on all gateways together (0 = no limit)",
    ),
    (
        "max_bytes_per_sec",
        "uplink bytes per second on all gateways together (0 = no limit)",
    ),
    (
        "broadcast_threshold",
        "session pushes to more members go out as one broadcast (empty = state's default)",
    ),
    (
        "receipt_mode",
        "business|stored: UP_ACK 0 once the business stored the UP (default) or once JetStream did",
    ),
    (
        "membership_events",
        "true|false: publish joined/left events on tether.<app>.presence (empty = state's default)",
    ),
    (
        "qos_default",
        "0|1: QoS of pushes without a Tether-Qos header (empty = 1)",
    ),
    (
        "business_subject",
        "where state sends the app's uplinks, tether.<app>.biz.<name> (empty = the default, biz.up)",
    ),
    (
        "inbox_retention",
        "seconds QoS1 messages stay in inboxes, 1..=31622400, at most the stream's max_age (empty = the stream's)",
    ),
];

impl AppPipeline {
    /// Sets `key` from its text form (`max_msgs_per_sec=100`); an empty value of an
    /// optional setting clears it. Unknown keys and unparsable values are errors.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let value = value.trim();
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{key}: {v:?} is not a non-negative integer"))
        };
        let boolean = |v: &str| match v {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            other => Err(format!("{key}: {other:?} is not true or false")),
        };
        match key {
            "paused" => self.paused = boolean(value)?,
            "membership_events" => {
                self.membership_events = match value {
                    "" => None,
                    v => Some(boolean(v)?),
                }
            }
            "qos_default" => {
                self.qos_default = match value {
                    "" => None,
                    "0" => Some(0),
                    "1" => Some(1),
                    other => return Err(format!("qos_default: {other:?} is not 0 or 1")),
                }
            }
            "business_subject" => {
                self.business_subject = Some(value).filter(|v| !v.is_empty()).map(str::to_string)
            }
            "inbox_retention" => {
                self.inbox_retention = match value {
                    "" => None,
                    v => match number(v)? {
                        n @ 1..=MAX_INBOX_RETENTION_SECS => Some(n),
                        n => {
                            return Err(format!(
                                "inbox_retention: {n} is not between 1 and {MAX_INBOX_RETENTION_SECS} seconds"
                            ));
                        }
                    },
                }
            }
            "max_connections" => self.max_connections = number(value)?,
            "max_msgs_per_sec" => self.max_msgs_per_sec = number(value)?,
            "max_bytes_per_sec" => self.max_bytes_per_sec = number(value)?,
            "broadcast_threshold" => {
                self.broadcast_threshold = if value.is_empty() {
                    None
                } else {
                    Some(
                        usize::try_from(number(value)?)
                            .map_err(|_| format!("{key}: {value} is too large"))?,
                    )
                }
            }
            "receipt_mode" => {
                self.receipt_mode = match value {
                    "business" | "" => ReceiptMode::Business,
                    "stored" => ReceiptMode::Stored,
                    other => {
                        return Err(format!("receipt_mode: {other:?} is not business or stored"));
                    }
                }
            }
            other => {
                let known: Vec<&str> = PIPELINE_KEYS.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "unknown pipeline setting {other:?} (known: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Checks the values a record written without [`AppPipeline::set`] could carry:
    /// `qos_default` 0 or 1, `inbox_retention` in range. (`business_subject` depends on
    /// the app id and the bus crate's subjects: `tether_nats::subjects::check_business_subject`.)
    pub fn check(&self) -> Result<(), String> {
        if self.qos_default.is_some_and(|q| q > 1) {
            return Err("qos_default must be 0 or 1".into());
        }
        if self
            .inbox_retention
            .is_some_and(|s| s == 0 || s > MAX_INBOX_RETENTION_SECS)
        {
            return Err(format!(
                "inbox_retention must be between 1 and {MAX_INBOX_RETENTION_SECS} seconds"
            ));
        }
        Ok(())
    }

    /// The QoS of a push without `Tether-Qos`: true for QoS1 (the default).
    pub fn default_qos1(&self) -> bool {
        self.qos_default != Some(0)
    }
}

/// The part of an app record that gateways and state read: its id and pipeline (every other
/// field of the record is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AppPipelineView {
    /// App id.
    pub id: String,
    /// Its pipeline settings.
    pub pipeline: AppPipeline,
}

impl AppPipelineView {
    /// Parses a record of the `tether_apps` bucket.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_and_refuses() {
        let mut p = AppPipeline::default();
        assert!(p.set("max_msgs_per_sec", "5").is_ok());
        assert!(p.set("broadcast_threshold", "2").is_ok());
        assert!(p.set("paused", "true").is_ok());
        assert_eq!(p.max_msgs_per_sec, 5);
        assert_eq!(p.broadcast_threshold, Some(2));
        assert!(p.paused);
        assert!(p.set("receipt_mode", "stored").is_ok());
        assert_eq!(p.receipt_mode, ReceiptMode::Stored);
        assert!(p.set("receipt_mode", "fast").is_err());
        assert!(p.set("membership_events", "yes").is_ok());
        assert_eq!(p.membership_events, Some(true));
        assert!(p.set("membership_events", "maybe").is_err());
        assert!(p.set("membership_events", "").is_ok());
        assert_eq!(p.membership_events, None);
        assert!(p.set("broadcast_threshold", "").is_ok());
        assert_eq!(p.broadcast_threshold, None);
        assert!(p.set("max_connections", "-1").is_err());
        assert!(p.set("paused", "maybe").is_err());
        assert!(p.set("qos_default", "2").is_err());
        assert!(p.set("qos_default", "0").is_ok());
        assert!(!p.default_qos1());
        assert!(p.set("qos_default", "").is_ok());
        assert!(p.default_qos1());
        assert!(p.set("inbox_retention", "0").is_err());
        assert!(p.set("inbox_retention", "99999999999").is_err());
        assert!(p.set("inbox_retention", "60").is_ok());
        assert_eq!(p.inbox_retention, Some(60));
        assert!(p.set("business_subject", "x.y").is_ok());
        assert_eq!(p.business_subject.as_deref(), Some("x.y"));
        assert!(p.set("business_subject", "").is_ok());
        assert_eq!(p.business_subject, None);
        assert!(p.check().is_ok());
        p.qos_default = Some(2);
        assert!(p.check().is_err());
        p.qos_default = None;
        let err = p.set("qos", "1").err().unwrap_or_default();
        assert!(err.contains("unknown pipeline setting"), "{err}");
    }

    #[test]
    fn view_ignores_other_fields() -> Result<(), serde_json::Error> {
        let view = AppPipelineView::from_json(
            br#"{"id":"demo","secrets":["x"],"pipeline":{"max_msgs_per_sec":3},"later":1}"#,
        )?;
        assert_eq!(view.id, "demo");
        assert_eq!(view.pipeline.max_msgs_per_sec, 3);
        let json = serde_json::to_string(&view.pipeline)?;
        assert_eq!(json, r#"{"max_msgs_per_sec":3}"#);
        let stored =
            AppPipelineView::from_json(br#"{"id":"d","pipeline":{"receipt_mode":"stored"}}"#)?;
        assert_eq!(stored.pipeline.receipt_mode, ReceiptMode::Stored);
        Ok(())
    }
}
