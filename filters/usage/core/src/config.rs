//! The usage filter's configuration: where batches go, how they are cut
//! and bounded, and how a request becomes a record (identity headers,
//! route templates). Parsed with unknown fields refused; every error names
//! the field.

use entitlements_core::template::PathTemplate;
use filter_common::config::ConfigError;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Envoy cluster of the sidecar's ingest endpoint.
    pub cluster: String,
    /// `:authority` of the batch requests. Default: the cluster name.
    pub authority: Option<String>,
    /// Path of the ingest endpoint. Default `/v1/usage`.
    #[serde(default = "default_path")]
    pub path: String,
    /// Shared secret sent in `secret_header` (when the sidecar is not on
    /// loopback). Default: none.
    pub secret: Option<String>,
    /// The name of an environment variable of the VM holding that secret
    /// (Envoy's `vm_config.environment_variables`, Istio's WasmPlugin
    /// `vmConfig.env`, filled from a Kubernetes Secret), read at
    /// configuration. Not with `secret`. Default: none.
    pub secret_env: Option<String>,
    /// Default `x-usage-secret`.
    #[serde(default = "default_secret_header")]
    pub secret_header: String,
    /// How often a VM sends what it holds, ms. Default 1000.
    #[serde(default = "default_flush")]
    pub flush_interval_ms: u64,
    /// Most records in one batch. Default 500; a full batch goes at once.
    #[serde(default = "default_batch")]
    pub max_batch_records: usize,
    /// Most records a VM holds while the sidecar is slow or unreachable;
    /// beyond, the oldest are dropped (`usage.records_dropped`).
    /// Default 20000.
    #[serde(default = "default_pending")]
    pub max_pending_records: usize,
    /// How long a batch request may take, ms. Default 5000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// First wait before resending a failed batch, ms; doubled per failure
    /// up to `retry_max_ms`. Defaults 500 and 30000.
    #[serde(default = "default_retry")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// Name of the shared queue between streams and root contexts.
    /// Default `254carbon.usage`.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Identity headers (set by the auth filter). Defaults
    /// `x-auth-tenant`, `x-auth-subject`.
    #[serde(default = "default_tenant_header")]
    pub tenant_header: String,
    #[serde(default = "default_subject_header")]
    pub subject_header: String,
    /// Tenant of requests without one. Default `anonymous`.
    #[serde(default = "default_anonymous")]
    pub anonymous_tenant: String,
    /// Route templates (`/api/v1/curves/{market}/latest`, `*`, `**`): a
    /// record carries the first template the path matches, never the path
    /// itself, so the routes are bounded.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Route of paths no template matches. Default `other`.
    #[serde(default = "default_unmatched")]
    pub unmatched_route: String,
}

fn default_path() -> String {
    "/v1/usage".into()
}
fn default_secret_header() -> String {
    "x-usage-secret".into()
}
fn default_flush() -> u64 {
    1000
}
fn default_batch() -> usize {
    500
}
fn default_pending() -> usize {
    20_000
}
fn default_timeout() -> u64 {
    5000
}
fn default_retry() -> u64 {
    500
}
fn default_retry_max() -> u64 {
    30_000
}
fn default_queue() -> String {
    "254carbon.usage".into()
}
fn default_tenant_header() -> String {
    "x-auth-tenant".into()
}
fn default_subject_header() -> String {
    "x-auth-subject".into()
}
fn default_anonymous() -> String {
    "anonymous".into()
}
fn default_unmatched() -> String {
    "other".into()
}

/// The compiled configuration.
#[derive(Debug)]
pub struct Settings {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub secret: Option<(String, String)>,
    pub flush_interval_ms: u64,
    pub max_batch_records: usize,
    pub max_pending_records: usize,
    pub timeout_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub queue: String,
    pub tenant_header: String,
    pub subject_header: String,
    pub anonymous_tenant: String,
    pub routes: Vec<(String, PathTemplate)>,
    pub unmatched_route: String,
}

fn header_name(field: &str, h: &str) -> Result<(), ConfigError> {
    if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::new(
            field,
            format!("{h:?} is not a lower-case header name"),
        ));
    }
    Ok(())
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(
            field,
            format!("{v} is not within {lo}..={hi}"),
        ));
    }
    Ok(())
}

