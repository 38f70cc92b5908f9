//! Helpers for the filters' integration tests (`tests/`): requests with
//! identity headers, and loading the built `.wasm` files.

use base64::Engine as _;
use serde_json::Value;
use wasm_host::{Host, LoadError, Message, Plugin, PluginConfig};

/// The entitlements filter with this plugin configuration.
pub fn entitlements_config(config: &Value) -> PluginConfig {
    PluginConfig::new(wasm_host::wasm_path("entitlements"))
        .name("entitlements")
        .root_id("entitlements")
        .vm_id("entitlements")
        .config_json(config)
}

pub fn load_entitlements(host: &Host, config: &Value) -> Result<Plugin, LoadError> {
    host.load(entitlements_config(config))
}

/// The auth filter with this plugin configuration.
pub fn auth_config(config: &Value) -> PluginConfig {
    PluginConfig::new(wasm_host::wasm_path("auth"))
        .name("auth")
        .root_id("auth")
        .vm_id("auth")
        .config_json(config)
}

pub fn load_auth(host: &Host, config: &Value) -> Result<Plugin, LoadError> {
    host.load(auth_config(config))
}

/// The ratelimit filter with this plugin configuration.
pub fn ratelimit_config(config: &Value) -> PluginConfig {
    PluginConfig::new(wasm_host::wasm_path("ratelimit"))
        .name("ratelimit")
        .root_id("ratelimit")
        .vm_id("ratelimit")
        .config_json(config)
}

/// The usage filter with this plugin configuration.
pub fn usage_config(config: &Value) -> PluginConfig {
    PluginConfig::new(wasm_host::wasm_path("usage"))
        .name("usage")
        .root_id("usage")
        .vm_id("usage")
        .config_json(config)
}

/// base64url (no padding) of a JSON value: an `x-auth-claims` header.
pub fn claims_header(claims: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string())
}

/// A request as it leaves auth: pseudo-headers plus identity headers.
pub struct Req {
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Req {
        Req {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), "api.254carbon.test".into()),
                (":scheme".into(), "https".into()),
            ],
        }
    }

    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }

    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }

    /// Identity headers as auth sets them.
    pub fn identity(self, subject: &str, tenant: &str, roles: &[&str], claims: &Value) -> Req {
        self.header("x-auth-subject", subject)
            .header("x-auth-issuer", "https://idp.254carbon.test/realms/carbon")
            .header("x-auth-tenant", tenant)
            .header("x-auth-roles", &roles.join(","))
            .header("x-auth-claims", &claims_header(claims))
    }

    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// The demo upstream of the usage tests: 404 for `/missing…`, else 200
/// with an 11-byte body.
pub fn demo_upstream(req: &Message) -> Message {
    let path = req.header(":path").unwrap_or_default();
    let (status, body) = if path.starts_with("/missing") {
        ("404", b"no".to_vec())
    } else {
        ("200", b"hello world".to_vec())
    };
    Message {
        headers: vec![(":status".into(), status.as_bytes().to_vec())].into(),
        body,
        trailers: None,
    }
}
