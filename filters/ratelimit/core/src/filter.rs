//! The ratelimit filter as a [`Filter`], third in the chain. Every policy
//! that matches a request is counted — locally in a GCRA bucket kept in
//! shared data and updated with compare-and-swap ([`crate::slots`]), so a
//! limit holds exactly across all worker VMs; or globally by an Envoy Rate
//! Limit Service (one `ShouldRateLimit` call with a descriptor per
//! matching policy, the request waiting for the answer). Both modes end in
//! one [`Fold`]: a refused request gets 429 with DESIGN.md's body,
//! `Retry-After`, `RateLimit-Policy`/`RateLimit` and the `X-RateLimit-*`
//! trio; an allowed one optionally carries the fields of the policy
//! closest to its limit.

use crate::config::{client_ip, GlobalConfig, OnError, Policy, RequestView, Settings};
use crate::fields::{body, fields};
use crate::gcra::Outcome;
use crate::metrics::Metrics;
use crate::rls;
use crate::slots::{Admission, SlotStats, Store, Table};
use filter_common::config::ConfigError;
use filter_common::filter::{Filter, Flow};
use filter_common::host::{HeaderPairs, Host, Level, Map};
use std::hash::Hasher;
use std::time::Duration;

/// Shared data through the host.
struct Shared<'h, H>(&'h H);

impl<H: Host> Store for Shared<'_, H> {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.0.shared(key) {
            Some((v, cas)) => (Some(v), Some(cas)),
            None => (None, None),
        }
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.0.shared_cas(key, value, cas.unwrap_or(0))
    }
}

/// One worker VM's ratelimit state.
pub struct RateLimit {
    settings: Settings,
    table: Table,
    metrics: Metrics,
}

/// Per stream: the fields for an allowed response, and (global mode) the
/// call in flight with the policies of its descriptors.
#[derive(Default)]
pub struct Stream {
    response_fields: Vec<(String, String)>,
    pending: Option<(u32, Vec<usize>)>,
}

/// One matching policy's count, in either mode.
struct Counted {
    policy: usize,
    outcome: Outcome,
    /// The limit as the service reported it (requests, window seconds);
    /// `None`: the policy's own.
    limit: Option<(u64, u64)>,
    /// Whether it may supply the fields of an allowed response.
    reports: bool,
    /// The bucket key (local mode), for the log.
    key: Option<String>,
}

/// The verdict over every matching policy: the refusal with the longest
/// wait (enforced policies only: shadow ones count and log), and the
/// allowed outcome closest to its limit.
#[derive(Default)]
struct Fold {
    refusal: Option<Counted>,
    closest: Option<Counted>,
}

impl RateLimit {
    fn fold<H: Host>(&self, h: &H, counted: impl IntoIterator<Item = Counted>) -> Fold {
        let m = &self.metrics;
        let mut f = Fold::default();
        for c in counted {
            let Some(p) = self.settings.policies.get(c.policy) else {
                continue;
            };
            let (allowed_m, limited_m) = m.policy(c.policy);
            if c.outcome.allowed {
                h.increment(allowed_m, 1);
                if c.reports
                    && !p.shadow
                    && f.closest
                        .as_ref()
                        .is_none_or(|o| c.outcome.remaining < o.outcome.remaining)
                {
                    f.closest = Some(c);
                }
            } else if p.shadow {
                h.increment(m.shadow_limited, 1);
                h.increment(limited_m, 1);
                let key = c
                    .key
                    .as_deref()
                    .map(|k| format!(" for {k}"))
                    .unwrap_or_default();
                h.log(
                    Level::Info,
                    &format!("ratelimit: shadow limit {}{key}", p.id),
                );
            } else {
                h.increment(limited_m, 1);
                if f.refusal
                    .as_ref()
                    .is_none_or(|r| c.outcome.retry_after_ns > r.outcome.retry_after_ns)
                {
                    f.refusal = Some(c);
                }
            }
        }
        f
    }

    /// The fields of a policy's outcome, with the service's limit if it
    /// reported one.
    fn fields(p: &Policy, c: &Counted) -> Vec<(String, String)> {
        fields(p, &c.outcome)
            .into_iter()
            .map(|(k, v)| {
                let v = match (k, c.limit) {
                    ("ratelimit-policy", Some((l, w))) if l > 0 && w > 0 => {
                        format!("\"{}\";q={l};w={w}", p.id)
                    }
                    ("x-ratelimit-limit", Some((l, _))) if l > 0 => l.to_string(),
                    _ => v,
                };
                (k.to_string(), v)
            })
            .collect()
    }

