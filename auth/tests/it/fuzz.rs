//! Garbage in, never a panic out; and no mutation of a genuine token verifies.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tether_auth::{AuthError, Claims, HEADER_B64, Right, Rights, TokenSigner};

use crate::TestResult;

const NOW: u64 = 1_767_225_600;
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick(&mut self, from: &[u8]) -> char {
        char::from(from.get(self.below(from.len())).copied().unwrap_or(b'A'))
    }
    fn any_char(&mut self) -> char {
        match self.below(4) {
            0 => self.pick(b"._-=+/ \n\0{}\""),
            1 => char::from_u32(self.below(0x11_0000) as u32).unwrap_or('\u{fffd}'),
            _ => self.pick(B64),
        }
    }
    fn b64_string(&mut self, n: usize) -> String {
        (0..n).map(|_| self.pick(B64)).collect()
    }
}

fn check_never_ok(verifier: &tether_auth::TokenVerifier, input: &str) {
    // Only genuine tokens may verify; the point here is that nothing panics.
    let result = verifier.verify(input, NOW);
    assert!(result.is_err(), "garbage verified: {input:?}");
}

#[test]
fn random_strings_never_panic() {
    let verifier = TokenSigner::generate().verifier();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..20_000 {
        let input: String = match round % 5 {
            // Arbitrary characters, any length up to a little over the cap.
            0 => (0..rng.below(5000)).map(|_| rng.any_char()).collect(),
            // base64url with dots in random places.
            1 => (0..rng.below(400))
                .map(|_| {
                    if rng.below(20) == 0 {
                        '.'
                    } else {
                        rng.pick(B64)
                    }
                })
                .collect(),
            // Right shape, random bytes: reaches signature decompression and verify.
            2 => {
                let n = rng.below(200);
                let payload = rng.bytes(n);
                let sig = rng.bytes(64);
                format!(
                    "{HEADER_B64}.{}.{}",
                    URL_SAFE_NO_PAD.encode(payload),
                    URL_SAFE_NO_PAD.encode(sig)
                )
            }
            // Random header part, random signature text of the right length.
            3 => {
                let len = rng.below(60);
                let h = rng.b64_string(len);
                let n = rng.below(100);
                let p = rng.b64_string(n);
                let s = rng.b64_string(86);
                format!("{h}.{p}.{s}")
            }
            // Random JSON-ish headers, base64url encoded.
            _ => {
                let header: String = (0..rng.below(60)).map(|_| rng.any_char()).collect();
                let header = format!(r#"{{"alg":"EdDSA",{header}}}"#);
                format!(
                    "{}.e30.{}",
                    URL_SAFE_NO_PAD.encode(header),
                    rng.b64_string(86)
                )
            }
        };
        check_never_ok(&verifier, &input);
    }
}

#[test]
fn huge_inputs_are_malformed() {
    let verifier = TokenSigner::generate().verifier();
    for len in [4097, 10_000, 1 << 20, 16 << 20] {
        let dots = format!("{HEADER_B64}.{}", "A.".repeat(len / 2));
        for input in ["A".repeat(len), dots] {
            assert!(matches!(
                verifier.verify(&input, NOW),
                Err(AuthError::Malformed(_))
            ));
        }
    }
}

#[test]
fn mutated_tokens_never_verify() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let mut claims = Claims::new("demo", "alice", "phone-1", NOW, Duration::from_secs(600));
    claims.rights = Rights::of(&[Right::Up, Right::Rooms]);
    claims.sess = vec!["room-42".into()];
    let token = signer.sign(&claims)?;
    assert_eq!(verifier.verify(&token, NOW)?, claims);

    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let original: Vec<char> = token.chars().collect();
    let mut accepted_unchanged = 0;
    for _ in 0..3_000 {
        let mut t = original.clone();
        for _ in 0..=rng.below(3) {
            let len = t.len();
            match rng.below(7) {
                0 => {
                    if let Some(c) = t.get_mut(rng.below(len)) {
                        *c = rng.pick(B64);
                    }
                }
                1 => {
                    if let Some(c) = t.get_mut(rng.below(len)) {
                        *c = rng.any_char();
                    }
                }
                2 => t.insert(rng.below(len + 1), rng.any_char()),
                3 => {
                    let at = rng.below(len);
                    let end = (at + 1 + rng.below(8)).min(len);
                    t.drain(at..end);
                }
                4 => t.truncate(rng.below(len)),
                5 => {
                    let at = rng.below(len);
                    let chunk: Vec<char> = t.iter().skip(at).take(rng.below(40)).copied().collect();
                    let to = rng.below(len);
                    t.splice(to..to, chunk);
                }
                _ => {
                    // Swap two characters (often across a dot).
                    let (a, b) = (rng.below(len), rng.below(len));
                    if a < len && b < len {
                        t.swap(a, b);
                    }
                }
            }
        }
        let mutated: String = t.into_iter().collect();
        let result = verifier.verify(&mutated, NOW);
        if mutated == token {
            accepted_unchanged += 1;
            assert!(result.is_ok());
        } else {
            assert!(result.is_err(), "mutation verified: {mutated:?}");
        }
    }
    assert!(accepted_unchanged < 300, "mutations too weak");
    Ok(())
}
