//! Gateway tokens: short-lived Ed25519-signed tokens that ipconfig (or
//! `tether token issue`) mints with a private key and that every gateway verifies locally
//! with the matching public key.
//!
//! A token is a standard JWT (RFC 7519) signed with `alg: "EdDSA"` (RFC 8037, Ed25519),
//! so any JWT library that supports EdDSA verifies it with the public key PEM.
//!
//! # Format, byte by byte
//!
//! A token is ASCII, at most 4096 bytes, three base64url parts joined by `.`:
//!
//! ```text
//! token = header_b64 "." payload_b64 "." signature_b64
//!
//! bytes      content
//! 0..36      header_b64: always "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9", the base64url of the
//!            27 ASCII bytes {"alg":"EdDSA","typ":"JWT"}
//! 36         "." (0x2E)
//! 37..p      payload_b64: base64url of the claims, one UTF-8 JSON object (below)
//! p          "." (0x2E)
//! p+1..p+87  signature_b64: 86 chars, base64url of the 64-byte Ed25519 signature
//!            (R || S, RFC 8032 pure Ed25519, no prehash, no context) computed over
//!            bytes 0..p, i.e. the ASCII text header_b64 "." payload_b64
//! ```
//!
//! base64url is RFC 4648 §5 (`A–Z a–z 0–9 - _`) without `=` padding, no whitespace.
//!
//! # Claims
//!
//! | claim  | JSON type        | meaning |
//! |--------|------------------|---------|
//! | `app`  | string (id)      | app (tenant) id |
//! | `uid`  | string (id)      | user id |
//! | `did`  | string (id)      | device id |
//! | `exp`  | integer          | expiry, unix seconds; refused when `exp <= now` |
//! | `iat`  | integer          | issue time, unix seconds |
//! | `pub`  | array of strings | rights: `"up"` (may send UP frames), `"rooms"` (may pass room cursors); absent = `["up"]`, unknown names ignored |
//! | `sess` | array of ids     | sessions to join at login; optional, omitted when empty |
//! | `gw`   | string (id)      | optional; only this gateway id accepts the token (redirects) |
//!
//! An id is 1 to 64 characters of `[A-Za-z0-9_-]` ([`valid_id`]); ids become NATS
//! subject tokens. `exp` and `iat` are non-negative integers (no fractions). Other claims
//! are ignored. Tokens are issued with the claims in the order above.
//!
//! # Verification
//!
//! 1. length ≤ 4096 and exactly three `.`-separated parts;
//! 2. the header is the 36 bytes above, or any base64url JSON object with
//!    `"alg":"EdDSA"`, `typ` absent or `"JWT"`, and no `crit` (so `none`, `HS256`, … are
//!    refused before any crypto);
//! 3. the signature decodes to 64 bytes and verifies with the public key under RFC 8032
//!    with the strict checks of ed25519-dalek's `verify_strict` (canonical `S`, no
//!    small-order `R` or key);
//! 4. the payload decodes and parses as the claims, every id is valid, and `exp > now`
//!    (no leeway; keep gateway clocks in NTP sync).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tether_auth::{TokenSigner, TokenVerifier, unix_now};
//!
//! let signer = TokenSigner::generate(); // or TokenSigner::from_file(path)
//! let token = signer.issue("demo", "alice", "phone-1", Duration::from_secs(600))?;
//! let verifier = TokenVerifier::from_pem(&signer.verifier().to_pem()?)?;
//! let claims = verifier.verify(&token, unix_now())?;
//! assert_eq!(claims.did, "phone-1");
//! assert!(claims.may_uplink());
//! # Ok::<(), tether_auth::AuthError>(())
//! ```
//!
//! # Layout
//!
//! - `claims`: [`Claims`], [`Rights`], [`Right`], [`valid_id`];
//! - `token`: the wire format (encode, decode and the order of checks);
//! - `keys`: [`TokenSigner`], [`TokenVerifier`], PEM and key files, [`write_keypair`];
//! - `error`: [`AuthError`].

#![forbid(unsafe_code)]

mod cache;
mod claims;
mod error;
mod keys;
mod token;

pub use cache::{CachedVerifier, DEFAULT_CACHED_TOKENS};
pub use claims::{Claims, MAX_ID_LEN, Right, Rights, valid_id};
pub use error::AuthError;
pub use keys::{TokenSigner, TokenVerifier, public_key_path, write_keypair};
pub use token::{HEADER_B64, HEADER_JSON, MAX_TOKEN_LEN};

/// Milliseconds since the unix epoch (from the bus contract).
pub use tether_schemas::bus::unix_now_ms;

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
