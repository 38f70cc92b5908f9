//! The ratelimit filter, third in the chain (local mode): every policy
//! that matches a request counts it in a GCRA bucket kept in shared data
//! and updated with compare-and-swap, so a limit holds exactly across all
//! worker VMs; a refused request gets 429 with DESIGN.md's body,
//! `Retry-After`, `RateLimit-Policy`/`RateLimit` and the `X-RateLimit-*`
//! trio. Buckets live in a bounded slot table (see `ratelimit_core::slots`).

use filter_shell as host;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::BufferType;
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use ratelimit_core::config::{client_ip, GlobalConfig, OnError, Policy, RequestView, Settings};
use ratelimit_core::fields::{body, fields};
use ratelimit_core::gcra::Outcome;
use ratelimit_core::rls;
use ratelimit_core::slots::{Admission, SlotStats, Store, Table};
use std::hash::Hasher;
use std::rc::Rc;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("ratelimit: panic: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// Shared data through the host.
struct Shared;

impl Store for Shared {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        host::shared_get(key)
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        host::shared_set(key, value, cas)
    }
}

struct Metrics {
    allowed: Option<u32>,
    limited: Option<u32>,
    shadow_limited: Option<u32>,
    cas_retries: Option<u32>,
    recycled: Option<u32>,
    fail_open: Option<u32>,
    fail_closed: Option<u32>,
    /// Per policy: (allowed, limited).
    per_policy: Vec<(Option<u32>, Option<u32>)>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("ratelimit.{name}"))
}

struct Config {
    settings: Settings,
    table: Table,
    metrics: Metrics,
}

#[derive(Default)]
struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = host::plugin_configuration() else {
            host::log(LogLevel::Error, "ratelimit: configuration: missing");
            return false;
        };
        let settings = match Settings::from_json(&bytes) {
            Ok(s) => s,
            Err(e) => {
                host::log(LogLevel::Error, &format!("ratelimit: {e}"));
                return false;
            }
        };
        // The slot hash's seed: configured, or derived from the
        // configuration (the same on every worker, unknown to clients).
        let seed = settings.hash_seed.unwrap_or_else(|| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(&bytes);
            h.finish()
        });
        let table = Table {
            prefix: "254carbon.ratelimit|".into(),
            slots: settings.slots,
            max_cas_retries: settings.max_cas_retries,
            seed: (seed, seed.rotate_left(17) ^ 0x5bd1_e995),
        };
        let metrics = Metrics {
            allowed: counter("allowed"),
            limited: counter("limited"),
            shadow_limited: counter("shadow_limited"),
            cas_retries: counter("cas_retries"),
            recycled: counter("slots_recycled"),
            fail_open: counter("fail_open"),
            fail_closed: counter("fail_closed"),
            per_policy: settings
                .policies
                .iter()
                .map(|p| {
                    (
                        counter(&format!("policy.{}.allowed", p.id)),
                        counter(&format!("policy.{}.limited", p.id)),
                    )
                })
                .collect(),
        };
        host::log(
            LogLevel::Info,
            &format!(
                "ratelimit: configured, {} policies, {} slots",
                settings.policies.len(),
                settings.slots
            ),
        );
        self.config = Some(Rc::new(Config {
            settings,
            table,
            metrics,
        }));
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            response_fields: Vec::new(),
            pending: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Option<Rc<Config>>,
    /// Fields to add to an allowed response (`headers_on_allowed`).
    response_fields: Vec<(String, String)>,
    /// Global mode: the call in flight, and the policies of its descriptors.
    pending: Option<(u32, Vec<usize>)>,
}

