//! State's inputs from NATS, checked where they enter.
//!
//! Pure functions, no I/O: each takes what arrived (subject, headers, payload) and returns
//! either a typed value whose identity comes from the subject, or a refusal with the reason
//! that labels `tether_state_refused_total`. The handlers (`partition`, `uplink`, `push`)
//! call them first; the fuzz target in `state/fuzz` feeds them arbitrary bytes.

use async_nats::HeaderMap;
use bytes::Bytes;
use tether_nats::headers::{self, HeaderCodec};
use tether_nats::subjects::{self, Subject};
use tether_schemas::bus::{Event, Push, Uplink, UplinkReply, WireError, valid_id};
use tether_schemas::{ErrorCode, Frame, RawFrame, limits, pb};

/// Why an input was refused: a metric label and a lowercase explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Label of `tether_state_refused_total{reason=…}`.
    pub reason: &'static str,
    /// What was wrong.
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

/// An event from the log, checked against its subject: the app is the subject's, the did
/// belongs to the subject's partition, connection events arrive on `evt.conn` and session
/// events on `evt.sess`, and every id obeys the id rule.
pub fn event(subject: &str, payload: &[u8]) -> Result<Event, Refusal> {
    let event = Event::from_json(payload)
        .map_err(|e| Refusal::new("event_unreadable", format!("unreadable event: {e}")))?;
    let parsed = Subject::parse(subject);
    let (app, did, ids_ok, on_subject) = match &event {
        Event::ConnUp(e) | Event::ConnDown(e) => (
            &e.app,
            &e.did,
            valid_id(&e.uid) && valid_id(&e.gw) && e.sessions.iter().all(|s| valid_id(s)),
            matches!(parsed, Some(Subject::ConnEvents { .. })),
        ),
        Event::SessBind(e) | Event::SessUnbind(e) | Event::SessReplace(e) => (
            &e.app,
            &e.did,
            e.sessions.iter().all(|s| valid_id(s)),
            matches!(parsed, Some(Subject::SessionEvents { .. })),
        ),
    };
    let partition = match parsed {
        Some(Subject::ConnEvents { partition, .. } | Subject::SessionEvents { partition, .. }) => {
            partition
        }
        _ => return Err(Refusal::new("event_identity", "not an event subject")),
    };
    let matches = on_subject
        && ids_ok
        && valid_id(did)
        && parsed.and_then(|s| s.app()) == Some(app.as_str())
        && subjects::partition(did) == partition;
    if !matches {
        return Err(Refusal::new(
            "event_identity",
            format!("{} does not match its subject {subject}", event.kind()),
        ));
    }
    Ok(event)
}

/// One uplink stream message, decoded: the app and did from the subject, the user,
/// gateway and connection from the gateway's headers, the UP's var header and body.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkInput {
    /// The business request (headers side; its body is `body`).
    pub request: Uplink,
    /// The UP's var header.
    pub up: pb::Up,
    /// The UP's body.
    pub body: Bytes,
}

/// Decodes an uplink stream message (`tether.<app>.up.<p>.<did>`).
pub fn uplink(
    subject: &str,
    map: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<UplinkInput, Refusal> {
    let Some(Subject::Uplink { app, did }) = Subject::parse(subject) else {
        return Err(Refusal::new("uplink_subject", "not an uplink subject"));
    };
    let header = |name: &str| headers::get(map, name).unwrap_or_default();
    // The gateway also names the app and did in headers: a header that disagrees with the
    // subject is forged (NATS guards subjects, not headers).
    let disagrees =
        |name: &str, expected: &str| headers::get(map, name).is_some_and(|v| v != expected);
    if disagrees(headers::APP, app) || disagrees(headers::DID, did) {
        return Err(Refusal::new(
            "uplink_identity",
            "uplink headers name another app or device than the subject",
        ));
    }
    let up = RawFrame::from_bytes(payload, limits::MAX_FRAME_LEN_CAP)
        .ok()
        .and_then(|raw| Frame::decode(&raw).ok());
    let Some(Frame::Up { header: up, body }) = up else {
        return Err(Refusal::new(
            "not_an_up",
            "uplink payload is not an UP frame",
        ));
    };
    let request = Uplink {
        app: app.to_string(),
        uid: header(headers::UID).to_string(),
        did: did.to_string(),
        msg_id: up.client_msg_id,
        session: Some(up.session.clone()).filter(|s| !s.is_empty()),
        gw: header(headers::GATEWAY).to_string(),
        conn: header(headers::CONN).parse().unwrap_or(0),
        body: Bytes::new(),
    };
    Ok(UplinkInput { request, up, body })
}

/// The headers of the business request for an uplink: every value checked (a CR/LF in a
/// session or id is `bad_request`, never a panic).
pub fn business_request_headers(input: &UplinkInput) -> Result<HeaderMap, WireError> {
    input.request.to_headers()
}

/// A business push on `tether.<app>.push`: the app from the subject, the push validated
/// (targets, ids, meta), and the largest frame it can produce encodable.
pub fn push(
    subject: &str,
    map: Option<&HeaderMap>,
    body: Bytes,
) -> Result<(String, Push), WireError> {
    let Some(app) = Subject::parse(subject).and_then(|s| match s {
        Subject::Push { app } => Some(app),
        _ => None,
    }) else {
        return Err(WireError::bad_request("not a push subject"));
    };
    let push = Push::from_message(map, body)?;
    let largest = Frame::Down {
        header: pb::Down {
            seq: u64::MAX,
            session: push.session.clone().unwrap_or_default(),
            room_seq: u64::MAX,
            sent_at_ms: u64::MAX,
            meta: push.meta.clone(),
        },
        qos1: push.qos1.unwrap_or(true),
        body: Bytes::new(),
    };
    if largest.try_encode().is_err() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "push metadata too large for one frame",
        ));
    }
    Ok((app.to_string(), push))
}

