//! Compiling a parsed policy: rule ids checked, templates, regexes and
//! claim paths compiled (errors name the rule and the field), the path
//! index built, and what the cache key needs collected.

use super::conditions::{Attr, AttrCondition, Condition, GrantCondition, Operand, Part};
use super::config::{
    ChannelAction, ConditionConfig, GrantConditionConfig, Op, PathMatchConfig, PolicyConfig,
    PolicyError, RuleConfig, ValueMatchConfig, RESERVED_IDS,
};
use super::matching::{PathMatch, Rule, Target, ValueMatch};
use super::Policy;
use crate::identity::ClaimPath;
use crate::index::{prefix_segments, regex_literal_prefix, PathIndex};
use crate::template::{ChannelTemplate, PathTemplate};
use regex_lite::Regex;
use std::collections::HashSet;

impl Policy {
    /// Parses and compiles a JSON policy.
    pub fn from_json(json: &[u8]) -> Result<Policy, PolicyError> {
        let cfg: PolicyConfig =
            serde_json::from_slice(json).map_err(|e| PolicyError::Parse(e.to_string()))?;
        Policy::compile(cfg)
    }

    /// Compiles a parsed policy.
    pub fn compile(cfg: PolicyConfig) -> Result<Policy, PolicyError> {
        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.into_iter().enumerate() {
            if r.id.is_empty() {
                return Err(rule_err(&format!("#{i}"), "id", "must not be empty"));
            }
            if RESERVED_IDS.contains(&r.id.as_str()) {
                return Err(rule_err(
                    &r.id,
                    "id",
                    "reserved (the engine reports it itself)",
                ));
            }
            if !ids.insert(r.id.clone()) {
                return Err(rule_err(&r.id, "id", "duplicate rule id"));
            }
            rules.push(compile_rule(r)?);
        }
        let mut key_headers = std::collections::BTreeSet::new();
        let mut key_query = std::collections::BTreeSet::new();
        let mut uses_claims = false;
        let mut uses_grants = false;
        let mut claim_roots = std::collections::BTreeSet::new();
        for r in &rules {
            for c in &r.when {
                if let Some(p) = c.claim() {
                    claim_roots.insert(p.root().to_string());
                }
            }
            if let Target::Http { headers, query, .. } = &r.target {
                key_headers.extend(headers.iter().map(|(n, _)| n.clone()));
                key_query.extend(query.iter().map(|(n, _)| n.clone()));
            }
            uses_claims |= r.when.iter().any(|c| c.claim().is_some());
            uses_grants |= r.when.iter().any(Condition::is_grant);
        }
        let mut index = PathIndex::new(rules.len());
        let mut channel_rules = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match &r.target {
                Target::Channel { .. } => channel_rules.push(i),
                Target::Http { path, .. } => match path {
                    None => index.insert(i, std::iter::empty()),
                    Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) => {
                        index.insert(i, prefix_segments(p))
                    }
                    Some(PathMatch::Template(t)) => index.insert(i, t.leading_literals()),
                    Some(PathMatch::Regex(_, prefix)) => index.insert(i, prefix_segments(prefix)),
                },
            }
        }
        Ok(Policy {
            default: cfg.default,
            shadow: cfg.shadow,
            index,
            channel_rules,
            rules,
            key_headers: key_headers.into_iter().collect(),
            key_query: key_query.into_iter().collect(),
            uses_claims,
            uses_grants,
            claim_roots: claim_roots.into_iter().collect(),
        })
    }
}

impl ValueMatch {
    fn compile(c: ValueMatchConfig, rule: &str, field: &str) -> Result<ValueMatch, PolicyError> {
        Ok(match c {
            ValueMatchConfig::Exact(v) => ValueMatch::Exact(v),
            ValueMatchConfig::Prefix(v) => ValueMatch::Prefix(v),
            ValueMatchConfig::Present(b) => ValueMatch::Present(b),
            ValueMatchConfig::Regex(re) => ValueMatch::Regex(
                Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| rule_err(rule, field, e.to_string()))?,
            ),
        })
    }
}

