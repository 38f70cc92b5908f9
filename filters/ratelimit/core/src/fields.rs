//! The fields a 429 (and, if configured, an allowed response) carries:
//! `Retry-After`, the IETF httpapi draft's `RateLimit-Policy` and
//! `RateLimit` (structured fields: `"<policy>";q=<quota>;w=<window>` and
//! `"<policy>";r=<remaining>;t=<seconds>`), and the `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining`, `X-RateLimit-Reset` trio clients already parse.
//!
//! The policy announced is what a client can rely on under GCRA: a quota
//! of `burst` per the time the bucket takes to refill (`burst × T`), e.g.
//! 120 a minute with a burst of 20 is `q=20;w=10`. Sending at most `q` in
//! any `w` seconds, however bunched, is never refused; the long-run rate
//! (`q/w`) is the configured one. (Announcing the configured period with
//! the burst, `q=20;w=60`, would tell a client six times less than it
//! gets; the rate with the period, `q=120;w=60`, more than it may send at
//! once.)

use crate::config::Policy;
use crate::gcra::{ceil_secs, Outcome};

/// Response fields for the policy closest to its limit.
pub fn fields(policy: &Policy, o: &Outcome) -> Vec<(&'static str, String)> {
    let reset = ceil_secs(o.reset_ns);
    let mut out = vec![
        (
            "ratelimit-policy",
            format!(
                "\"{}\";q={};w={}",
                policy.id,
                policy.rate.burst.max(1),
                policy.rate.refill_secs()
            ),
        ),
        (
            "ratelimit",
            format!("\"{}\";r={};t={}", policy.id, o.remaining, reset),
        ),
        ("x-ratelimit-limit", policy.rate.burst.to_string()),
        ("x-ratelimit-remaining", o.remaining.to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ];
    if !o.allowed {
        out.push((
            "retry-after",
            ceil_secs(o.retry_after_ns).max(1).to_string(),
        ));
    }
    out
}

/// The 429 body of DESIGN.md.
pub fn body(o: &Outcome) -> String {
    format!(
        "{{\"error\":\"rate_limited\",\"retry_after\":{}}}",
        ceil_secs(o.retry_after_ns).max(1)
    )
}

#[cfg(test)]
mod tests {
    use crate::gcra::Rate;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000_000;

    /// A client that sends `q` at once every `w` seconds, as announced.
    fn paced_by_the_header_is_never_refused(rate: Rate) {
        let (q, w) = (rate.burst.max(1), rate.refill_secs());
        let mut tat = 0;
        for round in 0..50u64 {
            let now = 1_000 * SEC + round * w * SEC;
            for i in 0..q {
                let (o, t) = rate.apply(tat, now);
                assert!(
                    o.allowed,
                    "{rate:?}: round {round}, request {i} of q={q};w={w}"
                );
                tat = t;
            }
            // One more in the same window may be refused (the quota is
            // tight when T divides a second).
        }
        // And the long-run rate is the configured one: q per w is at
        // most requests per period, rounding aside.
        let per_period = q as f64 * rate.period_ns as f64 / (w * SEC) as f64;
        assert!(
            per_period <= rate.requests as f64 + 1e-9,
            "{rate:?}: {per_period}"
        );
    }

    #[test]
    fn the_announced_policy_holds_against_the_gcra() {
        for (requests, period_s, burst) in [
            (120, 60, 20),
            (10, 1, 10),
            (1000, 3600, 50),
            (7, 60, 3),
            (1, 86_400, 1),
            (100, 1, 1),
        ] {
            paced_by_the_header_is_never_refused(Rate {
                requests,
                period_ns: period_s * SEC,
                burst,
            });
        }
        let stack = Rate {
            requests: 120,
            period_ns: 60 * SEC,
            burst: 20,
        };
        assert_eq!(
            (stack.burst, stack.refill_secs()),
            (20, 10),
            "the dev stack's per-subject policy"
        );
    }

    #[test]
    fn more_than_the_quota_at_once_is_refused_when_it_is_tight() {
        let r = Rate {
            requests: 120,
            period_ns: 60 * SEC,
            burst: 20,
        };
        let mut tat = 0;
        let now = 1_000 * SEC;
        for _ in 0..20 {
            tat = r.apply(tat, now).1;
        }
        assert!(!r.apply(tat, now).0.allowed, "the 21st at once");
    }
}
