//! The auth filter's metrics (`wasmcustom.auth.*` in Envoy). Names:
//! `auth.<what>`; Envoy jwt_authn's names where it has one
//! (`allowed`, `denied`, `jwks_fetch_success`, `jwks_fetch_failed`,
//! `jwt_cache_hit`, `jwt_cache_miss`), refusals per reason as
//! `auth.denied.<code>`.

use crate::error::Reason;
use filter_common::cache::CacheCounters;
use filter_common::host::{Host, Metric};

pub const ALLOWED: &str = "auth.allowed";
pub const DENIED: &str = "auth.denied";
pub const BYPASSED: &str = "auth.bypassed";
/// Let through without identity (missing or failed token allowed).
pub const ANONYMOUS: &str = "auth.anonymous";
/// Requests that waited for a provider's keys.
pub const WAITED_FOR_KEYS: &str = "auth.waited_for_keys";
pub const JWKS_FETCH_SUCCESS: &str = "auth.jwks_fetch_success";
pub const JWKS_FETCH_FAILED: &str = "auth.jwks_fetch_failed";
pub const JWT_CACHE_HIT: &str = "auth.jwt_cache_hit";
pub const JWT_CACHE_MISS: &str = "auth.jwt_cache_miss";
pub const JWT_CACHE_EVICTIONS: &str = "auth.jwt_cache_evictions";

/// `auth.denied.<code>` ([`Reason::CODES`]).
pub fn denied_metric(code: &str) -> String {
    format!("auth.denied.{code}")
}

pub struct Metrics {
    pub allowed: Metric,
    pub denied: Metric,
    pub bypassed: Metric,
    pub anonymous: Metric,
    pub waited: Metric,
    pub jwks_fetch_success: Metric,
    pub jwks_fetch_failed: Metric,
    pub cache: CacheCounters,
    /// `auth.denied.<code>`, in [`Reason::CODES`] order.
    reasons: Vec<Metric>,
}

impl Metrics {
    pub fn define<H: Host>(h: &H) -> Metrics {
        Metrics {
            allowed: h.counter(ALLOWED),
            denied: h.counter(DENIED),
            bypassed: h.counter(BYPASSED),
            anonymous: h.counter(ANONYMOUS),
            waited: h.counter(WAITED_FOR_KEYS),
            jwks_fetch_success: h.counter(JWKS_FETCH_SUCCESS),
            jwks_fetch_failed: h.counter(JWKS_FETCH_FAILED),
            cache: CacheCounters::define(
                h,
                JWT_CACHE_HIT,
                JWT_CACHE_MISS,
                JWT_CACHE_EVICTIONS,
                None,
            ),
            reasons: Reason::CODES
                .iter()
                .map(|c| h.counter(&denied_metric(c)))
                .collect(),
        }
    }

    /// Counts a refusal under its reason.
    pub fn reason<H: Host>(&self, h: &H, r: &Reason) {
        let i = Reason::CODES.iter().position(|c| *c == r.code());
        h.increment(
            i.and_then(|i| self.reasons.get(i).copied())
                .unwrap_or_default(),
            1,
        );
    }
}
