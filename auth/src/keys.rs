//! Keys: the signer (private key, held by ipconfig and `tether token issue`) and the
//! verifier (public key, held by every gateway), their PEM forms and key files.
//!
//! Private keys are PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`), exactly what
//! `openssl genpkey -algorithm ed25519` writes; public keys are SPKI PEM
//! (`-----BEGIN PUBLIC KEY-----`), what `openssl pkey -pubout` writes.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::KeypairBytes;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::{AuthError, Claims, token, unix_now};

/// Mints tokens; holds an Ed25519 private key. `Debug` shows only the public key.
#[derive(Clone)]
pub struct TokenSigner {
    key: SigningKey,
}

impl TokenSigner {
    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> TokenSigner {
        TokenSigner {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Parses a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`, v1 or v2).
    pub fn from_pem(pem: &str) -> Result<TokenSigner, AuthError> {
        let pem = pem.trim();
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| TokenSigner { key })
            .map_err(|e| {
                if pem.starts_with("-----BEGIN PUBLIC KEY-----") {
                    AuthError::Key(
                        "expected a private key (PRIVATE KEY pem), got a public key".into(),
                    )
                } else {
                    AuthError::Key(format!("not an ed25519 pkcs#8 private key pem: {e}"))
                }
            })
    }

    /// Reads a private key PEM file (see [`TokenSigner::from_pem`]).
    pub fn from_file(path: &Path) -> Result<TokenSigner, AuthError> {
        TokenSigner::from_pem(&read_key_file(path)?).map_err(|e| with_path(e, path))
    }

    /// The private key as PKCS#8 v1 PEM, LF line endings (the same bytes openssl writes).
    pub fn to_pem(&self) -> Result<String, AuthError> {
        let bytes = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.as_str().to_owned())
            .map_err(|e| AuthError::Key(format!("encode private key: {e}")))
    }

    /// The matching verifier (public key).
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            key: self.key.verifying_key(),
        }
    }

    /// Signs `claims` as is, after checking every identifier with
    /// [`valid_id`](crate::valid_id). Fails if the token would exceed
    /// [`MAX_TOKEN_LEN`](crate::MAX_TOKEN_LEN).
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        token::encode(&self.key, claims)
    }

    /// A token for `app`/`uid`/`did` issued now, valid for `ttl`, with the default rights
    /// (`["up"]`), no sessions and no gateway binding.
    pub fn issue(
        &self,
        app: &str,
        uid: &str,
        did: &str,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        self.sign(&Claims::new(app, uid, did, unix_now(), ttl))
    }
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("public_key", &self.verifier().key_id())
            .finish_non_exhaustive()
    }
}

/// Checks tokens; holds an Ed25519 public key. Cheap to clone (no heap data).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenVerifier {
    key: VerifyingKey,
}

impl TokenVerifier {
    /// Parses an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`). Weak (small-order)
    /// keys are refused.
    pub fn from_pem(pem: &str) -> Result<TokenVerifier, AuthError> {
        let pem = pem.trim();
        let key = VerifyingKey::from_public_key_pem(pem).map_err(|e| {
            if pem.starts_with("-----BEGIN PRIVATE KEY-----") {
                AuthError::Key("expected a public key (PUBLIC KEY pem), got a private key".into())
            } else {
                AuthError::Key(format!("not an ed25519 spki public key pem: {e}"))
            }
        })?;
        TokenVerifier::from_key(key)
    }

    /// Reads a public key PEM file (see [`TokenVerifier::from_pem`]).
    pub fn from_file(path: &Path) -> Result<TokenVerifier, AuthError> {
        TokenVerifier::from_pem(&read_key_file(path)?).map_err(|e| with_path(e, path))
    }

    /// A verifier for the raw 32-byte public key (RFC 8032 encoding).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<TokenVerifier, AuthError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| AuthError::Key("not an ed25519 public key".into()))?;
        TokenVerifier::from_key(key)
    }

