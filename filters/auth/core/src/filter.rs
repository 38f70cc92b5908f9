//! The auth filter as a [`Filter`], first in the chain. On every request
//! it removes every incoming `x-auth-*` header (and the configured
//! identity headers), finds the route's requirement, finds and verifies
//! the token ([`crate::authenticate`]), and either sets the identity
//! headers and lets the request through, or answers 401 with DESIGN.md's
//! JSON body and RFC 6750 `WWW-Authenticate`.
//!
//! Per worker VM: each provider's key set, a bounded cache of verified
//! tokens, and the requests waiting for keys (paused until the provider's
//! first key set, or a refetch after an unknown `kid`, arrives; at most
//! `jwks_wait_ms`, then 401). Remote key sets (a JWKS URL, or OIDC
//! discovery naming one) are [`filter_common::remote`] documents: one
//! worker fetches, every worker parses what is shared.

mod keys;

use crate::authenticate::{authenticate, Outcome};
use crate::claims::ClaimRules;
use crate::config::{Requirement, Settings, SourceConfig};
use crate::error::Reason;
use crate::metrics::Metrics;
use crate::source;
use filter_common::cache::{fast_hasher, BoundedCache, FastHasher};
use filter_common::config::ConfigError;
use filter_common::filter::{Filter, Flow};
use filter_common::host::{Host, Level, Map};
use keys::ProviderKeys;
use std::rc::Rc;
use std::time::Duration;

/// A verified token, as cached.
struct Verified {
    provider: usize,
    /// `iss`, for refusing a cached token on a route of other providers.
    issuer: String,
    /// When the token is acceptable ([`ClaimRules::window`]).
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

/// One worker VM's auth state.
pub struct Auth {
    settings: Settings,
    keys: Vec<ProviderKeys>,
    /// Only verified tokens get in, so clients cannot fill it with keys of
    /// their choosing: the fast hasher is enough.
    cache: BoundedCache<Rc<Verified>, FastHasher>,
    metrics: Metrics,
    waiters: Vec<Waiter>,
    /// When the key sets are looked at next (ns): every second, every tick
    /// while requests wait.
    next_poll: u64,
}

/// What to do with a request.
enum Step {
    /// Let it through, with this identity (or none).
    Pass(Option<Rc<Verified>>),
    Deny(Reason),
    /// Wait for provider's keys.
    Wait(usize),
}

/// The tick while any key set is remote: the finest wait a request has;
/// the key sets are looked at every [`POLL`].
const TICK: Duration = Duration::from_millis(100);
const POLL_NS: u64 = 1_000_000_000;

impl Auth {
    /// Verifies `token` for `req`. `retry`: the keys were just refreshed
    /// for this request, so an unknown kid is final.
    fn authenticate<H: Host>(
        &mut self,
        h: &H,
        token: &str,
        req: &Requirement,
        retry: bool,
    ) -> Step {
        let now = h.now().as_secs();
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
                        Some(_) => self
                            .keys
                            .get_mut(provider)
                            .is_some_and(|k| k.refetch_now(h)),
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
    fn apply<H: Host>(
        &mut self,
        h: &H,
        step: Step,
        source: Option<usize>,
        req: &Requirement,
    ) -> bool {
        let passed = match step {
            Step::Pass(Some(v)) => {
                // Replace, not add: on a host where the removal of the
                // client's copies did nothing, only the verified value
                // goes upstream.
                for (name, value) in &v.headers {
                    h.set_header(Map::RequestHeaders, name, value);
                }
                if !req
                    .forward_token
                    .unwrap_or(self.settings.output.forward_token)
                {
                    if let Some(SourceConfig::Header { name, .. }) =
                        source.and_then(|i| self.settings.sources.get(i))
                    {
                        h.strip_request_headers(&[name]);
                    }
                }
                h.increment(self.metrics.allowed, 1);
                true
            }
            Step::Pass(None) => {
                h.increment(self.metrics.anonymous, 1);
                true
            }
            Step::Deny(r) => {
                self.metrics.reason(h, &r);
                let missing = r == Reason::Missing;
                let level = if missing { Level::Debug } else { Level::Info };
                h.log(level, &format!("auth: {} ({})", r, r.code()));
                if req.allow_failed || (missing && req.allow_missing) {
                    h.increment(self.metrics.anonymous, 1);
                    true
                } else {
                    h.increment(self.metrics.denied, 1);
                    self.unauthorized(h, &r);
                    false
                }
            }
            Step::Wait(_) => false,
        };
        self.metrics.cache.flush(h, self.cache.stats());
        passed
    }

    /// 401 with the JSON body and `WWW-Authenticate` of DESIGN.md (RFC 6750).
    fn unauthorized<H: Host>(&self, h: &H, r: &Reason) {
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
        h.reply(
            401,
            &[
                ("content-type", "application/json"),
                ("www-authenticate", &challenge),
            ],
            body.as_bytes(),
        );
    }

    /// Resumes or answers the waiters of providers whose keys changed, and
    /// those past their deadline. They were paused by their own streams'
    /// callbacks; the answer comes to the root, so each is made effective
    /// (no stream callback comes for a paused request to resume from).
    fn wake<H: Host>(&mut self, h: &H, changed: &[usize]) {
        let now = h.now_ns();
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            let ready = changed.contains(&w.provider);
            if !ready && now < w.deadline_ns {
                self.waiters.push(w);
                continue;
            }
            if h.set_effective_context(w.context_id).is_err() {
                continue; // the stream is gone
            }
            let step = if ready {
                self.authenticate(h, &w.token, &w.requirement, true)
            } else {
                let issuer = self
                    .settings
                    .providers
                    .get(w.provider)
                    .map_or(String::new(), |p| p.rules.issuer.clone());
                Step::Deny(Reason::JwksUnavailable(issuer))
            };
            if self.apply(h, step, Some(w.source), &w.requirement) {
                let _ = h.resume_request();
            }
        }
    }

