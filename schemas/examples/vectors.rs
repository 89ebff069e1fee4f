//! Prints the generated parts of `PROTOCOL.md`:
//! `cargo run -p tether-schemas --example vectors` prints the hex test vectors,
//! `cargo run -p tether-schemas --example vectors -- codes` the error code table.
//!
//! Paste the output into the matching section; `tests/vectors.rs` checks that every
//! vector there decodes and re-encodes to the same bytes, and that the table is current.

use bytes::Bytes;
use tether_schemas::{ErrorCode, FixedHeader, Frame, pb};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("codes") {
        print_codes();
    } else {
        print_vectors();
    }
}

fn print_codes() {
    println!("| code | name | meaning | retryable | HTTP |");
    println!("|---:|---|---|---|---:|");
    for code in ErrorCode::ALL {
        println!(
            "| {} | `{}` | {} | {} | {} |",
            code.as_u16(),
            code.as_str(),
            code.meaning(),
            if code.is_retryable() { "yes" } else { "no" },
            code.http_status(),
        );
    }
}

fn print_vectors() {
    for (name, frame, what) in vectors() {
        let bytes = frame.encode();
        let Ok(Some(head)) = FixedHeader::parse(&bytes) else {
            eprintln!("vector {name} does not parse");
            std::process::exit(1);
        };
        println!("```hex name={name}");
        for line in bytes.chunks(16) {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            println!("{}", hex.join(" "));
        }
        println!("```");
        println!(
            "{} ({} bytes): flags 0x{:02x}, var header {} bytes, body {} bytes. {what}",
            frame.frame_type(),
            bytes.len(),
            head.flags,
            head.header_len,
            head.body_len,
        );
        println!();
    }
}

fn vectors() -> Vec<(&'static str, Frame, &'static str)> {
    vec![
        (
            "login",
            Frame::Login(pb::Login {
                token: "tok-abc".into(),
                did: "dev-1".into(),
                app: "chat".into(),
                resume_seq: 41,
                rooms: vec![pb::RoomCursor {
                    session: "room-9".into(),
                    room_seq: 7,
                }],
                sdk: "rust/0.1.0".into(),
            }),
            "Login: token \"tok-abc\", did \"dev-1\", app \"chat\", resume_seq 41, \
             rooms [{session \"room-9\", room_seq 7}], sdk \"rust/0.1.0\".",
        ),
        (
            "login_ack",
            Frame::LoginAck(pb::LoginAck {
                conn_id: 1001,
                gateway: "gw-1".into(),
                heartbeat_secs: 300,
                server_time_ms: 1_700_000_000_000,
                last_acked_seq: 40,
            }),
            "LoginAck: conn_id 1001, gateway \"gw-1\", heartbeat_secs 300, \
             server_time_ms 1700000000000, last_acked_seq 40.",
        ),
        (
            "ping",
            Frame::Ping(Bytes::from_static(b"hb-1")),
            "No var header; body is the 4 ASCII bytes \"hb-1\".",
        ),
        (
            "ping_empty",
            Frame::Ping(Bytes::new()),
            "The smallest frame: no var header, no body.",
        ),
        (
            "pong",
            Frame::Pong(Bytes::from_static(b"hb-1")),
            "No var header; body \"hb-1\" echoed from the PING.",
        ),
        (
            "up",
            Frame::Up {
                header: pb::Up {
                    client_msg_id: 17,
                    session: "s-42".into(),
                },
                body: Bytes::from_static(b"hello"),
            },
            "Up: client_msg_id 17, session \"s-42\"; body \"hello\".",
        ),
        (
            "up_ack",
            Frame::UpAck(pb::UpAck {
                client_msg_id: 17,
                code: 0,
                message: String::new(),
                server_msg_id: "m-9001".into(),
            }),
            "UpAck: client_msg_id 17, code 0 (ok, field omitted), message \"\" (omitted), \
             server_msg_id \"m-9001\".",
        ),
        (
            "up_ack_rejected",
            Frame::UpAck(pb::UpAck {
                client_msg_id: 18,
                code: ErrorCode::Rejected.into(),
                message: "muted".into(),
                server_msg_id: String::new(),
            }),
            "UpAck: client_msg_id 18, code 18 (rejected), message \"muted\".",
        ),
        (
            "down",
            Frame::Down {
                header: pb::Down {
                    seq: 42,
                    session: "s-42".into(),
                    room_seq: 0,
                    sent_at_ms: 1_700_000_000_123,
                    meta: [("from".to_owned(), "u-7".to_owned())].into(),
                },
                qos1: true,
                body: Bytes::from_static(b"hi there"),
            },
            "QOS1 flag set. Down: seq 42, session \"s-42\", room_seq 0 (omitted), \
             sent_at_ms 1700000000123, meta {\"from\": \"u-7\"}; body \"hi there\".",
        ),
        (
            "down_qos0",
            Frame::Down {
                header: pb::Down {
                    seq: 0,
                    session: "room-9".into(),
                    room_seq: 8,
                    sent_at_ms: 1_700_000_000_456,
                    meta: Default::default(),
                },
                qos1: false,
                body: Bytes::from_static(b"live"),
            },
            "No flags (QoS0, do not ack). Down: seq 0, session \"room-9\", room_seq 8, \
             sent_at_ms 1700000000456; body \"live\".",
        ),
        (
            "down_ack",
            Frame::DownAck(pb::DownAck { seq: 42 }),
            "DownAck: seq 42 (acks every DOWN with seq <= 42).",
        ),
        (
            "redirect",
            Frame::Redirect(pb::Redirect {
                endpoint: "10.0.0.2:7000".into(),
                token: "tok-new".into(),
                reason: "drain".into(),
            }),
            "Redirect: endpoint \"10.0.0.2:7000\", token \"tok-new\", reason \"drain\".",
        ),
        (
            "error",
            Frame::Error {
                error: pb::Error {
                    code: ErrorCode::TokenExpired.into(),
                    text: "token expired".into(),
                    retry_after_ms: 0,
                },
                close: true,
            },
            "CLOSE flag set. Error: code 7 (token_expired), text \"token expired\".",
        ),
        (
            "error_rate_limited",
            Frame::Error {
                error: pb::Error {
                    code: ErrorCode::RateLimited.into(),
                    text: String::new(),
                    retry_after_ms: 1500,
                },
                close: false,
            },
            "No flags (connection stays open). Error: code 12 (rate_limited), \
             retry_after_ms 1500.",
        ),
    ]
}
