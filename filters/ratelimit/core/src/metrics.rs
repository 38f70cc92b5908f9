//! The ratelimit filter's metrics (`wasmcustom.ratelimit.*` in Envoy).
//! Names: `ratelimit.<what>`, per policy `ratelimit.policy.<id>.<what>`.

use crate::config::Policy;
use filter_common::host::{Host, Metric};

pub const ALLOWED: &str = "ratelimit.allowed";
pub const LIMITED: &str = "ratelimit.limited";
pub const SHADOW_LIMITED: &str = "ratelimit.shadow_limited";
pub const CAS_RETRIES: &str = "ratelimit.cas_retries";
pub const SLOTS_RECYCLED: &str = "ratelimit.slots_recycled";
pub const FAIL_OPEN: &str = "ratelimit.fail_open";
pub const FAIL_CLOSED: &str = "ratelimit.fail_closed";

/// `ratelimit.policy.<id>.allowed` / `.limited`.
pub fn policy_metric(id: &str, what: &str) -> String {
    format!("ratelimit.policy.{id}.{what}")
}

pub struct Metrics {
    pub allowed: Metric,
    pub limited: Metric,
    pub shadow_limited: Metric,
    pub cas_retries: Metric,
    pub recycled: Metric,
    pub fail_open: Metric,
    pub fail_closed: Metric,
    /// Per policy: (allowed, limited).
    per_policy: Vec<(Metric, Metric)>,
}

impl Metrics {
    pub fn define<H: Host>(h: &H, policies: &[Policy]) -> Metrics {
        Metrics {
            allowed: h.counter(ALLOWED),
            limited: h.counter(LIMITED),
            shadow_limited: h.counter(SHADOW_LIMITED),
            cas_retries: h.counter(CAS_RETRIES),
            recycled: h.counter(SLOTS_RECYCLED),
            fail_open: h.counter(FAIL_OPEN),
            fail_closed: h.counter(FAIL_CLOSED),
            per_policy: policies
                .iter()
                .map(|p| {
                    (
                        h.counter(&policy_metric(&p.id, "allowed")),
                        h.counter(&policy_metric(&p.id, "limited")),
                    )
                })
                .collect(),
        }
    }

    /// A policy's (allowed, limited) counters.
    pub fn policy(&self, i: usize) -> (Metric, Metric) {
        self.per_policy.get(i).copied().unwrap_or_default()
    }
}