fn compile_rule(r: RuleConfig) -> Result<Rule, PolicyError> {
    let id = r.id;
    let m = r.matcher;
    let target = match m.channel {
        Some(ch) => {
            if !m.methods.is_empty()
                || !m.hosts.is_empty()
                || m.path.is_some()
                || !m.headers.is_empty()
                || !m.query.is_empty()
            {
                return Err(rule_err(
                    &id,
                    "match",
                    "a channel rule cannot also match methods, hosts, paths, headers or query",
                ));
            }
            let template =
                ChannelTemplate::parse(&ch).map_err(|e| rule_err(&id, "match.channel", e))?;
            let actions = if m.actions.is_empty() {
                vec![ChannelAction::Subscribe]
            } else {
                m.actions
            };
            Target::Channel { template, actions }
        }
        None => {
            if !m.actions.is_empty() {
                return Err(rule_err(
                    &id,
                    "match.actions",
                    "only channel rules have actions",
                ));
            }
            for (i, meth) in m.methods.iter().enumerate() {
                if meth.is_empty() || !meth.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(rule_err(
                        &id,
                        &format!("match.methods[{i}]"),
                        format!("{meth:?} is not an upper-case method"),
                    ));
                }
            }
            let path = match m.path {
                None => None,
                Some(PathMatchConfig::Exact(p)) => Some(PathMatch::Exact(p)),
                Some(PathMatchConfig::Prefix(p)) => Some(PathMatch::Prefix(p)),
                Some(PathMatchConfig::Template(t)) => Some(PathMatch::Template(
                    PathTemplate::parse(&t).map_err(|e| rule_err(&id, "match.path.template", e))?,
                )),
                Some(PathMatchConfig::Regex(re)) => Some(PathMatch::Regex(
                    Regex::new(&format!("^(?:{re})$"))
                        .map_err(|e| rule_err(&id, "match.path.regex", e.to_string()))?,
                    regex_literal_prefix(&re),
                )),
            };
            let hosts = m.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            let mut headers = Vec::with_capacity(m.headers.len());
            for (name, vm) in m.headers {
                let field = format!("match.headers.{name}");
                if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(rule_err(
                        &id,
                        &field,
                        "header names are non-empty and lower case",
                    ));
                }
                headers.push((name, ValueMatch::compile(vm, &id, &field)?));
            }
            let mut query = Vec::with_capacity(m.query.len());
            for (name, vm) in m.query {
                let field = format!("match.query.{name}");
                query.push((name, ValueMatch::compile(vm, &id, &field)?));
            }
            Target::Http {
                methods: m.methods,
                hosts,
                path,
                headers,
                query,
            }
        }
    };
    let mut when = Vec::with_capacity(r.when.len());
    for (i, c) in r.when.into_iter().enumerate() {
        when.push(compile_condition(&id, i, c, &target)?);
    }
    Ok(Rule {
        id,
        effect: r.effect,
        shadow: r.shadow,
        target,
        when,
    })
}

