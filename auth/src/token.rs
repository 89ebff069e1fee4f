//! The token wire format: encoding a signed token and checking one.
//!
//! The layout is described byte by byte in the crate documentation. Checking is ordered
//! so that forged or garbage input costs as little as possible: length cap, shape and
//! `alg` first (no allocation for the header we issue), then the signature over the ASCII
//! `header.payload` bytes (the signature is decoded onto the stack), and only then one
//! base64 decode and one JSON parse of the now-trusted payload.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Deserialize;

use crate::{AuthError, Claims};

/// Longest token accepted (and produced), in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The JOSE header every token is issued with.
pub const HEADER_JSON: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// [`HEADER_JSON`] in base64url without padding: the first 36 bytes of every token we
/// issue.
pub const HEADER_B64: &str = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9";

/// Length of a base64url-encoded 64-byte Ed25519 signature.
const SIG_B64_LEN: usize = 86;

/// Longest encoded header we are willing to decode on the slow path.
const MAX_HEADER_B64_LEN: usize = 512;

fn malformed(msg: &str) -> AuthError {
    AuthError::Malformed(msg.to_owned())
}

/// Validates `claims`, then builds and signs the token.
pub(crate) fn encode(key: &SigningKey, claims: &Claims) -> Result<String, AuthError> {
    claims.validate()?;
    let payload =
        serde_json::to_vec(claims).map_err(|e| AuthError::Malformed(format!("claims: {e}")))?;
    let mut token = String::with_capacity(HEADER_B64.len() + payload.len() * 4 / 3 + 92);
    token.push_str(HEADER_B64);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let signature = key.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed(format!(
            "token would be {} bytes, more than {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    Ok(token)
}

/// Checks `token` against `key` at `now_unix` and returns its claims.
pub(crate) fn decode(key: &VerifyingKey, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
    decode_checked(Some(key), token, now_unix)
}

/// Like [`decode`] without the signature check, for a token whose exact bytes verified
/// before (`crate::cache`): every other check is made again.
pub(crate) fn decode_verified_before(token: &str, now_unix: u64) -> Result<Claims, AuthError> {
    decode_checked(None, token, now_unix)
}

fn decode_checked(
    key: Option<&VerifyingKey>,
    token: &str,
    now_unix: u64,
) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("token longer than 4096 bytes"));
    }
    let (signed, sig_b64) = token
        .rsplit_once('.')
        .ok_or_else(|| malformed("expected three dot-separated parts"))?;
    let (header_b64, payload_b64) = signed
        .split_once('.')
        .ok_or_else(|| malformed("expected three dot-separated parts"))?;
    if payload_b64.contains('.') {
        return Err(malformed("expected three dot-separated parts"));
    }
    check_header(header_b64)?;

    if sig_b64.len() != SIG_B64_LEN {
        return Err(malformed("signature is not 64 bytes"));
    }
    // Room for the engine's conservative length estimate (66 bytes for 86 chars).
    let mut sig = [0u8; 72];
    let n = URL_SAFE_NO_PAD
        .decode_slice(sig_b64, &mut sig)
        .map_err(|_| malformed("signature is not base64url"))?;
    let sig: &[u8; 64] = sig
        .get(..n)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| malformed("signature is not 64 bytes"))?;
    if let Some(key) = key {
        key.verify_strict(signed.as_bytes(), &Signature::from_bytes(sig))
            .map_err(|_| AuthError::BadSignature)?;
    }

    // From here on the bytes are the issuer's, so error details may be shown.
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| malformed("payload is not base64url"))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|e| AuthError::Malformed(format!("claims: {e}")))?;
    claims.validate()?;
    if claims.exp <= now_unix {
        return Err(AuthError::Expired {
            exp: claims.exp,
            now: now_unix,
        });
    }
    Ok(claims)
}

/// The header fields we look at; anything else (`kid`, …) is ignored.
#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    typ: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

/// Accepts the header we issue without decoding it; otherwise decodes and requires
/// `alg: "EdDSA"`, `typ` absent or `"JWT"`, and no `crit` (no extension is understood).
fn check_header(header_b64: &str) -> Result<(), AuthError> {
    if header_b64 == HEADER_B64 {
        return Ok(());
    }
    if header_b64.len() > MAX_HEADER_B64_LEN {
        return Err(malformed("header too long"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: Header =
        serde_json::from_slice(&bytes).map_err(|_| malformed("header is not a json object"))?;
    match header.alg.as_deref() {
        Some("EdDSA") => {}
        Some(other) => {
            // Short and escaped: the header is not authenticated yet.
            let shown: String = other.chars().take(16).collect();
            return Err(AuthError::Malformed(format!(
                "unsupported alg {shown:?}, expected \"EdDSA\""
            )));
        }
        None => return Err(malformed("header has no alg")),
    }
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
    {
        return Err(malformed("unsupported typ, expected \"JWT\""));
    }
    if header.crit.is_some() {
        return Err(malformed("header has crit extensions"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constant_matches_json() {
        assert_eq!(HEADER_JSON.len(), 27);
        assert_eq!(URL_SAFE_NO_PAD.encode(HEADER_JSON), HEADER_B64);
    }

    #[test]
    fn other_header_spellings() {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        assert!(check_header(&enc(r#"{"typ":"JWT","alg":"EdDSA"}"#)).is_ok());
        assert!(check_header(&enc(r#"{"alg":"EdDSA","kid":"k1"}"#)).is_ok());
        assert!(check_header(&enc(r#"{"alg":"EdDSA","typ":"jwt"}"#)).is_ok());
        for bad in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"ES256"}"#,
            r#"{"alg":"eddsa"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":"EdDSA","typ":"JOSE+JSON"}"#,
            r#"{"alg":"EdDSA","crit":["b64"],"b64":false}"#,
            r#"{"alg":"EdDSA","alg":"none"}"#,
            r#"["EdDSA"]"#,
            "",
        ] {
            assert!(check_header(&enc(bad)).is_err(), "{bad} accepted");
        }
        assert!(check_header("eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9=").is_err());
        assert!(check_header(&"A".repeat(600)).is_err());
    }
}
