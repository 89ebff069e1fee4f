//! Reconnect delays: exponential backoff with random jitter, so that devices cut off by
//! the same outage do not all come back in the same instant.

use std::time::Duration;

use rand::Rng;

use crate::error::ClientError;

/// Exponential backoff: round `n` waits `min · 2ⁿ`, capped at `max`, of which the
/// `jitter` fraction is random (e.g. 0.5: between half and all of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first reconnect round.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Random share of each delay, 0.0 (none) to 1.0 (anything from 0 to the delay).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.min.is_zero() || self.max < self.min {
            return Err(ClientError::Config(
                "reconnect backoff needs 0 < min <= max".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ClientError::Config(
                "reconnect jitter must be between 0 and 1".into(),
            ));
        }
        Ok(())
    }

    /// The delay before round `attempt` (0-based) without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before round `attempt`, with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::thread_rng().gen_range(0.0..=1.0))
    }

    /// The delay before round `attempt` for a random draw `r` in `0.0..=1.0`.
    fn delay_with(&self, attempt: u32, r: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        ceiling.mul_f64(1.0 - jitter + jitter * r.clamp(0.0, 1.0))
    }
}

/// A random duration in `base ± jitter`.
pub(crate) fn jittered(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let r: f64 = rand::thread_rng().gen_range(-1.0..=1.0);
    let offset = jitter.mul_f64(r.abs());
    if r < 0.0 {
        base.saturating_sub(offset)
    } else {
        base.saturating_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_max() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(6), Duration::from_millis(6_400));
        assert_eq!(b.ceiling(7), Duration::from_secs(10));
        assert_eq!(b.ceiling(1_000), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_in_its_share() {
        let b = Backoff::default();
        assert_eq!(b.delay_with(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_millis(800));
        for attempt in 0..20 {
            let d = b.delay(attempt);
            assert!(
                d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt),
                "{attempt}: {d:?}"
            );
        }
        let none = Backoff { jitter: 0.0, ..b };
        assert_eq!(none.delay(2), Duration::from_millis(400));
    }

    #[test]
    fn ping_jitter_is_symmetric_and_bounded() {
        let base = Duration::from_secs(10);
        let j = Duration::from_secs(2);
        for _ in 0..100 {
            let d = jittered(base, j);
            assert!(d >= base - j && d <= base + j, "{d:?}");
        }
        assert_eq!(jittered(base, Duration::ZERO), base);
    }

    #[test]
    fn validation() {
        assert!(Backoff::default().validate().is_ok());
        assert!(
            Backoff {
                min: Duration::ZERO,
                ..Backoff::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Backoff {
                jitter: 1.5,
                ..Backoff::default()
            }
            .validate()
            .is_err()
        );
        let inverted = Backoff {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
            jitter: 0.1,
        };
        assert!(inverted.validate().is_err());
    }
}
