//! When to fetch a remote document (a JWKS, a policy) again: the schedule
//! without any I/O, time passed in (milliseconds on any monotonic clock).
//!
//! After a success the next fetch is due after the refresh period, or at
//! 90 % of the response's `Cache-Control: max-age` when that is sooner
//! (at least a second); after a failure after the first retry delay,
//! doubling per failure in a row up to the longest retry delay (at most
//! the refresh period). A document that
//! turns out to lack something (a JWT's `kid`) can make a fetch due at
//! once, at most once per `min_refetch` since the last fetch.

/// The timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub refresh_ms: u64,
    pub retry_initial_ms: u64,
    /// Longest delay after failures (the doubling stops there); at most
    /// the refresh period.
    pub retry_max_ms: u64,
    /// Least time between a fetch and a refetch asked for by
    /// [`Schedule::refetch_now`].
    pub min_refetch_ms: u64,
}

impl Timings {
    /// The delay after a success: the refresh period, or 90 % of
    /// `max-age` (seconds) when sooner, never under a second.
    pub fn success_delay(&self, max_age_s: Option<u64>) -> u64 {
        max_age_s.map_or(self.refresh_ms, |age| {
            (age.saturating_mul(1000) / 10 * 9).clamp(1000.min(self.refresh_ms), self.refresh_ms)
        })
    }

    /// The delay after `failures` (≥ 1) in a row: the first retry delay,
    /// doubling, up to `retry_max_ms` and the refresh period.
    pub fn failure_delay(&self, failures: u32) -> u64 {
        self.retry_initial_ms
            .saturating_mul(1u64 << failures.saturating_sub(1).min(30))
            .min(self.retry_max_ms)
            .min(self.refresh_ms)
    }
}

/// One document's fetch schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub timings: Timings,
    /// When the next fetch is due.
    next_at: u64,
    /// Failures in a row.
    failures: u32,
    /// When the last successful fetch completed (`None`: never).
    fetched_at: Option<u64>,
    /// When the last early refetch was asked for.
    refetch_at: Option<u64>,
}

impl Schedule {
    /// A schedule whose first fetch is due at once.
    pub fn new(timings: Timings) -> Schedule {
        Schedule {
            timings,
            next_at: 0,
            failures: 0,
            fetched_at: None,
            refetch_at: None,
        }
    }

    /// Whether a fetch is due at `now`.
    pub fn due(&self, now: u64) -> bool {
        now >= self.next_at
    }

    /// When the next fetch is due.
    pub fn next_at(&self) -> u64 {
        self.next_at
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the last success was.
    pub fn fetched_at(&self) -> Option<u64> {
        self.fetched_at
    }

    /// A fetch succeeded at `now`; `max_age_s` from its `Cache-Control`.
    /// Returns the delay until the next one.
    pub fn succeeded(&mut self, now: u64, max_age_s: Option<u64>) -> u64 {
        let delay = self.timings.success_delay(max_age_s);
        self.failures = 0;
        self.fetched_at = Some(now);
        self.next_at = now.saturating_add(delay);
        delay
    }

    /// A fetch failed at `now`. Returns the delay until the next attempt.
    pub fn failed(&mut self, now: u64) -> u64 {
        self.failures = self.failures.saturating_add(1);
        let delay = self.timings.failure_delay(self.failures);
        self.next_at = now.saturating_add(delay);
        delay
    }

    /// Asks for a fetch now because the document lacks something; true if
    /// one becomes (or already is) due, false if the last fetch or the
    /// last such request is younger than `min_refetch_ms`.
    pub fn refetch_now(&mut self, now: u64) -> bool {
        if self.due(now) {
            return true;
        }
        let window = self.timings.min_refetch_ms;
        let young = |t: Option<u64>| t.is_some_and(|t| now.saturating_sub(t) < window);
        if young(self.fetched_at) || young(self.refetch_at) {
            return false;
        }
        self.refetch_at = Some(now);
        self.next_at = now;
        true
    }
}

/// `max-age` of a `Cache-Control` value, in seconds.
pub fn max_age(cache_control: &str) -> Option<u64> {
    cache_control.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| v.trim().trim_matches('"').parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T: Timings = Timings {
        refresh_ms: 600_000,
        retry_initial_ms: 1000,
        retry_max_ms: 600_000,
        min_refetch_ms: 30_000,
    };

    #[test]
    fn due_at_once_then_after_the_refresh_or_max_age() {
        let mut s = Schedule::new(T);
        assert!(s.due(0));
        assert_eq!(s.succeeded(5_000, None), 600_000);
        assert!(!s.due(604_999) && s.due(605_000));
        // 90 % of max-age when sooner; never under a second; never over the refresh.
        assert_eq!(s.succeeded(0, Some(100)), 90_000);
        assert_eq!(s.succeeded(0, Some(0)), 1000);
        assert_eq!(s.succeeded(0, Some(86_400)), 600_000);
        assert_eq!(s.fetched_at(), Some(0));
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_refresh() {
        let mut s = Schedule::new(T);
        let delays: Vec<u64> = (0..12).map(|_| s.failed(0)).collect();
        assert_eq!(
            delays,
            [
                1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 600_000,
                600_000
            ]
        );
        assert_eq!(s.failures(), 12);
        for _ in 0..100 {
            s.failed(0);
        }
        assert_eq!(s.failed(7), 600_000, "no overflow");
        s.succeeded(10, None);
        assert_eq!((s.failures(), s.failed(10)), (0, 1000), "a success resets");
    }

    #[test]
    fn early_refetches_are_rate_limited() {
        let mut s = Schedule::new(T);
        s.succeeded(0, None);
        assert!(!s.refetch_now(10_000), "the set is younger than 30 s");
        assert!(s.refetch_now(30_000));
        assert!(s.due(30_000));
        s.failed(30_500);
        assert!(!s.refetch_now(31_000), "asked a second ago, retry not due");
        assert!(s.refetch_now(31_500), "the retry is due anyway");
        s.succeeded(32_000, None);
        assert!(!s.refetch_now(50_000), "fetched 18 s ago");
        assert!(s.refetch_now(62_000));
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("public, max-age=300"), Some(300));
        assert_eq!(max_age("Max-Age = \"60\""), Some(60));
        assert_eq!(max_age("no-store"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
