//! Fuzzes what state reads from NATS: event JSON, uplink headers and frames, push headers
//! and bodies, business replies. Each input is split into a subject, header lines and a
//! payload; every checker must answer (accept or refuse) without panicking.
#![no_main]

use async_nats::HeaderMap;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_nats::subjects;
use tether_state::inputs;

/// `data` = selector byte, then `subject \n header-lines \n\n payload`.
fn split(data: &[u8]) -> Option<(u8, String, HeaderMap, Bytes)> {
    let (&selector, rest) = data.split_first()?;
    let text_end = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(rest.len());
    let (head, payload) = rest.split_at(text_end);
    let payload = payload.get(2..).unwrap_or_default();
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let subject = lines.next().unwrap_or_default().to_string();
    let mut map = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && let (Ok(name), Ok(value)) = (
                name.trim().parse::<async_nats::header::HeaderName>(),
                value.trim().parse::<async_nats::HeaderValue>(),
            )
        {
            map.append(name, value);
        }
    }
    Some((selector, subject, map, Bytes::copy_from_slice(payload)))
}

fuzz_target!(|data: &[u8]| {
    let Some((selector, subject, map, payload)) = split(data) else {
        return;
    };
    // Half the time use a well-formed subject, so the checks behind the subject run too.
    let subject = match selector % 8 {
        0 => subjects::conn_events("app", "d1"),
        1 => subjects::session_events("app", "d1"),
        2 => subjects::uplink("app", "d1"),
        3 => subjects::push("app"),
        _ => subject,
    };
    let _ = subjects::Subject::parse(&subject);
    let _ = inputs::event(&subject, &payload);
    if let Ok(input) = inputs::uplink(&subject, Some(&map), payload.clone()) {
        let _ = inputs::business_request_headers(&input);
    }
    let _ = inputs::push(&subject, Some(&map), payload.clone());
    let _ = inputs::business_reply(&payload);
});
