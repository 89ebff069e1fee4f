//! The test vector published in `auth/TOKENS.md`: the document and the code must agree.
//!
//! Ed25519 signatures are deterministic, so a fixed key and fixed claims give a fixed
//! token. If this test fails after an intended format change, it prints the new values
//! to paste into TOKENS.md.

use std::time::Duration;

use tether_auth::{Claims, Right, Rights, TokenSigner, TokenVerifier};

use crate::TestResult;

/// RFC 8032 §7.1 TEST 1 secret key as PKCS#8. A published test key: never use it.
pub const VECTOR_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
    MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
    -----END PRIVATE KEY-----\n";

/// 2026-01-01T00:00:00Z.
pub const VECTOR_IAT: u64 = 1_767_225_600;

pub fn vector_claims() -> Claims {
    let mut c = Claims::new(
        "demo",
        "alice",
        "phone-1",
        VECTOR_IAT,
        Duration::from_secs(600),
    );
    c.rights = Rights::of(&[Right::Up, Right::Rooms]);
    c.sess = vec!["room-42".into()];
    c
}

#[test]
fn tokens_md_vector() -> TestResult {
    let signer = TokenSigner::from_pem(VECTOR_PRIVATE_PEM)?;
    let token = signer.sign(&vector_claims())?;
    let public = signer.verifier().to_pem()?;
    let payload = serde_json::to_string(&vector_claims())?;

    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/TOKENS.md");
    let doc = std::fs::read_to_string(doc_path)?;
    let missing: Vec<&str> = [
        ("token", token.as_str()),
        ("public key", public.as_str()),
        ("private key", VECTOR_PRIVATE_PEM),
        ("payload", payload.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !doc.contains(v))
    .map(|(k, _)| k)
    .collect();
    if !missing.is_empty() {
        eprintln!("payload:\n{payload}\n\ntoken:\n{token}\n\npublic key:\n{public}");
        return Err(format!("TOKENS.md is missing the current {missing:?}").into());
    }

    // The documented public key verifies the documented token, and time matters.
    let verifier = TokenVerifier::from_pem(&public)?;
    assert_eq!(verifier.verify(&token, VECTOR_IAT)?, vector_claims());
    assert!(verifier.verify(&token, VECTOR_IAT + 600).is_err());
    Ok(())
}
