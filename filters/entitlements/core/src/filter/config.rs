//! The entitlements filter's plugin configuration: parsed with unknown
//! fields refused, then compiled (the policy, path options, remote
//! source); every error names the field.

use crate::filter::grants::FeedSource;
use crate::path::{EscapedSlashes, PathOptions, DEFAULT_MAX_PATH_BYTES};
use crate::policy::{Policy, PolicyConfig};
use filter_common::config::ConfigError;
pub use filter_common::identity::IdentityHeaders;
use filter_common::refresh::Timings;
use filter_common::remote::Source;
use serde::Deserialize;
use std::time::Duration;

/// The JSON plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The policy, inline. Required unless `remote` is set; with `remote`,
    /// it serves until the first fetch succeeds.
    pub policy: Option<PolicyConfig>,
    /// Fetch the policy from an HTTP endpoint and refresh it on a timer.
    pub remote: Option<RemoteConfig>,
    /// Take the grants of the policy's `grant` conditions from the
    /// sidecar's grants feed. Without it every `grant` condition is false.
    pub grants: Option<GrantsConfig>,
    /// Names of the identity headers auth sets.
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    /// Path normalisation before matching.
    #[serde(default)]
    pub path: PathConfig,
    /// The per-worker decision cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Largest `x-auth-claims` value decoded (bytes, encoded); a larger
    /// one is refused like a malformed one.
    #[serde(default = "default_max_claims_bytes")]
    pub max_claims_bytes: usize,
}

/// Where the policy is fetched from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Envoy cluster serving the policy.
    pub cluster: String,
    /// Request path, e.g. `/policies/entitlements.json`.
    pub path: String,
    /// `:authority` of the request; default: the cluster name.
    pub authority: Option<String>,
    /// Time between fetches after a success (ms). Default 30 000.
    #[serde(default = "default_refresh_ms")]
    pub refresh_interval_ms: u64,
    /// Time before another attempt after a failure (ms). Default 5 000.
    #[serde(default = "default_retry_ms")]
    pub retry_interval_ms: u64,
    /// Timeout of one fetch (ms). Default 5 000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest policy document accepted (bytes). Default 1 MiB.
    #[serde(default = "default_max_policy_bytes")]
    pub max_bytes: usize,
    /// Shared-data key under which the workers share the fetched policy;
    /// default derived from cluster and path.
    pub shared_key: Option<String>,
}

/// The grants feed ([`crate::filter::grants`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// Envoy cluster of the sidecar.
    pub cluster: String,
    /// Default `/internal/v1/grants`.
    #[serde(default = "default_grants_path")]
    pub path: String,
    /// `:authority`; default: the cluster name.
    pub authority: Option<String>,
    /// Sent as `authorization: Bearer <token>` (the sidecar's
    /// `--grants-feed-token`).
    pub token: Option<String>,
    /// Time between polls after a success (ms): the longest a change
    /// takes to reach this Envoy, and one request (a 304 when nothing
    /// changed) per interval. Default 1 000.
    #[serde(default = "default_grants_refresh_ms")]
    pub refresh_interval_ms: u64,
    /// First delay after a failure (ms), doubling up to the refresh
    /// interval. Default 1 000.
    #[serde(default = "default_grants_refresh_ms")]
    pub retry_interval_ms: u64,
    /// Timeout of one page (ms). Default 5 000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Grants asked for per page. Default 10 000.
    #[serde(default = "default_page_grants")]
    pub page_grants: usize,
    /// Largest page accepted (bytes). Default 4 MiB.
    #[serde(default = "default_max_page_bytes")]
    pub max_page_bytes: usize,
    /// Most grants in force at this Envoy. Default 1 000 000.
    #[serde(default = "default_max_grants")]
    pub max_grants: u64,
    /// Most grants of one holder. Default 10 000.
    #[serde(default = "default_max_holder_grants")]
    pub max_holder_grants: usize,
    /// Changed holders remembered so workers drop only those from their
    /// caches. Default 4 096.
    #[serde(default = "default_4096")]
    pub log_entries: usize,
    /// Holders each worker keeps decoded. Default 4 096.
    #[serde(default = "default_4096")]
    pub holder_cache_entries: usize,
    /// Shared-data prefix; default `254carbon.grants|<cluster>|<path>`.
    pub shared_key: Option<String>,
}

