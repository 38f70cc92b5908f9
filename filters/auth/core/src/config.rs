//! The auth filter's configuration: parsed with unknown fields refused,
//! then compiled (key sets, claim paths, route regexes); errors name the
//! field.

use crate::claims::ClaimRules;
use crate::error::Reason;
use crate::jwk::JwkSet;
use crate::jwt::Alg;
use filter_common::claims::ClaimPath;
use filter_common::config::ConfigError;
use regex_lite::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The JSON plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Token issuers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Where tokens are looked for, in order. Default: `Authorization: Bearer`.
    #[serde(default = "default_sources")]
    pub sources: Vec<SourceConfig>,
    /// Per-route requirements, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Requirement of requests no rule matches. Default: a valid token
    /// from any provider.
    #[serde(default)]
    pub default: RequirementConfig,
    /// Identity headers set after a verification.
    #[serde(default)]
    pub output: OutputConfig,
    /// Longest token accepted, bytes. Default 8192.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// How long a request waits for a provider's first key set (or for a
    /// refetch after an unknown `kid`) before failing with 401, ms. Default 3000.
    #[serde(default = "default_wait")]
    pub jwks_wait_ms: u64,
    /// Verified tokens kept per worker; 0 turns the cache off. Default 1000.
    #[serde(default = "default_cache")]
    pub cache_max_entries: usize,
    /// Put the refusal reason into the 401 body and `WWW-Authenticate`
    /// (default: a generic message; the reason always goes to logs and metrics).
    #[serde(default)]
    pub expose_reasons: bool,
}

fn default_sources() -> Vec<SourceConfig> {
    vec![SourceConfig::Header {
        name: "authorization".into(),
        prefix: Some("Bearer ".into()),
    }]
}
fn default_max_token() -> usize {
    8192
}
fn default_wait() -> u64 {
    3000
}
fn default_cache() -> usize {
    1000
}
fn default_skew() -> u64 {
    60
}
fn yes() -> bool {
    true
}

/// One issuer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Accepted `aud` values (any of); empty accepts any.
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks: JwksConfig,
    /// Accepted algorithms; empty accepts every supported one that fits a key.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Tolerance on `exp`/`nbf`/`iat`, seconds. Default 60.
    #[serde(default = "default_skew")]
    pub clock_skew_s: u64,
    /// Refuse tokens without `exp`. Default true.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Longest accepted `exp − iat`, seconds.
    pub max_lifetime_s: Option<u64>,
    /// Claim → accepted values (empty: must be present).
    #[serde(default)]
    pub required_claims: BTreeMap<String, Vec<String>>,
}

/// Where a provider's keys come from (exactly one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum JwksConfig {
    /// A JWKS document in the configuration (symmetric `oct` keys allowed).
    Inline(Value),
    /// Fetched from `jwks_uri` through an Envoy cluster.
    Remote(RemoteConfig),
    /// OIDC discovery: the configuration document at `path` (default
    /// `/.well-known/openid-configuration` under the issuer's path) names
    /// `jwks_uri`, fetched through the same cluster.
    Discovery(RemoteConfig),
}

/// An HTTP source through an Envoy cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub cluster: String,
    /// Request path; for discovery, defaults to the issuer's path plus
    /// `/.well-known/openid-configuration`.
    pub path: Option<String>,
    /// `:authority`; default the issuer's host.
    pub authority: Option<String>,
    /// Per fetch, ms. Default 5000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Refresh period after a success, s. Default 600.
    #[serde(default = "default_refresh")]
    pub refresh_interval_s: u64,
    /// First retry delay after a failure, ms; doubles up to the refresh
    /// period. Default 1000.
    #[serde(default = "default_retry")]
    pub retry_initial_ms: u64,
    /// Least time between refetches caused by an unknown `kid`, s. Default 30.
    #[serde(default = "default_kid_refetch")]
    pub unknown_kid_refetch_s: u64,
    /// Largest document accepted, bytes. Default 256 KiB.
    #[serde(default = "default_max_doc")]
    pub max_bytes: usize,
}

