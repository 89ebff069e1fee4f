//! Feeds arbitrary bytes to every decoding entry point: the TCP stream decoder (in chunks
//! whose sizes come from the input, to exercise partial frames), the one-frame decoder
//! used for WebSocket messages and NATS payloads, and typed decoding. Whatever decodes
//! must re-encode to a frame that decodes to the same value.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether_schemas::{Frame, RawFrame, split_frame};

const MAX: usize = 8192;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read chunk size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    'read: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match split_frame(&mut buf, MAX) {
                Ok(Some(raw)) => {
                    assert_eq!(raw.bytes.len(), raw.header.frame_len());
                    check(&raw);
                }
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
    }

    if let Ok(raw) = RawFrame::from_bytes(Bytes::copy_from_slice(stream), MAX) {
        check(&raw);
    }
});

fn check(raw: &RawFrame) {
    if let Ok(frame) = Frame::decode(raw) {
        let bytes = frame.encode();
        let again = RawFrame::from_bytes(bytes, usize::MAX).expect("re-encoded frame parses");
        assert_eq!(Frame::decode(&again).ok(), Some(frame));
    }
}