/// A business service's answer to an uplink request, as (code, message, server id): a
/// `stored` reply is code 0; an error reply's code (never 0: `ok` reads as `rejected`);
/// anything unreadable is `internal`.
pub fn business_reply(payload: &[u8]) -> (ErrorCode, String, String) {
    match UplinkReply::from_json(payload) {
        Ok(UplinkReply::Stored { id }) => (ErrorCode::Ok, String::new(), id.unwrap_or_default()),
        Ok(UplinkReply::Error { code, message }) => {
            let code = if code == ErrorCode::Ok {
                ErrorCode::Rejected
            } else {
                code
            };
            (code, message, String::new())
        }
        Err(error) => (
            ErrorCode::Internal,
            format!("business reply is not valid json: {error}"),
            String::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_schemas::bus::{ConnEvent, SessionChange};

    fn conn_up(app: &str, did: &str) -> Vec<u8> {
        Event::ConnUp(ConnEvent {
            app: app.into(),
            uid: "u".into(),
            did: did.into(),
            gw: "gw1".into(),
            conn: 1,
            ..Default::default()
        })
        .to_json()
        .map(|b| b.to_vec())
        .unwrap_or_default()
    }

    #[test]
    fn events_must_match_their_subject() {
        let subject = subjects::conn_events("a", "d1");
        assert!(event(&subject, &conn_up("a", "d1")).is_ok());
        let forged = event(&subject, &conn_up("b", "d1"));
        assert_eq!(forged.map_err(|r| r.reason), Err("event_identity"));
        let other = (0..100)
            .map(|i| format!("x{i}"))
            .find(|d| subjects::partition(d) != subjects::partition("d1"))
            .unwrap_or_default();
        assert!(event(&subject, &conn_up("a", &other)).is_err());
        let sess = Event::SessReplace(SessionChange {
            app: "a".into(),
            did: "d1".into(),
            sessions: vec![],
            at_ms: 0,
        })
        .to_json()
        .map(|b| b.to_vec())
        .unwrap_or_default();
        assert!(
            event(&subject, &sess).is_err(),
            "session event on a conn subject"
        );
        assert!(event(&subjects::session_events("a", "d1"), &sess).is_ok());
        assert!(event(&subject, b"{").is_err());
    }

    #[test]
    fn uplinks_take_identity_from_the_subject() {
        let frame = Frame::Up {
            header: pb::Up {
                client_msg_id: 7,
                session: "bad\r\nsession".into(),
            },
            body: Bytes::from_static(b"x"),
        }
        .encode();
        let mut map = HeaderMap::new();
        map.insert(headers::APP, "other");
        let forged = uplink(&subjects::uplink("a", "d1"), Some(&map), frame.clone());
        assert_eq!(forged.map_err(|r| r.reason), Err("uplink_identity"));
        map.insert(headers::APP, "a");
        let input = uplink(&subjects::uplink("a", "d1"), Some(&map), frame);
        let Ok(input) = input else {
            panic!("a valid up frame must decode");
        };
        assert_eq!(
            (input.request.app.as_str(), input.request.did.as_str()),
            ("a", "d1")
        );
        assert!(
            business_request_headers(&input).is_err(),
            "cr/lf never reaches a header"
        );
        assert_eq!(
            uplink(
                &subjects::uplink("a", "d1"),
                None,
                Bytes::from_static(b"junk")
            )
            .map_err(|r| r.reason),
            Err("not_an_up")
        );
    }

    #[test]
    fn pushes_are_bounded() {
        let subject = subjects::push("a");
        let mut map = HeaderMap::new();
        map.insert(headers::DID, "d1");
        assert!(push(&subject, Some(&map), Bytes::new()).is_ok());
        assert!(push(&subjects::session("a"), Some(&map), Bytes::new()).is_err());
        let long = "v".repeat(2000);
        map.insert("Tether-Meta-k", long.as_str());
        assert!(push(&subject, Some(&map), Bytes::new()).is_err());
    }
}
