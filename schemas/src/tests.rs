//! Unit tests for framing and typed frames.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};

use crate::limits::{DEFAULT_MAX_FRAME_LEN, FIXED_HEADER_LEN, MAX_FRAME_LEN_CAP};
use crate::{ErrorCode, FixedHeader, Frame, FrameError, FrameType, RawFrame, flags, pb};
use crate::{encode_frame, split_frame, try_encode_frame};

/// One non-trivial frame of every type.
fn samples() -> Vec<Frame> {
    vec![
        Frame::Login(pb::Login {
            token: "tok".into(),
            did: "dev-1".into(),
            app: "chat".into(),
            resume_seq: 7,
            rooms: vec![pb::RoomCursor {
                session: "room-1".into(),
                room_seq: 3,
            }],
            sdk: "rust/0.1".into(),
        }),
        Frame::LoginAck(pb::LoginAck {
            conn_id: 99,
            gateway: "gw-1".into(),
            heartbeat_secs: 300,
            server_time_ms: 1_700_000_000_000,
            last_acked_seq: 6,
        }),
        Frame::Ping(Bytes::from_static(b"p")),
        Frame::Pong(Bytes::new()),
        Frame::Up {
            header: pb::Up {
                client_msg_id: 5,
                session: "s".into(),
            },
            body: Bytes::from_static(b"hello"),
        },
        Frame::UpAck(pb::UpAck {
            client_msg_id: 5,
            code: ErrorCode::Rejected.into(),
            message: "no".into(),
            server_msg_id: String::new(),
        }),
        Frame::Down {
            header: pb::Down {
                seq: 8,
                session: "s".into(),
                room_seq: 0,
                sent_at_ms: 1,
                meta: [("a".to_owned(), "1".to_owned()), ("b".into(), "2".into())].into(),
            },
            qos1: true,
            body: Bytes::from_static(b"world"),
        },
        Frame::Down {
            header: pb::Down::default(),
            qos1: false,
            body: Bytes::new(),
        },
        Frame::DownAck(pb::DownAck { seq: 8 }),
        Frame::Redirect(pb::Redirect {
            endpoint: "10.0.0.2:7000".into(),
            token: "t2".into(),
            reason: "drain".into(),
        }),
        Frame::error(ErrorCode::BadToken, "bad token", true),
    ]
}

#[test]
fn round_trip_every_frame_type() {
    let frames = samples();
    for ty in FrameType::ALL {
        assert!(
            frames.iter().any(|f| f.frame_type() == ty),
            "no sample for {ty}"
        );
    }
    for frame in frames {
        let bytes = frame.encode();
        assert_eq!(
            bytes.len(),
            Frame::decode(&raw(&bytes)).unwrap().encode().len()
        );
        let raw = RawFrame::from_bytes(bytes.clone(), DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(raw.kind().unwrap(), frame.frame_type());
        assert_eq!(raw.header.flags, frame.flags());
        let back = Frame::decode(&raw).unwrap();
        assert_eq!(back, frame);
        assert_eq!(back.encode(), bytes);
    }
}

fn raw(bytes: &Bytes) -> RawFrame {
    RawFrame::from_bytes(bytes.clone(), DEFAULT_MAX_FRAME_LEN).unwrap()
}

#[test]
fn encode_allocates_exactly() {
    let frame = &samples()[0];
    let bytes = frame.encode();
    let header = FixedHeader::parse(&bytes).unwrap().unwrap();
    assert_eq!(header.frame_len(), bytes.len());
    let mut head = [0; FIXED_HEADER_LEN];
    header.write_to(&mut head);
    assert_eq!(head[..], bytes[..FIXED_HEADER_LEN]);
    let mut put = BytesMut::new();
    header.put(&mut put);
    assert_eq!(put[..], head[..]);
}

#[test]
fn split_frame_byte_by_byte() {
    let frames = samples();
    let stream: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in stream {
        buf.extend_from_slice(&[byte]);
        while let Some(raw) = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
            out.push(Frame::decode(&raw).unwrap());
        }
    }
    assert!(buf.is_empty());
    assert_eq!(out, frames);
}

