//! A bounded cache of verified tokens in front of a [`TokenVerifier`].
//!
//! An Ed25519 verification is most of the CPU a login costs in the gateway. A device that
//! reconnects (a network flap, a reconnect storm after a gateway or NATS trouble) presents
//! the token it presented before, so the gateway remembers, for every token it verified,
//! the SHA-256 of the token's exact bytes and the claims it yielded. A token with the same
//! hash was signed by the key already: only its expiry is checked again. The cache holds
//! only what [`TokenVerifier::verify`] accepted, so a cached answer is never more lenient
//! than a fresh one; a forged or altered token never matches (it would need a SHA-256
//! collision with a verified token).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::{AuthError, Claims, TokenVerifier};

/// The default number of tokens remembered (about 200 bytes each).
pub const DEFAULT_CACHED_TOKENS: usize = 100_000;

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
    claims: HashMap<[u8; 32], Claims>,
    /// Insertion order, for eviction.
    order: VecDeque<[u8; 32]>,
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

    /// Like [`TokenVerifier::verify`], from the cache when the same token verified before
    /// (its expiry is checked again against `now_unix`).
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        if self.capacity == 0 {
            return self.verifier.verify(token, now_unix);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.lock().claims.get(&key).cloned();
        if let Some(claims) = cached {
            self.hits.fetch_add(1, Ordering::Relaxed);
            if claims.exp <= now_unix {
                return Err(AuthError::Expired {
                    exp: claims.exp,
                    now: now_unix,
                });
            }
            return Ok(claims);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let claims = self.verifier.verify(token, now_unix)?;
        let mut cache = self.lock();
        if cache.claims.insert(key, claims.clone()).is_none() {
            cache.order.push_back(key);
            while cache.order.len() > self.capacity {
                if let Some(oldest) = cache.order.pop_front() {
                    cache.claims.remove(&oldest);
                }
            }
        }
        Ok(claims)
    }

    /// Tokens answered from the cache (expired ones included).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Tokens verified with the key (accepted or not).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.lock().claims.len()
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
