//! Keys: PEM round trips, foreign PEM forms, key files.

use std::io;
use std::time::Duration;

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use tether_auth::{AuthError, TokenSigner, TokenVerifier, public_key_path, write_keypair};

use crate::{TestResult, raw_key};

#[test]
fn pem_round_trip() -> TestResult {
    let signer = TokenSigner::generate();
    let private = signer.to_pem()?;
    assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(private.ends_with("-----END PRIVATE KEY-----\n"));
    let again = TokenSigner::from_pem(&private)?;
    assert_eq!(again.verifier(), signer.verifier());
    assert_eq!(again.to_pem()?, private);

    let public = signer.verifier().to_pem()?;
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let verifier = TokenVerifier::from_pem(&public)?;
    assert_eq!(verifier, signer.verifier());
    assert_eq!(verifier.to_pem()?, public);
    assert_eq!(TokenVerifier::from_bytes(&verifier.to_bytes())?, verifier);
    assert_eq!(verifier.key_id().len(), 43);

    // A token signed by the reloaded signer verifies with the reloaded verifier.
    let token = again.issue("demo", "alice", "phone-1", Duration::from_secs(60))?;
    verifier.verify(&token, tether_auth::unix_now())?;

    // Surrounding whitespace and CRLF line endings are fine.
    TokenSigner::from_pem(&format!("\n  {}\n\n", private.replace('\n', "\r\n")))?;
    TokenVerifier::from_pem(&format!("{public}\n\n"))?;
    Ok(())
}

#[test]
fn foreign_pem_forms() -> TestResult {
    // PKCS#8 v2 (with the public key inside), as some tools write it.
    let signer = TokenSigner::generate();
    let v2 = raw_key(&signer)?.to_pkcs8_pem(LineEnding::LF)?;
    assert_ne!(v2.as_str(), signer.to_pem()?);
    assert_eq!(TokenSigner::from_pem(&v2)?.verifier(), signer.verifier());

    // openssl genpkey -algorithm ed25519 (RFC 8032 test key 1).
    let openssl = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
        -----END PRIVATE KEY-----\n";
    let public = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n\
        -----END PUBLIC KEY-----\n";
    let signer = TokenSigner::from_pem(openssl)?;
    assert_eq!(signer.to_pem()?, openssl);
    assert_eq!(signer.verifier().to_pem()?, public);
    assert_eq!(
        signer.verifier().to_bytes()[..4],
        [0xd7, 0x5a, 0x98, 0x01],
        "rfc 8032 test 1 public key"
    );
    Ok(())
}

#[test]
fn wrong_pem_refused() -> TestResult {
    let signer = TokenSigner::generate();
    let private = signer.to_pem()?;
    let public = signer.verifier().to_pem()?;

    let err = TokenSigner::from_pem(&public)
        .err()
        .ok_or("public accepted as private")?;
    assert!(
        matches!(&err, AuthError::Key(m) if m.contains("got a public key")),
        "{err}"
    );
    let err = TokenVerifier::from_pem(&private)
        .err()
        .ok_or("private accepted as public")?;
    assert!(
        matches!(&err, AuthError::Key(m) if m.contains("got a private key")),
        "{err}"
    );

    // A P-256 public key (openssl ec) and garbage.
    let p256 = "-----BEGIN PUBLIC KEY-----\n\
        MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+bud/WMQ3rbYzCS6043U9RX3HZQX\n\
        0hDGQ99Vx5o54UIZd89onC2AB4Ur97O32LxHV+lrZOK+9LVI0ghJSYpKzQ==\n\
        -----END PUBLIC KEY-----\n";
    assert!(matches!(
        TokenVerifier::from_pem(p256),
        Err(AuthError::Key(_))
    ));
    for junk in [
        "",
        "hello",
        "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n",
    ] {
        assert!(matches!(
            TokenVerifier::from_pem(junk),
            Err(AuthError::Key(_))
        ));
        assert!(matches!(
            TokenSigner::from_pem(junk),
            Err(AuthError::Key(_))
        ));
    }

    // The identity point is a weak key: every signature would be forgeable by anyone.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert!(matches!(
        TokenVerifier::from_bytes(&identity),
        Err(AuthError::Key(_))
    ));
    Ok(())
}

#[test]
fn key_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("token.pem");
    let signer = write_keypair(&path, false)?;
    let pub_path = public_key_path(&path);
    assert_eq!(pub_path, dir.path().join("token.pem.pub"));

    assert_eq!(TokenSigner::from_file(&path)?.verifier(), signer.verifier());
    assert_eq!(TokenVerifier::from_file(&pub_path)?, signer.verifier());
    assert_eq!(std::fs::read_to_string(&path)?, signer.to_pem()?);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| -> io::Result<u32> {
            Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
        };
        assert_eq!(mode(&path)?, 0o600);
        assert_eq!(mode(&pub_path)? & 0o600, 0o600);
    }

    // No silent overwrite of an existing key.
    let err = write_keypair(&path, false).err().ok_or("overwrote a key")?;
    assert!(matches!(&err, AuthError::Io(e) if e.kind() == io::ErrorKind::AlreadyExists));
    assert_eq!(TokenSigner::from_file(&path)?.verifier(), signer.verifier());

    // Unless asked; both files are replaced and stay a matching pair.
    let newer = write_keypair(&path, true)?;
    assert_ne!(newer.verifier(), signer.verifier());
    assert_eq!(TokenSigner::from_file(&path)?.verifier(), newer.verifier());
    assert_eq!(TokenVerifier::from_file(&pub_path)?, newer.verifier());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
    }
    let leftovers = std::fs::read_dir(dir.path())?.count();
    assert_eq!(leftovers, 2, "temporary files left behind");
    Ok(())
}

#[test]
fn key_file_errors_name_the_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope.pem");
    let err = TokenVerifier::from_file(&missing)
        .err()
        .ok_or("missing file loaded")?;
    assert!(matches!(&err, AuthError::Io(e) if e.kind() == io::ErrorKind::NotFound));
    assert!(err.to_string().contains("nope.pem"), "{err}");

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key")?;
    let err = TokenSigner::from_file(&junk).err().ok_or("junk loaded")?;
    assert!(
        matches!(&err, AuthError::Key(m) if m.contains("junk.pem")),
        "{err}"
    );

    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, vec![b'a'; 100_000])?;
    assert!(matches!(
        TokenVerifier::from_file(&huge),
        Err(AuthError::Key(_))
    ));

    let no_dir = dir.path().join("missing-dir").join("k.pem");
    let err = write_keypair(&no_dir, false)
        .err()
        .ok_or("wrote into a missing dir")?;
    assert!(matches!(&err, AuthError::Io(e) if e.kind() == io::ErrorKind::NotFound));
    Ok(())
}
