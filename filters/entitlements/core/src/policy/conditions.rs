//! Conditions on the verified identity: the compiled attribute, operator
//! and operand, or a grant the caller must hold; and whether they hold
//! (with the values a match captured).

use super::config::Op;
use crate::grants::{Caller, Grants};
use crate::identity::{ClaimPath, Identity};
use crate::template::Captures;
use regex_lite::Regex;

pub(super) enum Attr {
    Subject,
    Issuer,
    Tenant,
    Roles,
    Claim(ClaimPath),
}

pub(super) enum Operand {
    Value(String),
    Values(Vec<String>),
    Regex(Regex),
    Capture(String),
    None,
}

pub(super) enum Condition {
    Attr(AttrCondition),
    Grant(GrantCondition),
}

pub(super) struct AttrCondition {
    pub(super) attr: Attr,
    pub(super) op: Op,
    pub(super) operand: Operand,
}

/// A piece of a grant condition's resource.
pub(super) enum Part {
    Text(String),
    Capture(String),
}

pub(super) struct GrantCondition {
    pub(super) resource: Vec<Part>,
    pub(super) action: String,
}

impl Condition {
    pub(super) fn holds(&self, id: &Identity, caps: &Captures, grants: &dyn Grants) -> bool {
        match self {
            Condition::Attr(c) => c.holds(id, caps),
            Condition::Grant(g) => g.holds(id, caps, grants),
        }
    }

    /// The claim it reads, if any.
    pub(super) fn claim(&self) -> Option<&ClaimPath> {
        match self {
            Condition::Attr(AttrCondition {
                attr: Attr::Claim(p),
                ..
            }) => Some(p),
            _ => None,
        }
    }

    pub(super) fn is_grant(&self) -> bool {
        matches!(self, Condition::Grant(_))
    }
}

impl GrantCondition {
    fn holds(&self, id: &Identity, caps: &Captures, grants: &dyn Grants) -> bool {
        let mut resource = String::new();
        for p in &self.resource {
            match p {
                Part::Text(t) => resource.push_str(t),
                Part::Capture(name) => match caps.iter().find(|(n, _)| n == name) {
                    Some((_, v)) => resource.push_str(v),
                    None => return false,
                },
            }
        }
        let caller = Caller {
            tenant: id.tenant.as_deref(),
            subject: id.subject.as_deref(),
        };
        grants.holds(caller, &resource, &self.action)
    }
}

impl AttrCondition {
    fn holds(&self, id: &Identity, caps: &Captures) -> bool {
        // Borrowed from the identity: no copy per evaluation (claims that are
        // numbers or booleans are the only values formatted).
        let values: Vec<std::borrow::Cow<'_, str>> = match &self.attr {
            Attr::Subject => id.subject.as_deref().map(Into::into).into_iter().collect(),
            Attr::Issuer => id.issuer.as_deref().map(Into::into).into_iter().collect(),
            Attr::Tenant => id.tenant.as_deref().map(Into::into).into_iter().collect(),
            Attr::Roles => id.roles.iter().map(|r| r.as_str().into()).collect(),
            Attr::Claim(p) => p.values(&id.claims),
        };
        let single =
            |want: &str| values.len() == 1 && values.first().map(|v| v.as_ref()) == Some(want);
        let any = |f: &dyn Fn(&str) -> bool| values.iter().any(|v| f(v));
        let captured;
        let operand = match &self.operand {
            Operand::Capture(name) => match caps.iter().find(|(n, _)| n == name) {
                Some((_, v)) => {
                    captured = Operand::Value(v.clone());
                    &captured
                }
                None => return false,
            },
            o => o,
        };
        match (self.op, operand) {
            (Op::Exists, _) => !values.is_empty(),
            (Op::Eq, Operand::Value(v)) => single(v),
            (Op::Ne, Operand::Value(v)) => !single(v),
            (Op::In, Operand::Values(vs)) => values.len() == 1 && vs.iter().any(|w| single(w)),
            // With a capture: the captured value is one of the attribute's values.
            (Op::In | Op::Contains, Operand::Value(v)) => any(&|x| x == v),
            (Op::ContainsAny, Operand::Values(vs)) => any(&|x| vs.iter().any(|w| w == x)),
            (Op::Prefix, Operand::Value(v)) => any(&|x| x.starts_with(v.as_str())),
            (Op::Suffix, Operand::Value(v)) => any(&|x| x.ends_with(v.as_str())),
            (Op::Regex, Operand::Regex(re)) => any(&|x| re.is_match(x)),
            _ => false,
        }
    }
}
