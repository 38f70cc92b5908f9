//! Policies: rules parsed from JSON (unknown fields refused), compiled once
//! (templates, regexes, claim paths; errors name the rule and the field),
//! then evaluated per HTTP request or channel subscription.
//!
//! A matching enforced deny wins over any allow; otherwise a matching allow
//! allows; otherwise the default (deny unless configured). Shadow rules, and
//! every rule in a shadow policy, are evaluated and reported but never
//! enforced.

use crate::channel::Pattern;
use crate::identity::{ClaimPath, Identity};
use crate::index::{ones, prefix_segments, regex_literal_prefix, PathIndex};
use crate::template::{Captures, ChannelTemplate, PathTemplate};
use regex_lite::Regex;
use serde::Deserialize;
use std::collections::HashSet;

/// Rule ids the engine and its users report themselves: `default` when no
/// rule matched, `invalid_identity` when the identity could not be read.
pub const RESERVED_IDS: &[&str] = &["default", "invalid_identity"];

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

/// The policy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Effect when no rule matches. Default `deny`.
    #[serde(default = "deny")]
    pub default: Effect,
    /// Evaluate and report, never enforce (everything is allowed).
    #[serde(default)]
    pub shadow: bool,
    pub rules: Vec<RuleConfig>,
}

fn deny() -> Effect {
    Effect::Deny
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique id: reported in the 403 body, logs and metrics.
    pub id: String,
    pub effect: Effect,
    /// Evaluate and report this rule, do not enforce it.
    #[serde(default)]
    pub shadow: bool,
    /// What requests or subscriptions the rule is about.
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// Conditions on the identity, all of which must hold.
    #[serde(default)]
    pub when: Vec<ConditionConfig>,
}

/// Request matching; every field given must match. A rule with `channel`
/// applies to channels only; without, to HTTP requests only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// HTTP methods (upper case), any of.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Hosts, any of: exact, or `*.example.com` for subdomains. Port ignored.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub path: Option<PathMatchConfig>,
    /// Request headers (lower-case names), all of which must match.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, ValueMatchConfig>,
    /// Query parameters (decoded), all of which must match.
    #[serde(default)]
    pub query: std::collections::BTreeMap<String, ValueMatchConfig>,
    /// Channel template, e.g. `pricing.curves.{market}.>`.
    pub channel: Option<String>,
    /// For channel rules: `subscribe` and/or `publish`. Default `subscribe`.
    #[serde(default)]
    pub actions: Vec<ChannelAction>,
}

/// How a path matches (exactly one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathMatchConfig {
    Exact(String),
    Prefix(String),
    Template(String),
    Regex(String),
}

/// How a header or query value matches (exactly one). `present: false`
/// matches when the header or parameter is absent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ValueMatchConfig {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present(bool),
}

/// What a client does with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelAction {
    Subscribe,
    Publish,
}

/// A condition: `attr` (`subject`, `issuer`, `tenant`, `roles` or
/// `claims.<path>`) compared with `value`/`values`, or with a value the
/// match captured (`capture`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub attr: String,
    pub op: Op,
    pub value: Option<String>,
    pub values: Option<Vec<String>>,
    /// Compare this capture with the attribute instead of `value`(s).
    pub capture: Option<String>,
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The attribute has exactly one value, equal to `value` (or the capture).
    Eq,
    /// Not `eq`.
    Ne,
    /// The attribute has exactly one value, one of `values`; with `capture`:
    /// the captured value is one of the attribute's values.
    In,
    /// One of the attribute's values equals `value` (or the capture).
    Contains,
    /// One of the attribute's values is one of `values`.
    ContainsAny,
    /// One of the attribute's values starts with `value`.
    Prefix,
    /// One of the attribute's values ends with `value`.
    Suffix,
    /// One of the attribute's values matches the regex `value` (whole value).
    Regex,
    /// The attribute has a value.
    Exists,
}