#[test]
fn split_frame_back_to_back_in_one_read() {
    let frames = samples();
    let stream: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
    let mut buf = BytesMut::from(&stream[..]);
    let mut n = 0;
    while let Some(raw) = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
        assert_eq!(Frame::decode(&raw).unwrap(), frames[n]);
        n += 1;
    }
    assert_eq!(n, frames.len());
}

#[test]
fn too_large_refused_from_header_alone() {
    let header = FixedHeader {
        frame_type: FrameType::Up as u8,
        flags: 0,
        header_len: 2,
        body_len: u32::MAX,
    };
    let mut buf = BytesMut::from(&header.to_bytes()[..]);
    let err = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(
        err,
        FrameError::TooLarge {
            max: DEFAULT_MAX_FRAME_LEN,
            ..
        }
    ));
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);

    // Just over the limit, with only the fixed header buffered.
    let over = FixedHeader {
        body_len: u32::try_from(DEFAULT_MAX_FRAME_LEN - FIXED_HEADER_LEN + 1).unwrap(),
        header_len: 0,
        ..header
    };
    let mut buf = BytesMut::from(&over.to_bytes()[..]);
    let err = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: DEFAULT_MAX_FRAME_LEN + 1,
            max: DEFAULT_MAX_FRAME_LEN
        }
    );

    // Exactly at the limit is fine (and waits for the rest).
    let at = FixedHeader {
        body_len: over.body_len - 1,
        ..over
    };
    let mut buf = BytesMut::from(&at.to_bytes()[..]);
    assert_eq!(split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN), Ok(None));
}

#[test]
fn configured_max_is_clamped_to_cap() {
    let header = FixedHeader {
        frame_type: FrameType::Down as u8,
        flags: 0,
        header_len: 0,
        body_len: u32::try_from(MAX_FRAME_LEN_CAP).unwrap(),
    };
    let mut buf = BytesMut::from(&header.to_bytes()[..]);
    let err = split_frame(&mut buf, usize::MAX).unwrap_err();
    assert!(matches!(
        err,
        FrameError::TooLarge {
            max: MAX_FRAME_LEN_CAP,
            ..
        }
    ));
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = samples()[0].encode().to_vec();
    bytes[0] = b'G';
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
        Err(FrameError::BadMagic(b'G'))
    );
    assert_eq!(FrameError::BadMagic(0).code(), ErrorCode::BadFrame);

    bytes[0] = 0x54;
    bytes[1] = 2;
    let err = RawFrame::from_bytes(Bytes::from(bytes), DEFAULT_MAX_FRAME_LEN).unwrap_err();
    assert_eq!(err, FrameError::UnsupportedVersion(2));
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
}

#[test]
fn short_input_waits() {
    let bytes = samples()[0].encode();
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        assert_eq!(
            split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
            Ok(None),
            "prefix {n}"
        );
        assert_eq!(buf.len(), n);
    }
    assert_eq!(FixedHeader::parse(&bytes[..9]), Ok(None));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
    assert_eq!(
        split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
        Err(FrameError::BadMagic(b'G'))
    );

    // Valid fixed header, garbage var header.
    let mut bytes = FixedHeader {
        frame_type: 1,
        flags: 0,
        header_len: 3,
        body_len: 0,
    }
    .to_bytes()
    .to_vec();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
    let raw = RawFrame::from_bytes(Bytes::from(bytes), DEFAULT_MAX_FRAME_LEN).unwrap();
    let err = Frame::decode(&raw).unwrap_err();
    assert!(matches!(err, FrameError::BadHeader(_)), "{err:?}");
    assert_eq!(err.code(), ErrorCode::BadFrame);
}

