//! The generic cell rate algorithm: a token bucket kept as one number, the
//! theoretical arrival time (TAT) of the next request, in nanoseconds.
//! A limit of `burst` requests at once, refilled at `requests` per
//! `period`: each request moves the TAT one emission interval
//! `T = period / requests` forward; a request is admitted while the TAT it
//! would leave is at most `burst · T` ahead of now. Integer arithmetic only,
//! so every worker computes the same answer from the same state.

/// A rate: `requests` per `period_ns`, with a burst capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub period_ns: u64,
    pub burst: u64,
}

/// What a request was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests still admissible right now after this one.
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// For a refused request: nanoseconds until one would be admitted.
    pub retry_after_ns: u64,
}

impl Rate {
    /// The emission interval `T` (at least 1 ns).
    pub fn interval(&self) -> u64 {
        (self.period_ns / self.requests.max(1)).max(1)
    }

    /// Applies one request at `now` to the state `tat` (0 for a new key);
    /// returns the outcome and the state to store (unchanged if refused).
    pub fn apply(&self, tat: u64, now: u64) -> (Outcome, u64) {
        let t = self.interval();
        let window = t.saturating_mul(self.burst.max(1));
        let base = tat.max(now);
        let new_tat = base.saturating_add(t);
        let ahead = new_tat - now;
        if ahead <= window {
            let remaining = (window - ahead) / t;
            (
                Outcome {
                    allowed: true,
                    remaining,
                    reset_ns: ahead,
                    retry_after_ns: 0,
                },
                new_tat,
            )
        } else {
            (
                Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_ns: base - now,
                    retry_after_ns: ahead - window,
                },
                tat,
            )
        }
    }

    /// Seconds an empty bucket takes to be full again (`burst × T`, rounded
    /// up, at least 1): what `RateLimit-Policy` announces as the window of
    /// a quota of `burst`. A client that sends at most `burst` requests in
    /// any such window, however bunched, is never refused.
    pub fn refill_secs(&self) -> u64 {
        ceil_secs(self.interval().saturating_mul(self.burst.max(1))).max(1)
    }

    /// Whether a bucket in state `tat` is full at `now` (its slot can be
    /// given to another key without anyone noticing).
    pub fn idle(tat: u64, now: u64) -> bool {
        tat <= now
    }
}

/// Whole seconds, rounded up (for `Retry-After` and reset fields).
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_is_admitted_at_once_then_one_per_interval() {
        let r = Rate {
            requests: 10,
            period_ns: 60 * S,
            burst: 10,
        };
        let (mut tat, now) = (0, 1_000 * S);
        let mut admitted = 0;
        for i in 0..20 {
            let (o, t) = r.apply(tat, now);
            tat = t;
            if o.allowed {
                admitted += 1;
                assert_eq!(o.remaining, 9 - i);
            } else {
                assert_eq!(o.retry_after_ns, 6 * S, "one request per 6 s");
            }
        }
        assert_eq!(admitted, 10);
        // 6 s later exactly one more; 60 s later a full burst again.
        assert!(!r.apply(tat, now + 6 * S - 1).0.allowed);
        let (o, t) = r.apply(tat, now + 6 * S);
        assert!(o.allowed && o.remaining == 0);
        assert_eq!(o.reset_ns, 60 * S);
        let mut tat = t;
        let later = now + 6 * S + 60 * S;
        let mut n = 0;
        while r.apply(tat, later).0.allowed {
            tat = r.apply(tat, later).1;
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn burst_smaller_than_rate_spreads_requests() {
        let r = Rate {
            requests: 100,
            period_ns: S,
            burst: 5,
        };
        let mut tat = 0;
        let now = 50 * S;
        let admitted = (0..50)
            .filter(|_| {
                let (o, t) = r.apply(tat, now);
                tat = t;
                o.allowed
            })
            .count();
        assert_eq!(admitted, 5);
        assert!(Rate::idle(tat, now + 50_000_000));
        assert!(!Rate::idle(tat, now + 49_999_999));
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(S), 1);
        assert_eq!(ceil_secs(S + 1), 2);
    }
}