/// A configuration error, naming the rule and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not valid JSON, a wrong type, or an unknown field.
    #[error("policy: {0}")]
    Parse(String),
    /// A rule's field is invalid.
    #[error("rule {rule:?}: {field}: {reason}")]
    Rule {
        rule: String,
        field: String,
        reason: String,
    },
}

enum PathMatch {
    Exact(String),
    Prefix(String),
    Template(PathTemplate),
    /// The regex, and the literal text every match starts with.
    Regex(Regex, String),
}

enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
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

    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (ValueMatch::Exact(e), Some(v)) => v == e,
            (ValueMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
        }
    }
}

enum Attr {
    Subject,
    Issuer,
    Tenant,
    Roles,
    Claim(ClaimPath),
}

enum Operand {
    Value(String),
    Values(Vec<String>),
    Regex(Regex),
    Capture(String),
    None,
}

struct Condition {
    attr: Attr,
    op: Op,
    operand: Operand,
}

enum Target {
    Http {
        methods: Vec<String>,
        hosts: Vec<String>,
        path: Option<PathMatch>,
        headers: Vec<(String, ValueMatch)>,
        query: Vec<(String, ValueMatch)>,
    },
    Channel {
        template: ChannelTemplate,
        actions: Vec<ChannelAction>,
    },
}

struct Rule {
    id: String,
    effect: Effect,
    shadow: bool,
    target: Target,
    when: Vec<Condition>,
}

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
    /// Top-level claims some condition reads (sorted).
    claim_roots: Vec<String>,
    /// HTTP rules by the path segments they need.
    index: PathIndex,
    /// Channel rules, in order.
    channel_rules: Vec<usize>,
}

/// An HTTP request as the engine sees it (path already normalised).
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The raw query (without `?`), if any.
    pub query: Option<&'a str>,
    /// Request headers, names lower-case; the first value of a name counts.
    pub headers: &'a [(String, String)],
}

impl<'a> HttpRequest<'a> {
    /// A request with no query and no headers.
    pub fn new(method: &'a str, host: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest {
            method,
            host,
            path,
            query: None,
            headers: &[],
        }
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The first value of a query parameter, percent- and `+`-decoded; `None`
/// if absent or not decodable to UTF-8.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    filter_common::form::query_value(query, name)
}

/// What is being decided.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Http(HttpRequest<'a>),
    Channel {
        pattern: &'a Pattern,
        action: ChannelAction,
    },
}

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

/// The identity as it arrived (raw header values), for cache keys: a
/// cache hit needs neither the roles split nor the claims decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityKey<'a> {
    pub subject: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub roles: Option<&'a str>,
    /// The encoded payload, as received.
    pub claims: Option<&'a str>,
}

