//! The Envoy Rate Limit Service (`envoy.service.ratelimit.v3.RateLimitService`)
//! served with tonic (gRPC over HTTP/2, h2c), with `grpc.health.v1`, and
//! counting in Redis ([`store`]) so that every Envoy and every sidecar
//! replica shares the limits.
//!
//! A descriptor's limit is its `limit` override when it has one (what our
//! ratelimit filter sends), else what the configuration files say for its
//! entries ([`limits`], envoyproxy/ratelimit's format), so a stock Envoy
//! `rate_limits` configuration or Kuadrant's wasm-shim works unchanged.
//!
//! Algorithm: GCRA, the same as the filter's local mode, in one Lua script
//! per descriptor: atomic in Redis, one round trip, one key per bucket
//! (one Cluster slot). Chosen over envoyproxy/ratelimit's fixed windows
//! because a fixed window admits up to twice the limit across a window
//! boundary, and so that a policy means the same in local and global mode.
//! Redis errors and deadlines answer `UNAVAILABLE` (14), so the caller's
//! failure mode decides (the filter's `on_error`, Envoy's
//! `failure_mode_deny`).

pub mod limits;
pub mod store;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit as PbUnit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limits::{Limit, Limits, Unit};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use store::{Hit, Store, StoreError};
use tokio::net::TcpListener;

/// The gRPC method's path.
pub const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// The names `grpc.health.v1` answers for ("" is the server as a whole).
pub const HEALTH_NAMES: [&str; 3] = [
    "",
    "ratelimit",
    "envoy.service.ratelimit.v3.RateLimitService",
];

/// Which rate limit headers the service asks Envoy to add to responses
/// (`response_headers_to_add`), from the descriptor closest to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ResponseHeaders {
    /// None (envoyproxy/ratelimit's default).
    #[default]
    None,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (the
    /// IETF draft's fields, as envoyproxy/ratelimit's
    /// `LIMIT_RESPONSE_HEADERS_ENABLED` sends them).
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    XRatelimit,
    /// Both sets.
    Both,
}

/// How the service decides.
#[derive(Debug, Clone)]
pub struct Options {
    pub response_headers: ResponseHeaders,
    /// A hit that leaves less than this share of the limit counts as
    /// `near_limit` (envoyproxy/ratelimit: 0.8).
    pub near_limit_ratio: f64,
    /// Distinct descriptor and domain labels in the metrics; beyond, they
    /// count under `_other` (and `sidecar_rls_label_overflow`).
    pub max_metric_labels: usize,
    /// Largest request message.
    pub max_message_bytes: usize,
    /// Concurrent calls per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// How long shutdown waits for calls in flight (after GOAWAY).
    pub drain: Duration,
    /// How often Redis is pinged for the health status.
    pub health_interval: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            response_headers: ResponseHeaders::None,
            near_limit_ratio: 0.8,
            max_metric_labels: 1000,
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 1024,
            drain: Duration::from_secs(5),
            health_interval: Duration::from_secs(1),
        }
    }
}

/// Counters of one descriptor key (envoyproxy/ratelimit's
/// `ratelimit.service.rate_limit.<domain>.<key>.*`).
#[derive(Clone, Default)]
struct KeyStats {
    total_hits: Counter,
    over_limit: Counter,
    near_limit: Counter,
    within_limit: Counter,
    shadow_mode: Counter,
}

type Labels = Vec<(String, String)>;

