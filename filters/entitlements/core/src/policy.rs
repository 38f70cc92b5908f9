//! Policies: rules parsed from JSON (unknown fields refused), compiled once
//! (templates, regexes, claim paths; errors name the rule and the field),
//! then evaluated per HTTP request or channel subscription.
//!
//! A matching enforced deny wins over any allow; otherwise a matching allow
//! allows; otherwise the default (deny unless configured). Shadow rules, and
//! every rule in a shadow policy, are evaluated and reported but never
//! enforced.
//!
//! By concern: the document (`config`), compiling it (`compile`), what a
//! rule matches (`matching`) and the identity conditions (`conditions`),
//! deciding (`decide`), and decision cache keys (`keys`).

mod compile;
mod conditions;
mod config;
mod decide;
mod keys;
mod matching;
#[cfg(test)]
mod tests;

pub use config::{
    ChannelAction, ConditionConfig, Effect, MatchConfig, Op, PathMatchConfig, PolicyConfig,
    PolicyError, RuleConfig, ValueMatchConfig, RESERVED_IDS,
};
pub use decide::{Decider, Decision, Verdict};
pub use keys::IdentityKey;
pub use matching::{query_param, HttpRequest, Request};

use crate::index::PathIndex;
use matching::Rule;

/// A compiled policy.
pub struct Policy {
    default: Effect,
    shadow: bool,
    rules: Vec<Rule>,
    /// What a decision can depend on besides method, host, path and the
    /// plain identity attributes: the cache key carries exactly these.
    key_headers: Vec<String>,
    key_query: Vec<String>,
    uses_claims: bool,
    /// Whether any rule has a `grant` condition.
    uses_grants: bool,
    /// Top-level claims some condition reads (sorted).
    claim_roots: Vec<String>,
    /// HTTP rules by the path segments they need.
    index: PathIndex,
    /// Channel rules, in order.
    channel_rules: Vec<usize>,
}

impl Policy {
    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The top-level claims some condition reads (sorted): what
    /// [`decode_claims`](crate::identity::decode_claims) needs to keep.
    pub fn claim_roots(&self) -> &[String] {
        &self.claim_roots
    }

    /// The request headers some rule reads (lower-case, sorted).
    pub fn headers_read(&self) -> &[String] {
        &self.key_headers
    }

    /// Whether any condition reads `claims.*` (if none, the payload need
    /// not be decoded, and is not part of the cache key).
    pub fn uses_claims(&self) -> bool {
        self.uses_claims
    }

    /// Whether any rule asks for a grant (a decision then depends on the
    /// grants in force, not only on the identity and the request).
    pub fn uses_grants(&self) -> bool {
        self.uses_grants
    }

    /// The ids of the rules, in order (for per-rule metrics).
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }
}
