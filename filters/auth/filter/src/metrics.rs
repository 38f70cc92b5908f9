//! The filter's metrics (`wasmcustom.auth.*` in Envoy), Envoy jwt_authn's
//! names where they exist.

use auth_core::error::Reason;
use filter_common::cache::CacheStats;
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
    cache_hit: Option<u32>,
    cache_miss: Option<u32>,
    cache_evictions: Option<u32>,
    /// `auth.denied.<code>`, in [`Reason::CODES`] order.
    reasons: Vec<Option<u32>>,
    flushed: CacheStats,
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
            cache_hit: counter("jwt_cache_hit"),
            cache_miss: counter("jwt_cache_miss"),
            cache_evictions: counter("jwt_cache_evictions"),
            reasons: Reason::CODES
                .iter()
                .map(|c| counter(&format!("denied.{c}")))
                .collect(),
            flushed: CacheStats::default(),
        }
    }

    /// Counts a refusal under its reason.
    pub fn reason(&self, r: &Reason) {
        let i = Reason::CODES.iter().position(|c| *c == r.code());
        host::increment(i.and_then(|i| self.reasons.get(i).copied().flatten()), 1);
    }

    pub fn flush_cache(&mut self, now: CacheStats) {
        let was = self.flushed;
        host::increment(self.cache_hit, now.hits - was.hits);
        host::increment(self.cache_miss, now.misses - was.misses);
        host::increment(self.cache_evictions, now.evictions - was.evictions);
        self.flushed = now;
    }
}
