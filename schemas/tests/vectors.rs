//! Every hex vector in `PROTOCOL.md` decodes, re-encodes to the same bytes, and together
//! they cover every frame type; the error code table matches `ErrorCode`.

mod common;

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use tether_schemas::limits::DEFAULT_MAX_FRAME_LEN;
use tether_schemas::{ErrorCode, Frame, FrameType, RawFrame, split_frame};

#[test]
fn every_vector_round_trips() {
    let vectors = common::vectors();
    assert!(
        !vectors.is_empty(),
        "no ```hex name=… blocks in PROTOCOL.md"
    );
    let mut names = BTreeSet::new();
    let mut covered = BTreeSet::new();
    for v in &vectors {
        assert!(
            names.insert(v.name.clone()),
            "duplicate vector name {}",
            v.name
        );

        // TCP path: the stream decoder, fed the frame plus the start of another.
        let mut buf = BytesMut::from(&v.bytes[..]);
        buf.extend_from_slice(&[0x54, 0x01]);
        let raw = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .unwrap_or_else(|e| panic!("vector {}: split_frame: {e}", v.name))
            .unwrap_or_else(|| panic!("vector {}: incomplete frame", v.name));
        assert_eq!(&buf[..], &[0x54, 0x01], "vector {}: wrong length", v.name);
        let frame =
            Frame::decode(&raw).unwrap_or_else(|e| panic!("vector {}: decode: {e}", v.name));
        assert_eq!(
            frame.encode(),
            &v.bytes[..],
            "vector {}: re-encoding differs",
            v.name
        );

        // WebSocket / NATS path: one frame per message.
        let raw = RawFrame::from_bytes(Bytes::from(v.bytes.clone()), DEFAULT_MAX_FRAME_LEN)
            .unwrap_or_else(|e| panic!("vector {}: from_bytes: {e}", v.name));
        assert_eq!(Frame::decode(&raw).ok(), Some(frame.clone()));

        let ty = frame.frame_type();
        assert!(
            v.description.starts_with(&format!("{} (", ty.as_str())),
            "vector {}: description should start with {:?}: {:?}",
            v.name,
            ty.as_str(),
            v.description
        );
        covered.insert(ty);
    }
    for ty in FrameType::ALL {
        assert!(
            covered.contains(&ty),
            "PROTOCOL.md has no test vector for {ty}"
        );
    }
}

#[test]
fn error_code_table_is_current() {
    let text = common::protocol_md();
    for code in ErrorCode::ALL {
        let row = format!(
            "| {} | `{}` | {} | {} | {} |",
            code.as_u16(),
            code.as_str(),
            code.meaning(),
            if code.is_retryable() { "yes" } else { "no" },
            code.http_status(),
        );
        assert!(text.contains(&row), "PROTOCOL.md lacks the row {row}");
    }
}

#[test]
fn proto_file_is_pasted_verbatim() {
    let proto = include_str!("../proto/tether.proto");
    assert!(
        common::protocol_md().contains(proto),
        "PROTOCOL.md's schema differs from tether.proto"
    );
}

#[test]
fn nats_section_heading_is_present() {
    assert!(common::protocol_md().contains("\n## 10. NATS subjects and messages\n"));
}