    /// Answers 429 or lets the request through (keeping the fields for
    /// its response); `extra` headers go on a 429.
    fn decide<H: Host>(
        &self,
        h: &H,
        stream: &mut Stream,
        fold: Fold,
        extra: &[(String, String)],
    ) -> Flow {
        let policy = |c: &Counted| self.settings.policies.get(c.policy);
        if let Some(r) = fold.refusal {
            h.increment(self.metrics.limited, 1);
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            if let Some(p) = policy(&r) {
                headers.extend(Self::fields(p, &r));
            }
            headers.extend(extra.iter().cloned());
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            h.reply(429, &pairs, body(&r.outcome).as_bytes());
            return Flow::Pause;
        }
        h.increment(self.metrics.allowed, 1);
        if self.settings.headers_on_allowed {
            if let Some((p, c)) = fold.closest.as_ref().and_then(|c| Some((policy(c)?, c))) {
                stream.response_fields = Self::fields(p, c);
            }
        }
        Flow::Continue
    }

    /// The counting backend failed: `on_error` decides.
    fn unavailable<H: Host>(&self, h: &H, why: &str) -> Flow {
        h.log(Level::Warn, &format!("ratelimit: {why}"));
        if self.settings.on_error == OnError::Deny {
            h.increment(self.metrics.fail_closed, 1);
            h.reply_json(503, &[], r#"{"error":"rate_limit_unavailable"}"#);
            Flow::Pause
        } else {
            h.increment(self.metrics.fail_open, 1);
            h.increment(self.metrics.allowed, 1);
            Flow::Continue
        }
    }

    fn local<H: Host>(
        &self,
        h: &H,
        stream: &mut Stream,
        view: &RequestView<'_>,
        headers: &HeaderPairs,
    ) -> Flow {
        let s = &self.settings;
        let now = h.now_ns();
        let mut stats = SlotStats::default();
        let mut counted = Vec::new();
        for (i, p) in s.policies.iter().enumerate() {
            if !p.matches(view) {
                continue;
            }
            let key = p.key(view, |n| headers.text(n).map(str::to_string));
            let outcome = match self
                .table
                .admit(&mut Shared(h), &key, &p.rate, now, &mut stats)
            {
                Admission::Done(o) => o,
                other => {
                    h.log(
                        Level::Warn,
                        &format!("ratelimit: policy {}: {other:?}", p.id),
                    );
                    if s.on_error == OnError::Deny && !p.shadow {
                        h.increment(self.metrics.fail_closed, 1);
                        Outcome {
                            allowed: false,
                            remaining: 0,
                            reset_ns: 1_000_000_000,
                            retry_after_ns: 1_000_000_000,
                        }
                    } else {
                        h.increment(self.metrics.fail_open, 1);
                        continue;
                    }
                }
            };
            counted.push(Counted {
                policy: i,
                outcome,
                limit: None,
                reports: true,
                key: Some(key),
            });
        }
        h.increment(self.metrics.cas_retries, stats.cas_retries);
        h.increment(self.metrics.recycled, stats.recycled);
        let fold = self.fold(h, counted);
        self.decide(h, stream, fold, &[])
    }

    fn ask_service<H: Host>(
        &self,
        h: &H,
        stream: &mut Stream,
        g: &GlobalConfig,
        view: &RequestView<'_>,
        headers: &HeaderPairs,
    ) -> Flow {
        let mut policies = Vec::new();
        let mut descriptors = Vec::new();
        for (i, p) in self.settings.policies.iter().enumerate() {
            if p.matches(view) {
                policies.push(i);
                descriptors.push(p.descriptor(view, |n| headers.text(n).map(str::to_string)));
            }
        }
        if descriptors.is_empty() {
            h.increment(self.metrics.allowed, 1);
            return Flow::Continue;
        }
        let req = rls::Request {
            domain: g.domain.clone(),
            descriptors,
            hits_addend: 0,
        };
        let timeout = Duration::from_millis(g.timeout_ms);
        match h.grpc_call(
            &g.cluster,
            rls::SERVICE,
            rls::METHOD,
            &req.encode(),
            timeout,
        ) {
            Ok(token) => {
                stream.pending = Some((token, policies));
                Flow::Pause
            }
            Err(e) => self.unavailable(h, &format!("cannot call {:?}: {e}", g.cluster)),
        }
    }
}

fn outcome_of(st: &rls::Status, allowed: bool) -> Outcome {
    Outcome {
        allowed,
        remaining: u64::from(st.remaining),
        reset_ns: st.reset_ns,
        retry_after_ns: if allowed { 0 } else { st.reset_ns },
    }
}

/// A refusal by the service that named no policy status.
const NO_STATUS: rls::Status = rls::Status {
    code: rls::Code::OverLimit,
    limit: None,
    remaining: 0,
    reset_ns: 1_000_000_000,
};

impl Filter for RateLimit {
    const NAME: &'static str = "ratelimit";
    type Stream = Stream;