impl Context for Stream {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let Some((t, policies)) = self.pending.take() else {
            return;
        };
        let Some(c) = self.config.clone() else {
            return;
        };
        if t != token {
            return;
        }
        let m = &c.metrics;
        let s = &c.settings;
        let message = (status == 0)
            .then(|| {
                hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                    .ok()
                    .flatten()
            })
            .flatten()
            .unwrap_or_default();
        let resp = match (status, rls::Response::decode(&message)) {
            (0, Ok(r)) if r.overall != rls::Code::Unknown => r,
            (code, decoded) => {
                let why = match decoded {
                    Err(e) => e,
                    Ok(_) if code != 0 => format!("gRPC status {code}"),
                    Ok(_) => "no overall code".into(),
                };
                host::log(
                    LogLevel::Warn,
                    &format!("ratelimit: rate limit service: {why}"),
                );
                if s.on_error == OnError::Deny {
                    host::increment(m.fail_closed, 1);
                    host::send_json(503, &[], r#"{"error":"rate_limit_unavailable"}"#);
                } else {
                    host::increment(m.fail_open, 1);
                    host::increment(m.allowed, 1);
                    host::resume_request();
                }
                return;
            }
        };
        // Decide on the enforced policies' statuses; shadow ones only count.
        let mut refusal: Option<(usize, &rls::Status)> = None;
        let mut closest: Option<(usize, &rls::Status)> = None;
        for (pos, &i) in policies.iter().enumerate() {
            let (Some(p), Some(st)) = (s.policies.get(i), resp.statuses.get(pos)) else {
                continue;
            };
            let (allowed_m, limited_m) = m.per_policy.get(i).copied().unwrap_or((None, None));
            if st.code != rls::Code::OverLimit {
                host::increment(allowed_m, 1);
                if !p.shadow
                    && st.limit.is_some()
                    && closest.is_none_or(|(_, c)| st.remaining < c.remaining)
                {
                    closest = Some((i, st));
                }
            } else if p.shadow {
                host::increment(m.shadow_limited, 1);
                host::increment(limited_m, 1);
            } else {
                host::increment(limited_m, 1);
                if refusal.is_none_or(|(_, r)| st.reset_ns > r.reset_ns) {
                    refusal = Some((i, st));
                }
            }
        }
        if refusal.is_none() && resp.statuses.is_empty() && resp.overall == rls::Code::OverLimit {
            refusal = policies.first().map(|&i| (i, &NO_STATUS));
        }
        match refusal {
            Some((i, st)) => {
                host::increment(m.limited, 1);
                let (limit, window) = st.limit.as_ref().map_or((0, 0), |(n, unit, _)| {
                    (u64::from(*n), rls::unit_seconds(*unit))
                });
                let o = Outcome {
                    allowed: false,
                    remaining: u64::from(st.remaining),
                    reset_ns: st.reset_ns,
                    retry_after_ns: st.reset_ns,
                };
                let mut extra = vec![("content-type".to_string(), "application/json".to_string())];
                if let Some(p) = s.policies.get(i) {
                    extra.extend(global_fields(p, limit, window, &o));
                }
                extra.extend(resp.response_headers.iter().cloned());
                let pairs: Vec<(&str, &str)> = extra
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                host::send_reply(429, &pairs, body(&o).as_bytes());
            }
            None => {
                host::increment(m.allowed, 1);
                if s.headers_on_allowed {
                    if let Some((i, st)) = closest {
                        let (limit, window) = st.limit.as_ref().map_or((0, 0), |(n, unit, _)| {
                            (u64::from(*n), rls::unit_seconds(*unit))
                        });
                        let o = Outcome {
                            allowed: true,
                            remaining: u64::from(st.remaining),
                            reset_ns: st.reset_ns,
                            retry_after_ns: 0,
                        };
                        if let Some(p) = s.policies.get(i) {
                            self.response_fields = global_fields(p, limit, window, &o);
                        }
                    }
                }
                host::resume_request();
            }
        }
    }
}

const NO_STATUS: rls::Status = rls::Status {
    code: rls::Code::OverLimit,
    limit: None,
    remaining: 0,
    reset_ns: 1_000_000_000,
};

/// The response fields of a refusal by the service: its limit when it
/// says one, the policy's otherwise.
fn global_fields(p: &Policy, limit: u64, window: u64, o: &Outcome) -> Vec<(String, String)> {
    fields(p, o)
        .into_iter()
        .map(|(k, v)| {
            let v = match (k, limit, window) {
                ("ratelimit-policy", l, w) if l > 0 && w > 0 => format!("\"{}\";q={l};w={w}", p.id),
                ("x-ratelimit-limit", l, _) if l > 0 => l.to_string(),
                _ => v,
            };
            (k.to_string(), v)
        })
        .collect()
}

