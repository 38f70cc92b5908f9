//! The entitlements filter: second in the chain, after auth. It reads the
//! identity auth verified (the `x-auth-*` headers), normalises the path,
//! asks the policy engine (`entitlements-core`) and answers 403
//! `{"error":"forbidden","rule":"<id>"}` on deny.
//!
//! Per worker VM: the compiled policy, a bounded decision cache and the
//! metric ids. With a remote policy source, one worker at a time fetches it
//! (a lease in shared data), stores it in shared data, and every worker
//! compiles what it finds there; a failed or invalid fetch keeps the last
//! good policy.

mod config;
use filter_shell as host;
mod metrics;
mod remote;

use base64::Engine as _;
use config::Settings;
use entitlements_core::cache::{BoundedCache, DecisionCache};
use entitlements_core::identity::{decode_claims, Identity};
use entitlements_core::path::normalize;
use entitlements_core::policy::{Decider, HttpRequest, IdentityKey, Policy, Request, Verdict};
use metrics::Metrics;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("entitlements: panic: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// base64url, padded or not (RFC 7515 says unpadded; be lenient).
const BASE64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// What every stream of this VM shares.
struct State {
    settings: Settings,
    /// The policy in force, and its version (grows with every swap; the
    /// cache belongs to one version).
    policy: Option<Rc<Policy>>,
    version: u64,
    cache: DecisionCache,
    /// Decoded identities by their raw headers, each with an id that is
    /// never reused (decision keys carry the id).
    identities: BoundedCache<(u64, Rc<Identity>)>,
    next_identity: u64,
    id_key: Vec<u8>,
    metrics: Metrics,
    /// Reused buffer for cache keys.
    key: Vec<u8>,
    remote: remote::RemoteState,
}

impl State {
    fn new(settings: Settings) -> State {
        let cache = DecisionCache::new(settings.cache_entries, settings.cache_key_bytes);
        let mut s = State {
            policy: None,
            version: 0,
            cache,
            identities: BoundedCache::new(settings.identity_entries, settings.cache_key_bytes),
            next_identity: 0,
            id_key: Vec::with_capacity(512),
            metrics: Metrics::define(),
            key: Vec::with_capacity(256),
            remote: remote::RemoteState::default(),
            settings,
        };
        if let Some(p) = s.settings.policy.take() {
            s.install(p);
        }
        s
    }

    /// Puts a compiled policy in force.
    fn install(&mut self, policy: Policy) {
        self.version += 1;
        self.metrics.define_rules(&policy);
        self.policy = Some(Rc::new(policy));
    }
}

#[derive(Default)]
struct Root {
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        if let Some(state) = &self.state {
            if let Ok(mut s) = state.try_borrow_mut() {
                remote::on_response(&mut s, token, body);
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = host::plugin_configuration() else {
            host::log(LogLevel::Error, "entitlements: configuration: missing");
            return false;
        };
        let settings = match Settings::from_json(&bytes) {
            Ok(s) => s,
            Err(e) => {
                host::log(LogLevel::Error, &format!("entitlements: {e}"));
                return false;
            }
        };
        if let Some(r) = &settings.remote {
            host::set_tick_period(remote::tick_period(r));
        }
        let state = State::new(settings);
        host::log(
            LogLevel::Info,
            &format!(
                "entitlements: configured, {} rules{}",
                state.policy.as_ref().map_or(0, |p| p.len()),
                if state.settings.remote.is_some() {
                    ", remote source on"
                } else {
                    ""
                }
            ),
        );
        self.state = Some(Rc::new(RefCell::new(state)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.state {
            if let Ok(mut s) = state.try_borrow_mut() {
                remote::on_tick(&mut s);
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            state: self.state.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Stream {}

/// The identity headers as received.
struct RawIdentity<'h> {
    subject: Option<&'h str>,
    issuer: Option<&'h str>,
    tenant: Option<&'h str>,
    roles: Option<&'h str>,
    claims: Option<&'h str>,
}

impl RawIdentity<'_> {
    fn key(&self) -> IdentityKey<'_> {
        IdentityKey {
            subject: self.subject,
            issuer: self.issuer,
            tenant: self.tenant,
            roles: self.roles,
            claims: self.claims,
        }
    }

    /// The identity the engine evaluates; the claims decoded only if the
    /// policy reads them. `Err` names what was malformed.
    fn decode(&self, policy: &Policy, max_claims: usize) -> Result<Identity, &'static str> {
        let claims = match (self.claims, policy.uses_claims()) {
            (Some(c), true) => {
                if c.len() > max_claims {
                    return Err("claims header too large");
                }
                let raw = BASE64URL
                    .decode(c.trim())
                    .map_err(|_| "claims header is not base64url")?;
                decode_claims(&raw, policy.claim_roots())
                    .map_err(|_| "claims header is not a JSON object")?
            }
            _ => serde_json::Value::Null,
        };
        Ok(Identity {
            subject: self.subject.map(str::to_string),
            issuer: self.issuer.map(str::to_string),
            tenant: self.tenant.map(str::to_string),
            roles: self.roles.map(Identity::parse_roles).unwrap_or_default(),
            claims,
        })
    }
}

fn forbidden(rule: &str) {
    let body = serde_json::json!({"error": "forbidden", "rule": rule}).to_string();
    host::send_json(403, &[], &body);
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(state) = &self.state else {
            // Not configured: never reached in Envoy (the plugin is refused).
            forbidden("default");
            return Action::Pause;
        };
        let Ok(mut guard) = state.try_borrow_mut() else {
            forbidden("default");
            return Action::Pause;
        };
        let s = &mut *guard;
        let Some(policy) = s.policy.clone() else {
            host::increment(s.metrics.unavailable, 1);
            host::send_json(
                503,
                &[("retry-after", "1")],
                r#"{"error":"unavailable","message":"entitlements policy not loaded yet"}"#,
            );
            return Action::Pause;
        };

        // The request, with the path normalised.
        let headers = host::RequestHeaders::read();
        let header = |n: &str| headers.get(n).ok().flatten();
        let method = header(":method").unwrap_or_default();
        let authority = header(":authority").unwrap_or_default();
        let raw_path = match headers.get(":path") {
            Ok(Some(p)) => p,
            _ => {
                return invalid_path(s, "path is missing or not UTF-8");
            }
        };
        let target = match normalize(raw_path, &s.settings.path) {
            Ok(t) => t,
            Err(e) => return invalid_path(s, &e.to_string()),
        };
        if s.settings.rewrite_path {
            let unchanged = match &target.query {
                None => raw_path == target.path,
                Some(q) => {
                    raw_path.len() == target.path.len() + 1 + q.len()
                        && raw_path.starts_with(target.path.as_str())
                }
            };
            if !unchanged {
                host::set_request_header(":path", &target.to_string());
            }
        }
        let mut read_headers = Vec::with_capacity(policy.headers_read().len());
        for name in policy.headers_read() {
            if let Some(v) = header(name) {
                read_headers.push((name.clone(), v.to_string()));
            }
        }
        let request = HttpRequest {
            method,
            host: authority,
            path: &target.path,
            query: target.query.as_deref(),
            headers: &read_headers,
        };

        // The identity, as auth set it.
        let h = &s.settings.headers;
        let id_header = |n: &str| headers.get(n);
        let raw = match (
            id_header(&h.subject),
            id_header(&h.issuer),
            id_header(&h.tenant),
            id_header(&h.roles),
            id_header(&h.claims),
        ) {
            (Ok(subject), Ok(issuer), Ok(tenant), Ok(roles), Ok(claims)) => RawIdentity {
                subject,
                issuer,
                tenant,
                roles,
                claims,
            },
            _ => return invalid_identity(s, "an identity header is not UTF-8"),
        };

        // The caller: decoded once and kept (bounded) under an id, so that
        // decision keys stay short and a decision miss does not decode again.
        s.id_key.clear();
        policy.identity_key(&mut s.id_key, &raw.key());
        let interned =
            s.settings.identity_entries > 0 && s.id_key.len() <= s.settings.cache_key_bytes;
        let known = if interned {
            s.identities.lookup(s.version, &s.id_key)
        } else {
            Err(None)
        };
        let (id, identity) = match known {
            Ok(k) => k,
            Err(miss) => {
                let identity = match raw.decode(&policy, s.settings.max_claims_bytes) {
                    Ok(i) => Rc::new(i),
                    Err(why) => return invalid_identity(s, why),
                };
                s.next_identity += 1;
                if let Some(miss) = miss {
                    let value = (s.next_identity, identity.clone());
                    let State {
                        identities, id_key, ..
                    } = &mut *s;
                    identities.insert(miss, id_key, value);
                }
                (s.next_identity, identity)
            }
        };

        // Decide, through the decision cache (if on).
        let cached = s.settings.cache_entries > 0;
        if cached {
            policy.http_request_key(&mut s.key, &request);
            if interned {
                s.key.extend_from_slice(&id.to_le_bytes());
            } else {
                let State { key, id_key, .. } = &mut *s;
                key.extend_from_slice(id_key);
            }
        }
        let hit = if cached {
            s.cache.lookup(s.version, &s.key)
        } else {
            Err(None)
        };
        let verdict = match hit {
            Ok(v) => v,
            Err(miss) => {
                let v = policy.decide(&identity, &Request::Http(request));
                if let Some(miss) = miss {
                    let State { cache, key, .. } = &mut *s;
                    cache.insert(miss, key, v);
                }
                v
            }
        };
        s.metrics.identity_cache.flush(s.identities.stats());
        s.metrics.cache.flush(s.cache.stats());
        report(s, &policy, verdict, method, &target.path, raw.subject);
        if verdict.allowed {
            Action::Continue
        } else {
            forbidden(policy.rule_id(verdict.rule));
            Action::Pause
        }
    }
}

/// Counts and logs a decision.
fn report(s: &State, policy: &Policy, v: Verdict, method: &str, path: &str, subject: Option<&str>) {
    let m = &s.metrics;
    host::increment(m.rule(v.rule.slot(policy.len())), 1);
    host::increment(if v.allowed { m.allowed } else { m.denied }, 1);
    let who = subject.unwrap_or("-");
    if !v.allowed {
        host::log(
            LogLevel::Debug,
            &format!(
                "entitlements: denied by {}: {method} {path} subject={who}",
                policy.rule_id(v.rule)
            ),
        );
    }
    if let Some(d) = v.shadow_denied {
        host::increment(m.shadow_denied, 1);
        let rule = if matches!(d, Decider::Default) {
            "default"
        } else {
            policy.rule_id(d)
        };
        host::log(
            LogLevel::Info,
            &format!("entitlements: shadow deny by {rule}: {method} {path} subject={who}"),
        );
    }
}

fn invalid_path(s: &State, why: &str) -> Action {
    host::increment(s.metrics.invalid_path, 1);
    host::log(
        LogLevel::Debug,
        &format!("entitlements: invalid path: {why}"),
    );
    let body = serde_json::json!({"error": "invalid_path", "message": why}).to_string();
    host::send_json(400, &[], &body);
    Action::Pause
}

fn invalid_identity(s: &State, why: &str) -> Action {
    host::increment(s.metrics.invalid_identity, 1);
    host::log(
        LogLevel::Warn,
        &format!("entitlements: invalid identity headers: {why}"),
    );
    forbidden("invalid_identity");
    Action::Pause
}
