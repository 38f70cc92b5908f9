//! The filter's metrics, defined once per VM (Envoy exposes them as
//! `wasmcustom.entitlements.*`; all workers add to the same counters).

use entitlements_core::policy::Policy;
use filter_shell as host;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

pub struct Metrics {
    pub allowed: Option<u32>,
    pub denied: Option<u32>,
    pub shadow_denied: Option<u32>,
    pub invalid_path: Option<u32>,
    pub invalid_identity: Option<u32>,
    pub unavailable: Option<u32>,
    pub cache: host::CacheCounters,
    pub identity_cache: host::CacheCounters,
    pub policy_reloads: Option<u32>,
    pub policy_fetches: Option<u32>,
    pub policy_not_modified: Option<u32>,
    pub policy_fetch_failed: Option<u32>,
    pub policy_invalid: Option<u32>,
    policy_rules: Option<u32>,
    /// Per-rule hit counters of the policy in force, the default last.
    rules: Vec<Option<u32>>,
    /// Every rule counter defined so far, by name (a policy swap reuses them).
    defined: HashMap<String, Option<u32>>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("entitlements.{name}"))
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            allowed: counter("allowed"),
            denied: counter("denied"),
            shadow_denied: counter("shadow_denied"),
            invalid_path: counter("invalid_path"),
            invalid_identity: counter("invalid_identity"),
            unavailable: counter("unavailable"),
            cache: host::CacheCounters::define(
                "entitlements.cache.hits",
                "entitlements.cache.misses",
                "entitlements.cache.evictions",
                Some("entitlements.cache.oversized"),
            ),
            identity_cache: host::CacheCounters::define(
                "entitlements.identity_cache.hits",
                "entitlements.identity_cache.misses",
                "entitlements.identity_cache.evictions",
                None,
            ),
            policy_reloads: counter("policy.reloads"),
            policy_fetches: counter("policy.fetches"),
            policy_not_modified: counter("policy.not_modified"),
            policy_fetch_failed: counter("policy.fetch_failed"),
            policy_invalid: counter("policy.invalid"),
            policy_rules: host::define(MetricType::Gauge, "entitlements.policy.rules"),
            rules: Vec::new(),
            defined: HashMap::new(),
        }
    }

    /// Per-rule counters for a policy about to be put in force.
    pub fn define_rules(&mut self, policy: &Policy) {
        let names: Vec<String> = policy
            .rule_ids()
            .chain(std::iter::once("default"))
            .map(|id| format!("entitlements.rule.{id}"))
            .collect();
        self.rules = names
            .into_iter()
            .map(|n| {
                *self
                    .defined
                    .entry(n)
                    .or_insert_with_key(|n| host::define(MetricType::Counter, n))
            })
            .collect();
        host::record(self.policy_rules, policy.len() as u64);
    }

    /// The hit counter of the rule in `slot` ([`Decider::slot`]).
    ///
    /// [`Decider::slot`]: entitlements_core::policy::Decider::slot
    pub fn rule(&self, slot: usize) -> Option<u32> {
        self.rules.get(slot).copied().flatten()
    }
}
