//! The fields a 429 (and, if configured, an allowed response) carries:
//! `Retry-After`, the IETF httpapi draft's `RateLimit-Policy` and
//! `RateLimit` (structured fields: `"<policy>";q=<quota>;w=<window>` and
//! `"<policy>";r=<remaining>;t=<seconds>`), and the `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining`, `X-RateLimit-Reset` trio clients already parse.

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
                policy.id, policy.rate.burst, policy.window_s
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
