//! The ratelimit filter's configuration: policies (what they match, what
//! they count by, at what rate), the slot table, failure handling. Parsed
//! with unknown fields refused, compiled with errors naming the field.

use crate::gcra::Rate;
use entitlements_core::template::PathTemplate;
use filter_common::config::ConfigError;
pub use filter_common::identity::IdentityHeaders;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub table: TableConfig,
    /// When a bucket cannot be updated (contention past the retry bound,
    /// both slots busy with other keys, a key too long): `allow` (default:
    /// rate limiting fails open, and counts it) or `deny`.
    #[serde(default)]
    pub on_error: OnError,
    /// Also send the rate-limit fields on allowed responses. Default false.
    #[serde(default)]
    pub headers_on_allowed: bool,
    /// Identity header names (DESIGN.md's defaults).
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    /// Global mode: ask an Envoy Rate Limit Service instead of counting
    /// in shared data (limits across many Envoys).
    pub global: Option<GlobalConfig>,
}

/// Where the Rate Limit Service is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    /// Envoy cluster (HTTP/2) of the service.
    pub cluster: String,
    /// The `domain` of every request. Default `254carbon`.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// How long a request waits for the answer, ms. Default 100; then
    /// `on_error` decides.
    #[serde(default = "default_rls_timeout")]
    pub timeout_ms: u64,
}

fn default_domain() -> String {
    "254carbon".into()
}
fn default_rls_timeout() -> u64 {
    100
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Slots shared by every key of every policy. Default 65 536.
    pub slots: u32,
    /// CAS attempts per slot before giving up. Default 8.
    pub max_cas_retries: u32,
    /// Seed of the slot hash; default derived from the configuration (the
    /// same on every worker, unknown to clients).
    pub hash_seed: Option<u64>,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            slots: 65_536,
            max_cas_retries: 8,
            hash_seed: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Unique id: in metrics, logs and the `RateLimit` fields.
    pub id: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// What the requests are counted by, combined. Default `["subject"]`.
    #[serde(default = "default_key")]
    pub key: Vec<KeyPart>,
    pub rate: RateConfig,
    /// Requests admitted at once; default `rate.requests`.
    pub burst: Option<u64>,
    /// Count and report, never refuse.
    #[serde(default)]
    pub shadow: bool,
}

fn default_key() -> Vec<KeyPart> {
    vec![KeyPart::Subject]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub methods: Vec<String>,
    pub path: Option<PathConfig>,
    /// `true`: only requests auth verified; `false`: only anonymous ones.
    pub authenticated: Option<bool>,
    /// Only callers with one of these roles.
    #[serde(default)]
    pub roles_any: Vec<String>,
    /// Only these tenants.
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathConfig {
    Prefix(String),
    Template(String),
}

/// One part of a counting key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    Subject,
    Tenant,
    /// The client address (`source.address`, without the port).
    ClientIp,
    /// The policy's route: every request it matches shares the bucket
    /// (a global limit for the route).
    Route,
    /// A request header's value, e.g. an API key.
    Header(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub requests: u64,
    pub per: Per,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    Second,
    Minute,
    Hour,
    Day,
}

impl Per {
    pub fn seconds(self) -> u64 {
        match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3600,
            Per::Day => 86_400,
        }
    }
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub id: String,
    pub methods: Vec<String>,
    pub path: Option<PathMatch>,
    pub authenticated: Option<bool>,
    pub roles_any: Vec<String>,
    pub tenants: Vec<String>,
    pub key: Vec<KeyPart>,
    pub rate: Rate,
    /// The window the `RateLimit-Policy` field advertises, seconds.
    pub window_s: u64,
    pub shadow: bool,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Template(PathTemplate),
}

/// What a request looks like to the policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub subject: Option<&'a str>,
    pub tenant: Option<&'a str>,
    /// The `x-auth-roles` value, comma separated.
    pub roles: Option<&'a str>,
    pub client_ip: Option<&'a str>,
}

