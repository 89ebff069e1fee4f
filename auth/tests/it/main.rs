//! Integration tests of the public API of `tether-auth`, one binary, one module per
//! concern.

#![allow(missing_docs)]

mod fuzz;
mod keys;
mod tokens;
mod vector;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use tether_auth::TokenSigner;

/// Result type for tests that use `?` instead of unwrap.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The raw dalek key behind a signer, to hand-craft tokens the signer would refuse.
pub fn raw_key(
    signer: &TokenSigner,
) -> Result<ed25519_dalek::SigningKey, Box<dyn std::error::Error>> {
    Ok(ed25519_dalek::SigningKey::from_pkcs8_pem(
        &signer.to_pem()?,
    )?)
}

/// A token with arbitrary header and payload JSON, correctly signed with `key`.
pub fn craft(key: &ed25519_dalek::SigningKey, header: &str, payload: &str) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let sig = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    token
}

/// The token's three parts.
pub fn parts(token: &str) -> Result<(&str, &str, &str), Box<dyn std::error::Error>> {
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err("token does not have three parts".into()),
    }
}