fn compile_condition(
    id: &str,
    i: usize,
    c: ConditionConfig,
    target: &Target,
) -> Result<Condition, PolicyError> {
    let field = |f: &str| format!("when[{i}].{f}");
    let (attr, op) = match (c.grant, c.attr, c.op) {
        (Some(g), None, None) if c.value.is_none() && c.values.is_none() && c.capture.is_none() => {
            return compile_grant(id, &field("grant"), g, target).map(Condition::Grant)
        }
        (Some(_), _, _) => {
            return Err(rule_err(
                id,
                &field("grant"),
                "a grant condition stands alone (no attr, op, value(s) or capture)",
            ))
        }
        (None, Some(a), Some(op)) => (a, op),
        (None, None, _) => return Err(rule_err(id, &field("attr"), "required (or grant)")),
        (None, Some(_), None) => return Err(rule_err(id, &field("op"), "required")),
    };
    let attr = match attr.as_str() {
        "subject" => Attr::Subject,
        "issuer" => Attr::Issuer,
        "tenant" => Attr::Tenant,
        "roles" => Attr::Roles,
        a => match a.strip_prefix("claims.") {
            Some(p) => {
                Attr::Claim(ClaimPath::parse(p).map_err(|e| rule_err(id, &field("attr"), e))?)
            }
            None => {
                return Err(rule_err(
                    id,
                    &field("attr"),
                    format!("{a:?}: expected subject, issuer, tenant, roles or claims.<path>"),
                ))
            }
        },
    };
    let operand = match (&c.capture, op) {
        (Some(cap), Op::Eq | Op::Ne | Op::In | Op::Contains) => {
            if c.value.is_some() || c.values.is_some() {
                return Err(rule_err(
                    id,
                    &field("capture"),
                    "compare with a capture or with value(s), not both",
                ));
            }
            if !known_capture(target, cap) {
                return Err(rule_err(
                    id,
                    &field("capture"),
                    format!("no {{{cap}}} in the rule's template"),
                ));
            }
            Operand::Capture(cap.clone())
        }
        (Some(_), op) => {
            return Err(rule_err(
                id,
                &field("op"),
                format!("{op:?} cannot compare a capture"),
            ))
        }
        (None, Op::Exists) => Operand::None,
        (None, Op::In | Op::ContainsAny) => match c.values {
            Some(v) if !v.is_empty() => Operand::Values(v),
            _ => return Err(rule_err(id, &field("values"), "required, non-empty")),
        },
        (None, Op::Regex) => match c.value {
            Some(re) => Operand::Regex(
                Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| rule_err(id, &field("value"), e.to_string()))?,
            ),
            None => return Err(rule_err(id, &field("value"), "required")),
        },
        (None, _) => match c.value {
            Some(v) => Operand::Value(v),
            None => return Err(rule_err(id, &field("value"), "required")),
        },
    };
    Ok(Condition::Attr(AttrCondition { attr, op, operand }))
}

/// Whether the rule's template captures `name`.
fn known_capture(target: &Target, name: &str) -> bool {
    match target {
        Target::Http {
            path: Some(PathMatch::Template(t)),
            ..
        } => t.capture_names().any(|n| n == name),
        Target::Channel { template, .. } => template.capture_names().any(|n| n == name),
        _ => false,
    }
}

/// `curves:{market}` into text and captures (each one the rule's); the
/// action a word ([`crate::grants::check_action`], not `*`).
fn compile_grant(
    id: &str,
    field: &str,
    g: GrantConditionConfig,
    target: &Target,
) -> Result<GrantCondition, PolicyError> {
    let rfield = format!("{field}.resource");
    let mut parts = Vec::new();
    let mut rest = g.resource.as_str();
    while let Some(open) = rest.find('{') {
        let (text, after) = rest.split_at(open);
        let Some(close) = after.find('}') else {
            return Err(rule_err(id, &rfield, "`{` without `}`"));
        };
        let name = after.get(1..close).unwrap_or("");
        if !known_capture(target, name) {
            return Err(rule_err(
                id,
                &rfield,
                format!("no {{{name}}} in the rule's template"),
            ));
        }
        if !text.is_empty() {
            parts.push(Part::Text(text.to_string()));
        }
        parts.push(Part::Capture(name.to_string()));
        rest = after.get(close + 1..).unwrap_or("");
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    let literal: String = parts
        .iter()
        .map(|p| match p {
            Part::Text(t) => t.as_str(),
            Part::Capture(_) => "x",
        })
        .collect();
    if literal.contains(['}', '*']) || crate::grants::check_resource(&literal).is_err() {
        return Err(rule_err(
            id,
            &rfield,
            format!(
                "{:?}: a resource without spaces, `*` or stray braces",
                g.resource
            ),
        ));
    }
    if g.action == "*" || crate::grants::check_action(&g.action).is_err() {
        return Err(rule_err(
            id,
            &format!("{field}.action"),
            format!("{:?} is not a lower-case word", g.action),
        ));
    }
    Ok(GrantCondition {
        resource: parts,
        action: g.action,
    })
}

fn rule_err(rule: &str, field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        rule: rule.to_string(),
        field: field.to_string(),
        reason: reason.into(),
    }
}
