//! Property-style robustness test without extra dependencies: hundreds of thousands of
//! pseudo-random and mutated inputs go through `split_frame`, `RawFrame::from_bytes` and
//! `Frame::decode`. Nothing may panic, and whatever decodes must re-encode to something
//! that decodes to the same frame.

mod common;

use bytes::{Bytes, BytesMut};
use tether_schemas::limits::FIXED_HEADER_LEN;
use tether_schemas::{Frame, RawFrame, split_frame};

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

const MAX: usize = 4096;

/// Runs one input through both decoding paths, checking invariants; returns how many
/// frames decoded.
fn check(input: &[u8]) -> usize {
    let mut decoded = 0;
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match split_frame(&mut buf, MAX) {
            Ok(Some(raw)) => {
                assert_eq!(raw.bytes.len(), raw.header.frame_len());
                assert!(raw.bytes.len() <= MAX && raw.bytes.len() >= FIXED_HEADER_LEN);
                assert_eq!(buf.len() + raw.bytes.len(), before);
                decoded += usize::from(check_frame(&raw));
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(raw) = RawFrame::from_bytes(Bytes::copy_from_slice(input), MAX) {
        assert_eq!(raw.bytes.len(), input.len());
        decoded += usize::from(check_frame(&raw));
    }
    decoded
}

fn check_frame(raw: &RawFrame) -> bool {
    let Ok(frame) = Frame::decode(raw) else {
        return false;
    };
    assert_eq!(Ok(frame.frame_type()), raw.kind());
    let bytes = frame.encode();
    let again = RawFrame::from_bytes(bytes.clone(), usize::MAX).expect("re-encoded frame parses");
    assert_eq!(
        Frame::decode(&again).ok(),
        Some(frame),
        "decode(encode(f)) != f"
    );
    true
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for i in 0..200_000 {
        let len = rng.below(64);
        let mut input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        // Most random strings die at the magic byte; give half of them a valid prefix so
        // the length and var-header paths get exercised too.
        if i % 2 == 0 && input.len() >= 4 {
            input[0] = 0x54;
            input[1] = 0x01;
            input[2] = u8::try_from(rng.below(12)).unwrap_or(0);
            if let Some(rest) = input.len().checked_sub(FIXED_HEADER_LEN) {
                // Lengths that add up exactly half the time, random-ish otherwise.
                let hlen = rng.below(rest + 1);
                let blen = if i % 4 == 0 {
                    rest - hlen
                } else {
                    rng.below(rest + 1)
                };
                let hlen = u16::try_from(hlen).unwrap_or(0).to_be_bytes();
                let blen = u32::try_from(blen).unwrap_or(0).to_be_bytes();
                input[4..6].copy_from_slice(&hlen);
                input[6..10].copy_from_slice(&blen);
            }
        }
        decoded += check(&input);
    }
    assert!(
        decoded > 1000,
        "only {decoded} random inputs decoded; generator too weak"
    );
}

#[test]
fn mutated_vectors_never_panic() {
    let vectors = common::vectors();
    assert!(!vectors.is_empty());
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut decoded = 0;
    for _ in 0..200_000 {
        let mut input = vectors[rng.below(vectors.len())].bytes.clone();
        for _ in 0..=rng.below(4) {
            match rng.below(5) {
                // Flip a bit.
                0 => {
                    let i = rng.below(input.len());
                    if let Some(b) = input.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                // Overwrite a byte.
                1 => {
                    let i = rng.below(input.len());
                    if let Some(b) = input.get_mut(i) {
                        *b = rng.byte();
                    }
                }
                // Truncate.
                2 => input.truncate(rng.below(input.len() + 1)),
                // Append random bytes.
                3 => input.extend((0..rng.below(8)).map(|_| rng.byte())),
                // Append another vector (back-to-back frames).
                _ => input.extend_from_slice(&vectors[rng.below(vectors.len())].bytes),
            }
        }
        decoded += check(&input);
    }
    assert!(decoded > 10_000, "only {decoded} mutated inputs decoded");
}
