//! Signing and verifying: round trips, expiry, tampering, keys, headers, ids, size.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tether_auth::{
    AuthError, Claims, HEADER_B64, MAX_TOKEN_LEN, Right, Rights, TokenSigner, unix_now,
};

use crate::{TestResult, craft, parts, raw_key};

const NOW: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn claims() -> Claims {
    let mut c = Claims::new("demo", "alice", "phone-1", NOW, Duration::from_secs(600));
    c.rights = Rights::of(&[Right::Up, Right::Rooms]);
    c.sess = vec!["room-42".into(), "family_1".into()];
    c.gw = Some("gw-7".into());
    c
}

#[test]
fn round_trip() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let c = claims();
    let token = signer.sign(&c)?;
    assert!(token.starts_with(&format!("{HEADER_B64}.")));
    assert!(token.is_ascii());
    assert_eq!(verifier.verify(&token, NOW)?, c);
    assert_eq!(verifier.verify(&token, NOW + 599)?, c);

    // Minimal claims: optional fields stay out of the payload.
    let min = Claims::new("demo", "u1", "d1", NOW, Duration::from_secs(60));
    let token = signer.sign(&min)?;
    let (_, payload, _) = parts(&token)?;
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload)?)?;
    assert_eq!(
        json,
        format!(
            r#"{{"app":"demo","uid":"u1","did":"d1","exp":{},"iat":{NOW},"pub":["up"]}}"#,
            NOW + 60
        )
    );
    let back = verifier.verify(&token, NOW)?;
    assert!(back.may_uplink() && !back.may_use_rooms());
    assert_eq!(back, min);
    Ok(())
}

#[test]
fn issue_is_now_based() -> TestResult {
    let signer = TokenSigner::generate();
    let before = unix_now();
    let token = signer.issue("demo", "alice", "phone-1", Duration::from_secs(300))?;
    let c = signer.verifier().verify(&token, unix_now())?;
    assert!(c.iat >= before && c.iat <= unix_now());
    assert_eq!(c.exp - c.iat, 300);
    assert_eq!(
        (c.app.as_str(), c.uid.as_str(), c.did.as_str()),
        ("demo", "alice", "phone-1")
    );
    assert_eq!(c.rights, Rights::of(&[Right::Up]));
    assert!(c.sess.is_empty() && c.gw.is_none());
    Ok(())
}

#[test]
fn expired() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let token = signer.sign(&claims())?;
    let exp = NOW + 600;
    assert!(verifier.verify(&token, exp - 1).is_ok());
    for now in [exp, exp + 1, u64::MAX] {
        let err = verifier
            .verify(&token, now)
            .err()
            .ok_or("expired token accepted")?;
        assert!(err.is_expired(), "{err}");
        assert!(matches!(err, AuthError::Expired { exp: e, now: n } if e == exp && n == now));
    }
    // Only a genuine token can be "expired": a forged old one is a bad signature.
    let other = TokenSigner::generate().sign(&claims())?;
    let err = verifier
        .verify(&other, exp + 1)
        .err()
        .ok_or("forged token accepted")?;
    assert!(matches!(err, AuthError::BadSignature) && !err.is_expired());
    Ok(())
}

#[test]
fn tampered_payload() -> TestResult {
    let signer = TokenSigner::generate();
    let token = signer.sign(&claims())?;
    let (h, p, s) = parts(&token)?;
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(p)?)?;
    for (from, to) in [
        ("alice", "mallory"),
        ("\"up\",", ""),
        ("1767226200", "9999999999"),
    ] {
        assert!(json.contains(from));
        let forged = json.replacen(from, to, 1);
        let forged = format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(forged));
        assert!(matches!(
            signer.verifier().verify(&forged, NOW),
            Err(AuthError::BadSignature)
        ));
    }
    Ok(())
}

