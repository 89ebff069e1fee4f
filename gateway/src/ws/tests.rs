//! Unit tests of the handshake and the frame codec.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};

use super::frame::{WsDecoder, WsError, WsEvent, close_code, opcode};
use super::handshake::{Handshake, parse_upgrade};
use super::{binary_header_len, encode_close, encode_control, encode_frame_header};

const MAX: usize = 1 << 20;

// ---------------------------------------------------------------- handshake

fn request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\n\
         Host: example.com\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         {extra}\r\n"
    )
}

fn accept(buf: &[u8]) -> (String, usize) {
    match parse_upgrade(buf, "/ws", 4096) {
        Handshake::Accept { response, consumed } => {
            (String::from_utf8(response.to_vec()).unwrap(), consumed)
        }
        other => panic!("expected Accept, got {other:?}"),
    }
}

fn rejected(buf: &[u8]) -> (u16, &'static str, String) {
    rejected_with(buf, 4096)
}

fn rejected_with(buf: &[u8], max_len: usize) -> (u16, &'static str, String) {
    match parse_upgrade(buf, "/ws", max_len) {
        Handshake::Reject {
            response,
            status,
            reason,
        } => {
            let text = String::from_utf8(response.to_vec()).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{text}"
            );
            assert_eq!(body, format!("{reason}\n"));
            (status, reason, text)
        }
        other => panic!("expected Reject, got {other:?}"),
    }
}

#[test]
fn handshake_accepts_rfc_example() {
    let req = request("");
    let (resp, consumed) = accept(req.as_bytes());
    assert_eq!(consumed, req.len());
    assert_eq!(
        resp,
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
         \r\n"
    );
}

#[test]
fn handshake_byte_by_byte() {
    let req = request("Sec-WebSocket-Extensions: permessage-deflate\r\n");
    let bytes = req.as_bytes();
    for end in 0..bytes.len() {
        assert_eq!(
            parse_upgrade(&bytes[..end], "/ws", 4096),
            Handshake::Incomplete,
            "at {end}"
        );
    }
    let (resp, consumed) = accept(bytes);
    assert_eq!(consumed, bytes.len());
    // Extensions are ignored.
    assert!(!resp.contains("Extensions"));
}

#[test]
fn handshake_leaves_frame_bytes() {
    let mut buf = request("").into_bytes();
    let req_len = buf.len();
    let frame = masked(opcode::BINARY, true, b"hello", [1, 2, 3, 4]);
    buf.extend_from_slice(&frame);
    let (_, consumed) = accept(&buf);
    assert_eq!(consumed, req_len);
    let mut rest = BytesMut::from(&buf[consumed..]);
    let ev = WsDecoder::default().decode(&mut rest, MAX).unwrap();
    assert_eq!(ev, Some(WsEvent::Binary(Bytes::from_static(b"hello"))));
}

#[test]
fn handshake_query_string_and_lists() {
    let req = "GET /ws?token=abc&x=1 HTTP/1.1\r\n\
               Host: h\r\n\
               upgrade: WebSocket, foo\r\n\
               connection: keep-alive, UPGRADE\r\n\
               sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==  \r\n\
               sec-websocket-version:13\r\n\r\n";
    let (resp, _) = accept(req.as_bytes());
    assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    // Connection spread over two headers.
    let req = request("").replace(
        "Connection: Upgrade\r\n",
        "Connection: keep-alive\r\nConnection: upgrade\r\n",
    );
    accept(req.as_bytes());
}

#[test]
fn handshake_subprotocol() {
    let (resp, _) = accept(request("Sec-WebSocket-Protocol: chat, tether.v1\r\n").as_bytes());
    assert!(
        resp.contains("\r\nSec-WebSocket-Protocol: tether.v1\r\n"),
        "{resp}"
    );
    let (resp, _) = accept(
        request("Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: tether.v1\r\n").as_bytes(),
    );
    assert!(
        resp.contains("\r\nSec-WebSocket-Protocol: tether.v1\r\n"),
        "{resp}"
    );
    let (resp, _) = accept(request("Sec-WebSocket-Protocol: chat, tether.v2\r\n").as_bytes());
    assert!(!resp.contains("Sec-WebSocket-Protocol"), "{resp}");
    let (resp, _) = accept(request("").as_bytes());
    assert!(!resp.contains("Sec-WebSocket-Protocol"), "{resp}");
}