    fn configure<H: Host>(h: &H, config: &[u8]) -> Result<RateLimit, ConfigError> {
        let settings = Settings::from_json(config)?;
        // The slot hash's seed: configured, or derived from the
        // configuration (the same on every worker, unknown to clients).
        let seed = settings.hash_seed.unwrap_or_else(|| {
            let mut hs = std::collections::hash_map::DefaultHasher::new();
            hs.write(config);
            hs.finish()
        });
        let table = Table {
            prefix: "254carbon.ratelimit|".into(),
            slots: settings.slots,
            max_cas_retries: settings.max_cas_retries,
            seed: (seed, seed.rotate_left(17) ^ 0x5bd1_e995),
        };
        let metrics = Metrics::define(h, &settings.policies);
        Ok(RateLimit {
            settings,
            table,
            metrics,
        })
    }

    fn describe(&self) -> String {
        format!(
            "configured, {} policies, {} slots",
            self.settings.policies.len(),
            self.settings.slots
        )
    }

    fn unconfigured<H: Host>(_h: &H) -> Flow {
        Flow::Continue
    }

    fn on_request_headers<H: Host>(&mut self, h: &H, stream: &mut Stream, _id: u32) -> Flow {
        let s = &self.settings;
        let headers = h.request_headers();
        let source = h.text_property(&["source", "address"]);
        let ids = &s.identity_headers;
        let view = RequestView {
            method: headers.text(":method").unwrap_or(""),
            path: headers
                .text(":path")
                .unwrap_or("/")
                .split('?')
                .next()
                .unwrap_or("/"),
            subject: headers.text(&ids.subject),
            tenant: headers.text(&ids.tenant),
            roles: headers.text(&ids.roles),
            client_ip: source.as_deref().map(client_ip),
        };
        match &s.global {
            Some(g) => self.ask_service(h, stream, g, &view, &headers),
            None => self.local(h, stream, &view, &headers),
        }
    }

    fn on_grpc_call_response<H: Host>(
        &mut self,
        h: &H,
        stream: &mut Stream,
        token: u32,
        status: u32,
        size: usize,
    ) {
        let policies = match stream.pending.take() {
            Some((t, p)) if t == token => p,
            other => {
                stream.pending = other;
                return;
            }
        };
        let message = if status == 0 {
            h.grpc_response(size)
        } else {
            Vec::new()
        };
        let resp = match (status, rls::Response::decode(&message)) {
            (0, Ok(r)) if r.overall != rls::Code::Unknown => r,
            (code, decoded) => {
                let why = match decoded {
                    Err(e) => e,
                    Ok(_) if code != 0 => format!("gRPC status {code}"),
                    Ok(_) => "no overall code".into(),
                };
                if self.unavailable(h, &format!("rate limit service: {why}")) == Flow::Continue {
                    let _ = h.resume_request();
                }
                return;
            }
        };
        let counted = policies.iter().zip(&resp.statuses).map(|(&i, st)| {
            let allowed = st.code != rls::Code::OverLimit;
            let limit = st
                .limit
                .as_ref()
                .map(|(n, unit, _)| (u64::from(*n), rls::unit_seconds(*unit)));
            Counted {
                policy: i,
                outcome: outcome_of(st, allowed),
                reports: limit.is_some(),
                limit: limit.or(Some((0, 0))),
                key: None,
            }
        });
        let mut fold = self.fold(h, counted.collect::<Vec<_>>());
        // Over the limit without a status per descriptor: the first policy.
        if fold.refusal.is_none()
            && resp.statuses.is_empty()
            && resp.overall == rls::Code::OverLimit
        {
            fold.refusal = policies.first().map(|&i| Counted {
                policy: i,
                outcome: outcome_of(&NO_STATUS, false),
                limit: Some((0, 0)),
                reports: false,
                key: None,
            });
        }
        if self.decide(h, stream, fold, &resp.response_headers) == Flow::Continue {
            let _ = h.resume_request();
        }
    }

    fn on_response_headers<H: Host>(&mut self, h: &H, stream: &mut Stream) -> Flow {
        for (k, v) in &stream.response_fields {
            h.set_header(Map::ResponseHeaders, k, v);
        }
        Flow::Continue
    }
}

#[cfg(test)]
#[path = "filter/tests.rs"]
mod tests;