#[test]
fn tampered_signature() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let token = signer.sign(&claims())?;
    let (h, p, s) = parts(&token)?;
    let sig = URL_SAFE_NO_PAD.decode(s)?;
    for bit in [0, 7, 100, 255, 256, 300, 511] {
        let mut bad = sig.clone();
        if let Some(b) = bad.get_mut(bit / 8) {
            *b ^= 1 << (bit % 8);
        }
        let forged = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&bad));
        assert!(
            matches!(verifier.verify(&forged, NOW), Err(AuthError::BadSignature)),
            "bit {bit}"
        );
    }

    // Malleability: S + L is the same signature for lax verifiers; verify_strict refuses.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut bad = sig.clone();
    let mut carry = 0u16;
    for (b, l) in bad.iter_mut().skip(32).zip(L) {
        let sum = u16::from(*b) + u16::from(l) + carry;
        *b = (sum & 0xff) as u8;
        carry = sum >> 8;
    }
    let forged = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&bad));
    assert!(matches!(
        verifier.verify(&forged, NOW),
        Err(AuthError::BadSignature)
    ));

    // Shape errors in the signature part are malformed, not bad signatures.
    for s in [
        "",
        "AAAA",
        &format!("{s}A"),
        &format!("{s}="),
        &s.replacen('A', "*", 1),
    ] {
        let forged = format!("{h}.{p}.{s}");
        if forged != token {
            assert!(
                matches!(verifier.verify(&forged, NOW), Err(AuthError::Malformed(_))),
                "{s:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn wrong_key() -> TestResult {
    let token = TokenSigner::generate().sign(&claims())?;
    let err = TokenSigner::generate().verifier().verify(&token, NOW).err();
    assert!(matches!(err, Some(AuthError::BadSignature)));
    Ok(())
}

#[test]
fn other_algs_refused() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let key = raw_key(&signer)?;
    let payload = serde_json::to_string(&claims())?;

    // Correct Ed25519 signature, but the header claims another algorithm.
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"alg":"RS256"}"#,
        r#"{"alg":"ES256","typ":"JWT"}"#,
        r#"{"typ":"JWT"}"#,
        r#"{"alg":"EdDSA","crit":["exp"]}"#,
    ] {
        let token = craft(&key, header, &payload);
        let err = verifier.verify(&token, NOW).err();
        assert!(
            matches!(err, Some(AuthError::Malformed(_))),
            "{header}: {err:?}"
        );
    }
    let err = verifier
        .verify(
            &craft(&key, r#"{"alg":"HS256","typ":"JWT"}"#, &payload),
            NOW,
        )
        .err()
        .ok_or("HS256 accepted")?;
    assert!(err.to_string().contains("HS256"), "{err}");

    // Classic `alg: none` token with an empty signature.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(&payload)
    );
    assert!(matches!(
        verifier.verify(&none, NOW),
        Err(AuthError::Malformed(_))
    ));

    // Another spelling of a valid EdDSA header verifies (tokens from other JWT libraries).
    let token = craft(&key, r#"{"typ":"JWT","alg":"EdDSA","kid":"k1"}"#, &payload);
    assert_eq!(verifier.verify(&token, NOW)?, claims());
    Ok(())
}

#[test]
fn invalid_ids_refused_at_sign() -> TestResult {
    let signer = TokenSigner::generate();
    type Edit = fn(&mut Claims);
    let cases: [(&str, Edit); 8] = [
        ("app", |c| c.app = "a.b".into()),
        ("app", |c| c.app = String::new()),
        ("uid", |c| c.uid = "alice smith".into()),
        ("uid", |c| c.uid = "ä".into()),
        ("did", |c| c.did = "x".repeat(65)),
        ("did", |c| c.did = "app.>".into()),
        ("sess", |c| c.sess.push("room*".into())),
        ("gw", |c| c.gw = Some("gw.1".into())),
    ];
    for (field, edit) in cases {
        let mut c = claims();
        edit(&mut c);
        let err = signer.sign(&c).err();
        assert!(
            matches!(err, Some(AuthError::InvalidId { field: f }) if f == field),
            "{field}: {err:?}"
        );
    }
    let err = signer
        .issue("demo", "alice", "a.b", Duration::from_secs(60))
        .err();
    assert!(matches!(err, Some(AuthError::InvalidId { field: "did" })));
    Ok(())
}