fn default_timeout() -> u64 {
    5000
}
fn default_refresh() -> u64 {
    600
}
fn default_retry() -> u64 {
    1000
}
fn default_kid_refetch() -> u64 {
    30
}
fn default_max_doc() -> usize {
    256 * 1024
}

/// A place a token is looked for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SourceConfig {
    /// A header, with an optional prefix (`Bearer `, compared without case).
    Header {
        name: String,
        prefix: Option<String>,
    },
    /// A query parameter, e.g. `access_token` (WebSocket upgrades).
    Query(String),
    /// A cookie.
    Cookie(String),
}

/// A per-route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(rename = "match", default)]
    pub matcher: RouteMatchConfig,
    pub requires: RequirementConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    /// Upper-case methods, any of; empty: all.
    #[serde(default)]
    pub methods: Vec<String>,
    pub path: Option<PathConfig>,
}

/// Path match (exactly one), on the path without the query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathConfig {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// What a route requires.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequirementConfig {
    /// Providers accepted (by name); empty: any.
    #[serde(default)]
    pub providers: Vec<String>,
    /// No token is fine (public route); a token that fails is still 401.
    #[serde(default)]
    pub allow_missing: bool,
    /// No token or a failing one are both let through without identity.
    #[serde(default)]
    pub allow_failed: bool,
    /// Do not look for a token at all (health checks, CORS preflight).
    #[serde(default)]
    pub bypass: bool,
    /// Keep the token's header upstream on this route (overrides
    /// `output.forward_token`): the sidecar's `/ws` and `/publish/`, which
    /// verify it themselves as the proof of the identity headers.
    #[serde(default)]
    pub forward_token: Option<bool>,
}

/// The identity headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub subject_header: String,
    pub issuer_header: String,
    pub tenant_header: String,
    pub roles_header: String,
    /// Header for the base64url payload; empty: not set.
    pub claims_header: String,
    /// Header for the token's `exp` (whole seconds since the epoch), so a
    /// stream can end when the token does; empty: not set. Not set for a
    /// token without `exp`.
    pub expires_header: String,
    /// Claim path of the tenant.
    pub tenant_claim: String,
    /// Claim paths whose values make up the roles (merged, in order, deduplicated).
    pub roles_claims: Vec<String>,
    /// Send the token's header upstream (Envoy's `forward`). Default false.
    pub forward_token: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            subject_header: "x-auth-subject".into(),
            issuer_header: "x-auth-issuer".into(),
            tenant_header: "x-auth-tenant".into(),
            roles_header: "x-auth-roles".into(),
            claims_header: "x-auth-claims".into(),
            expires_header: "x-auth-expires".into(),
            tenant_claim: "tenant".into(),
            roles_claims: vec!["realm_access.roles".into()],
            forward_token: false,
        }
    }
}

/// Where a compiled provider's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Inline(JwkSet),
    Remote(Remote),
}

/// A compiled remote source: where the JWKS (or the discovery document) is.
#[derive(Debug, Clone)]
pub struct Remote {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    /// The path is a discovery document naming `jwks_uri`.
    pub discovery: bool,
    pub timeout_ms: u64,
    pub refresh_s: u64,
    pub retry_initial_ms: u64,
    pub unknown_kid_refetch_s: u64,
    pub max_bytes: usize,
}

/// A compiled provider.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub rules: ClaimRules,
    pub algorithms: Vec<Alg>,
    pub keys: KeySource,
}

#[derive(Debug, Clone)]
pub enum RoutePath {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// A compiled requirement: providers by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub providers: Vec<usize>,
    pub allow_missing: bool,
    pub allow_failed: bool,
    pub bypass: bool,
    /// `Some`: this route's choice over `output.forward_token`.
    pub forward_token: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub methods: Vec<String>,
    pub path: Option<RoutePath>,
    pub requires: Requirement,
}

