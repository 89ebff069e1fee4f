//! A bounded cache of verified tokens in front of a [`TokenVerifier`].
//!
//! An Ed25519 verification is most of the CPU a login costs in the gateway. A device that
//! reconnects (a network flap, a reconnect storm after a gateway or NATS trouble) presents
//! the token it presented before, so the gateway remembers a digest of every token it
//! verified (the first 16 bytes of the SHA-256 of the token's exact bytes, 16 bytes per
//! token plus the set's overhead). A token whose digest is remembered was signed by the
//! key already: everything else (format, claims, expiry) is checked again, only the
//! signature check is skipped. The cache holds only tokens [`TokenVerifier::verify`]
//! accepted, so a cached answer is never more lenient than a fresh one; a forged or
//! altered token never matches (it would need a second preimage of a 128-bit digest).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::{AuthError, Claims, TokenVerifier, token};

/// The default number of tokens remembered.
pub const DEFAULT_CACHED_TOKENS: usize = 100_000;

/// What is remembered of a verified token.
type TokenDigest = [u8; 16];

/// A [`TokenVerifier`] that remembers up to `capacity` verified tokens, oldest forgotten
/// first. With capacity 0 every token is verified.
#[derive(Debug)]
pub struct CachedVerifier {
    verifier: TokenVerifier,
    capacity: usize,
    cache: Mutex<Cache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Default)]
struct Cache {
    verified: HashSet<TokenDigest>,
    /// Insertion order, for eviction.
    order: VecDeque<TokenDigest>,
}

fn digest(token: &str) -> TokenDigest {
    let full = Sha256::digest(token.as_bytes());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

impl CachedVerifier {
    /// Wraps `verifier` with room for `capacity` tokens.
    pub fn new(verifier: TokenVerifier, capacity: usize) -> Self {
        Self {
            verifier,
            capacity,
            cache: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The verifier behind the cache.
    pub fn verifier(&self) -> &TokenVerifier {
        &self.verifier
    }

    /// Like [`TokenVerifier::verify`]; without the signature check when the same token
    /// verified before (every other check, expiry included, is made again).
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        if self.capacity == 0 {
            return self.verifier.verify(token, now_unix);
        }
        let key = digest(token);
        if self.lock().verified.contains(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return token::decode_verified_before(token, now_unix);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let claims = self.verifier.verify(token, now_unix)?;
        let mut cache = self.lock();
        if cache.verified.insert(key) {
            cache.order.push_back(key);
            while cache.order.len() > self.capacity {
                if let Some(oldest) = cache.order.pop_front() {
                    cache.verified.remove(&oldest);
                }
            }
        }
        Ok(claims)
    }

    /// Tokens answered without the signature check (expired ones included).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Tokens verified with the key (accepted or not).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.lock().verified.len()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::TokenSigner;

    fn token(signer: &TokenSigner, did: &str, ttl: u64) -> String {
        signer
            .issue("chat", "u1", did, Duration::from_secs(ttl))
            .expect("issue")
    }

    #[test]
    fn a_token_seen_before_is_answered_from_the_cache_with_the_same_claims() {
        let signer = TokenSigner::generate();
        let cached = CachedVerifier::new(signer.verifier(), 10);
        let token = token(&signer, "d1", 60);
        let now = crate::unix_now();
        let first = cached.verify(&token, now).expect("first");
        let second = cached.verify(&token, now).expect("second");
        assert_eq!(first, second);
        assert_eq!((cached.hits(), cached.misses()), (1, 1));
    }

    #[test]
    fn a_cached_token_still_expires() {
        let signer = TokenSigner::generate();
        let cached = CachedVerifier::new(signer.verifier(), 10);
        let token = token(&signer, "d1", 60);
        let now = crate::unix_now();
        let claims = cached.verify(&token, now).expect("valid now");
        let later = cached.verify(&token, claims.exp);
        assert!(matches!(later, Err(AuthError::Expired { .. })), "{later:?}");
    }

    #[test]
    fn refused_tokens_are_not_remembered_and_an_altered_token_does_not_match() {
        let signer = TokenSigner::generate();
        let other = TokenSigner::generate();
        let cached = CachedVerifier::new(signer.verifier(), 10);
        let now = crate::unix_now();
        let foreign = token(&other, "d1", 60);
        for _ in 0..2 {
            assert!(matches!(
                cached.verify(&foreign, now),
                Err(AuthError::BadSignature)
            ));
        }
        assert!(cached.is_empty());
        let good = token(&signer, "d1", 60);
        cached.verify(&good, now).expect("good");
        // The same claims, another signature: not the cached bytes, verified and refused.
        let (signed, _) = good.rsplit_once('.').expect("three parts");
        let (_, foreign_sig) = foreign.rsplit_once('.').expect("three parts");
        let altered = format!("{signed}.{foreign_sig}");
        assert!(matches!(
            cached.verify(&altered, now),
            Err(AuthError::BadSignature)
        ));
        assert_eq!(cached.hits(), 0);
    }

    #[test]
    fn the_oldest_token_is_forgotten_first_and_capacity_zero_caches_nothing() {
        let signer = TokenSigner::generate();
        let cached = CachedVerifier::new(signer.verifier(), 2);
        let now = crate::unix_now();
        let tokens: Vec<String> = (0..3)
            .map(|i| token(&signer, &format!("d{i}"), 60))
            .collect();
        for token in &tokens {
            cached.verify(token, now).expect("valid");
        }
        assert_eq!(cached.len(), 2);
        cached.verify(&tokens[2], now).expect("valid");
        assert_eq!(cached.hits(), 1, "the newest is remembered");
        cached.verify(&tokens[0], now).expect("valid");
        assert_eq!(cached.hits(), 1, "the oldest was forgotten");

        let uncached = CachedVerifier::new(signer.verifier(), 0);
        uncached.verify(&tokens[0], now).expect("valid");
        uncached.verify(&tokens[0], now).expect("valid");
        assert_eq!((uncached.hits(), uncached.len()), (0, 0));
    }
}