#[test]
fn unknown_type_passes_framing_but_not_decoding() {
    for ty in [0_u8, 11, 200, 255] {
        let header = FixedHeader {
            frame_type: ty,
            flags: 0,
            header_len: 0,
            body_len: 2,
        };
        let mut buf = BytesMut::from(&header.to_bytes()[..]);
        buf.extend_from_slice(b"xyz");
        let raw = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], b"z");
        assert_eq!(raw.body(), Bytes::from_static(b"xy"));
        assert_eq!(Frame::decode(&raw), Err(FrameError::UnknownType(ty)));
        assert_eq!(FrameType::try_from(ty), Err(FrameError::UnknownType(ty)));
    }
}

#[test]
fn from_bytes_wants_exactly_one_frame() {
    let bytes = samples()[1].encode();
    let mut longer = bytes.to_vec();
    longer.push(0);
    let err = RawFrame::from_bytes(Bytes::from(longer), DEFAULT_MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(err, FrameError::LengthMismatch { .. }));
    let shorter = bytes.slice(..bytes.len() - 1);
    assert!(RawFrame::from_bytes(shorter, DEFAULT_MAX_FRAME_LEN).is_err());
    assert!(RawFrame::from_bytes(bytes.slice(..4), DEFAULT_MAX_FRAME_LEN).is_err());
    let err = RawFrame::from_bytes(bytes.clone(), 12).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { max: 12, .. }));
}

#[test]
fn shape_rules() {
    // PING with a var header.
    let ping = encode_frame(FrameType::Ping, 0, &pb::DownAck { seq: 1 }, b"");
    assert_eq!(
        Frame::decode(&raw(&ping)),
        Err(FrameError::UnexpectedHeader(FrameType::Ping))
    );
    // LOGIN with a body.
    let login = encode_frame(FrameType::Login, 0, &pb::Login::default(), b"x");
    assert_eq!(
        Frame::decode(&raw(&login)),
        Err(FrameError::UnexpectedBody(FrameType::Login))
    );
    // Reserved flag bits are ignored; QOS1 on a non-DOWN frame means nothing.
    let down = encode_frame(
        FrameType::Down,
        0xfc | flags::QOS1,
        &pb::Down::default(),
        b"b",
    );
    assert!(matches!(
        Frame::decode(&raw(&down)),
        Ok(Frame::Down { qos1: true, .. })
    ));
    let ack = encode_frame(FrameType::DownAck, 0xff, &pb::DownAck { seq: 3 }, b"");
    assert_eq!(
        Frame::decode(&raw(&ack)),
        Ok(Frame::DownAck(pb::DownAck { seq: 3 }))
    );
    // Error's CLOSE flag.
    let err = Frame::error(ErrorCode::GoingAway, "", false).encode();
    assert!(matches!(
        Frame::decode(&raw(&err)),
        Ok(Frame::Error { close: false, .. })
    ));
}

#[test]
fn inconsistent_raw_frame_is_refused() {
    let bytes = samples()[4].encode();
    let mut raw = raw(&bytes);
    raw.header.body_len += 1;
    assert!(matches!(
        Frame::decode(&raw),
        Err(FrameError::LengthMismatch { .. })
    ));
    assert_eq!(raw.body().len(), 5);
    raw.bytes = Bytes::new();
    assert!(raw.var_header().is_empty() && raw.body().is_empty());
}

#[test]
fn oversized_var_header_is_an_error_for_try_encode() {
    let big = pb::Down {
        meta: [("k".to_owned(), "v".repeat(70_000))].into(),
        ..Default::default()
    };
    let err = try_encode_frame(FrameType::Down, 0, &big, b"").unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { max: 65_535, .. }));
    let frame = Frame::Down {
        header: big,
        qos1: false,
        body: Bytes::new(),
    };
    assert!(frame.try_encode().is_err());
}

#[test]
fn frame_type_names() {
    for (i, ty) in FrameType::ALL.into_iter().enumerate() {
        assert_eq!(usize::from(ty as u8), i + 1);
        assert_eq!(FrameType::try_from(ty as u8), Ok(ty));
    }
    assert_eq!(FrameType::LoginAck.as_str(), "LOGIN_ACK");
    assert_eq!(FrameType::Error.to_string(), "ERROR");
}