impl Stream {
    /// Global mode: one `ShouldRateLimit` call with a descriptor per
    /// matching policy; the request waits for the answer.
    fn ask_service(
        &mut self,
        c: &Config,
        g: &GlobalConfig,
        view: &RequestView<'_>,
        headers: &host::RequestHeaders,
    ) -> Action {
        let s = &c.settings;
        let mut policies = Vec::new();
        let mut descriptors = Vec::new();
        for (i, p) in s.policies.iter().enumerate() {
            if p.matches(view) {
                policies.push(i);
                descriptors.push(
                    p.descriptor(view, |h| headers.get(h).ok().flatten().map(str::to_string)),
                );
            }
        }
        if descriptors.is_empty() {
            host::increment(c.metrics.allowed, 1);
            return Action::Continue;
        }
        let req = rls::Request {
            domain: g.domain.clone(),
            descriptors,
            hits_addend: 0,
        };
        let msg = req.encode();
        match hostcalls::dispatch_grpc_call(
            &g.cluster,
            rls::SERVICE,
            rls::METHOD,
            vec![],
            Some(&msg),
            std::time::Duration::from_millis(g.timeout_ms),
        ) {
            Ok(token) => {
                self.pending = Some((token, policies));
                Action::Pause
            }
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    &format!("ratelimit: cannot call {:?}: {e:?}", g.cluster),
                );
                if s.on_error == OnError::Deny {
                    host::increment(c.metrics.fail_closed, 1);
                    host::send_json(503, &[], r#"{"error":"rate_limit_unavailable"}"#);
                    Action::Pause
                } else {
                    host::increment(c.metrics.fail_open, 1);
                    host::increment(c.metrics.allowed, 1);
                    Action::Continue
                }
            }
        }
    }
}

fn source_address() -> Option<String> {
    hostcalls::get_property(vec!["source", "address"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(c) = self.config.clone() else {
            return Action::Continue;
        };
        let s = &c.settings;
        let m = &c.metrics;
        let headers = host::RequestHeaders::read();
        let get = |n: &str| headers.get(n).ok().flatten();
        let source = source_address();
        let view = RequestView {
            method: get(":method").unwrap_or(""),
            path: get(":path").unwrap_or("/").split('?').next().unwrap_or("/"),
            subject: get(&s.identity_headers.subject),
            tenant: get(&s.identity_headers.tenant),
            roles: get(&s.identity_headers.roles),
            client_ip: source.as_deref().map(client_ip),
        };
        if let Some(g) = &s.global {
            return self.ask_service(&c, g, &view, &headers);
        }
        let now = u64::try_from(host::now().as_nanos()).unwrap_or(u64::MAX);
        let mut stats = SlotStats::default();
        // The refusal to report (longest wait), and the outcome closest to
        // its limit (for fields on allowed responses).
        let mut refusal: Option<(usize, Outcome)> = None;
        let mut closest: Option<(usize, Outcome)> = None;
        for (i, p) in s.policies.iter().enumerate() {
            if !p.matches(&view) {
                continue;
            }
            let key = p.key(&view, |h| get(h).map(str::to_string));
            let (allowed_m, limited_m) = m.per_policy.get(i).copied().unwrap_or((None, None));
            let outcome = match c.table.admit(&mut Shared, &key, &p.rate, now, &mut stats) {
                Admission::Done(o) => o,
                other => {
                    host::log(
                        LogLevel::Warn,
                        &format!("ratelimit: policy {}: {other:?}", p.id),
                    );
                    if s.on_error == OnError::Deny && !p.shadow {
                        host::increment(m.fail_closed, 1);
                        Outcome {
                            allowed: false,
                            remaining: 0,
                            reset_ns: 1_000_000_000,
                            retry_after_ns: 1_000_000_000,
                        }
                    } else {
                        host::increment(m.fail_open, 1);
                        continue;
                    }
                }
            };
            if outcome.allowed {
                host::increment(allowed_m, 1);
                if closest.is_none_or(|(_, o)| outcome.remaining < o.remaining) {
                    closest = Some((i, outcome));
                }
            } else if p.shadow {
                host::increment(m.shadow_limited, 1);
                host::increment(limited_m, 1);
                host::log(
                    LogLevel::Info,
                    &format!("ratelimit: shadow limit {} for {key}", p.id),
                );
            } else {
                host::increment(limited_m, 1);
                if refusal.is_none_or(|(_, o)| outcome.retry_after_ns > o.retry_after_ns) {
                    refusal = Some((i, outcome));
                }
            }
        }
        host::increment(m.cas_retries, stats.cas_retries);
        host::increment(m.recycled, stats.recycled);
        if let Some((i, o)) = refusal {
            host::increment(m.limited, 1);
            let mut extra = vec![("content-type", "application/json".to_string())];
            if let Some(p) = s.policies.get(i) {
                extra.extend(fields(p, &o));
            }
            let pairs: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            host::send_reply(429, &pairs, body(&o).as_bytes());
            return Action::Pause;
        }
        host::increment(m.allowed, 1);
        if s.headers_on_allowed {
            if let Some((i, o)) = closest {
                if let Some(p) = s.policies.get(i) {
                    self.response_fields = fields(p, &o)
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in &self.response_fields {
            let _ = hostcalls::set_map_value(
                proxy_wasm::types::MapType::HttpResponseHeaders,
                k,
                Some(v),
            );
        }
        Action::Continue
    }
}