    /// Polls every provider's key set: parses what changed, starts the
    /// fetches that are due. Returns the providers whose keys changed.
    fn poll<H: Host>(&mut self, h: &H) -> Vec<usize> {
        let mut changed = Vec::new();
        for (p, k) in self.keys.iter_mut().enumerate() {
            if k.sync(h, &self.settings, p) {
                changed.push(p);
            }
            k.poll(h, &self.settings, &self.metrics, p);
        }
        changed
    }
}

impl Filter for Auth {
    const NAME: &'static str = "auth";
    type Stream = ();

    fn configure<H: Host>(h: &H, config: &[u8]) -> Result<Auth, ConfigError> {
        let settings = Settings::from_json(config)?;
        let cache = BoundedCache::with_hasher(
            settings.cache_max_entries,
            settings.max_token_bytes,
            fast_hasher(),
        );
        Ok(Auth {
            keys: ProviderKeys::for_providers(&settings),
            settings,
            cache,
            metrics: Metrics::define(h),
            waiters: Vec::new(),
            next_poll: 0,
        })
    }

    fn tick_period(&self) -> Option<Duration> {
        self.keys.iter().any(ProviderKeys::remote).then_some(TICK)
    }

    fn describe(&self) -> String {
        format!("configured, {} providers", self.settings.providers.len())
    }

    fn on_tick<H: Host>(&mut self, h: &H) {
        let now = h.now_ns();
        let changed = if now >= self.next_poll || !self.waiters.is_empty() {
            self.next_poll = now.saturating_add(POLL_NS);
            self.poll(h)
        } else {
            Vec::new()
        };
        if !changed.is_empty() || !self.waiters.is_empty() {
            self.wake(h, &changed);
        }
    }

    fn on_http_call_response<H: Host>(&mut self, h: &H, token: u32, body_size: usize) {
        let mut changed = None;
        for (p, k) in self.keys.iter_mut().enumerate() {
            if let Some(c) = k.on_response(h, &self.settings, &self.metrics, p, token, body_size) {
                changed = c.then_some(p);
                break;
            }
        }
        if let Some(p) = changed {
            self.wake(h, &[p]);
        }
    }

    fn on_request_headers<H: Host>(&mut self, h: &H, _stream: &mut (), id: u32) -> Flow {
        let headers = h.request_headers();
        // Nothing downstream may see identity headers a client sent.
        let o = &self.settings.output;
        let own = [
            &o.subject_header,
            &o.issuer_header,
            &o.tenant_header,
            &o.roles_header,
            &o.claims_header,
            &o.expires_header,
        ];
        let spoofed: Vec<&str> = headers
            .names()
            .filter(|name| {
                name.starts_with("x-auth-") || own.iter().any(|n| !n.is_empty() && n == name)
            })
            .collect();
        h.strip_request_headers(&spoofed);
        let method = headers.text(":method").unwrap_or("");
        let full = headers.text(":path").unwrap_or("/");
        let (path, query) = match full.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (full, None),
        };
        let req = self.settings.requirement(method, path).clone();
        if req.bypass {
            h.increment(self.metrics.bypassed, 1);
            return Flow::Continue;
        }
        let found = source::find(
            &self.settings.sources,
            |n| headers.text(n).map(str::to_string),
            query,
        );
        let (token, src) = match found {
            Ok(Some(f)) => (f.token, f.source),
            Ok(None) => return self.flow(h, Step::Deny(Reason::Missing), None, &req),
            Err(r) => return self.flow(h, Step::Deny(r), None, &req),
        };
        match self.authenticate(h, &token, &req, false) {
            Step::Wait(p) => {
                h.increment(self.metrics.waited, 1);
                let wait_ns = self.settings.jwks_wait_ms.saturating_mul(1_000_000);
                self.waiters.push(Waiter {
                    context_id: id,
                    token,
                    source: src,
                    requirement: req,
                    provider: p,
                    deadline_ns: h.now_ns().saturating_add(wait_ns),
                });
                Flow::Pause
            }
            step => self.flow(h, step, Some(src), &req),
        }
    }

    fn on_log<H: Host>(&mut self, _h: &H, _stream: &mut (), id: u32) {
        // A client that went away while waiting is no longer waited for.
        self.waiters.retain(|w| w.context_id != id);
    }
}

impl Auth {
    fn flow<H: Host>(
        &mut self,
        h: &H,
        step: Step,
        source: Option<usize>,
        req: &Requirement,
    ) -> Flow {
        if self.apply(h, step, source, req) {
            Flow::Continue
        } else {
            Flow::Pause
        }
    }
}