/// The service's metrics (`sidecar_rls_*`).
#[derive(Clone)]
pub struct Metrics {
    calls: Family<Labels, Counter>,
    total_hits: Family<Labels, Counter>,
    over_limit: Family<Labels, Counter>,
    near_limit: Family<Labels, Counter>,
    within_limit: Family<Labels, Counter>,
    shadow_mode: Family<Labels, Counter>,
    domain_not_found: Counter,
    redis_errors: Family<Labels, Counter>,
    redis_seconds: Histogram,
    redis_up: Gauge,
    in_flight: Gauge,
    config_load_success: Counter,
    config_load_error: Counter,
    config_descriptors: Gauge,
    label_overflow: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            calls: Family::default(),
            total_hits: Family::default(),
            over_limit: Family::default(),
            near_limit: Family::default(),
            within_limit: Family::default(),
            shadow_mode: Family::default(),
            domain_not_found: Counter::default(),
            redis_errors: Family::default(),
            redis_seconds: Histogram::new([
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
            ]),
            redis_up: Gauge::default(),
            in_flight: Gauge::default(),
            config_load_success: Counter::default(),
            config_load_error: Counter::default(),
            config_descriptors: Gauge::default(),
            label_overflow: Counter::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sidecar_rls");
        r.register(
            "calls",
            "ShouldRateLimit calls, by domain and code (the answer): ok, over_limit, unavailable (Redis failed or \
             the deadline passed), invalid (a request that cannot be answered)",
            self.calls.clone(),
        );
        r.register(
            "total_hits",
            "Hits on limited descriptors, by key (domain.key_value…, as envoyproxy/ratelimit's stats)",
            self.total_hits.clone(),
        );
        r.register(
            "over_limit",
            "Hits over the limit, by key",
            self.over_limit.clone(),
        );
        r.register(
            "near_limit",
            "Hits admitted that left less than 1 - near-limit-ratio of the limit, by key",
            self.near_limit.clone(),
        );
        r.register(
            "within_limit",
            "Hits admitted, by key",
            self.within_limit.clone(),
        );
        r.register(
            "shadow_mode",
            "Hits over the limit of a shadow_mode descriptor (answered OK), by key",
            self.shadow_mode.clone(),
        );
        r.register(
            "domain_not_found",
            "Descriptors of a domain no configuration file defines (answered OK)",
            self.domain_not_found.clone(),
        );
        r.register(
            "redis_errors",
            "Failed Redis calls, by kind: error, not_connected, timeout, deadline, bad_reply, queue_full",
            self.redis_errors.clone(),
        );
        r.register(
            "redis_seconds",
            "Time the Redis round trips of one call took",
            self.redis_seconds.clone(),
        );
        r.register(
            "redis_up",
            "1 while Redis answers the health check's PING",
            self.redis_up.clone(),
        );
        r.register("in_flight", "Calls being answered", self.in_flight.clone());
        r.register(
            "config_load_success",
            "Configuration loads put in force",
            self.config_load_success.clone(),
        );
        r.register(
            "config_load_error",
            "Configuration loads refused (the last good one stays)",
            self.config_load_error.clone(),
        );
        r.register(
            "config_descriptors",
            "Descriptors in the configuration in force",
            self.config_descriptors.clone(),
        );
        r.register(
            "label_overflow",
            "Calls counted under the label _other: more distinct domains or keys than \
             --rls-max-metric-labels",
            self.label_overflow.clone(),
        );
    }
}

/// The answer of one descriptor before it becomes a `DescriptorStatus`.
struct Decided {
    code: Code,
    limit: Option<(u32, Unit, String)>,
    remaining: u32,
    reset: Option<Duration>,
}

impl Decided {
    fn ok() -> Decided {
        Decided {
            code: Code::Ok,
            limit: None,
            remaining: 0,
            reset: None,
        }
    }
}

/// What a descriptor is limited by.
enum Plan<'a> {
    Free,
    Limited {
        limit: std::borrow::Cow<'a, Limit>,
        hits: i64,
    },
}

/// The rate limit service.
pub struct Service {
    store: Store,
    limits: RwLock<Arc<Limits>>,
    opts: Options,
    metrics: Metrics,
    labels: Mutex<HashMap<String, KeyStats>>,
    /// A domain's `calls` counters: ok, over_limit, unavailable, invalid.
    domains: Mutex<HashMap<String, [Counter; 4]>>,
}

/// The `code` label of `sidecar_rls_calls_total`.
const CALL_CODES: [&str; 4] = ["ok", "over_limit", "unavailable", "invalid"];

/// A failed call: the gRPC status it answers.
pub type CallError = tonic::Status;

fn unit_of(n: i32) -> Option<Unit> {
    Unit::from_proto(n)
}

fn pb_unit(u: Unit) -> i32 {
    match u {
        Unit::Second => PbUnit::Second as i32,
        Unit::Minute => PbUnit::Minute as i32,
        Unit::Hour => PbUnit::Hour as i32,
        Unit::Day => PbUnit::Day as i32,
        Unit::Week => PbUnit::Week as i32,
        Unit::Month => PbUnit::Month as i32,
        Unit::Year => PbUnit::Year as i32,
    }
}

