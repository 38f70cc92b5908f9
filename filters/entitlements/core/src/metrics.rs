//! The entitlements filter's metrics, defined once per VM (Envoy exposes
//! them as `wasmcustom.entitlements.*`; all workers add to the same
//! counters). Names: `entitlements.<what>`, grouped by a dotted prefix
//! (`entitlements.cache.*`, `entitlements.policy.*`,
//! `entitlements.rule.<id>`).

use crate::policy::Policy;
use filter_common::cache::CacheCounters;
use filter_common::host::{Host, Metric, MetricKind};
use std::collections::HashMap;

pub const ALLOWED: &str = "entitlements.allowed";
pub const DENIED: &str = "entitlements.denied";
pub const SHADOW_DENIED: &str = "entitlements.shadow_denied";
pub const INVALID_PATH: &str = "entitlements.invalid_path";
pub const INVALID_IDENTITY: &str = "entitlements.invalid_identity";
pub const UNAVAILABLE: &str = "entitlements.unavailable";
pub const POLICY_RELOADS: &str = "entitlements.policy.reloads";
pub const POLICY_FETCHES: &str = "entitlements.policy.fetches";
pub const POLICY_NOT_MODIFIED: &str = "entitlements.policy.not_modified";
pub const POLICY_FETCH_FAILED: &str = "entitlements.policy.fetch_failed";
pub const POLICY_INVALID: &str = "entitlements.policy.invalid";
/// Gauge: rules of the policy in force.
pub const POLICY_RULES: &str = "entitlements.policy.rules";
pub const GRANTS_PAGES: &str = "entitlements.grants.pages";
pub const GRANTS_SNAPSHOTS: &str = "entitlements.grants.snapshots";
pub const GRANTS_DELTAS: &str = "entitlements.grants.deltas";
pub const GRANTS_NOT_MODIFIED: &str = "entitlements.grants.not_modified";
pub const GRANTS_FETCH_FAILED: &str = "entitlements.grants.fetch_failed";
pub const GRANTS_INVALID: &str = "entitlements.grants.invalid";
/// A worker emptied its caches: the log of changed holders
/// (`grants.log_entries`) did not reach back to its version.
pub const GRANTS_LOG_OVERFLOW: &str = "entitlements.grants.log_overflow";
/// Gauges: grants in force at this Envoy, and their version.
pub const GRANTS_IN_FORCE: &str = "entitlements.grants.in_force";
pub const GRANTS_VERSION: &str = "entitlements.grants.version";
/// `entitlements.grants.cache.{hits,misses,evictions}`.
pub const GRANTS_CACHE: &str = "entitlements.grants.cache";
/// `entitlements.cache.{hits,misses,evictions,oversized}`.
pub const CACHE: &str = "entitlements.cache";
/// `entitlements.identity_cache.{hits,misses,evictions}`.
pub const IDENTITY_CACHE: &str = "entitlements.identity_cache";

/// `entitlements.rule.<id>` (the default rule's id is `default`).
pub fn rule_metric(id: &str) -> String {
    format!("entitlements.rule.{id}")
}

pub struct Metrics {
    pub allowed: Metric,
    pub denied: Metric,
    pub shadow_denied: Metric,
    pub invalid_path: Metric,
    pub invalid_identity: Metric,
    pub unavailable: Metric,
    pub cache: CacheCounters,
    pub identity_cache: CacheCounters,
    pub policy_reloads: Metric,
    pub policy_fetches: Metric,
    pub policy_not_modified: Metric,
    pub policy_fetch_failed: Metric,
    pub policy_invalid: Metric,
    policy_rules: Metric,
    pub grants: GrantsMetrics,
    /// Per-rule hit counters of the policy in force, the default last.
    rules: Vec<Metric>,
    /// Every rule counter defined so far, by name (a policy swap reuses them).
    defined: HashMap<String, Metric>,
}

/// The grants feed's.
pub struct GrantsMetrics {
    pub pages: Metric,
    pub snapshots: Metric,
    pub deltas: Metric,
    pub not_modified: Metric,
    pub fetch_failed: Metric,
    pub invalid: Metric,
    pub log_overflow: Metric,
    pub in_force: Metric,
    pub version: Metric,
    pub cache: CacheCounters,
}

impl GrantsMetrics {
    fn define<H: Host>(h: &H) -> GrantsMetrics {
        GrantsMetrics {
            pages: h.counter(GRANTS_PAGES),
            snapshots: h.counter(GRANTS_SNAPSHOTS),
            deltas: h.counter(GRANTS_DELTAS),
            not_modified: h.counter(GRANTS_NOT_MODIFIED),
            fetch_failed: h.counter(GRANTS_FETCH_FAILED),
            invalid: h.counter(GRANTS_INVALID),
            log_overflow: h.counter(GRANTS_LOG_OVERFLOW),
            in_force: h.metric(MetricKind::Gauge, GRANTS_IN_FORCE),
            version: h.metric(MetricKind::Gauge, GRANTS_VERSION),
            cache: CacheCounters::define(
                h,
                &format!("{GRANTS_CACHE}.hits"),
                &format!("{GRANTS_CACHE}.misses"),
                &format!("{GRANTS_CACHE}.evictions"),
                None,
            ),
        }
    }
}

impl Metrics {
    pub fn define<H: Host>(h: &H) -> Metrics {
        Metrics {
            allowed: h.counter(ALLOWED),
            denied: h.counter(DENIED),
            shadow_denied: h.counter(SHADOW_DENIED),
            invalid_path: h.counter(INVALID_PATH),
            invalid_identity: h.counter(INVALID_IDENTITY),
            unavailable: h.counter(UNAVAILABLE),
            cache: CacheCounters::define(
                h,
                &format!("{CACHE}.hits"),
                &format!("{CACHE}.misses"),
                &format!("{CACHE}.evictions"),
                Some(&format!("{CACHE}.oversized")),
            ),
            identity_cache: CacheCounters::define(
                h,
                &format!("{IDENTITY_CACHE}.hits"),
                &format!("{IDENTITY_CACHE}.misses"),
                &format!("{IDENTITY_CACHE}.evictions"),
                None,
            ),
            policy_reloads: h.counter(POLICY_RELOADS),
            policy_fetches: h.counter(POLICY_FETCHES),
            policy_not_modified: h.counter(POLICY_NOT_MODIFIED),
            policy_fetch_failed: h.counter(POLICY_FETCH_FAILED),
            policy_invalid: h.counter(POLICY_INVALID),
            policy_rules: h.metric(MetricKind::Gauge, POLICY_RULES),
            grants: GrantsMetrics::define(h),
            rules: Vec::new(),
            defined: HashMap::new(),
        }
    }

    /// Per-rule counters for a policy about to be put in force.
    pub fn define_rules<H: Host>(&mut self, h: &H, policy: &Policy) {
        let names: Vec<String> = policy
            .rule_ids()
            .chain(std::iter::once("default"))
            .map(rule_metric)
            .collect();
        self.rules = names
            .into_iter()
            .map(|n| *self.defined.entry(n).or_insert_with_key(|n| h.counter(n)))
            .collect();
        h.record(self.policy_rules, policy.len() as u64);
    }

    /// The hit counter of the rule in `slot` ([`Decider::slot`]).
    ///
    /// [`Decider::slot`]: crate::policy::Decider::slot
    pub fn rule(&self, slot: usize) -> Metric {
        self.rules.get(slot).copied().unwrap_or_default()
    }
}
