//! Client credentials: the JWT an app's own backend signs for one of its devices, which
//! the device presents to ipconfig in exchange for endpoints and a gateway token.
//!
//! A credential is a compact JWT (RFC 7519), at most [`MAX_CREDENTIAL_LEN`] bytes, signed
//! either with `HS256` (HMAC-SHA256, RFC 7518 §3.2) keyed with one of the app's secrets
//! (the secret string's UTF-8 bytes as written, not base64-decoded), or with `EdDSA`
//! (Ed25519, RFC 8037) by a key whose public half is in the app's record.
//!
//! Claims: `app`, `uid`, `did` (ids, see [`tether_auth::valid_id`]) and `exp` (unix
//! seconds, required); `iat` and anything else are ignored.
//!
//! Checks, in order: length and shape; the header names `HS256` or `EdDSA` (anything else,
//! `none` included, is refused); the payload names an app we know (else `wrong_app`); the
//! signature verifies with one of that app's keys for that algorithm (else `bad_token`);
//! the ids are valid; `exp > now` (else `token_expired`). Nothing unverified is echoed in
//! an error message.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::{Signature, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tether_schemas::ErrorCode;

use crate::apps::AppRecord;

/// Longest credential accepted, in bytes.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// The JOSE header of HS256 credentials made by [`sign_hs256`].
pub const HS256_HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

type HmacSha256 = Hmac<Sha256>;

/// The claims of a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialClaims {
    /// App id.
    pub app: String,
    /// User id.
    pub uid: String,
    /// Device id.
    pub did: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issue time, unix seconds (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// The signature algorithms a credential may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC-SHA256 with one of the app's secrets.
    Hs256,
    /// Ed25519 with one of the app's public keys.
    EdDsa,
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// No `Authorization: Bearer` credential came with the request.
    #[error("missing credential (authorization: bearer <jwt>)")]
    Missing,
    /// Not a well-formed HS256 or EdDSA JWT with the expected claims.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with any key of the app.
    #[error("credential signature does not verify")]
    BadSignature,
    /// The credential names an app that is not configured.
    #[error("unknown app")]
    UnknownApp,
    /// The credential is for another app than the request asked for.
    #[error("credential is for another app")]
    WrongApp,
    /// The credential expired.
    #[error("credential expired at {exp} (now {now})")]
    Expired {
        /// Its `exp`.
        exp: u64,
        /// The time it was checked at.
        now: u64,
    },
}

impl CredentialError {
    /// The protocol error code answered for this refusal (PROTOCOL.md section 8).
    pub fn code(&self) -> ErrorCode {
        match self {
            CredentialError::Missing
            | CredentialError::Malformed(_)
            | CredentialError::BadSignature => ErrorCode::BadToken,
            CredentialError::UnknownApp | CredentialError::WrongApp => ErrorCode::WrongApp,
            CredentialError::Expired { .. } => ErrorCode::TokenExpired,
        }
    }
}

/// A credential split and parsed, signature not yet checked.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// Its algorithm.
    pub alg: Alg,
    /// Claims as written (not trusted until [`Unverified::verify`] passes).
    pub claims: CredentialClaims,
    signed: &'a str,
    signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    typ: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

