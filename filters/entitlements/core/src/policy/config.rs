//! The policy document as parsed from JSON (serde, unknown fields
//! refused), and the configuration errors.

use serde::Deserialize;

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
/// match captured (`capture`); or, alone, `grant`: the caller's tenant or
/// the caller holds a grant ([`crate::grants`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub attr: Option<String>,
    pub op: Option<Op>,
    pub grant: Option<GrantConditionConfig>,
    pub value: Option<String>,
    pub values: Option<Vec<String>>,
    /// Compare this capture with the attribute instead of `value`(s).
    pub capture: Option<String>,
}

/// `{"grant": {"resource": "curves:{market}", "action": "read"}}`: the
/// resource with the rule's captures filled in (`{name}`), asked literally.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConditionConfig {
    pub resource: String,
    pub action: String,
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