/// The compiled configuration.
#[derive(Debug)]
pub struct Settings {
    pub policies: Vec<Policy>,
    pub slots: u32,
    pub max_cas_retries: u32,
    pub hash_seed: Option<u64>,
    pub on_error: OnError,
    pub headers_on_allowed: bool,
    pub identity_headers: IdentityHeaders,
    pub global: Option<GlobalConfig>,
}

impl Settings {
    pub fn from_json(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let cfg: RateLimitConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::json(&e))?;
        Settings::compile(cfg)
    }

    pub fn compile(cfg: RateLimitConfig) -> Result<Settings, ConfigError> {
        let mut ids = std::collections::HashSet::new();
        let mut policies = Vec::with_capacity(cfg.policies.len());
        for (i, p) in cfg.policies.into_iter().enumerate() {
            let f = format!("policies[{i}]");
            if p.id.is_empty() || p.id.contains(['"', '\\', ',', ';']) {
                return Err(ConfigError::new(
                    format!("{f}.id"),
                    format!(
                        "{:?} must be non-empty, without quotes, commas or semicolons",
                        p.id
                    ),
                ));
            }
            if !ids.insert(p.id.clone()) {
                return Err(ConfigError::new(
                    format!("{f}.id"),
                    format!("duplicate policy id {:?}", p.id),
                ));
            }
            for (j, m) in p.matcher.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::new(
                        format!("{f}.match.methods[{j}]"),
                        format!("{m:?} is not an upper-case method"),
                    ));
                }
            }
            let path = match p.matcher.path {
                None => None,
                Some(PathConfig::Prefix(pre)) => Some(PathMatch::Prefix(pre)),
                Some(PathConfig::Template(t)) => Some(PathMatch::Template(
                    PathTemplate::parse(&t)
                        .map_err(|e| ConfigError::new(format!("{f}.match.path.template"), e))?,
                )),
            };
            if p.key.is_empty() {
                return Err(ConfigError::new(
                    format!("{f}.key"),
                    "at least one part is required",
                ));
            }
            for (j, k) in p.key.iter().enumerate() {
                if let KeyPart::Header(h) = k {
                    if h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()) {
                        return Err(ConfigError::new(
                            format!("{f}.key[{j}].header"),
                            format!("{h:?} is not a lower-case header name"),
                        ));
                    }
                }
            }
            if p.rate.requests == 0 {
                return Err(ConfigError::new(
                    format!("{f}.rate.requests"),
                    "must be at least 1",
                ));
            }
            let period_ns = p.rate.per.seconds() * 1_000_000_000;
            if p.rate.requests > period_ns {
                return Err(ConfigError::new(
                    format!("{f}.rate.requests"),
                    "more than one per nanosecond",
                ));
            }
            let burst = p.burst.unwrap_or(p.rate.requests);
            if burst == 0 {
                return Err(ConfigError::new(format!("{f}.burst"), "must be at least 1"));
            }
            policies.push(Policy {
                id: p.id,
                methods: p.matcher.methods,
                path,
                authenticated: p.matcher.authenticated,
                roles_any: p.matcher.roles_any,
                tenants: p.matcher.tenants,
                key: p.key,
                rate: Rate {
                    requests: p.rate.requests,
                    period_ns,
                    burst,
                },
                window_s: p.rate.per.seconds(),
                shadow: p.shadow,
            });
        }
        if let Some(g) = &cfg.global {
            if g.cluster.is_empty() {
                return Err(ConfigError::new("global.cluster", "must not be empty"));
            }
            if g.timeout_ms == 0 || g.timeout_ms > u64::from(u32::MAX) {
                return Err(ConfigError::new(
                    "global.timeout_ms",
                    format!("{} is not between 1 and {}", g.timeout_ms, u32::MAX),
                ));
            }
        }
        if cfg.table.slots == 0 {
            return Err(ConfigError::new("table.slots", "must be at least 1"));
        }
        Ok(Settings {
            policies,
            slots: cfg.table.slots,
            max_cas_retries: cfg.table.max_cas_retries,
            hash_seed: cfg.table.hash_seed,
            on_error: cfg.on_error,
            headers_on_allowed: cfg.headers_on_allowed,
            identity_headers: cfg.identity_headers,
            global: cfg.global,
        })
    }
}