/// The compiled configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub providers: Vec<Provider>,
    pub sources: Vec<SourceConfig>,
    pub routes: Vec<Route>,
    pub default: Requirement,
    pub output: OutputConfig,
    pub tenant_claim: ClaimPath,
    pub roles_claims: Vec<ClaimPath>,
    pub max_token_bytes: usize,
    pub jwks_wait_ms: u64,
    pub cache_max_entries: usize,
    pub expose_reasons: bool,
}

fn header_name(field: &str, v: &str, allow_empty: bool) -> Result<(), ConfigError> {
    if (v.is_empty() && !allow_empty)
        || v.bytes()
            .any(|b| b.is_ascii_uppercase() || !b.is_ascii_graphic())
    {
        return Err(ConfigError::new(
            field,
            format!("{v:?} is not a lower-case header name"),
        ));
    }
    Ok(())
}

/// The authority and the path (with query; empty if none) of an
/// `http(s)://` URL: an issuer, a discovered `jwks_uri`.
pub fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    match rest.find('/') {
        Some(i) => Some((rest.get(..i)?, rest.get(i..)?)),
        None => Some((rest, "")),
    }
}

/// The `jwks_uri` an OIDC discovery document names, as (authority,
/// path); `None` when the document has no usable one.
pub fn discovered_jwks_uri(document: &[u8]) -> Option<(String, String)> {
    let v = serde_json::from_slice::<Value>(document).ok()?;
    let (auth, path) = split_url(v.get("jwks_uri")?.as_str()?)?;
    let path = if path.is_empty() { "/" } else { path };
    (!auth.is_empty()).then(|| (auth.to_string(), path.to_string()))
}

fn compile_remote(
    field: &str,
    issuer: &str,
    r: RemoteConfig,
    discovery: bool,
) -> Result<Remote, ConfigError> {
    if r.cluster.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.cluster"),
            "must not be empty",
        ));
    }
    let (host, issuer_path) = split_url(issuer).unwrap_or(("", ""));
    let path = match r.path {
        Some(p) => p,
        None if discovery => format!(
            "{}/.well-known/openid-configuration",
            issuer_path.trim_end_matches('/')
        ),
        None => return Err(ConfigError::new(format!("{field}.path"), "required")),
    };
    if !path.starts_with('/') {
        return Err(ConfigError::new(
            format!("{field}.path"),
            format!("{path:?} must start with '/'"),
        ));
    }
    let authority = match r.authority {
        Some(a) => a,
        None if !host.is_empty() => host.to_string(),
        None => {
            return Err(ConfigError::new(
                format!("{field}.authority"),
                "required (the issuer is not a URL)",
            ))
        }
    };
    for (f, v) in [
        ("timeout_ms", r.timeout_ms),
        ("refresh_interval_s", r.refresh_interval_s),
        ("retry_initial_ms", r.retry_initial_ms),
    ] {
        if v == 0 || v > u64::from(u32::MAX) {
            return Err(ConfigError::new(
                format!("{field}.{f}"),
                format!("{v} is not between 1 and {}", u32::MAX),
            ));
        }
    }
    if r.max_bytes == 0 {
        return Err(ConfigError::new(
            format!("{field}.max_bytes"),
            "must be positive",
        ));
    }
    Ok(Remote {
        cluster: r.cluster,
        path,
        authority,
        discovery,
        timeout_ms: r.timeout_ms,
        refresh_s: r.refresh_interval_s,
        retry_initial_ms: r.retry_initial_ms,
        unknown_kid_refetch_s: r.unknown_kid_refetch_s,
        max_bytes: r.max_bytes,
    })
}