    fn from_key(key: VerifyingKey) -> Result<TokenVerifier, AuthError> {
        if key.is_weak() {
            return Err(AuthError::Key("weak ed25519 public key".into()));
        }
        Ok(TokenVerifier { key })
    }

    /// The public key as SPKI PEM, LF line endings.
    pub fn to_pem(&self) -> Result<String, AuthError> {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| AuthError::Key(format!("encode public key: {e}")))
    }

    /// The raw 32-byte public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The raw public key in base64url without padding (43 characters): a short,
    /// loggable name for the key, and the JWK `x` value.
    pub fn key_id(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.as_bytes())
    }

    /// Checks `token` at time `now_unix` (unix seconds) and returns its claims.
    ///
    /// Refuses, in this order: tokens over 4096 bytes, not three base64url parts, a
    /// header whose `alg` is not `EdDSA` ([`AuthError::Malformed`]); a signature that does
    /// not verify strictly with this key ([`AuthError::BadSignature`]); claims that do not
    /// parse ([`AuthError::Malformed`]); a bad identifier ([`AuthError::InvalidId`]);
    /// `exp <= now_unix` ([`AuthError::Expired`], no leeway). Never panics.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        token::decode(&self.key, token, now_unix)
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("public_key", &self.key_id())
            .finish()
    }
}

/// Where [`write_keypair`] puts the public key for a private key at `path`: `path` with
/// `.pub` appended (`keys/gw.pem` → `keys/gw.pem.pub`).
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Generates a key pair for `tether token keygen --out PATH`: the private key PEM goes to
/// `path` (mode 0600 on unix), the public key PEM to [`public_key_path`]`(path)` (0644).
///
/// Without `overwrite`, an existing file at either path is an error
/// (`io::ErrorKind::AlreadyExists`) and nothing is written. With it, each file is replaced
/// atomically (written beside it, then renamed).
pub fn write_keypair(path: &Path, overwrite: bool) -> Result<TokenSigner, AuthError> {
    let pub_path = public_key_path(path);
    if !overwrite {
        for p in [path, pub_path.as_path()] {
            if p.exists() {
                return Err(AuthError::Io(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: already exists", p.display()),
                )));
            }
        }
    }
    let signer = TokenSigner::generate();
    let private_pem = signer.to_pem()?;
    let public_pem = signer.verifier().to_pem()?;
    write_file(path, private_pem.as_bytes(), 0o600, overwrite)?;
    write_file(&pub_path, public_pem.as_bytes(), 0o644, overwrite)?;
    Ok(signer)
}

/// Writes `data` to `path` with `mode` (unix): directly with `create_new` when not
/// overwriting, else through a temporary file in the same directory and a rename.
fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), AuthError> {
    let ctx = |e: io::Error| io_at(e, path);
    let target = if overwrite {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        PathBuf::from(tmp)
    } else {
        path.to_path_buf()
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let result = opts.open(&target).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(e) = result {
        if overwrite {
            let _ = fs::remove_file(&target);
        }
        return Err(ctx(e));
    }
    if overwrite {
        fs::rename(&target, path).map_err(|e| {
            let _ = fs::remove_file(&target);
            ctx(e)
        })?;
    }
    Ok(())
}

fn read_key_file(path: &Path) -> Result<String, AuthError> {
    // Key files are tiny; refuse to slurp something that obviously is not one.
    const MAX_KEY_FILE: u64 = 64 * 1024;
    let len = fs::metadata(path).map_err(|e| io_at(e, path))?.len();
    if len > MAX_KEY_FILE {
        return Err(AuthError::Key(format!(
            "{}: {len} bytes is too large for a key file",
            path.display()
        )));
    }
    fs::read_to_string(path).map_err(|e| io_at(e, path))
}

/// Keeps the error kind, puts the path in the message.
fn io_at(e: io::Error, path: &Path) -> AuthError {
    AuthError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn with_path(e: AuthError, path: &Path) -> AuthError {
    match e {
        AuthError::Key(msg) => AuthError::Key(format!("{}: {msg}", path.display())),
        other => other,
    }
}