impl Policy {
    /// Whether the policy applies to a request.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let mut caps = Vec::new();
        (self.methods.is_empty() || self.methods.iter().any(|m| m == r.method))
            && match &self.path {
                None => true,
                Some(PathMatch::Prefix(p)) => r.path.starts_with(p.as_str()),
                Some(PathMatch::Template(t)) => t.matches(r.path, &mut caps),
            }
            && self.authenticated.is_none_or(|a| a == r.subject.is_some())
            && (self.roles_any.is_empty()
                || r.roles.is_some_and(|roles| {
                    roles
                        .split(',')
                        .map(str::trim)
                        .any(|x| self.roles_any.iter().any(|w| w == x))
                }))
            && (self.tenants.is_empty()
                || r.tenant
                    .is_some_and(|t| self.tenants.iter().any(|w| w == t)))
    }

    /// The counting key: the policy id and each part; a part the request
    /// lacks (no tenant on an anonymous request) counts as one shared value,
    /// so such requests share a bucket rather than escape the limit.
    /// `header` reads a request header.
    pub fn key(&self, r: &RequestView<'_>, header: impl Fn(&str) -> Option<String>) -> String {
        let mut k = self.id.clone();
        for part in &self.key {
            k.push('|');
            let v = match part {
                KeyPart::Subject => r.subject.map(str::to_string),
                KeyPart::Tenant => r.tenant.map(str::to_string),
                KeyPart::ClientIp => r.client_ip.map(str::to_string),
                KeyPart::Route => Some(String::new()),
                KeyPart::Header(h) => header(h),
            };
            match v {
                Some(v) => {
                    // Length-prefixed, so parts cannot run into each other.
                    k.push_str(&v.len().to_string());
                    k.push(':');
                    k.push_str(&v);
                }
                None => k.push('-'),
            }
        }
        k
    }
}

impl Policy {
    /// The RLS descriptor of a request: the policy id, then each key part
    /// (`-` for a part the request lacks), with the policy's rate as the
    /// limit override (requests per unit, when the rate maps to a unit).
    pub fn descriptor(
        &self,
        r: &RequestView<'_>,
        header: impl Fn(&str) -> Option<String>,
    ) -> crate::rls::Descriptor {
        let mut entries = vec![("policy".to_string(), self.id.clone())];
        for part in &self.key {
            let (k, v) = match part {
                KeyPart::Subject => ("subject".to_string(), r.subject.map(str::to_string)),
                KeyPart::Tenant => ("tenant".to_string(), r.tenant.map(str::to_string)),
                KeyPart::ClientIp => ("client_ip".to_string(), r.client_ip.map(str::to_string)),
                KeyPart::Route => ("route".to_string(), Some(self.id.clone())),
                KeyPart::Header(h) => (format!("header.{h}"), header(h)),
            };
            entries.push((k, v.unwrap_or_else(|| "-".to_string())));
        }
        let unit = match self.window_s {
            1 => 1,
            60 => 2,
            3600 => 3,
            86_400 => 4,
            _ => 0,
        };
        let limit =
            (unit != 0).then(|| (u32::try_from(self.rate.requests).unwrap_or(u32::MAX), unit));
        crate::rls::Descriptor { entries, limit }
    }
}

/// The client address without its port (`10.0.0.1:5000` → `10.0.0.1`,
/// `[::1]:5000` → `::1`).
pub fn client_ip(source_address: &str) -> &str {
    if let Some(rest) = source_address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match source_address.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => source_address,
    }
}
