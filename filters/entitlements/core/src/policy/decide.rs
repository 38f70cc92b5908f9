//! Deciding: the outcome types, and the evaluation of a request against
//! the rules (through the path index, or every rule for reference).

use super::config::Effect;
use super::matching::Request;
use super::Policy;
use crate::grants::{Grants, NoGrants};
use crate::identity::Identity;
use crate::index::ones;
use crate::template::Captures;

/// The outcome, with the id of the rule that decided (`"default"` if none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'p> {
    /// Whether to let the request through (always true in a shadow policy).
    pub allowed: bool,
    pub rule: &'p str,
    /// Set when enforcing the shadow rules (or a shadow policy) would have
    /// denied what is allowed: the id of the rule that would have decided.
    pub shadow_denied: Option<&'p str>,
}

/// What decided: a rule, by position in the policy, or the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decider {
    Rule(usize),
    Default,
}

impl Decider {
    /// Index into per-rule tables of `rules + 1` entries, the default last.
    pub fn slot(self, rules: usize) -> usize {
        match self {
            Decider::Rule(i) => i.min(rules),
            Decider::Default => rules,
        }
    }
}

/// A decision with rules by position: small, `Copy`, and what the
/// decision cache keeps. Meaningful only for the policy that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: Decider,
    pub shadow_denied: Option<Decider>,
}

impl Policy {
    /// Decides a request for an identity.
    pub fn evaluate(&self, identity: &Identity, request: &Request<'_>) -> Decision<'_> {
        self.explain(self.decide(identity, request))
    }

    /// Decides a request for an identity, naming rules by position (what
    /// the decision cache stores; [`Policy::explain`] gives the ids).
    pub fn decide(&self, identity: &Identity, request: &Request<'_>) -> Verdict {
        self.decide_with(identity, request, true, &NoGrants)
    }

    /// [`Policy::decide`] with these grants in force (without them every
    /// `grant` condition is false).
    pub fn decide_granted(
        &self,
        identity: &Identity,
        request: &Request<'_>,
        grants: &dyn Grants,
    ) -> Verdict {
        self.decide_with(identity, request, true, grants)
    }

    /// [`Policy::decide`] without the path index: every rule is looked at.
    /// The reference the index is tested against, and a benchmark baseline.
    pub fn decide_scan(&self, identity: &Identity, request: &Request<'_>) -> Verdict {
        self.decide_with(identity, request, false, &NoGrants)
    }

    fn decide_with(
        &self,
        identity: &Identity,
        request: &Request<'_>,
        indexed: bool,
        grants: &dyn Grants,
    ) -> Verdict {
        let mut caps = Captures::new();
        // First matching enforced deny, else first enforced allow; and the
        // same over every rule, shadow ones included.
        let mut enforced: Option<(usize, Effect)> = None;
        let mut all: Option<(usize, Effect)> = None;
        let mut consider = |i: usize| {
            let Some(rule) = self.rules.get(i) else {
                return;
            };
            caps.clear();
            if !rule.applies(identity, request, &mut caps, grants) {
                return;
            }
            let better = |cur: Option<(usize, Effect)>| match cur {
                None => true,
                Some((_, e)) => e == Effect::Allow && rule.effect == Effect::Deny,
            };
            if !rule.shadow && better(enforced) {
                enforced = Some((i, rule.effect));
            }
            if better(all) {
                all = Some((i, rule.effect));
            }
        };
        match request {
            _ if !indexed => (0..self.rules.len()).for_each(consider),
            Request::Http(r) => {
                let mut candidates = Vec::new();
                self.index.candidates(r.path, &mut candidates);
                ones(&candidates).for_each(&mut consider);
            }
            Request::Channel { .. } => self.channel_rules.iter().for_each(|&i| consider(i)),
        }
        let decider =
            |r: Option<(usize, Effect)>| r.map_or(Decider::Default, |(i, _)| Decider::Rule(i));
        let allows =
            |r: Option<(usize, Effect)>| r.map_or(self.default, |(_, e)| e) == Effect::Allow;
        if self.shadow {
            return Verdict {
                allowed: true,
                rule: decider(all),
                shadow_denied: (!allows(all)).then(|| decider(all)),
            };
        }
        Verdict {
            allowed: allows(enforced),
            rule: decider(enforced),
            shadow_denied: (allows(enforced) && !allows(all)).then(|| decider(all)),
        }
    }

    /// A verdict with the rules named by id.
    pub fn explain(&self, v: Verdict) -> Decision<'_> {
        Decision {
            allowed: v.allowed,
            rule: self.rule_id(v.rule),
            shadow_denied: v.shadow_denied.map(|d| self.rule_id(d)),
        }
    }

    /// The id of a rule, `"default"` for the default (or an index out of range).
    pub fn rule_id(&self, d: Decider) -> &str {
        match d {
            Decider::Rule(i) => self.rules.get(i).map_or("default", |r| r.id.as_str()),
            Decider::Default => "default",
        }
    }
}