/// Path handling.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathConfig {
    /// `reject` (default), `decode` or `keep` for `%2F` / `%5C`.
    pub escaped_slashes: EscapedSlashesConfig,
    /// Longest path accepted, bytes. Default 8192.
    pub max_bytes: usize,
    /// Send the normalised path upstream, so the upstream sees what the
    /// rules saw. Default true.
    pub rewrite: bool,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            escaped_slashes: EscapedSlashesConfig::Reject,
            max_bytes: DEFAULT_MAX_PATH_BYTES,
            rewrite: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashesConfig {
    Reject,
    Decode,
    Keep,
}

/// The decision cache.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries per worker; 0 disables the cache. Default 10 000.
    pub max_entries: usize,
    /// Requests whose key is longer are decided without the cache. Default 4096.
    pub max_key_bytes: usize,
    /// Decoded identities kept per worker; 0 decodes the identity headers
    /// on every decision-cache miss. Default 1024.
    pub max_identities: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 10_000,
            max_key_bytes: 4096,
            max_identities: 1024,
        }
    }
}

fn default_grants_path() -> String {
    "/internal/v1/grants".into()
}
fn default_grants_refresh_ms() -> u64 {
    1_000
}
fn default_page_grants() -> usize {
    10_000
}
fn default_max_page_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_max_grants() -> u64 {
    1_000_000
}
fn default_max_holder_grants() -> usize {
    10_000
}
fn default_4096() -> usize {
    4096
}
fn default_max_claims_bytes() -> usize {
    16 * 1024
}
fn default_refresh_ms() -> u64 {
    30_000
}
fn default_retry_ms() -> u64 {
    5_000
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_max_policy_bytes() -> usize {
    1024 * 1024
}

/// The compiled configuration.
pub struct Settings {
    pub policy: Option<Policy>,
    pub remote: Option<Source>,
    pub grants: Option<FeedSource>,
    pub headers: IdentityHeaders,
    pub path: PathOptions,
    pub rewrite_path: bool,
    pub cache_entries: usize,
    pub cache_key_bytes: usize,
    pub identity_entries: usize,
    pub max_claims_bytes: usize,
}

fn positive(field: &str, v: u64, max: u64) -> Result<(), ConfigError> {
    if v == 0 || v > max {
        return Err(ConfigError::new(
            field,
            format!("{v} is not between 1 and {max}"),
        ));
    }
    Ok(())
}

fn feed_source(g: GrantsConfig) -> Result<FeedSource, ConfigError> {
    if g.cluster.is_empty() {
        return Err(ConfigError::new("grants.cluster", "must not be empty"));
    }
    if !g.path.starts_with('/') {
        return Err(ConfigError::new(
            "grants.path",
            format!("{:?} must start with '/'", g.path),
        ));
    }
    let ms = u64::from(u32::MAX);
    positive("grants.refresh_interval_ms", g.refresh_interval_ms, ms)?;
    positive("grants.retry_interval_ms", g.retry_interval_ms, ms)?;
    positive("grants.timeout_ms", g.timeout_ms, ms)?;
    positive("grants.page_grants", g.page_grants as u64, 100_000)?;
    positive(
        "grants.max_page_bytes",
        g.max_page_bytes as u64,
        u64::from(u32::MAX),
    )?;
    positive("grants.max_grants", g.max_grants, u64::MAX)?;
    positive(
        "grants.max_holder_grants",
        g.max_holder_grants as u64,
        u64::MAX,
    )?;
    positive("grants.log_entries", g.log_entries as u64, 1_000_000)?;
    if let Some(t) = &g.token {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                "grants.token",
                "must be printable ASCII without spaces",
            ));
        }
    }
    let key = g
        .shared_key
        .unwrap_or_else(|| format!("254carbon.grants|{}|{}", g.cluster, g.path));
    if key.is_empty() {
        return Err(ConfigError::new("grants.shared_key", "must not be empty"));
    }
    Ok(FeedSource {
        authority: g.authority.unwrap_or_else(|| g.cluster.clone()),
        cluster: g.cluster,
        path: g.path,
        token: g.token,
        timeout: Duration::from_millis(g.timeout_ms),
        timings: Timings {
            refresh_ms: g.refresh_interval_ms,
            retry_initial_ms: g.retry_interval_ms.min(g.refresh_interval_ms),
            retry_max_ms: g.refresh_interval_ms,
            min_refetch_ms: g.refresh_interval_ms,
        },
        page_grants: g.page_grants,
        max_page_bytes: g.max_page_bytes,
        max_grants: g.max_grants,
        max_holder_grants: g.max_holder_grants,
        log_entries: g.log_entries,
        holder_cache_entries: g.holder_cache_entries,
        key,
    })
}