fn key_field(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
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

fn rule_err(rule: &str, field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        rule: rule.to_string(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

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
        let mut claim_roots = std::collections::BTreeSet::new();
        for r in &rules {
            for c in &r.when {
                if let Attr::Claim(p) = &c.attr {
                    claim_roots.insert(p.root().to_string());
                }
            }
            if let Target::Http { headers, query, .. } = &r.target {
                key_headers.extend(headers.iter().map(|(n, _)| n.clone()));
                key_query.extend(query.iter().map(|(n, _)| n.clone()));
            }
            uses_claims |= r.when.iter().any(|c| matches!(c.attr, Attr::Claim(_)));
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
            claim_roots: claim_roots.into_iter().collect(),
        })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides a request for an identity.
    pub fn evaluate(&self, identity: &Identity, request: &Request<'_>) -> Decision<'_> {
        self.explain(self.decide(identity, request))
    }

    /// Decides a request for an identity, naming rules by position (what
    /// the decision cache stores; [`Policy::explain`] gives the ids).
    pub fn decide(&self, identity: &Identity, request: &Request<'_>) -> Verdict {
        self.decide_with(identity, request, true)
    }

    /// [`Policy::decide`] without the path index: every rule is looked at.
    /// The reference the index is tested against, and a benchmark baseline.
    pub fn decide_scan(&self, identity: &Identity, request: &Request<'_>) -> Verdict {
        self.decide_with(identity, request, false)
    }

    fn decide_with(&self, identity: &Identity, request: &Request<'_>, indexed: bool) -> Verdict {
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
            if !rule.applies(identity, request, &mut caps) {
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

    /// Writes the decision cache key of an HTTP request into `out`
    /// (cleared first): every input the policy's decision depends on,
    /// each length-prefixed so that no two different inputs share a key.
    pub fn http_key(&self, out: &mut Vec<u8>, id: &IdentityKey<'_>, r: &HttpRequest<'_>) {
        self.http_request_key(out, r);
        self.identity_key(out, id);
    }

    /// Writes the request half of [`Policy::http_key`] into `out` (cleared
    /// first): for callers that key identities separately (the filter
    /// appends the id of the decoded identity).
    pub fn http_request_key(&self, out: &mut Vec<u8>, r: &HttpRequest<'_>) {
        out.clear();
        out.push(b'H');
        key_field(out, Some(r.method));
        key_field(out, Some(r.host));
        key_field(out, Some(r.path));
        for h in &self.key_headers {
            key_field(out, r.header(h));
        }
        for q in &self.key_query {
            match r.query.map(|query| query_param(query, q)) {
                Some(Some(v)) => key_field(out, Some(&v)),
                _ => key_field(out, None),
            }
        }
    }

    /// Writes the decision cache key of a channel request into `out`.
    pub fn channel_key(
        &self,
        out: &mut Vec<u8>,
        id: &IdentityKey<'_>,
        pattern: &str,
        action: ChannelAction,
    ) {
        out.clear();
        out.push(match action {
            ChannelAction::Subscribe => b'S',
            ChannelAction::Publish => b'P',
        });
        key_field(out, Some(pattern));
        self.identity_key(out, id);
    }

    /// Appends the identity half of a cache key to `out`: the identity
    /// headers, and the claims if a condition reads them.
    pub fn identity_key(&self, out: &mut Vec<u8>, id: &IdentityKey<'_>) {
        key_field(out, id.subject);
        key_field(out, id.issuer);
        key_field(out, id.tenant);
        key_field(out, id.roles);
        if self.uses_claims {
            key_field(out, id.claims);
        }
    }

    /// The ids of the rules, in order (for per-rule metrics).
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
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
    let attr = match c.attr.as_str() {
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
    let operand = match (&c.capture, c.op) {
        (Some(cap), Op::Eq | Op::Ne | Op::In | Op::Contains) => {
            if c.value.is_some() || c.values.is_some() {
                return Err(rule_err(
                    id,
                    &field("capture"),
                    "compare with a capture or with value(s), not both",
                ));
            }
            let known = match target {
                Target::Http {
                    path: Some(PathMatch::Template(t)),
                    ..
                } => t.capture_names().any(|n| n == cap),
                Target::Channel { template, .. } => template.capture_names().any(|n| n == cap),
                _ => false,
            };
            if !known {
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
    Ok(Condition {
        attr,
        op: c.op,
        operand,
    })
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes().get(host.len() - suffix.len() - 1) == Some(&b'.')
        }
        None => pattern == host,
    }
}

impl Rule {
    fn applies(&self, identity: &Identity, request: &Request<'_>, caps: &mut Captures) -> bool {
        let target = match (&self.target, request) {
            (
                Target::Http {
                    methods,
                    hosts,
                    path,
                    headers,
                    query,
                },
                Request::Http(r),
            ) => {
                (methods.is_empty() || methods.iter().any(|m| m == r.method))
                    && (hosts.is_empty() || hosts.iter().any(|h| host_matches(h, r.host)))
                    && match path {
                        None => true,
                        Some(PathMatch::Exact(p)) => r.path == p,
                        Some(PathMatch::Prefix(p)) => r.path.starts_with(p.as_str()),
                        Some(PathMatch::Template(t)) => t.matches(r.path, caps),
                        Some(PathMatch::Regex(re, prefix)) => {
                            r.path.starts_with(prefix.as_str()) && re.is_match(r.path)
                        }
                    }
                    && headers.iter().all(|(n, m)| m.matches(r.header(n)))
                    && query
                        .iter()
                        .all(|(n, m)| m.matches(r.query.and_then(|q| query_param(q, n)).as_deref()))
            }
            (Target::Channel { template, actions }, Request::Channel { pattern, action }) => {
                actions.contains(action) && template.covers(pattern, caps)
            }
            _ => false,
        };
        target && self.when.iter().all(|c| c.holds(identity, caps))
    }
}

impl Condition {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn policy(v: serde_json::Value) -> Policy {
        Policy::from_json(v.to_string().as_bytes()).unwrap()
    }

    fn err(v: serde_json::Value) -> String {
        match Policy::from_json(v.to_string().as_bytes()) {
            Ok(_) => panic!("accepted: {v}"),
            Err(e) => e.to_string(),
        }
    }

    fn who(tenant: &str, roles: &[&str], claims: serde_json::Value) -> Identity {
        Identity {
            subject: Some("alice".into()),
            issuer: Some("https://idp.254carbon.test/realms/carbon".into()),
            tenant: Some(tenant.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            claims,
        }
    }

    fn ch(pattern: &Pattern, action: ChannelAction) -> Request<'_> {
        Request::Channel { pattern, action }
    }

    fn get<'a>(path: &'a str) -> Request<'a> {
        Request::Http(HttpRequest::new("GET", "api.254carbon.test", path))
    }

    fn carbon() -> Policy {
        policy(json!({
            "rules": [
                {"id": "curves-read", "effect": "allow",
                 "match": {"methods": ["GET", "HEAD"], "path": {"template": "/api/v1/curves/{market}/**"}},
                 "when": [{"attr": "claims.markets", "op": "in", "capture": "market"}]},
                {"id": "curves-publish", "effect": "allow",
                 "match": {"channel": "pricing.curves.{market}.>", "actions": ["publish"]},
                 "when": [{"attr": "roles", "op": "contains", "value": "trader"}, {"attr": "claims.markets", "op": "in", "capture": "market"}]},
                {"id": "curves-subscribe", "effect": "allow",
                 "match": {"channel": "pricing.curves.{market}.>"},
                 "when": [{"attr": "claims.markets", "op": "contains", "capture": "market"}]},
                {"id": "admin", "effect": "allow",
                 "match": {"path": {"prefix": "/admin/"}},
                 "when": [{"attr": "roles", "op": "contains", "value": "admin"}]},
                {"id": "suspended", "effect": "deny",
                 "when": [{"attr": "claims.status", "op": "eq", "value": "suspended"}]}
            ]
        }))
    }

    #[test]
    fn captured_market_must_be_in_the_markets_claim() {
        let p = carbon();
        let alice = who(
            "acme",
            &["viewer"],
            json!({"markets": ["EU-ETS", "UK-ETS"]}),
        );
        let d = p.evaluate(&alice, &get("/api/v1/curves/EU-ETS/DEC26"));
        assert_eq!((d.allowed, d.rule), (true, "curves-read"));
        let d = p.evaluate(&alice, &get("/api/v1/curves/CAISO/DEC26"));
        assert_eq!((d.allowed, d.rule), (false, "default"));
        let d = p.evaluate(&alice, &get("/admin/users"));
        assert_eq!((d.allowed, d.rule), (false, "default"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = carbon();
        let bob = who(
            "acme",
            &["admin"],
            json!({"markets": ["EU-ETS"], "status": "suspended"}),
        );
        let d = p.evaluate(&bob, &get("/api/v1/curves/EU-ETS/DEC26"));
        assert_eq!((d.allowed, d.rule), (false, "suspended"));
        let d = p.evaluate(&bob, &get("/admin/users"));
        assert_eq!((d.allowed, d.rule), (false, "suspended"));
    }

    #[test]
    fn channels_subscribe_and_publish() {
        let p = carbon();
        let trader = who("acme", &["trader"], json!({"markets": ["EU-ETS"]}));
        let viewer = who("acme", &["viewer"], json!({"markets": ["EU-ETS"]}));
        let sub = |pat: &str| Pattern::parse(pat).unwrap();
        let eu = sub("pricing.curves.EU-ETS.DEC26");
        let eu_all = sub("pricing.curves.EU-ETS.>");
        let any_market = sub("pricing.curves.*.DEC26");
        let ca = sub("pricing.curves.CAISO.>");
        assert!(
            p.evaluate(&viewer, &ch(&eu, ChannelAction::Subscribe))
                .allowed
        );
        assert_eq!(
            p.evaluate(&viewer, &ch(&eu_all, ChannelAction::Subscribe))
                .rule,
            "curves-subscribe"
        );
        assert!(
            !p.evaluate(&viewer, &ch(&any_market, ChannelAction::Subscribe))
                .allowed,
            "* spans markets not granted"
        );
        assert!(
            !p.evaluate(&viewer, &ch(&ca, ChannelAction::Subscribe))
                .allowed
        );
        assert!(
            !p.evaluate(&viewer, &ch(&eu, ChannelAction::Publish))
                .allowed,
            "viewers do not publish"
        );
        let d = p.evaluate(&trader, &ch(&eu, ChannelAction::Publish));
        assert_eq!((d.allowed, d.rule), (true, "curves-publish"));
        // A channel request never matches an HTTP rule and vice versa.
        assert!(!p.evaluate(&viewer, &get("/pricing/curves/EU-ETS")).allowed);
    }

    #[test]
    fn operators() {
        let id = who(
            "acme",
            &["trader", "risk"],
            json!({"plan": "pro-2026", "markets": ["EU-ETS", "CAISO"], "seats": 3}),
        );
        let one = |cond: serde_json::Value| {
            policy(json!({"rules": [{"id": "r", "effect": "allow", "when": [cond]}]}))
                .evaluate(&id, &get("/x"))
                .allowed
        };
        assert!(one(json!({"attr": "tenant", "op": "eq", "value": "acme"})));
        assert!(!one(
            json!({"attr": "tenant", "op": "eq", "value": "globex"})
        ));
        assert!(one(
            json!({"attr": "tenant", "op": "ne", "value": "globex"})
        ));
        assert!(one(
            json!({"attr": "subject", "op": "in", "values": ["bob", "alice"]})
        ));
        assert!(
            !one(json!({"attr": "roles", "op": "eq", "value": "trader"})),
            "eq needs exactly one value"
        );
        assert!(one(
            json!({"attr": "roles", "op": "contains", "value": "risk"})
        ));
        assert!(one(
            json!({"attr": "roles", "op": "contains_any", "values": ["admin", "risk"]})
        ));
        assert!(!one(
            json!({"attr": "roles", "op": "contains_any", "values": ["admin"]})
        ));
        assert!(one(
            json!({"attr": "claims.plan", "op": "prefix", "value": "pro-"})
        ));
        assert!(one(
            json!({"attr": "claims.plan", "op": "suffix", "value": "2026"})
        ));
        assert!(one(
            json!({"attr": "claims.plan", "op": "regex", "value": "pro-[0-9]{4}"})
        ));
        assert!(
            !one(json!({"attr": "claims.plan", "op": "regex", "value": "pro"})),
            "regex matches the whole value"
        );
        assert!(one(
            json!({"attr": "claims.seats", "op": "eq", "value": "3"})
        ));
        assert!(one(json!({"attr": "claims.markets", "op": "exists"})));
        assert!(!one(json!({"attr": "claims.missing", "op": "exists"})));
        assert!(one(
            json!({"attr": "issuer", "op": "prefix", "value": "https://idp.254carbon.test/"})
        ));
    }

    #[test]
    fn http_matching() {
        let p = policy(json!({"rules": [
            {"id": "exact", "effect": "allow", "match": {"path": {"exact": "/health"}}},
            {"id": "host", "effect": "allow", "match": {"hosts": ["*.254carbon.test"], "methods": ["POST"]}},
            {"id": "re", "effect": "allow", "match": {"path": {"regex": "/api/v[0-9]+/instruments"}}}
        ]}));
        let id = Identity::default();
        let req = |method, host, path| Request::Http(HttpRequest::new(method, host, path));
        assert_eq!(p.evaluate(&id, &req("GET", "x", "/health")).rule, "exact");
        assert!(!p.evaluate(&id, &req("GET", "x", "/health/")).allowed);
        assert_eq!(
            p.evaluate(&id, &req("POST", "api.254carbon.test:8443", "/q"))
                .rule,
            "host"
        );
        assert!(
            !p.evaluate(&id, &req("POST", "254carbon.test", "/q"))
                .allowed,
            "*. needs a subdomain"
        );
        assert!(
            !p.evaluate(&id, &req("POST", "evil254carbon.test", "/q"))
                .allowed
        );
        assert!(
            !p.evaluate(&id, &req("GET", "api.254carbon.test", "/q"))
                .allowed
        );
        assert_eq!(
            p.evaluate(&id, &req("GET", "x", "/api/v2/instruments"))
                .rule,
            "re"
        );
        assert!(
            !p.evaluate(&id, &req("GET", "x", "/api/v2/instruments/1"))
                .allowed,
            "regex is anchored"
        );
    }

    #[test]
    fn header_and_query_matching() {
        let p = policy(json!({"rules": [
            {"id": "api-key", "effect": "allow", "match": {"headers": {"x-api-key": {"prefix": "k_"}, "x-debug": {"present": false}}}},
            {"id": "export", "effect": "allow", "match": {"query": {"format": {"regex": "csv|parquet"}, "as of": {"exact": "2026-11-26 00:00"}}}}
        ]}));
        let id = Identity::default();
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let with = |headers: &[(String, String)], query: Option<&str>| {
            let r = HttpRequest {
                query,
                headers,
                ..HttpRequest::new("GET", "h", "/x")
            };
            p.evaluate(&id, &Request::Http(r)).rule.to_string()
        };
        assert_eq!(with(&h(&[("x-api-key", "k_123")]), None), "api-key");
        assert_eq!(
            with(&h(&[("x-api-key", "k_123"), ("x-debug", "1")]), None),
            "default"
        );
        assert_eq!(with(&h(&[("x-api-key", "nope")]), None), "default");
        assert_eq!(
            with(&[], Some("format=csv&as+of=2026-11-26%2000%3A00")),
            "export"
        );
        assert_eq!(
            with(&[], Some("format=xlsx&as+of=2026-11-26%2000%3A00")),
            "default"
        );
        assert_eq!(with(&[], Some("format=csv")), "default");
        assert_eq!(query_param("a=1&b=%zz&c", "b").as_deref(), Some("%zz"));
        assert_eq!(query_param("a=1&c", "c").as_deref(), Some(""));
        assert_eq!(query_param("a=%ff", "a"), None, "not UTF-8");
        // No sign in an escape (u8::from_str_radix would read "+4" as 4).
        assert_eq!(query_param("a=%+4", "a").as_deref(), Some("% 4"));
        assert_eq!(query_param("a=%ff&a=ok", "a"), None, "the first decides");
        assert!(err(json!({"rules": [{"id": "u", "effect": "allow", "match": {"headers": {"X-Key": {"present": true}}}}]}))
            .starts_with("rule \"u\": match.headers.X-Key:"));
        assert!(err(json!({"rules": [{"id": "r", "effect": "allow", "match": {"query": {"f": {"regex": "("}}}}]}))
            .starts_with("rule \"r\": match.query.f:"));
    }

    #[test]
    fn shadow_rules_and_shadow_policy() {
        let rules = json!([
            {"id": "allow-all", "effect": "allow"},
            {"id": "block-caiso", "effect": "deny", "shadow": true, "match": {"path": {"prefix": "/api/v1/curves/CAISO"}}}
        ]);
        let p = policy(json!({"rules": rules}));
        let id = Identity::default();
        let d = p.evaluate(&id, &get("/api/v1/curves/CAISO/x"));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                rule: "allow-all",
                shadow_denied: Some("block-caiso")
            }
        );
        let d = p.evaluate(&id, &get("/api/v1/curves/EU-ETS/x"));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                rule: "allow-all",
                shadow_denied: None
            }
        );
        let p = policy(
            json!({"shadow": true, "rules": [{"id": "only-admin", "effect": "allow", "when": [{"attr": "roles", "op": "contains", "value": "admin"}]}]}),
        );
        let d = p.evaluate(&id, &get("/x"));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                rule: "default",
                shadow_denied: Some("default")
            }
        );
        let p = policy(json!({"default": "allow", "rules": []}));
        assert!(p.evaluate(&id, &get("/x")).allowed);
    }

    #[test]
    fn configuration_errors_name_the_rule_and_field() {
        let r = |rule: serde_json::Value| err(json!({"rules": [rule]}));
        assert!(err(json!({"rules": [], "extra": 1})).contains("unknown field `extra`"));
        assert!(
            r(json!({"id": "a", "effect": "allow", "mtach": {}})).contains("unknown field `mtach`")
        );
        assert!(r(json!({"id": "a", "effect": "maybe"})).contains("unknown variant `maybe`"));
        assert_eq!(
            err(json!({"rules": [{"id": "a", "effect": "allow"}, {"id": "a", "effect": "deny"}]})),
            "rule \"a\": id: duplicate rule id"
        );
        assert_eq!(
            r(json!({"id": "", "effect": "allow"})),
            "rule \"#0\": id: must not be empty"
        );
        assert!(
            r(json!({"id": "t", "effect": "allow", "match": {"path": {"template": "/a/{m"}}}))
                .starts_with("rule \"t\": match.path.template:")
        );
        assert!(
            r(json!({"id": "x", "effect": "allow", "match": {"path": {"regex": "(["}}}))
                .starts_with("rule \"x\": match.path.regex:")
        );
        assert!(
            r(json!({"id": "c", "effect": "allow", "match": {"channel": "a..b"}}))
                .starts_with("rule \"c\": match.channel:")
        );
        assert!(
            r(json!({"id": "m", "effect": "allow", "match": {"methods": ["get"]}}))
                .starts_with("rule \"m\": match.methods[0]:")
        );
        assert!(r(
            json!({"id": "k", "effect": "allow", "when": [{"attr": "email", "op": "exists"}]})
        )
        .starts_with("rule \"k\": when[0].attr:"));
        assert!(
            r(json!({"id": "v", "effect": "allow", "when": [{"attr": "tenant", "op": "eq"}]}))
                .starts_with("rule \"v\": when[0].value: required")
        );
        assert!(r(json!({"id": "w", "effect": "allow", "when": [{"attr": "tenant", "op": "in", "values": []}]})).starts_with("rule \"w\": when[0].values:"));
        assert!(r(json!({"id": "g", "effect": "allow", "when": [{"attr": "claims.m", "op": "in", "capture": "market"}]}))
            .contains("when[0].capture: no {market} in the rule's template"));
        assert!(r(json!({"id": "h", "effect": "allow", "match": {"channel": "a.{m}"}, "when": [{"attr": "claims.m", "op": "prefix", "capture": "m"}]}))
            .contains("when[0].op: Prefix cannot compare a capture"));
        assert!(r(
            json!({"id": "j", "effect": "allow", "match": {"channel": "a.>", "methods": ["GET"]}})
        )
        .starts_with("rule \"j\": match:"));
        assert!(r(json!({"id": "default", "effect": "allow"})).contains("reserved"));
        assert!(
            r(json!({"id": "q", "effect": "allow", "match": {"actions": ["publish"]}}))
                .starts_with("rule \"q\": match.actions:")
        );
    }

    #[test]
    fn cache_keys_hold_exactly_what_the_decision_depends_on() {
        let with_header = policy(json!({"rules": [
            {"id": "h", "effect": "allow", "match": {"headers": {"x-desk": {"exact": "power"}}, "query": {"fmt": {"exact": "csv"}}},
             "when": [{"attr": "roles", "op": "contains", "value": "trader"}]}
        ]}));
        let key =
            |p: &Policy, headers: &[(String, String)], query: Option<&str>, id: IdentityKey<'_>| {
                let mut r = HttpRequest::new("GET", "api", "/x");
                r.headers = headers;
                r.query = query;
                let mut out = Vec::new();
                p.http_key(&mut out, &id, &r);
                out
            };
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let alice = IdentityKey {
            subject: Some("alice"),
            roles: Some("trader"),
            claims: Some("e30"),
            ..IdentityKey::default()
        };
        let base = key(
            &with_header,
            &h(&[("x-desk", "power")]),
            Some("fmt=csv"),
            alice,
        );
        // A header or parameter no rule reads does not split the cache...
        assert_eq!(
            base,
            key(
                &with_header,
                &h(&[("x-desk", "power"), ("x-other", "1")]),
                Some("fmt=csv&t=123"),
                alice
            )
        );
        // ...nor do claims when no condition reads them.
        assert_eq!(
            base,
            key(
                &with_header,
                &h(&[("x-desk", "power")]),
                Some("fmt=csv"),
                IdentityKey {
                    claims: Some("other"),
                    ..alice
                }
            )
        );
        // Everything read does.
        assert_ne!(
            base,
            key(
                &with_header,
                &h(&[("x-desk", "gas")]),
                Some("fmt=csv"),
                alice
            )
        );
        assert_ne!(base, key(&with_header, &h(&[]), Some("fmt=csv"), alice));
        assert_ne!(
            base,
            key(
                &with_header,
                &h(&[("x-desk", "power")]),
                Some("fmt=json"),
                alice
            )
        );
        assert_ne!(
            base,
            key(
                &with_header,
                &h(&[("x-desk", "power")]),
                Some("fmt=csv"),
                IdentityKey {
                    roles: Some("viewer"),
                    ..alice
                }
            )
        );
        // Field boundaries are unambiguous: ("ab", "c") is not ("a", "bc").
        let a = IdentityKey {
            subject: Some("ab"),
            issuer: Some("c"),
            ..IdentityKey::default()
        };
        let b = IdentityKey {
            subject: Some("a"),
            issuer: Some("bc"),
            ..IdentityKey::default()
        };
        assert_ne!(
            key(&with_header, &[], None, a),
            key(&with_header, &[], None, b)
        );
        let absent = IdentityKey { subject: None, ..a };
        let empty = IdentityKey {
            subject: Some(""),
            ..a
        };
        assert_ne!(
            key(&with_header, &[], None, absent),
            key(&with_header, &[], None, empty)
        );
        // Claims count once a condition reads them.
        let p = carbon();
        assert!(p.uses_claims());
        assert_ne!(
            key(&p, &[], None, alice),
            key(
                &p,
                &[],
                None,
                IdentityKey {
                    claims: Some("other"),
                    ..alice
                }
            )
        );
    }

    #[test]
    fn verdicts_name_rules_by_position() {
        let p = carbon();
        let alice = who("acme", &["viewer"], json!({"markets": ["EU-ETS"]}));
        let v = p.decide(&alice, &get("/api/v1/curves/EU-ETS/DEC26"));
        assert_eq!(
            v,
            Verdict {
                allowed: true,
                rule: Decider::Rule(0),
                shadow_denied: None
            }
        );
        assert_eq!(p.explain(v).rule, "curves-read");
        assert_eq!(Decider::Rule(0).slot(p.len()), 0);
        assert_eq!(Decider::Default.slot(p.len()), p.len());
        assert_eq!(p.rule_id(Decider::Rule(99)), "default");
    }
}
