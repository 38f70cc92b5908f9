//! The filter's metrics (`wasmcustom.auth.*` in Envoy), Envoy jwt_authn's
//! names where they exist.

use auth_core::error::Reason;
use filter_shell as host;
use proxy_wasm::types::MetricType;

pub struct Metrics {
    pub allowed: Option<u32>,
    pub denied: Option<u32>,
    pub bypassed: Option<u32>,
    /// Let through without identity (missing or failed token allowed).
    pub anonymous: Option<u32>,
    /// Requests that waited for a provider's keys.
    pub waited: Option<u32>,
    pub jwks_fetch_success: Option<u32>,
    pub jwks_fetch_failed: Option<u32>,
    pub cache: host::CacheCounters,
    /// `auth.denied.<code>`, in [`Reason::CODES`] order.
    reasons: Vec<Option<u32>>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("auth.{name}"))
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            allowed: counter("allowed"),
            denied: counter("denied"),
            bypassed: counter("bypassed"),
            anonymous: counter("anonymous"),
            waited: counter("waited_for_keys"),
            jwks_fetch_success: counter("jwks_fetch_success"),
            jwks_fetch_failed: counter("jwks_fetch_failed"),
            cache: host::CacheCounters::define(
                "auth.jwt_cache_hit",
                "auth.jwt_cache_miss",
                "auth.jwt_cache_evictions",
                None,
            ),
            reasons: Reason::CODES
                .iter()
                .map(|c| counter(&format!("denied.{c}")))
                .collect(),
        }
    }

    /// Counts a refusal under its reason.
    pub fn reason(&self, r: &Reason) {
        let i = Reason::CODES.iter().position(|c| *c == r.code());
        host::increment(i.and_then(|i| self.reasons.get(i).copied().flatten()), 1);
    }
}