#[test]
fn invalid_ids_refused_at_verify() -> TestResult {
    let signer = TokenSigner::generate();
    let key = raw_key(&signer)?;
    let header = r#"{"alg":"EdDSA","typ":"JWT"}"#;
    for (field, payload) in [
        (
            "did",
            r#"{"app":"demo","uid":"alice","did":"a.b","exp":9999999999,"iat":1}"#,
        ),
        (
            "app",
            r#"{"app":"","uid":"alice","did":"d","exp":9999999999,"iat":1}"#,
        ),
        (
            "sess",
            r#"{"app":"a","uid":"u","did":"d","exp":9999999999,"iat":1,"sess":["ok","x y"]}"#,
        ),
        (
            "gw",
            r#"{"app":"a","uid":"u","did":"d","exp":9999999999,"iat":1,"gw":"*"}"#,
        ),
    ] {
        let token = craft(&key, header, payload);
        assert!(token.starts_with(HEADER_B64));
        let err = signer.verifier().verify(&token, NOW).err();
        assert!(
            matches!(err, Some(AuthError::InvalidId { field: f }) if f == field),
            "{field}: {err:?}"
        );
    }
    Ok(())
}

#[test]
fn bad_claims_are_malformed() -> TestResult {
    let signer = TokenSigner::generate();
    let key = raw_key(&signer)?;
    let header = r#"{"alg":"EdDSA","typ":"JWT"}"#;
    for payload in [
        "",
        "null",
        "[]",
        r#"{"app":"a","uid":"u","did":"d","iat":1}"#,
        r#"{"app":"a","uid":"u","did":"d","exp":-1,"iat":1}"#,
        r#"{"app":"a","uid":"u","did":"d","exp":1.5e10,"iat":1}"#,
        r#"{"app":"a","uid":"u","did":"d","exp":"9999999999","iat":1}"#,
        r#"{"app":"a","uid":"u","did":"d","exp":9999999999,"iat":1,"pub":"up"}"#,
        r#"{"app":"a","app":"b","uid":"u","did":"d","exp":9999999999,"iat":1}"#,
    ] {
        let err = signer
            .verifier()
            .verify(&craft(&key, header, payload), NOW)
            .err();
        assert!(
            matches!(err, Some(AuthError::Malformed(_))),
            "{payload}: {err:?}"
        );
    }
    // Unknown claims and unknown rights are ignored.
    let payload = r#"{"iss":"x","app":"a","uid":"u","did":"d","exp":9999999999,"iat":1,"pub":["rooms","admin"],"nbf":0}"#;
    let c = signer
        .verifier()
        .verify(&craft(&key, header, payload), NOW)?;
    assert!(!c.may_uplink() && c.may_use_rooms());
    Ok(())
}

#[test]
fn size_cap() -> TestResult {
    let signer = TokenSigner::generate();
    let verifier = signer.verifier();
    let mut c = claims();
    // Grow the session list until the token no longer fits.
    let mut last_ok = signer.sign(&c)?;
    loop {
        c.sess.push(format!("session-{:0>40}", c.sess.len()));
        match signer.sign(&c) {
            Ok(t) => last_ok = t,
            Err(AuthError::Malformed(msg)) => {
                assert!(msg.contains("4096"), "{msg}");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert!(last_ok.len() <= MAX_TOKEN_LEN);
    assert!(verifier.verify(&last_ok, NOW).is_ok());

    let key = raw_key(&signer)?;
    let payload = format!(
        r#"{{"app":"a","uid":"u","did":"d","exp":9999999999,"iat":1,"x":"{}"}}"#,
        "y".repeat(3000)
    );
    let big = craft(&key, r#"{"alg":"EdDSA","typ":"JWT"}"#, &payload);
    assert!(big.len() > MAX_TOKEN_LEN);
    assert!(matches!(
        verifier.verify(&big, NOW),
        Err(AuthError::Malformed(_))
    ));
    Ok(())
}