impl Settings {
    pub fn from_json(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let cfg: AuthConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::new("configuration", e))?;
        Settings::compile(cfg)
    }

    pub fn compile(cfg: AuthConfig) -> Result<Settings, ConfigError> {
        if cfg.providers.is_empty() {
            return Err(ConfigError::new("providers", "at least one is required"));
        }
        let names: Vec<String> = cfg.providers.keys().cloned().collect();
        let mut providers = Vec::with_capacity(cfg.providers.len());
        let mut issuers = std::collections::HashSet::new();
        for (name, p) in cfg.providers {
            let f = format!("providers.{name}");
            if p.issuer.is_empty() {
                return Err(ConfigError::new(format!("{f}.issuer"), "must not be empty"));
            }
            if !issuers.insert(p.issuer.clone()) {
                return Err(ConfigError::new(
                    format!("{f}.issuer"),
                    format!("{:?} is used by another provider", p.issuer),
                ));
            }
            let mut algorithms = Vec::with_capacity(p.algorithms.len());
            for (i, a) in p.algorithms.iter().enumerate() {
                algorithms.push(Alg::parse(a).map_err(|_| {
                    ConfigError::new(
                        format!("{f}.algorithms[{i}]"),
                        format!("{a:?} is not supported"),
                    )
                })?);
            }
            let keys = match p.jwks {
                JwksConfig::Inline(doc) => {
                    let set = JwkSet::parse(doc.to_string().as_bytes(), true)
                        .map_err(|e| ConfigError::new(format!("{f}.jwks.inline"), e))?;
                    if set.keys.is_empty() {
                        return Err(ConfigError::new(
                            format!("{f}.jwks.inline"),
                            format!("no usable key ({})", set.skipped.join("; ")),
                        ));
                    }
                    KeySource::Inline(set)
                }
                JwksConfig::Remote(r) => KeySource::Remote(compile_remote(
                    &format!("{f}.jwks.remote"),
                    &p.issuer,
                    r,
                    false,
                )?),
                JwksConfig::Discovery(r) => KeySource::Remote(compile_remote(
                    &format!("{f}.jwks.discovery"),
                    &p.issuer,
                    r,
                    true,
                )?),
            };
            providers.push(Provider {
                name,
                rules: ClaimRules {
                    issuer: p.issuer,
                    audiences: p.audiences,
                    clock_skew: p.clock_skew_s,
                    require_exp: p.require_exp,
                    max_lifetime: p.max_lifetime_s,
                    required: p.required_claims.into_iter().collect(),
                },
                algorithms,
                keys,
            });
        }
        let requirement = |field: &str, r: RequirementConfig| -> Result<Requirement, ConfigError> {
            let mut idx = Vec::new();
            for (i, n) in r.providers.iter().enumerate() {
                match names.iter().position(|x| x == n) {
                    Some(p) => idx.push(p),
                    None => {
                        return Err(ConfigError::new(
                            format!("{field}.providers[{i}]"),
                            format!("no provider {n:?}"),
                        ))
                    }
                }
            }
            if idx.is_empty() {
                idx = (0..names.len()).collect();
            }
            Ok(Requirement {
                providers: idx,
                allow_missing: r.allow_missing || r.allow_failed,
                allow_failed: r.allow_failed,
                bypass: r.bypass,
                forward_token: r.forward_token,
            })
        };
        let mut routes = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.into_iter().enumerate() {
            let f = format!("rules[{i}]");
            for (j, m) in r.matcher.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::new(
                        format!("{f}.match.methods[{j}]"),
                        format!("{m:?} is not an upper-case method"),
                    ));
                }
            }
            let path = match r.matcher.path {
                None => None,
                Some(PathConfig::Exact(p)) => Some(RoutePath::Exact(p)),
                Some(PathConfig::Prefix(p)) => Some(RoutePath::Prefix(p)),
                Some(PathConfig::Regex(re)) => Some(RoutePath::Regex(
                    Regex::new(&format!("^(?:{re})$"))
                        .map_err(|e| ConfigError::new(format!("{f}.match.path.regex"), e))?,
                )),
            };
            routes.push(Route {
                methods: r.matcher.methods,
                path,
                requires: requirement(&format!("{f}.requires"), r.requires)?,
            });
        }
        let default = requirement("default", cfg.default)?;
        if cfg.sources.is_empty() {
            return Err(ConfigError::new("sources", "at least one is required"));
        }
        for (i, s) in cfg.sources.iter().enumerate() {
            match s {
                SourceConfig::Header { name, .. } => {
                    header_name(&format!("sources[{i}].header.name"), name, false)?
                }
                SourceConfig::Query(n) | SourceConfig::Cookie(n) if n.is_empty() => {
                    return Err(ConfigError::new(
                        format!("sources[{i}]"),
                        "name must not be empty",
                    ))
                }
                _ => {}
            }
        }
        let o = &cfg.output;
        header_name("output.subject_header", &o.subject_header, false)?;
        header_name("output.issuer_header", &o.issuer_header, false)?;
        header_name("output.tenant_header", &o.tenant_header, false)?;
        header_name("output.roles_header", &o.roles_header, false)?;
        header_name("output.claims_header", &o.claims_header, true)?;
        header_name("output.expires_header", &o.expires_header, true)?;
        let tenant_claim = ClaimPath::parse(&o.tenant_claim)
            .map_err(|e| ConfigError::new("output.tenant_claim", e))?;
        let mut roles_claims = Vec::new();
        for (i, p) in o.roles_claims.iter().enumerate() {
            roles_claims.push(
                ClaimPath::parse(p)
                    .map_err(|e| ConfigError::new(format!("output.roles_claims[{i}]"), e))?,
            );
        }
        if cfg.max_token_bytes == 0 {
            return Err(ConfigError::new("max_token_bytes", "must be positive"));
        }
        Ok(Settings {
            providers,
            sources: cfg.sources,
            routes,
            default,
            output: cfg.output,
            tenant_claim,
            roles_claims,
            max_token_bytes: cfg.max_token_bytes,
            jwks_wait_ms: cfg.jwks_wait_ms,
            cache_max_entries: cfg.cache_max_entries,
            expose_reasons: cfg.expose_reasons,
        })
    }

    /// The requirement of a request (path without the query).
    pub fn requirement(&self, method: &str, path: &str) -> &Requirement {
        self.routes
            .iter()
            .find(|r| {
                (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                    && match &r.path {
                        None => true,
                        Some(RoutePath::Exact(p)) => path == p,
                        Some(RoutePath::Prefix(p)) => path.starts_with(p.as_str()),
                        Some(RoutePath::Regex(re)) => re.is_match(path),
                    }
            })
            .map_or(&self.default, |r| &r.requires)
    }

    /// The provider whose issuer is `iss`, if the requirement accepts it.
    pub fn provider_for(&self, iss: &str, req: &Requirement) -> Result<usize, Reason> {
        req.providers
            .iter()
            .copied()
            .find(|&i| self.providers.get(i).is_some_and(|p| p.rules.issuer == iss))
            .ok_or_else(|| Reason::UnknownIssuer(iss.to_string()))
    }

    /// The identity headers for verified claims: (name, value) pairs.
    pub fn identity_headers(
        &self,
        claims: &Map<String, Value>,
        payload_b64: &str,
    ) -> Vec<(String, String)> {
        let o = &self.output;
        let obj = Value::Object(claims.clone());
        let mut out = Vec::with_capacity(6);
        let text = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(sub) = text("sub") {
            out.push((o.subject_header.clone(), sub));
        }
        if let Some(iss) = text("iss") {
            out.push((o.issuer_header.clone(), iss));
        }
        if let Some(t) = self.tenant_claim.values(&obj).first() {
            out.push((o.tenant_header.clone(), t.to_string()));
        }
        let mut roles: Vec<String> = Vec::new();
        for p in &self.roles_claims {
            for r in p.values(&obj) {
                // A comma inside a role would split it in the header: drop it.
                if !r.contains(',') && !roles.iter().any(|x| *x == r) {
                    roles.push(r.into_owned());
                }
            }
        }
        out.push((o.roles_header.clone(), roles.join(",")));
        if !o.claims_header.is_empty() {
            out.push((o.claims_header.clone(), payload_b64.to_string()));
        }
        if !o.expires_header.is_empty() {
            // Verified already: a finite number. Whole seconds, rounded down.
            if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
                out.push((
                    o.expires_header.clone(),
                    format!("{}", exp.max(0.0).floor() as u64),
                ));
            }
        }
        out
    }
}
