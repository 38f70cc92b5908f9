//! Who a connection is and until when: the identity a session acts for,
//! the moment it stops being valid, and the clock that says so.
//!
//! Token times are seconds since the epoch; timers run on tokio's clock.
//! [`Clock`] ties the two together once (the wall clock at start plus
//! tokio's elapsed time), so a deadline computed from `exp` fires at the
//! right instant, and tests that pause tokio's clock move token time too.

use entitlements_core::identity::Identity;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Epoch time on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Seconds since the epoch at `base`.
    epoch_at_base: Duration,
    base: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// The wall clock now, read once; from here on time is tokio's.
    pub fn new() -> Clock {
        Clock {
            epoch_at_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            base: Instant::now(),
        }
    }

    /// Now, as time since the epoch.
    pub fn now(&self) -> Duration {
        self.epoch_at_base + self.base.elapsed()
    }

    /// Now, in whole seconds since the epoch.
    pub fn now_secs(&self) -> u64 {
        self.now().as_secs()
    }

    /// The instant at `epoch_secs` seconds since the epoch (now, if that
    /// is in the past).
    pub fn instant_at(&self, epoch_secs: u64) -> Instant {
        let at = Duration::from_secs(epoch_secs);
        let now = self.now();
        Instant::now() + at.saturating_sub(now)
    }
}

/// Why an identity's validity ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The token's `exp` plus the clock skew.
    Expiry,
    /// The identity had no expiry: the configured longest lifetime.
    Lifetime,
}

/// A connection's identity and the end of its validity.
#[derive(Debug, Clone)]
pub struct Access {
    pub identity: Identity,
    /// The verified payload as received (JSON), so a new policy that reads
    /// other claims can decode them again.
    pub payload: Option<bytes::Bytes>,
    /// The token's `exp`, seconds since the epoch, when it has one.
    pub expires: Option<u64>,
    /// When the identity stops being valid (seconds since the epoch) and
    /// why; `None` when nothing bounds it.
    pub valid_until: Option<(u64, Bound)>,
}

impl Access {
    /// `identity` with its token's `exp` (if any): valid until `exp +
    /// skew`, or, without an expiry, for `lifetime` from `now` (zero: no
    /// bound).
    pub fn new(
        identity: Identity,
        payload: Option<bytes::Bytes>,
        expires: Option<u64>,
        skew: Duration,
        lifetime: Duration,
        now: u64,
    ) -> Access {
        let valid_until = match expires {
            Some(exp) => Some((exp.saturating_add(skew.as_secs()), Bound::Expiry)),
            None if lifetime.is_zero() => None,
            None => Some((now.saturating_add(lifetime.as_secs()), Bound::Lifetime)),
        };
        Access {
            identity,
            payload,
            expires,
            valid_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_tokio_time() {
        let c = Clock::new();
        let t0 = c.now_secs();
        let fraction = c.now() - Duration::from_secs(t0);
        let at = c.instant_at(t0 + 90);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(c.now_secs(), t0 + 60);
        assert_eq!(at - Instant::now(), Duration::from_secs(30) - fraction);
        assert!(c.instant_at(t0) <= Instant::now(), "the past is now");
    }

    #[test]
    fn validity_is_exp_plus_skew_or_the_lifetime() {
        let id = Identity::default();
        let skew = Duration::from_secs(60);
        let life = Duration::from_secs(3600);
        let a = Access::new(id.clone(), None, Some(1000), skew, life, 500);
        assert_eq!(a.valid_until, Some((1060, Bound::Expiry)));
        let a = Access::new(id.clone(), None, None, skew, life, 500);
        assert_eq!(a.valid_until, Some((4100, Bound::Lifetime)));
        let a = Access::new(id, None, None, skew, Duration::ZERO, 500);
        assert_eq!(a.valid_until, None);
    }
}
