//! Token claims, the rights a token grants, and the identifier rule.
//!
//! Identifiers end up as NATS subject tokens (`tether.<app>.up.<did>`), so the rule is
//! deliberately narrow: no `.`, `*`, `>`, whitespace or anything non-ASCII can get in.

use std::fmt;
use std::time::Duration;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::AuthError;

/// The identifier rule is a wire rule: it lives in the bus contract.
pub use tether_schemas::bus::{MAX_ID_LEN, valid_id};

/// The claims carried by a gateway token (the JWT payload).
///
/// Unknown claims in a token are ignored; a missing `pub` means the default rights
/// (`["up"]`), a missing `sess` means no sessions, a missing `gw` means any gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Claims {
    /// App (tenant) id.
    pub app: String,
    /// User id of the device's owner.
    pub uid: String,
    /// Device id; unique per device within the app.
    pub did: String,
    /// Expiry, unix seconds: the token is refused when `exp <= now`.
    pub exp: u64,
    /// Issue time, unix seconds (informational; not checked against the clock).
    pub iat: u64,
    /// What the holder may do; serialized as the `pub` claim, a list of right names.
    #[serde(rename = "pub", default)]
    pub rights: Rights,
    /// Sessions (groups, rooms) to join at login.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sess: Vec<String>,
    /// When set, only the gateway with this id accepts the token (redirect tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

impl Claims {
    /// Claims issued at `iat` that expire `ttl` later (sub-second parts round up), with the
    /// default rights, no sessions and no gateway binding.
    pub fn new(
        app: impl Into<String>,
        uid: impl Into<String>,
        did: impl Into<String>,
        iat: u64,
        ttl: Duration,
    ) -> Claims {
        let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        Claims {
            app: app.into(),
            uid: uid.into(),
            did: did.into(),
            exp: iat.saturating_add(ttl_secs),
            iat,
            rights: Rights::default(),
            sess: Vec::new(),
            gw: None,
        }
    }

    /// True when the holder may send UP frames.
    pub fn may_uplink(&self) -> bool {
        self.rights.contains(Right::Up)
    }

    /// True when the holder may pass room cursors (resume recoverable room broadcasts).
    pub fn may_use_rooms(&self) -> bool {
        self.rights.contains(Right::Rooms)
    }

    /// Checks every identifier claim against [`valid_id`]; the error names the first bad
    /// claim.
    pub fn validate(&self) -> Result<(), AuthError> {
        let check = |field: &'static str, value: &str| {
            if valid_id(value) {
                Ok(())
            } else {
                Err(AuthError::InvalidId { field })
            }
        };
        check("app", &self.app)?;
        check("uid", &self.uid)?;
        check("did", &self.did)?;
        for s in &self.sess {
            check("sess", s)?;
        }
        if let Some(gw) = &self.gw {
            check("gw", gw)?;
        }
        Ok(())
    }
}

/// One thing a token may allow; its wire name is the snake_case variant name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Right {
    /// `"up"`: may send UP (uplink) frames.
    Up,
    /// `"rooms"`: may pass room cursors at login to resume room broadcasts.
    Rooms,
}

impl Right {
    /// Every right, in wire order.
    pub const ALL: [Right; 2] = [Right::Up, Right::Rooms];

    /// The wire name (`"up"`, `"rooms"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Up => "up",
            Right::Rooms => "rooms",
        }
    }

    /// The right with this wire name, if any.
    pub fn from_name(name: &str) -> Option<Right> {
        Right::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Right::Up => 1,
            Right::Rooms => 2,
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Right`]s, serialized as a JSON list of names (`["up","rooms"]`).
///
/// Unknown names in a token are ignored (a newer issuer cannot grant an older gateway
/// something it does not know). The default is `["up"]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rights(u8);

impl Rights {
    /// No rights at all (`[]`): the device may only receive.
    pub const NONE: Rights = Rights(0);

    /// A set holding exactly these rights.
    pub fn of(rights: &[Right]) -> Rights {
        rights.iter().fold(Rights::NONE, |acc, r| acc.with(*r))
    }

    /// This set plus `right`.
    pub fn with(self, right: Right) -> Rights {
        Rights(self.0 | right.bit())
    }

    /// This set without `right`.
    pub fn without(self, right: Right) -> Rights {
        Rights(self.0 & !right.bit())
    }

    /// True when `right` is in the set.
    pub fn contains(self, right: Right) -> bool {
        self.0 & right.bit() != 0
    }

    /// True when the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The rights in the set, in wire order.
    pub fn iter(self) -> impl Iterator<Item = Right> {
        Right::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

impl Default for Rights {
    fn default() -> Rights {
        Rights::NONE.with(Right::Up)
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for Rights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.iter().count()))?;
        for right in self.iter() {
            seq.serialize_element(right.as_str())?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Rights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Rights, D::Error> {
        deserializer.deserialize_seq(RightsVisitor)
    }
}

struct RightsVisitor;

impl<'de> Visitor<'de> for RightsVisitor {
    type Value = Rights;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of right names")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rights, A::Error> {
        let mut rights = Rights::NONE;
        while let Some(name) = seq.next_element::<RightName>()? {
            if let Some(right) = name.0 {
                rights = rights.with(right);
            }
        }
        Ok(rights)
    }
}

/// One element of the `pub` list: a known right, or `None` for a name we do not know.
/// Deserializes from a string without allocating.
struct RightName(Option<Right>);

impl<'de> Deserialize<'de> for RightName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RightName, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = RightName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a right name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RightName, E> {
                Ok(RightName(Right::from_name(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_serde() -> Result<(), serde_json::Error> {
        assert_eq!(serde_json::to_string(&Rights::default())?, r#"["up"]"#);
        assert_eq!(serde_json::to_string(&Rights::NONE)?, "[]");
        let all = Rights::of(&[Right::Rooms, Right::Up]);
        assert_eq!(serde_json::to_string(&all)?, r#"["up","rooms"]"#);
        let parsed: Rights = serde_json::from_str(r#"["rooms","future","rooms"]"#)?;
        assert_eq!(parsed, Rights::of(&[Right::Rooms]));
        assert!(serde_json::from_str::<Rights>(r#""up""#).is_err());
        assert!(serde_json::from_str::<Rights>("[1]").is_err());
        Ok(())
    }

    #[test]
    fn claims_defaults_and_shape() -> Result<(), serde_json::Error> {
        let c: Claims = serde_json::from_str(r#"{"app":"a","uid":"u","did":"d","exp":2,"iat":1}"#)?;
        assert!(c.may_uplink());
        assert!(!c.may_use_rooms());
        assert!(c.sess.is_empty() && c.gw.is_none());
        // `pub` is always written, so an empty set survives a round trip.
        let mut c2 = c.clone();
        c2.rights = Rights::NONE;
        let json = serde_json::to_string(&c2)?;
        assert_eq!(
            json,
            r#"{"app":"a","uid":"u","did":"d","exp":2,"iat":1,"pub":[]}"#
        );
        assert_eq!(serde_json::from_str::<Claims>(&json)?, c2);
        Ok(())
    }

    #[test]
    fn ttl_rounds_up() {
        let c = Claims::new("a", "u", "d", 100, Duration::from_millis(1500));
        assert_eq!(c.exp, 102);
        let c = Claims::new("a", "u", "d", u64::MAX - 1, Duration::from_secs(10));
        assert_eq!(c.exp, u64::MAX);
    }
}