/// Splits and parses `credential` without checking its signature.
pub fn parse(credential: &str) -> Result<Unverified<'_>, CredentialError> {
    use CredentialError::Malformed;
    if credential.is_empty() {
        return Err(CredentialError::Missing);
    }
    if credential.len() > MAX_CREDENTIAL_LEN {
        return Err(Malformed("longer than 4096 bytes"));
    }
    let (signed, sig_b64) = credential
        .rsplit_once('.')
        .ok_or(Malformed("expected three dot-separated parts"))?;
    let (header_b64, payload_b64) = signed
        .split_once('.')
        .ok_or(Malformed("expected three dot-separated parts"))?;
    if payload_b64.contains('.') {
        return Err(Malformed("expected three dot-separated parts"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| Malformed("header is not base64url"))?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|_| Malformed("header is not a json object"))?;
    let alg = match header.alg.as_deref() {
        Some("HS256") => Alg::Hs256,
        Some("EdDSA") => Alg::EdDsa,
        _ => return Err(Malformed("alg must be HS256 or EdDSA")),
    };
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
    {
        return Err(Malformed("typ must be JWT"));
    }
    if header.crit.is_some() {
        return Err(Malformed("crit extensions are not supported"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| Malformed("signature is not base64url"))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| Malformed("payload is not base64url"))?;
    let claims: CredentialClaims = serde_json::from_slice(&payload)
        .map_err(|_| Malformed("claims must hold app, uid, did (strings) and exp (integer)"))?;
    Ok(Unverified {
        alg,
        claims,
        signed,
        signature,
    })
}

impl Unverified<'_> {
    /// Checks the signature with `app`'s keys, the ids and `exp` against `now` (minus
    /// `leeway` seconds of tolerated skew); returns the now trusted claims.
    pub fn verify(
        self,
        app: &AppRecord,
        now: u64,
        leeway: u64,
    ) -> Result<CredentialClaims, CredentialError> {
        let good = match self.alg {
            Alg::Hs256 => app.secrets.iter().any(|secret| {
                let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
                    return false;
                };
                mac.update(self.signed.as_bytes());
                mac.verify_slice(&self.signature).is_ok()
            }),
            Alg::EdDsa => {
                let Ok(bytes) = <[u8; 64]>::try_from(self.signature.as_slice()) else {
                    return Err(CredentialError::BadSignature);
                };
                let signature = Signature::from_bytes(&bytes);
                app.public_keys.iter().any(|pem| {
                    VerifyingKey::from_public_key_pem(pem.trim()).is_ok_and(|key| {
                        key.verify_strict(self.signed.as_bytes(), &signature)
                            .is_ok()
                    })
                })
            }
        };
        if !good {
            return Err(CredentialError::BadSignature);
        }
        let claims = self.claims;
        if claims.app != app.id {
            return Err(CredentialError::WrongApp);
        }
        if ![&claims.uid, &claims.did]
            .iter()
            .all(|id| tether_auth::valid_id(id))
        {
            return Err(CredentialError::Malformed(
                "uid and did must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        if claims.exp.saturating_add(leeway) <= now {
            return Err(CredentialError::Expired {
                exp: claims.exp,
                now,
            });
        }
        Ok(claims)
    }
}

/// Signs `claims` as an HS256 credential with `secret` (what an app backend does; used by
/// `tether app credential` and tests).
pub fn sign_hs256(secret: &str, claims: &CredentialClaims) -> Result<String, CredentialError> {
    let payload = serde_json::to_vec(claims).map_err(|_| CredentialError::Malformed("claims"))?;
    let mut out = URL_SAFE_NO_PAD.encode(HS256_HEADER_JSON);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut out);
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes())
        .map_err(|_| CredentialError::Malformed("secret"))?;
    mac.update(out.as_bytes());
    let tag = mac.finalize().into_bytes();
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;

    fn app(secrets: &[&str]) -> AppRecord {
        AppRecord {
            id: "demo".into(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn claims(exp: u64) -> CredentialClaims {
        CredentialClaims {
            app: "demo".into(),
            uid: "alice".into(),
            did: "phone1".into(),
            exp,
            iat: None,
        }
    }

    fn check(
        credential: &str,
        app: &AppRecord,
        now: u64,
    ) -> Result<CredentialClaims, CredentialError> {
        parse(credential)?.verify(app, now, 0)
    }

    /// The vector in PROTOCOL.md section 12.2.
    #[test]
    fn hs256_vector() -> Result<(), CredentialError> {
        let credential = sign_hs256("s3cret-demo", &claims(2_000_000_000))?;
        assert_eq!(
            credential,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJhcHAiOiJkZW1vIiwidWlkIjoiYWxpY2UiLCJkaWQiOiJwaG9uZTEiLCJleHAiOjIwMDAwMDAwMDB9.\
             jzgvgyVdP5_OyLPFCBjn-9jKupd-ysYERQHrHcmvPdk"
        );
        assert_eq!(
            check(&credential, &app(&["s3cret-demo"]), 1)?,
            claims(2_000_000_000)
        );
        Ok(())
    }

    #[test]
    fn refusals_have_their_codes() -> Result<(), CredentialError> {
        let good = sign_hs256("k1", &claims(100))?;
        let forged = sign_hs256("not-the-secret", &claims(100))?;
        let err = |c: &str, a: &AppRecord, now| check(c, a, now).err().map(|e| e.code());
        assert_eq!(err(&forged, &app(&["k1"]), 50), Some(ErrorCode::BadToken));
        assert_eq!(
            err(&good, &app(&["k1"]), 100),
            Some(ErrorCode::TokenExpired)
        );
        assert!(parse(&good)?.verify(&app(&["k1"]), 100, 5).is_ok());
        // Rotation: any listed secret verifies.
        assert!(check(&good, &app(&["k2", "k1"]), 50).is_ok());
        let mut other = app(&["k1"]);
        other.id = "other".into();
        assert_eq!(err(&good, &other, 50), Some(ErrorCode::WrongApp));
        // Tampered payload under a good signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(r#"{"app":"demo","uid":"root","did":"x","exp":100}"#);
        parts[1] = &evil;
        assert_eq!(
            err(&parts.join("."), &app(&["k1"]), 50),
            Some(ErrorCode::BadToken)
        );
        for bad in ["", "a.b", "a.b.c.d", "x.y.z"] {
            assert_eq!(
                err(bad, &app(&["k1"]), 50),
                Some(ErrorCode::BadToken),
                "{bad}"
            );
        }
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"app":"demo","uid":"u","did":"d","exp":100}"#)
        );
        assert_eq!(err(&none, &app(&["k1"]), 50), Some(ErrorCode::BadToken));
        Ok(())
    }

    #[test]
    fn eddsa_credentials() -> Result<(), Box<dyn std::error::Error>> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let pem = key.verifying_key().to_public_key_pem(LineEnding::LF)?;
        let mut record = app(&[]);
        record.public_keys = vec![pem];
        let mut signed = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"JWT"}"#);
        signed.push('.');
        signed.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(100))?));
        let signature = URL_SAFE_NO_PAD.encode(key.sign(signed.as_bytes()).to_bytes());
        let credential = format!("{signed}.{signature}");
        assert_eq!(check(&credential, &record, 50)?, claims(100));
        // An HS256 credential for an app with only an Ed25519 key is refused.
        let hs = sign_hs256("k1", &claims(100))?;
        assert_eq!(check(&hs, &record, 50), Err(CredentialError::BadSignature));
        Ok(())
    }
}
