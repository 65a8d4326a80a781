//! Retry timing as a pure function of the attempt number; the relay stores
//! the result as `next_attempt_at`, so backoff survives a restart.

use std::time::Duration;

/// Exponential backoff with jitter, and when to give up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Growth per failed attempt.
    pub multiplier: f64,
    /// Upper bound of one delay.
    pub max_delay: Duration,
    /// Share of the delay that is random, from 0 (none) to 1 (full jitter).
    pub jitter: f64,
    /// Attempts after which an event is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.5,
            max_attempts: 12,
        }
    }
}

impl RetryPolicy {
    /// The delay after the `attempt`-th failure (1-based), given `random` in [0, 1).
    ///
    /// The random part is an argument so the function stays pure and testable.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_delay.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let secs = capped * (1.0 - jitter) + capped * jitter * random.clamp(0.0, 1.0);
        // A NaN or out-of-range figure (only from an unvalidated policy)
        // saturates to the cap instead of panicking.
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay)
    }

    /// [`RetryPolicy::delay`] with a fresh random draw.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }

    /// Whether an event that has now failed `attempts` times is out of attempts.
    pub fn exhausted(&self, attempts: u32) -> bool {
        attempts >= self.max_attempts
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("multiplier must be a finite number of at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("jitter must be between 0 and 1".into());
        }
        if self.initial > self.max_delay {
            return Err("initial delay must not exceed max_delay".into());
        }
        crate::time::check_at_most("max_delay", self.max_delay, crate::time::MAX_RETRY_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay(1, 0.3), Duration::from_millis(500));
        assert_eq!(p.delay(2, 0.3), Duration::from_secs(1));
        assert_eq!(p.delay(4, 0.9), Duration::from_secs(4));
        assert_eq!(p.delay(40, 0.9), Duration::from_secs(300));
        assert_eq!(p.delay(u32::MAX, 0.9), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay(3, 0.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, 1.0), Duration::from_secs(2));
        for _ in 0..100 {
            let d = p.backoff(3);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[test]
    fn validates() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert!(RetryPolicy {
            max_attempts: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(RetryPolicy {
            jitter: 2.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        let absurd = RetryPolicy {
            max_delay: Duration::MAX,
            ..Default::default()
        };
        assert!(absurd.validate().unwrap_err().contains("max_delay"));
        // Even unvalidated, it never panics.
        assert!(absurd.delay(200, 0.5) > Duration::from_secs(1 << 40));
        let nan = RetryPolicy {
            multiplier: f64::NAN,
            ..Default::default()
        };
        let _ = nan.delay(3, 0.5);
    }
}