/// `grpc-timeout` (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Service {
    pub fn new(store: Store, limits: Limits, opts: Options, metrics: Metrics) -> Service {
        metrics
            .config_descriptors
            .set(i64::try_from(limits.descriptor_count()).unwrap_or(i64::MAX));
        Service {
            store,
            limits: RwLock::new(Arc::new(limits)),
            opts,
            metrics,
            labels: Mutex::new(HashMap::new()),
            domains: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a configuration in force (counted as a successful load).
    pub fn set_limits(&self, limits: Limits) {
        self.metrics
            .config_descriptors
            .set(i64::try_from(limits.descriptor_count()).unwrap_or(i64::MAX));
        self.metrics.config_load_success.inc();
        *self
            .limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(limits);
    }

    /// Counts a refused configuration load.
    pub fn refused_limits(&self) {
        self.metrics.config_load_error.inc();
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn key_stats(&self, key: &str) -> KeyStats {
        let mut labels = lock(&self.labels);
        if let Some(s) = labels.get(key) {
            return s.clone();
        }
        let label = if labels.len() < self.opts.max_metric_labels {
            key
        } else {
            self.metrics.label_overflow.inc();
            "_other"
        };
        let l = vec![("key".to_string(), label.to_string())];
        let s = KeyStats {
            total_hits: self.metrics.total_hits.get_or_create(&l).clone(),
            over_limit: self.metrics.over_limit.get_or_create(&l).clone(),
            near_limit: self.metrics.near_limit.get_or_create(&l).clone(),
            within_limit: self.metrics.within_limit.get_or_create(&l).clone(),
            shadow_mode: self.metrics.shadow_mode.get_or_create(&l).clone(),
        };
        if label == key {
            labels.insert(key.to_string(), s.clone());
        }
        s
    }

    fn count_call(&self, domain: &str, code: usize) {
        let mut d = lock(&self.domains);
        if let Some(c) = d.get(domain).and_then(|c| c.get(code)) {
            c.inc();
            return;
        }
        let label = if d.len() < self.opts.max_metric_labels {
            domain
        } else {
            self.metrics.label_overflow.inc();
            "_other"
        };
        let counters = CALL_CODES.map(|code| {
            self.metrics
                .calls
                .get_or_create(&vec![
                    ("domain".into(), label.to_string()),
                    ("code".into(), code.to_string()),
                ])
                .clone()
        });
        if let Some(c) = counters.get(code) {
            c.inc();
        }
        if label == domain {
            d.insert(domain.to_string(), counters);
        }
    }

    /// The bucket key of one descriptor: the prefix, the domain and the
    /// entries, each length-prefixed (no two descriptors share a key).
    fn key(&self, domain: &str, d: &RateLimitDescriptor) -> String {
        let mut k = format!("{}{}:{domain}", self.store.prefix(), domain.len());
        for e in &d.entries {
            k.push_str(&format!(
                "|{}:{}={}:{}",
                e.key.len(),
                e.key,
                e.value.len(),
                e.value
            ));
        }
        k
    }

    fn plan<'a>(
        &self,
        limits: &'a Limits,
        req: &RateLimitRequest,
        d: &RateLimitDescriptor,
    ) -> Result<Plan<'a>, String> {
        let hits = match &d.hits_addend {
            Some(h) => i64::try_from(h.value).unwrap_or(i64::MAX),
            None => i64::from(req.hits_addend.max(1)),
        };
        let hits = if d.is_negative_hits { -hits } else { hits };
        if let Some(o) = &d.limit {
            let Some(unit) = unit_of(o.unit) else {
                return Err(format!("descriptor limit override with unit {}", o.unit));
            };
            let entries: Vec<&str> = d.entries.iter().map(|e| e.key.as_str()).collect();
            return Ok(Plan::Limited {
                limit: std::borrow::Cow::Owned(Limit {
                    rate: Some((o.requests_per_unit, unit)),
                    name: None,
                    replaces: Vec::new(),
                    shadow_mode: false,
                    detailed_metric: false,
                    stat_key: format!("{}.{}", req.domain, entries.join(".")),
                }),
                hits,
            });
        }
        let found = limits.find_iter(
            &req.domain,
            d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())),
        );
        match found {
            Some(l) if l.detailed_metric => {
                let entries: Vec<(String, String)> = d
                    .entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect();
                let mut l = l.clone();
                l.stat_key = limits::detailed_stat_key(&req.domain, &entries);
                Ok(Plan::Limited {
                    limit: std::borrow::Cow::Owned(l),
                    hits,
                })
            }
            Some(l) => Ok(Plan::Limited {
                limit: std::borrow::Cow::Borrowed(l),
                hits,
            }),
            None => Ok(Plan::Free),
        }
    }

    /// Answers one `ShouldRateLimit` request; `deadline` is the caller's
    /// (`grpc-timeout`), Redis gets no longer than it.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
        deadline: Option<Duration>,
    ) -> Result<RateLimitResponse, CallError> {
        self.metrics.in_flight.inc();
        let r = self.answer(req, deadline).await;
        self.metrics.in_flight.dec();
        let code = match &r {
            Ok(resp) if resp.overall_code == Code::OverLimit as i32 => 1,
            Ok(_) => 0,
            Err(s) if s.code() == tonic::Code::Unavailable => 2,
            Err(_) => 3,
        };
        self.count_call(&req.domain, code);
        r
    }

    async fn answer(
        &self,
        req: &RateLimitRequest,
        deadline: Option<Duration>,
    ) -> Result<RateLimitResponse, CallError> {
        if req.domain.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        if req.descriptors.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        let limits = self.limits();
        let known = limits.has_domain(&req.domain);
        let mut plans = Vec::with_capacity(req.descriptors.len());
        for (i, d) in req.descriptors.iter().enumerate() {
            let p = self
                .plan(&limits, req, d)
                .map_err(|e| tonic::Status::invalid_argument(format!("descriptors[{i}]: {e}")))?;
            if !known && matches!(p, Plan::Free) {
                self.metrics.domain_not_found.inc();
            }
            plans.push(p);
        }
        // Named limits that a matched limit replaces do not apply.
        let replaced: Vec<&str> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Limited { limit, .. } => Some(limit.replaces.iter().map(String::as_str)),
                Plan::Free => None,
            })
            .flatten()
            .collect();
        let budget = match deadline {
            // Leave the answer a little of the caller's time.
            Some(d) => self.store.timeout().min(d.saturating_sub(d / 10)),
            None => self.store.timeout(),
        };
        let started = Instant::now();
        let mut redis_calls = 0usize;
        let calls = plans.iter().zip(&req.descriptors).map(|(p, d)| {
            let call: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Decided, StoreError>> + Send + '_>,
            > = match p {
                Plan::Limited { limit, .. }
                    if limit.name.as_deref().is_some_and(|n| replaced.contains(&n)) =>
                {
                    Box::pin(async { Ok(Decided::ok()) })
                }
                Plan::Free => Box::pin(async { Ok(Decided::ok()) }),
                Plan::Limited { limit, hits } => {
                    let stats = self.key_stats(&limit.stat_key);
                    let hits = *hits;
                    match limit.rate {
                        None => Box::pin(async move {
                            // unlimited
                            Ok(Decided {
                                code: Code::Ok,
                                limit: None,
                                remaining: u32::MAX,
                                reset: None,
                            })
                        }),
                        Some((requests, unit)) => {
                            redis_calls += 1;
                            let key = self.key(&req.domain, d);
                            let name = limit.name.clone().unwrap_or_default();
                            let shadow = limit.shadow_mode;
                            Box::pin(async move {
                                let hit = if requests == 0 {
                                    // Every request is over a limit of 0.
                                    Hit {
                                        admitted: false,
                                        remaining: 0,
                                        until_full: Duration::ZERO,
                                        until_next: Duration::from_secs(unit.seconds()),
                                    }
                                } else {
                                    self.store
                                        .hit(
                                            &key,
                                            requests,
                                            Duration::from_secs(unit.seconds()),
                                            hits,
                                            Some(budget),
                                        )
                                        .await?
                                };
                                Ok(self.decide(&stats, hit, hits, requests, unit, name, shadow))
                            })
                        }
                    }
                }
            };
            call
        });
        let calls: Vec<_> = calls.collect();
        let results = futures_util::future::join_all(calls).await;
        if redis_calls > 0 {
            self.metrics
                .redis_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let mut decided = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(d) => decided.push(d),
                Err(e) => {
                    self.redis_failed(&req.domain, &e);
                    return Err(tonic::Status::unavailable(e.to_string()));
                }
            }
        }
        Ok(self.response(decided))
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        stats: &KeyStats,
        hit: Hit,
        hits: i64,
        requests: u32,
        unit: Unit,
        name: String,
        shadow: bool,
    ) -> Decided {
        let n = u64::try_from(hits.max(0)).unwrap_or(0);
        stats.total_hits.inc_by(n);
        let limit = Some((requests, unit, name));
        if hit.admitted {
            stats.within_limit.inc_by(n);
            let left = f64::from(hit.remaining) / f64::from(requests.max(1));
            if n > 0 && left < 1.0 - self.opts.near_limit_ratio {
                stats.near_limit.inc_by(n);
            }
            return Decided {
                code: Code::Ok,
                limit,
                remaining: hit.remaining,
                reset: Some(hit.until_full),
            };
        }
        stats.over_limit.inc_by(n);
        if shadow {
            stats.shadow_mode.inc_by(n);
        }
        Decided {
            code: if shadow { Code::Ok } else { Code::OverLimit },
            limit,
            remaining: 0,
            // The wait until one more request is admitted.
            reset: Some(hit.until_next),
        }
    }

    fn redis_failed(&self, domain: &str, e: &StoreError) {
        let kind = match e {
            // A caller's budget shorter than the reply timeout ran out.
            StoreError::Timeout(b) if *b < self.store.timeout() => "deadline",
            e => e.kind(),
        };
        self.metrics
            .redis_errors
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
        if let Some(more) = REDIS_ERRORS_LOG.allow() {
            tracing::warn!(
                domain,
                error = %e,
                failed_since_last_line = more,
                "rls: redis failed; answered UNAVAILABLE"
            );
        }
    }

    fn response(&self, decided: Vec<Decided>) -> RateLimitResponse {
        let overall = if decided.iter().any(|d| d.code == Code::OverLimit) {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let mut headers = Vec::new();
        if self.opts.response_headers != ResponseHeaders::None {
            // The last over-limit descriptor, else the one with the least left.
            let pick = decided
                .iter()
                .rev()
                .find(|d| d.code == Code::OverLimit && d.limit.is_some())
                .or_else(|| {
                    decided
                        .iter()
                        .filter(|d| d.limit.is_some())
                        .min_by_key(|d| d.remaining)
                });
            if let Some(
                d @ Decided {
                    limit: Some((requests, _, _)),
                    ..
                },
            ) = pick
            {
                let reset = d.reset.unwrap_or_default();
                let reset = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
                let values = [
                    requests.to_string(),
                    d.remaining.to_string(),
                    reset.to_string(),
                ];
                let mut add = |names: [&str; 3]| {
                    for (n, v) in names.iter().zip(&values) {
                        headers.push(HeaderValue {
                            key: (*n).to_string(),
                            value: v.clone(),
                            ..HeaderValue::default()
                        });
                    }
                };
                if matches!(
                    self.opts.response_headers,
                    ResponseHeaders::Draft | ResponseHeaders::Both
                ) {
                    add(["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]);
                }
                if matches!(
                    self.opts.response_headers,
                    ResponseHeaders::XRatelimit | ResponseHeaders::Both
                ) {
                    add([
                        "X-RateLimit-Limit",
                        "X-RateLimit-Remaining",
                        "X-RateLimit-Reset",
                    ]);
                }
            }
        }
        RateLimitResponse {
            overall_code: overall as i32,
            statuses: decided
                .into_iter()
                .map(|d| DescriptorStatus {
                    code: d.code as i32,
                    current_limit: d.limit.map(|(requests, unit, name)| RateLimit {
                        name,
                        requests_per_unit: requests,
                        unit: pb_unit(unit),
                    }),
                    limit_remaining: d.remaining,
                    duration_until_reset: d.reset.map(|r| {
                        envoy_types::pb::google::protobuf::Duration {
                            seconds: i64::try_from(r.as_secs()).unwrap_or(i64::MAX),
                            nanos: i32::try_from(r.subsec_nanos()).unwrap_or(0),
                        }
                    }),
                    ..DescriptorStatus::default()
                })
                .collect(),
            response_headers_to_add: headers,
            ..RateLimitResponse::default()
        }
    }

    /// Pings Redis every `health_interval` until `shutdown`, and reports
    /// the result to `grpc.health.v1` and `sidecar_rls_redis_up`.
    async fn health_loop(
        self: Arc<Self>,
        reporter: tonic_health::server::HealthReporter,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut last: Option<bool> = None;
        loop {
            let up = self.store.ping().await.is_ok();
            self.metrics.redis_up.set(i64::from(up));
            if last != Some(up) {
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                for name in HEALTH_NAMES {
                    reporter.set_service_status(name, status).await;
                }
                if last.is_some() || !up {
                    if up {
                        tracing::info!(
                            redis = self.store.describe(),
                            "rls: redis answers again; SERVING"
                        );
                    } else {
                        tracing::warn!(
                            redis = self.store.describe(),
                            "rls: redis does not answer; NOT_SERVING"
                        );
                    }
                }
                last = Some(up);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.opts.health_interval) => {}
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Redis failures: a line at most every 10 s.
static REDIS_ERRORS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);

struct Api(Arc<Service>);

#[tonic::async_trait]
impl RateLimitService for Api {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let req = request.into_inner();
        self.0
            .should_rate_limit(&req, deadline)
            .await
            .map(tonic::Response::new)
    }
}

/// Accepted connections, with a short pause when accepting fails (out of
/// descriptors: without it the loop would spin).
fn incoming(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_util::stream::unfold((listener, false), |(listener, mut failing)| async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("rls: accepting again");
                    }
                    // Small request/response messages: no Nagle delay.
                    let _ = socket.set_nodelay(true);
                    return Some((Ok(socket), (listener, failing)));
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::error!(error = %e, "rls: accept failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// Serves the API and `grpc.health.v1` on `listener` until `shutdown`
/// completes; then sends GOAWAY, lets the calls in flight finish for up
/// to `drain` and returns.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(service.clone().health_loop(reporter, stop.clone()));
    let api = RateLimitServiceServer::new(Api(service.clone()))
        .max_decoding_message_size(service.opts.max_message_bytes);
    let drain = service.opts.drain;
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(service.opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(api)
        .serve_with_incoming_shutdown(Box::pin(incoming(listener)), signal);
    tokio::select! {
        r = server => {
            if let Err(e) = r {
                tracing::error!(error = %e, "rls: the server failed");
            }
        }
        _ = async { stop.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!("rls: calls still open after the drain timeout ({drain:?}); closing");
        }
    }
}

/// Watches the configuration at `path` until `shutdown`: on SIGHUP and
/// every `poll` (zero: only on SIGHUP) it is read again when it differs
/// from `seen` (taken before the configuration in force was read); a file
/// that does not load is refused and the last good configuration stays.
pub async fn watch_config(
    service: Arc<Service>,
    path: std::path::PathBuf,
    mut seen: Fingerprint,
    poll: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    crate::reload::on_hup_or_every("rls config", poll, shutdown, || {
        let now = fingerprint(&path);
        if now == seen {
            return;
        }
        seen = now;
        match Limits::load(&path) {
            Ok(l) => {
                let (domains, n) = (l.domains().count(), l.descriptor_count());
                service.set_limits(l);
                tracing::info!(
                    path = %path.display(),
                    domains,
                    descriptors = n,
                    "rls config: reloaded"
                );
            }
            Err(e) => {
                service.refused_limits();
                tracing::warn!(path = %path.display(), "rls config: refused ({e}); the last good configuration stays");
            }
        }
    })
    .await;
}

/// The names, sizes and modification times under `path`: what changes
/// when a file is edited, added or removed (a ConfigMap's symlink swap
/// included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)>);

/// `path`'s [`Fingerprint`] now.
pub fn fingerprint(path: &std::path::Path) -> Fingerprint {
    Fingerprint(fingerprint_entries(path))
}

fn fingerprint_entries(
    path: &std::path::Path,
) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let one = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok();
        (
            p.to_path_buf(),
            m.as_ref().map_or(0, std::fs::Metadata::len),
            m.and_then(|m| m.modified().ok()),
        )
    };
    if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| one(&e.path()))
            .collect();
        v.sort();
        v
    } else {
        vec![one(path)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout("5000u"), Some(Duration::from_micros(5000)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "20", "20x", "-1m", "123456789m", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
