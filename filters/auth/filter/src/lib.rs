//! The auth filter: first in the chain. On every request it removes every
//! incoming `x-auth-*` header (and the configured identity headers), finds
//! the route's requirement, finds and verifies the token (`auth-core`),
//! and either sets the identity headers and lets the request through, or
//! answers 401 with DESIGN.md's JSON body and RFC 6750 `WWW-Authenticate`.
//!
//! Per worker VM: the compiled configuration, each provider's key set,
//! a bounded cache of verified tokens, and the requests waiting for keys
//! (paused until the provider's first key set, or a refetch after an
//! unknown `kid`, arrives; at most `jwks_wait_ms`, then 401).

mod keys;
mod metrics;

use auth_core::authenticate::{authenticate, Outcome};
use auth_core::claims::ClaimRules;
use auth_core::config::{Requirement, Settings, SourceConfig};
use auth_core::error::Reason;
use auth_core::source;
use filter_common::cache::{fast_hasher, BoundedCache, FastHasher};
use filter_shell as host;
use metrics::Metrics;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("auth: panic: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// A verified token, as cached.
struct Verified {
    provider: usize,
    /// `iss`, for refusing a cached token on a route of other providers.
    issuer: String,
    /// When the token is acceptable ([`ClaimRules::window`]).
    ///
    /// [`ClaimRules::window`]: auth_core::claims::ClaimRules::window
    window: (f64, f64),
    /// The identity headers, computed once.
    headers: Vec<(String, String)>,
}

/// A request paused until its provider's keys arrive.
struct Waiter {
    context_id: u32,
    token: String,
    source: usize,
    requirement: Requirement,
    provider: usize,
    deadline_ns: u64,
}

pub(crate) struct State {
    settings: Settings,
    keys: Vec<keys::ProviderKeys>,
    /// Only verified tokens get in, so clients cannot fill it with keys of
    /// their choosing: the fast hasher is enough.
    cache: BoundedCache<Rc<Verified>, FastHasher>,
    metrics: Metrics,
    waiters: Vec<Waiter>,
    fast_tick: bool,
}

/// What to do with a request.
enum Step {
    /// Let it through, with this identity (or none).
    Pass(Option<Rc<Verified>>),
    Deny(Reason),
    /// Wait for provider's keys.
    Wait(usize),
}

const SLOW_TICK: Duration = Duration::from_secs(1);
const FAST_TICK: Duration = Duration::from_millis(100);

fn now_secs() -> u64 {
    host::now().as_secs()
}

fn now_ns() -> u64 {
    u64::try_from(host::now().as_nanos()).unwrap_or(u64::MAX)
}

impl State {
    /// Verifies `token` for `req`. `retry`: the keys were just refreshed
    /// for this request, so an unknown kid is final.
    fn authenticate(&mut self, token: &str, req: &Requirement, retry: bool) -> Step {
        let now = now_secs();
        if let Some(v) = self.cache.get(1, token.as_bytes()) {
            if !req.providers.contains(&v.provider) {
                return Step::Deny(Reason::UnknownIssuer(v.issuer.clone()));
            }
            return match ClaimRules::check_window(v.window, now) {
                Ok(()) => Step::Pass(Some(v)),
                Err(r) => Step::Deny(r),
            };
        }
        let sets = &self.keys;
        let outcome = authenticate(
            &self.settings,
            req,
            token,
            |p| sets.get(p).and_then(|k| k.set.as_deref()),
            now,
        );
        let v = match outcome {
            Outcome::Verified(v) => v,
            Outcome::Denied(r) => return Step::Deny(r),
            Outcome::NeedKeys { provider, kid, alg } => {
                let wait = !retry
                    && match &kid {
                        None => true,
                        Some(_) => keys::refetch_for_unknown_kid(self, provider),
                    };
                return if wait {
                    Step::Wait(provider)
                } else {
                    Step::Deny(Outcome::keys_unavailable(
                        &self.settings,
                        provider,
                        kid,
                        alg,
                    ))
                };
            }
        };
        let v = Rc::new(Verified {
            provider: v.provider,
            issuer: v.issuer,
            window: v.window,
            headers: v.headers,
        });
        self.cache.put(1, token.as_bytes(), v.clone());
        Step::Pass(Some(v))
    }

    /// Applies a step to the current (or effective) stream: identity
    /// headers and continue, or a 401. Returns whether to continue.
    fn apply(&mut self, step: Step, source: Option<usize>, req: &Requirement) -> bool {
        let passed = match step {
            Step::Pass(Some(v)) => {
                // Every incoming header of these names is gone already.
                for (name, value) in &v.headers {
                    host::add_request_header(name, value);
                }
                if !self.settings.output.forward_token {
                    if let Some(SourceConfig::Header { name, .. }) =
                        source.and_then(|i| self.settings.sources.get(i))
                    {
                        host::remove_request_header(name);
                    }
                }
                host::increment(self.metrics.allowed, 1);
                true
            }
            Step::Pass(None) => {
                host::increment(self.metrics.anonymous, 1);
                true
            }
            Step::Deny(r) => {
                self.metrics.reason(&r);
                let missing = r == Reason::Missing;
                host::log(
                    if missing {
                        LogLevel::Debug
                    } else {
                        LogLevel::Info
                    },
                    &format!("auth: {} ({})", r, r.code()),
                );
                if req.allow_failed || (missing && req.allow_missing) {
                    host::increment(self.metrics.anonymous, 1);
                    true
                } else {
                    host::increment(self.metrics.denied, 1);
                    self.unauthorized(&r);
                    false
                }
            }
            Step::Wait(_) => false,
        };
        self.metrics.cache.flush(self.cache.stats());
        passed
    }

    /// 401 with the JSON body and `WWW-Authenticate` of DESIGN.md (RFC 6750).
    fn unauthorized(&self, r: &Reason) {
        let message = match (r, self.settings.expose_reasons) {
            (Reason::Missing, _) => "token missing".to_string(),
            (_, true) => r.to_string(),
            (_, false) => "invalid token".to_string(),
        };
        let quoted = message.replace(['"', '\\'], "'");
        let challenge = if *r == Reason::Missing {
            // RFC 6750 §3.1: no error code when the request had no token.
            r#"Bearer realm="254carbon""#.to_string()
        } else {
            format!(
                r#"Bearer realm="254carbon", error="invalid_token", error_description="{quoted}""#
            )
        };
        let body = serde_json::json!({"error": "invalid_token", "message": message}).to_string();
        host::send_reply(
            401,
            &[
                ("content-type", "application/json"),
                ("www-authenticate", &challenge),
            ],
            body.as_bytes(),
        );
    }

    /// Resumes or answers the waiters of providers whose keys changed, and
    /// those past their deadline.
    fn wake(&mut self, changed: &[usize]) {
        let now = now_ns();
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            let ready = changed.contains(&w.provider);
            if !ready && now < w.deadline_ns {
                self.waiters.push(w);
                continue;
            }
            if !host::set_effective_context(w.context_id) {
                continue; // the stream is gone
            }
            let step = if ready {
                self.authenticate(&w.token, &w.requirement, true)
            } else {
                let issuer = self
                    .settings
                    .providers
                    .get(w.provider)
                    .map_or(String::new(), |p| p.rules.issuer.clone());
                Step::Deny(Reason::JwksUnavailable(issuer))
            };
            if self.apply(step, Some(w.source), &w.requirement) {
                host::resume_request();
            }
        }
        self.set_tick();
    }

    fn set_tick(&mut self) {
        let fast = !self.waiters.is_empty();
        if fast != self.fast_tick {
            self.fast_tick = fast;
            host::set_tick_period(if fast { FAST_TICK } else { SLOW_TICK });
        }
    }
}