fn header_name(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty()
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

impl Settings {
    /// Parses and compiles the plugin configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let cfg: FilterConfig = serde_json::from_slice(bytes).map_err(|e| ConfigError::json(&e))?;
        Settings::compile(cfg)
    }

    pub fn compile(cfg: FilterConfig) -> Result<Settings, ConfigError> {
        if cfg.policy.is_none() && cfg.remote.is_none() {
            return Err(ConfigError::new("policy", "required unless remote is set"));
        }
        let policy = match cfg.policy {
            Some(p) => Some(Policy::compile(p).map_err(|e| ConfigError::new("policy", e))?),
            None => None,
        };
        let remote = match cfg.remote {
            None => None,
            Some(r) => {
                if r.cluster.is_empty() {
                    return Err(ConfigError::new("remote.cluster", "must not be empty"));
                }
                if !r.path.starts_with('/') {
                    return Err(ConfigError::new(
                        "remote.path",
                        format!("{:?} must start with '/'", r.path),
                    ));
                }
                for (field, v) in [
                    ("remote.refresh_interval_ms", r.refresh_interval_ms),
                    ("remote.retry_interval_ms", r.retry_interval_ms),
                    ("remote.timeout_ms", r.timeout_ms),
                ] {
                    if v == 0 || v > u64::from(u32::MAX) {
                        return Err(ConfigError::new(
                            field,
                            format!("{v} is not between 1 and {}", u32::MAX),
                        ));
                    }
                }
                if r.max_bytes == 0 {
                    return Err(ConfigError::new("remote.max_bytes", "must be positive"));
                }
                let shared_key = r.shared_key.unwrap_or_else(|| {
                    format!("254carbon.entitlements.policy|{}|{}", r.cluster, r.path)
                });
                if shared_key.is_empty() {
                    return Err(ConfigError::new("remote.shared_key", "must not be empty"));
                }
                Some(Source {
                    authority: r.authority.unwrap_or_else(|| r.cluster.clone()),
                    cluster: r.cluster,
                    path: r.path,
                    timeout: Duration::from_millis(r.timeout_ms),
                    // A failed fetch is tried again after the retry
                    // interval, not doubling.
                    timings: Timings {
                        refresh_ms: r.refresh_interval_ms,
                        retry_initial_ms: r.retry_interval_ms,
                        retry_max_ms: r.retry_interval_ms,
                        min_refetch_ms: r.refresh_interval_ms,
                    },
                    max_bytes: r.max_bytes,
                    max_bytes_field: "remote.max_bytes".into(),
                    key: shared_key,
                    follow: false,
                })
            }
        };
        let grants = cfg.grants.map(feed_source).transpose()?;
        let h = &cfg.identity_headers;
        header_name("identity_headers.subject", &h.subject)?;
        header_name("identity_headers.issuer", &h.issuer)?;
        header_name("identity_headers.tenant", &h.tenant)?;
        header_name("identity_headers.roles", &h.roles)?;
        header_name("identity_headers.claims", &h.claims)?;
        if cfg.path.max_bytes == 0 {
            return Err(ConfigError::new("path.max_bytes", "must be positive"));
        }
        if (cfg.cache.max_entries > 0 || cfg.cache.max_identities > 0)
            && cfg.cache.max_key_bytes == 0
        {
            return Err(ConfigError::new(
                "cache.max_key_bytes",
                "must be positive when the cache is on",
            ));
        }
        Ok(Settings {
            policy,
            remote,
            grants,
            headers: cfg.identity_headers,
            path: PathOptions {
                escaped_slashes: match cfg.path.escaped_slashes {
                    EscapedSlashesConfig::Reject => EscapedSlashes::Reject,
                    EscapedSlashesConfig::Decode => EscapedSlashes::Decode,
                    EscapedSlashesConfig::Keep => EscapedSlashes::Keep,
                },
                max_bytes: cfg.path.max_bytes,
            },
            rewrite_path: cfg.path.rewrite,
            cache_entries: cfg.cache.max_entries,
            cache_key_bytes: cfg.cache.max_key_bytes,
            identity_entries: cfg.cache.max_identities,
            max_claims_bytes: cfg.max_claims_bytes,
        })
    }
}