#[test]
fn handshake_rejects() {
    let base = request("");
    let cases: Vec<(String, u16, &str)> = vec![
        (base.replace("GET ", "POST "), 400, "method must be GET"),
        (base.replace("HTTP/1.1", "HTTP/1.0"), 400, "HTTP/1.1 required"),
        (base.replace("GET /ws ", "GET /other "), 404, "not found"),
        (base.replace("GET /ws ", "GET /ws/ "), 404, "not found"),
        (base.replace("GET /ws ", "GET /wsx?a "), 404, "not found"),
        (base.replace("Upgrade: websocket\r\n", ""), 400, "missing Upgrade: websocket"),
        (base.replace("Upgrade: websocket", "Upgrade: h2c"), 400, "missing Upgrade: websocket"),
        (base.replace("Connection: Upgrade", "Connection: keep-alive"), 400, "missing Connection: upgrade"),
        (base.replace("Sec-WebSocket-Version: 13\r\n", ""), 426, "Sec-WebSocket-Version 13 required"),
        (base.replace("Version: 13", "Version: 8"), 426, "Sec-WebSocket-Version 13 required"),
        (base.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), 400, "missing or repeated Sec-WebSocket-Key"),
        (base.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ"), 400, "invalid Sec-WebSocket-Key"),
        (base.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZSE="), 400, "invalid Sec-WebSocket-Key"),
        (base.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!=="), 400, "invalid Sec-WebSocket-Key"),
        (base.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"), 400, "missing or repeated Sec-WebSocket-Key"),
        ("\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03".to_owned(), 400, "malformed HTTP request"),
        ("GET /ws HTTP/1.1\r\nBad Header\r\n\r\n".to_owned(), 400, "malformed HTTP request"),
    ];
    for (req, status, reason) in cases {
        let (s, r, text) = rejected(req.as_bytes());
        assert_eq!((s, r), (status, reason), "{req:?}");
        if s == 426 {
            assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
        }
    }
}

#[test]
fn handshake_too_large() {
    let req = request("");
    // Complete request longer than max_len.
    let (s, r, _) = rejected_with(req.as_bytes(), req.len() - 1);
    assert_eq!((s, r), (431, "request too large"));
    // Exactly max_len is fine, even with frame bytes after it.
    let mut buf = req.clone().into_bytes();
    buf.extend_from_slice(&[0x82, 0x80, 0, 0, 0, 0]);
    assert!(matches!(
        parse_upgrade(&buf, "/ws", req.len()),
        Handshake::Accept { consumed, .. } if consumed == req.len()
    ));
    // A never-ending header line.
    let mut endless = b"GET /ws HTTP/1.1\r\nX-Junk: ".to_vec();
    endless.resize(5000, b'a');
    let (s, _, _) = rejected_with(&endless, 4096);
    assert_eq!(s, 431);
    assert_eq!(
        parse_upgrade(&endless[..4095], "/ws", 4096),
        Handshake::Incomplete
    );
    // Too many headers.
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (s, r, _) = rejected(request(&many).as_bytes());
    assert_eq!((s, r), (431, "too many headers"));
}

// ---------------------------------------------------------------- frames

/// A masked client frame.
fn masked(op: u8, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | op];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<WsEvent>, WsError> {
    let mut dec = WsDecoder::default();
    let mut buf = BytesMut::from(bytes);
    let mut events = Vec::new();
    while let Some(ev) = dec.decode(&mut buf, max)? {
        events.push(ev);
    }
    assert!(buf.is_empty(), "left {} bytes", buf.len());
    Ok(events)
}

fn decode_one(bytes: &[u8]) -> Result<Option<WsEvent>, WsError> {
    WsDecoder::default().decode(&mut BytesMut::from(bytes), MAX)
}

#[test]
fn decoder_is_small() {
    assert!(std::mem::size_of::<WsDecoder>() <= 32);
    assert_eq!(WsDecoder::default().buffered(), 0);
}

#[test]
fn binary_lengths() {
    for len in [0, 1, 7, 8, 9, 125, 126, 127, 1000, 65535, 65536, 70_000] {
        let payload = pattern(len);
        let frame = masked(opcode::BINARY, true, &payload, [0x37, 0xfa, 0x21, 0x3d]);
        let header = frame.len() - len;
        assert_eq!(header, 4 + binary_header_len(len), "len {len}");
        let events = decode_all(&frame, MAX).unwrap();
        assert_eq!(
            events,
            vec![WsEvent::Binary(Bytes::from(payload))],
            "len {len}"
        );
    }
}

#[test]
fn byte_by_byte() {
    let mut stream = Vec::new();
    stream.extend(masked(opcode::BINARY, true, &pattern(300), [1, 2, 3, 4]));
    stream.extend(masked(opcode::PING, true, b"hi", [5, 6, 7, 8]));
    stream.extend(masked(opcode::BINARY, false, b"ab", [9, 9, 9, 9]));
    stream.extend(masked(opcode::CONTINUATION, true, b"cd", [1, 1, 1, 1]));
    stream.extend(masked(
        opcode::BINARY,
        true,
        &pattern(70_000),
        [0xde, 0xad, 0xbe, 0xef],
    ));
    stream.extend(masked(opcode::CLOSE, true, b"\x03\xe8bye", [2, 2, 2, 2]));

    let mut dec = WsDecoder::default();
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for &b in &stream {
        buf.extend_from_slice(&[b]);
        while let Some(ev) = dec.decode(&mut buf, MAX).unwrap() {
            events.push(ev);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(
        events,
        vec![
            WsEvent::Binary(Bytes::from(pattern(300))),
            WsEvent::Ping(Bytes::from_static(b"hi")),
            WsEvent::Binary(Bytes::from_static(b"abcd")),
            WsEvent::Binary(Bytes::from(pattern(70_000))),
            WsEvent::Close {
                code: Some(1000),
                reason: "bye".into()
            },
        ]
    );
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn fragmentation_with_interleaved_control() {
    let mut stream = Vec::new();
    stream.extend(masked(opcode::BINARY, false, b"one ", [1, 2, 3, 4]));
    stream.extend(masked(opcode::PING, true, b"p", [1, 2, 3, 4]));
    stream.extend(masked(opcode::CONTINUATION, false, b"", [1, 2, 3, 4]));
    stream.extend(masked(opcode::CONTINUATION, false, b"two ", [4, 3, 2, 1]));
    stream.extend(masked(opcode::PONG, true, b"", [1, 2, 3, 4]));
    stream.extend(masked(opcode::CONTINUATION, true, b"three", [7, 7, 7, 7]));
    stream.extend(masked(opcode::BINARY, true, b"next", [7, 7, 7, 7]));
    let events = decode_all(&stream, MAX).unwrap();
    assert_eq!(
        events,
        vec![
            WsEvent::Ping(Bytes::from_static(b"p")),
            WsEvent::Pong(Bytes::new()),
            WsEvent::Binary(Bytes::from_static(b"one two three")),
            WsEvent::Binary(Bytes::from_static(b"next")),
        ]
    );
}

#[test]
fn fragments_buffered_count() {
    let mut dec = WsDecoder::default();
    let mut buf = BytesMut::from(&masked(opcode::BINARY, false, b"12345678", [1, 2, 3, 4])[..]);
    assert_eq!(dec.decode(&mut buf, MAX).unwrap(), None);
    assert!(dec.buffered() >= 8);
    buf.extend_from_slice(&masked(opcode::CONTINUATION, true, b"9", [1, 2, 3, 4]));
    assert_eq!(
        dec.decode(&mut buf, MAX).unwrap(),
        Some(WsEvent::Binary(Bytes::from_static(b"123456789")))
    );
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn too_large_from_header() {
    // Only the header of a 70 KB frame: refused before the payload arrives.
    let frame = masked(opcode::BINARY, true, &pattern(70_000), [1, 2, 3, 4]);
    assert_eq!(
        WsDecoder::default().decode(&mut BytesMut::from(&frame[..14]), 1000),
        Err(WsError::TooLarge {
            len: 70_000,
            max: 1000
        })
    );
    let err = WsDecoder::default()
        .decode(&mut BytesMut::from(&frame[..10]), 65_536)
        .unwrap_err();
    assert_eq!(
        err,
        WsError::TooLarge {
            len: 70_000,
            max: 65_536
        }
    );
    assert_eq!(err.close_code(), close_code::MESSAGE_TOO_BIG);
    // Exactly max is fine.
    assert!(decode_all(&frame, 70_000).is_ok());
    // Fragments count together.
    let mut stream = masked(opcode::BINARY, false, &pattern(60), [1, 2, 3, 4]);
    stream.extend(masked(
        opcode::CONTINUATION,
        false,
        &pattern(40),
        [1, 2, 3, 4],
    ));
    stream.extend(masked(
        opcode::CONTINUATION,
        true,
        &pattern(1),
        [1, 2, 3, 4],
    ));
    assert_eq!(
        decode_all(&stream, 100),
        Err(WsError::TooLarge { len: 101, max: 100 })
    );
    assert_eq!(decode_all(&stream, 101).unwrap().len(), 1);
    // 64-bit length with the high bit set.
    let mut huge = vec![0x82, 0xFF];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&[0; 4]);
    assert!(matches!(decode_one(&huge), Err(WsError::Protocol(_))));
    huge[2] = 0x7F;
    assert!(matches!(decode_one(&huge), Err(WsError::TooLarge { .. })));
}

#[test]
fn unmasked_refused() {
    let err = decode_one(&[0x82, 0x03, b'a', b'b', b'c']).unwrap_err();
    assert_eq!(err, WsError::Protocol("unmasked client frame"));
    assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
    // Detected from the first two bytes.
    assert!(decode_one(&[0x82, 0x03]).is_err());
}

#[test]
fn text_refused() {
    let err = decode_one(&masked(opcode::TEXT, true, b"hi", [1, 2, 3, 4])).unwrap_err();
    assert_eq!(err, WsError::Text);
    assert_eq!(err.close_code(), close_code::UNSUPPORTED_DATA);
    assert_eq!(decode_one(&[0x81]), Err(WsError::Text));
    // Fragmented text too.
    assert_eq!(decode_one(&[0x01]), Err(WsError::Text));
}

#[test]
fn bad_opcodes_and_bits() {
    for op in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
        let err = decode_one(&masked(op, true, b"x", [1, 2, 3, 4])).unwrap_err();
        assert_eq!(err, WsError::Protocol("unknown opcode"), "opcode {op}");
    }
    for rsv in [0x40u8, 0x20, 0x10] {
        let mut frame = masked(opcode::BINARY, true, b"x", [1, 2, 3, 4]);
        frame[0] |= rsv;
        assert_eq!(
            decode_one(&frame),
            Err(WsError::Protocol("reserved bits set"))
        );
    }
    // Continuation without a start.
    assert_eq!(
        decode_one(&masked(opcode::CONTINUATION, true, b"x", [1, 2, 3, 4])),
        Err(WsError::Protocol("continuation frame without a message"))
    );
    // New data frame while a fragmented message is open.
    let mut stream = masked(opcode::BINARY, false, b"a", [1, 2, 3, 4]);
    stream.extend(masked(opcode::BINARY, true, b"b", [1, 2, 3, 4]));
    assert_eq!(
        decode_all(&stream, MAX),
        Err(WsError::Protocol(
            "new data frame while a fragmented message is open"
        ))
    );
    let mut stream = masked(opcode::BINARY, false, b"a", [1, 2, 3, 4]);
    stream.extend(masked(opcode::TEXT, true, b"b", [1, 2, 3, 4]));
    assert!(matches!(
        decode_all(&stream, MAX),
        Err(WsError::Protocol(_))
    ));
}

#[test]
fn control_frames_checked() {
    for op in [opcode::PING, opcode::PONG, opcode::CLOSE] {
        // 125 bytes is the limit.
        let payload = if op == opcode::CLOSE {
            let mut p = b"\x03\xe8".to_vec();
            p.resize(125, b'r');
            p
        } else {
            pattern(125)
        };
        assert!(decode_one(&masked(op, true, &payload, [1, 2, 3, 4])).is_ok());
        let long = masked(op, true, &pattern(126), [1, 2, 3, 4]);
        assert_eq!(
            decode_one(&long),
            Err(WsError::Protocol(
                "control frame payload longer than 125 bytes"
            ))
        );
        let fragmented = masked(op, false, b"", [1, 2, 3, 4]);
        assert_eq!(
            decode_one(&fragmented),
            Err(WsError::Protocol("fragmented control frame"))
        );
    }
}

#[test]
fn close_frames() {
    assert_eq!(
        decode_one(&masked(opcode::CLOSE, true, b"", [1, 2, 3, 4])).unwrap(),
        Some(WsEvent::Close {
            code: None,
            reason: String::new()
        })
    );
    assert_eq!(
        decode_one(&masked(opcode::CLOSE, true, b"\x0f\xa0", [1, 2, 3, 4])).unwrap(),
        Some(WsEvent::Close {
            code: Some(4000),
            reason: String::new()
        })
    );
    assert_eq!(
        decode_one(&masked(
            opcode::CLOSE,
            true,
            &[&b"\x03\xe9"[..], "héllo".as_bytes()].concat(),
            [1, 2, 3, 4]
        ))
        .unwrap(),
        Some(WsEvent::Close {
            code: Some(1001),
            reason: "héllo".into()
        })
    );
    for bad in [
        &b"\x03"[..],
        b"\x03\xed",
        b"\x03\xee",
        b"\x00\x00",
        b"\x13\x88",
        b"\x03\xe8\xff",
    ] {
        assert!(
            matches!(
                decode_one(&masked(opcode::CLOSE, true, bad, [1, 2, 3, 4])),
                Err(WsError::Protocol(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn encoders() {
    let mut hdr = [0u8; 10];
    assert_eq!(encode_frame_header(opcode::BINARY, 0, &mut hdr), 2);
    assert_eq!(&hdr[..2], &[0x82, 0]);
    assert_eq!(encode_frame_header(opcode::BINARY, 125, &mut hdr), 2);
    assert_eq!(&hdr[..2], &[0x82, 125]);
    assert_eq!(encode_frame_header(opcode::BINARY, 126, &mut hdr), 4);
    assert_eq!(&hdr[..4], &[0x82, 126, 0, 126]);
    assert_eq!(encode_frame_header(opcode::BINARY, 65535, &mut hdr), 4);
    assert_eq!(&hdr[..4], &[0x82, 126, 0xff, 0xff]);
    assert_eq!(encode_frame_header(opcode::PING, 65536, &mut hdr), 10);
    assert_eq!(&hdr, &[0x89, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    for len in [0, 125, 126, 65535, 65536, usize::MAX] {
        assert_eq!(
            binary_header_len(len),
            encode_frame_header(2, len, &mut hdr)
        );
    }

    assert_eq!(&encode_control(opcode::PONG, b"abc")[..], b"\x8a\x03abc");
    let long = encode_control(opcode::PING, &pattern(300));
    assert_eq!(long.len(), 127);
    assert_eq!(&long[..2], &[0x89, 125]);

    assert_eq!(&encode_close(1000, "")[..], b"\x88\x02\x03\xe8");
    assert_eq!(&encode_close(1009, "big")[..], b"\x88\x05\x03\xf1big");
    // Reason cut on a character boundary: 61 two-byte characters = 122 bytes.
    let reason = "é".repeat(100);
    let frame = encode_close(close_code::POLICY_VIOLATION, &reason);
    assert_eq!(frame.len(), 2 + 2 + 122);
    assert_eq!(frame[1] as usize, frame.len() - 2);
    std::str::from_utf8(&frame[4..]).unwrap();
    // Same through encode_control with a raw close payload.
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    let frame2 = encode_control(opcode::CLOSE, &payload);
    assert_eq!(&frame2[2..4], b"\x03\xe8");
    assert_eq!(&frame2[4..], &frame[4..]);

    // What we encode, a client decoder (after masking) reads back.
    let close = encode_close(1000, "done");
    let mut client = close.to_vec();
    client[1] |= 0x80;
    client.splice(2..2, [0u8; 4]);
    assert_eq!(
        decode_one(&client).unwrap(),
        Some(WsEvent::Close {
            code: Some(1000),
            reason: "done".into()
        })
    );
}

#[test]
fn unmask_matches_bytewise() {
    for len in 0..64 {
        let payload = pattern(len);
        let key = [0x12, 0x34, 0x56, 0x78];
        let frame = masked(opcode::BINARY, true, &payload, key);
        assert_eq!(
            decode_one(&frame).unwrap(),
            Some(WsEvent::Binary(Bytes::from(payload)))
        );
    }
}

#[test]
fn garbage_never_panics() {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut decoder_events = 0usize;
    for i in 0..200_000 {
        // Mix pure garbage with plausible headers so the deeper paths are reached.
        let len = (next() % 40) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && bytes.len() >= 2 {
            bytes[0] &= 0x8F;
            bytes[1] |= 0x80;
        }
        let mut dec = WsDecoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        let max = (next() % 64) as usize;
        for _ in 0..8 {
            match dec.decode(&mut buf, max) {
                Ok(Some(_)) => decoder_events += 1,
                Ok(None) | Err(_) => break,
            }
        }
        let _ = parse_upgrade(&bytes, "/ws", (next() % 64) as usize);
        let mut hdr = [0u8; 10];
        let _ = encode_frame_header(bytes.first().copied().unwrap_or(0), len, &mut hdr);
        let _ = encode_control(opcode::CLOSE, &bytes);
    }
    assert!(decoder_events > 0);
}