#[derive(Default)]
struct Root {
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _h: usize, body: usize, _t: usize) {
        if let Some(state) = &self.state {
            if let Ok(mut s) = state.try_borrow_mut() {
                if let Some(p) = keys::on_response(&mut s, token, body) {
                    s.wake(&[p]);
                }
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = host::plugin_configuration() else {
            host::log(LogLevel::Error, "auth: configuration: missing");
            return false;
        };
        let settings = match Settings::from_json(&bytes) {
            Ok(s) => s,
            Err(e) => {
                host::log(LogLevel::Error, &format!("auth: {e}"));
                return false;
            }
        };
        let cache = BoundedCache::with_hasher(
            settings.cache_max_entries,
            settings.max_token_bytes,
            fast_hasher(),
        );
        let mut state = State {
            settings,
            keys: Vec::new(),
            cache,
            metrics: Metrics::define(),
            waiters: Vec::new(),
            fast_tick: false,
        };
        keys::init(&mut state);
        if keys::any_remote(&state) {
            // Fetch soon after start, then look every second.
            state.fast_tick = true;
            host::set_tick_period(FAST_TICK);
        }
        host::log(
            LogLevel::Info,
            &format!(
                "auth: configured, {} providers",
                state.settings.providers.len()
            ),
        );
        self.state = Some(Rc::new(RefCell::new(state)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.state {
            if let Ok(mut s) = state.try_borrow_mut() {
                let changed = keys::on_tick(&mut s);
                s.wake(&changed);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(state) = &self.state else {
            return Action::Pause;
        };
        let Ok(mut guard) = state.try_borrow_mut() else {
            return Action::Pause;
        };
        let s = &mut *guard;
        let headers = host::RequestHeaders::read();
        // Nothing downstream may see identity headers a client sent.
        let o = &s.settings.output;
        for name in headers.names() {
            if name.starts_with("x-auth-")
                || [
                    &o.subject_header,
                    &o.issuer_header,
                    &o.tenant_header,
                    &o.roles_header,
                    &o.claims_header,
                    &o.expires_header,
                ]
                .iter()
                .any(|h| !h.is_empty() && h.as_str() == name)
            {
                host::remove_request_header(name);
            }
        }
        let get = |n: &str| headers.get(n).ok().flatten();
        let method = get(":method").unwrap_or("");
        let (path, query) = match get(":path").unwrap_or("/").split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (get(":path").unwrap_or("/"), None),
        };
        let req = s.settings.requirement(method, path).clone();
        if req.bypass {
            host::increment(s.metrics.bypassed, 1);
            return Action::Continue;
        }
        let found = source::find(&s.settings.sources, |n| get(n).map(str::to_string), query);
        let (token, src) = match found {
            Ok(Some(f)) => (f.token, f.source),
            Ok(None) => {
                let go = s.apply(Step::Deny(Reason::Missing), None, &req);
                return if go { Action::Continue } else { Action::Pause };
            }
            Err(r) => {
                let go = s.apply(Step::Deny(r), None, &req);
                return if go { Action::Continue } else { Action::Pause };
            }
        };
        match s.authenticate(&token, &req, false) {
            Step::Wait(p) => {
                host::increment(s.metrics.waited, 1);
                let deadline_ns = now_ns().saturating_add(s.settings.jwks_wait_ms * 1_000_000);
                s.waiters.push(Waiter {
                    context_id: self.id,
                    token,
                    source: src,
                    requirement: req,
                    provider: p,
                    deadline_ns,
                });
                s.set_tick();
                Action::Pause
            }
            step => {
                if s.apply(step, Some(src), &req) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
        }
    }

    fn on_log(&mut self) {
        // A client that went away while waiting is no longer waited for.
        if let Some(state) = &self.state {
            if let Ok(mut s) = state.try_borrow_mut() {
                s.waiters.retain(|w| w.context_id != self.id);
            }
        }
    }
}