impl Settings {
    pub fn from_json(bytes: &[u8]) -> Result<Settings, ConfigError> {
        Settings::from_json_with_env(bytes, |name| std::env::var(name).ok())
    }

    /// [`Settings::from_json`] with `env` for the VM's environment (what
    /// `secret_env` names is looked up there).
    pub fn from_json_with_env(
        bytes: &[u8],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut cfg: UsageConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::json(&e))?;
        if let Some(name) = cfg.secret_env.take() {
            if cfg.secret.is_some() {
                return Err(ConfigError::new(
                    "secret_env",
                    "not with secret: one of them",
                ));
            }
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ConfigError::new(
                    "secret_env",
                    format!("{name:?} is not an environment variable name"),
                ));
            }
            let value = env(&name).ok_or_else(|| {
                ConfigError::new(
                    "secret_env",
                    format!(
                        "{name} is not set in the VM's environment (Envoy vm_config.environment_variables, Istio vmConfig.env)"
                    ),
                )
            })?;
            // The value is never shown: only that it is wrong.
            if value.is_empty() || value.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                return Err(ConfigError::new(
                    "secret_env",
                    format!("the value of {name} must be non-empty visible ASCII"),
                ));
            }
            cfg.secret = Some(value);
        }
        Settings::compile(cfg)
    }

    pub fn compile(c: UsageConfig) -> Result<Settings, ConfigError> {
        if c.cluster.is_empty() {
            return Err(ConfigError::new("cluster", "must not be empty"));
        }
        if !c.path.starts_with('/') {
            return Err(ConfigError::new(
                "path",
                format!("{:?} must start with '/'", c.path),
            ));
        }
        header_name("secret_header", &c.secret_header)?;
        header_name("tenant_header", &c.tenant_header)?;
        header_name("subject_header", &c.subject_header)?;
        if let Some(s) = &c.secret {
            if s.is_empty() || s.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                return Err(ConfigError::new(
                    "secret",
                    "must be non-empty visible ASCII",
                ));
            }
        }
        range("flush_interval_ms", c.flush_interval_ms, 10, 3_600_000)?;
        range("max_batch_records", c.max_batch_records as u64, 1, 100_000)?;
        range(
            "max_pending_records",
            c.max_pending_records as u64,
            c.max_batch_records as u64,
            10_000_000,
        )?;
        range("timeout_ms", c.timeout_ms, 1, 600_000)?;
        range("retry_initial_ms", c.retry_initial_ms, 1, 3_600_000)?;
        range(
            "retry_max_ms",
            c.retry_max_ms,
            c.retry_initial_ms,
            3_600_000,
        )?;
        if c.queue.is_empty() {
            return Err(ConfigError::new("queue", "must not be empty"));
        }
        for (field, v) in [
            ("anonymous_tenant", &c.anonymous_tenant),
            ("unmatched_route", &c.unmatched_route),
        ] {
            if v.is_empty() || v.len() > crate::wire::MAX_TEXT || v.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "must be 1 to {} bytes without control characters",
                        crate::wire::MAX_TEXT
                    ),
                ));
            }
        }
        let mut routes = Vec::with_capacity(c.routes.len());
        for (i, r) in c.routes.into_iter().enumerate() {
            if r.len() > crate::wire::MAX_TEXT {
                return Err(ConfigError::new(
                    format!("routes[{i}]"),
                    format!("longer than {} bytes", crate::wire::MAX_TEXT),
                ));
            }
            let t =
                PathTemplate::parse(&r).map_err(|e| ConfigError::new(format!("routes[{i}]"), e))?;
            routes.push((r, t));
        }
        Ok(Settings {
            authority: c.authority.unwrap_or_else(|| c.cluster.clone()),
            cluster: c.cluster,
            path: c.path,
            secret: c.secret.map(|s| (c.secret_header, s)),
            flush_interval_ms: c.flush_interval_ms,
            max_batch_records: c.max_batch_records,
            max_pending_records: c.max_pending_records,
            timeout_ms: c.timeout_ms,
            retry_initial_ms: c.retry_initial_ms,
            retry_max_ms: c.retry_max_ms,
            queue: c.queue,
            tenant_header: c.tenant_header,
            subject_header: c.subject_header,
            anonymous_tenant: c.anonymous_tenant,
            routes,
            unmatched_route: c.unmatched_route,
        })
    }

    /// The route template of a path (query ignored), or `unmatched_route`.
    pub fn route_of(&self, path: &str) -> &str {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let mut caps = Vec::new();
        for (name, t) in &self.routes {
            if t.matches(path, &mut caps) {
                return name;
            }
        }
        &self.unmatched_route
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn defaults_and_routes() {
        let s = Settings::from_json(
            br#"{"cluster":"sidecar","routes":["/api/v1/curves/{market}/latest","/api/v1/instruments/**"]}"#,
        )
        .unwrap();
        assert_eq!(s.authority, "sidecar");
        assert_eq!(s.path, "/v1/usage");
        assert_eq!(s.max_batch_records, 500);
        assert_eq!(
            s.route_of("/api/v1/curves/EU-ETS/latest?x=1"),
            "/api/v1/curves/{market}/latest"
        );
        assert_eq!(s.route_of("/api/v1/instruments"), "/api/v1/instruments/**");
        assert_eq!(
            s.route_of("/api/v1/instruments/a/b"),
            "/api/v1/instruments/**"
        );
        assert_eq!(s.route_of("/api/v1/curves/EU-ETS"), "other");
        assert_eq!(s.route_of("garbage"), "other");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{}"#, "missing field `cluster`"),
            (r#"{"cluster":""}"#, "cluster:"),
            (r#"{"cluster":"c","path":"v1"}"#, "path:"),
            (
                r#"{"cluster":"c","flush_interval_ms":0}"#,
                "flush_interval_ms:",
            ),
            (
                r#"{"cluster":"c","max_batch_records":0}"#,
                "max_batch_records:",
            ),
            (
                r#"{"cluster":"c","max_batch_records":100,"max_pending_records":10}"#,
                "max_pending_records:",
            ),
            (
                r#"{"cluster":"c","retry_initial_ms":100,"retry_max_ms":10}"#,
                "retry_max_ms:",
            ),
            (r#"{"cluster":"c","tenant_header":"X-T"}"#, "tenant_header:"),
            (r#"{"cluster":"c","secret":"a b"}"#, "secret:"),
            (r#"{"cluster":"c","routes":["api"]}"#, "routes[0]:"),
            (r#"{"cluster":"c","routes":["/a/**/b"]}"#, "routes[0]:"),
            (
                r#"{"cluster":"c","anonymous_tenant":""}"#,
                "anonymous_tenant:",
            ),
            (r#"{"cluster":"c","bogus":1}"#, "unknown field `bogus`"),
        ];
        for (json, want) in cases {
            let e = Settings::from_json(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn the_secret_may_come_from_the_vm_environment() {
        let env = |name: &str| match name {
            "ACCESS_USAGE_SECRET" => Some("s3cret-from-a-k8s-secret".to_string()),
            "EMPTY" => Some(String::new()),
            "SPACE" => Some("a b".to_string()),
            _ => None,
        };
        let s = Settings::from_json_with_env(
            br#"{"cluster":"c","secret_env":"ACCESS_USAGE_SECRET"}"#,
            env,
        )
        .unwrap();
        assert_eq!(
            s.secret,
            Some((
                "x-usage-secret".to_string(),
                "s3cret-from-a-k8s-secret".to_string()
            ))
        );
        for (cfg, want) in [
            (
                r#"{"cluster":"c","secret_env":"UNSET"}"#,
                "secret_env: UNSET is not set",
            ),
            (
                r#"{"cluster":"c","secret_env":"EMPTY"}"#,
                "secret_env: the value of EMPTY",
            ),
            (
                r#"{"cluster":"c","secret_env":"SPACE"}"#,
                "secret_env: the value of SPACE",
            ),
            (
                r#"{"cluster":"c","secret_env":"A-B"}"#,
                "secret_env: \"A-B\" is not",
            ),
            (
                r#"{"cluster":"c","secret_env":"X","secret":"y"}"#,
                "secret_env: not with secret",
            ),
        ] {
            let e = Settings::from_json_with_env(cfg.as_bytes(), env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{cfg}: {e}");
            assert!(!e.contains("a b"), "the value is never shown: {e}");
        }
    }
}
