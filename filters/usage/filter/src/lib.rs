//! The usage filter: at `on_log` every stream becomes one usage record
//! (tenant, subject, route template, method, status, body bytes both ways,
//! duration) pushed into a shared queue. The root context of each worker
//! VM drains the queue into what it holds, and posts batches to the
//! sidecar (`POST /v1/usage`, usage-core's wire format) with
//! `dispatch_http_call`: a full batch at once, the rest every
//! `flush_interval_ms`. One batch per VM is in flight; a failed one is
//! resent under the same batch id (the sidecar applies an id once) after
//! an exponential backoff; while the sidecar is away a VM holds at most
//! `max_pending_records`, dropping the oldest beyond. A request is never
//! delayed: the filter does nothing until the stream is over.

use filter_shell as host;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MapType, MetricType};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::Duration;
use usage_core::config::Settings;
use usage_core::wire::Record;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("usage: panic: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|id| Box::new(Root::new(id)));
}}

struct Metrics {
    records: Option<u32>,
    enqueue_failed: Option<u32>,
    batches_sent: Option<u32>,
    records_sent: Option<u32>,
    batch_failures: Option<u32>,
    records_dropped: Option<u32>,
    records_rejected: Option<u32>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("usage.{name}"))
}

struct Shared {
    settings: Settings,
    queue: u32,
    metrics: Metrics,
}

/// Records cut into a batch: its id stays with it until the sidecar
/// answers 2xx (or refuses it), so a resend is recognised.
struct Batch {
    id: String,
    records: VecDeque<Vec<u8>>,
}

impl Batch {
    fn body(&self) -> Vec<u8> {
        let size: usize = self.records.iter().map(|r| r.len() + 1).sum();
        let mut b = Vec::with_capacity(size + self.id.len() + 32);
        b.extend_from_slice(b"{\"batch\":\"");
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(b"\",\"records\":[");
        for (i, r) in self.records.iter().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(r);
        }
        b.extend_from_slice(b"]}");
        b
    }
}

struct Root {
    shared: Option<Rc<Shared>>,
    /// Unique per VM and start: the prefix of this VM's batch ids.
    nonce: String,
    next_seq: u64,
    /// Serialized records not yet in a batch, oldest first.
    open: VecDeque<Vec<u8>>,
    /// A batch that failed, to be resent first.
    retry: Option<Batch>,
    in_flight: Option<(u32, Batch)>,
    /// No send before this (host clock), after a failure.
    not_before: Duration,
    backoff_ms: u64,
}

impl Root {
    fn new(id: u32) -> Root {
        // Random keys from the host (WASI random_get), mixed with the clock
        // and the context id: distinct across VMs and restarts.
        let r =
            std::collections::hash_map::RandomState::new().hash_one((host::now().as_nanos(), id));
        Root {
            shared: None,
            nonce: format!("{r:016x}"),
            next_seq: 0,
            open: VecDeque::new(),
            retry: None,
            in_flight: None,
            not_before: Duration::ZERO,
            backoff_ms: 0,
        }
    }

    fn held(&self) -> usize {
        self.open.len()
            + self.retry.as_ref().map_or(0, |b| b.records.len())
            + self.in_flight.as_ref().map_or(0, |(_, b)| b.records.len())
    }

    /// Moves what the queue holds into `open`, dropping the oldest records
    /// (never the batch in flight) beyond `max_pending_records`.
    fn drain(&mut self, s: &Shared) {
        while let Ok(Some(r)) = hostcalls::dequeue_shared_queue(s.queue) {
            self.open.push_back(r);
        }
        let mut over = self.held().saturating_sub(s.settings.max_pending_records);
        let mut dropped = 0u64;
        while over > 0 {
            let popped = match self.retry.as_mut() {
                Some(b) if !b.records.is_empty() => b.records.pop_front(),
                _ => self.open.pop_front(),
            };
            if popped.is_none() {
                break;
            }
            over -= 1;
            dropped += 1;
        }
        if self.retry.as_ref().is_some_and(|b| b.records.is_empty()) {
            self.retry = None;
        }
        if dropped > 0 {
            host::increment(s.metrics.records_dropped, dropped);
            host::log(
                LogLevel::Warn,
                &format!(
                    "usage: dropped the {dropped} oldest records: more than max_pending_records ({}) held",
                    s.settings.max_pending_records
                ),
            );
        }
    }

    /// Sends the next batch unless one is in flight or a backoff runs: a
    /// failed batch first, then a full one, then (`partial`) any records.
    fn send(&mut self, s: &Shared, partial: bool) {
        if self.in_flight.is_some() || host::now() < self.not_before {
            return;
        }
        let batch = match self.retry.take() {
            Some(b) => b,
            None => {
                let n = self.open.len().min(s.settings.max_batch_records);
                if n == 0 || (n < s.settings.max_batch_records && !partial) {
                    return;
                }
                self.next_seq += 1;
                Batch {
                    id: format!("{}-{}", self.nonce, self.next_seq),
                    records: self.open.drain(..n).collect(),
                }
            }
        };
        let st = &s.settings;
        let len = batch.records.len().to_string();
        let mut headers = vec![
            (":method", "POST"),
            (":path", st.path.as_str()),
            (":authority", st.authority.as_str()),
            ("content-type", "application/json"),
            ("x-usage-records", len.as_str()),
        ];
        if let Some((name, value)) = &st.secret {
            headers.push((name.as_str(), value.as_str()));
        }
        let body = batch.body();
        match hostcalls::dispatch_http_call(
            &st.cluster,
            headers,
            Some(&body),
            vec![],
            Duration::from_millis(st.timeout_ms),
        ) {
            Ok(token) => self.in_flight = Some((token, batch)),
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    &format!("usage: cannot call cluster {}: {e:?}", st.cluster),
                );
                self.failed(s, batch);
            }
        }
    }

    fn failed(&mut self, s: &Shared, batch: Batch) {
        host::increment(s.metrics.batch_failures, 1);
        let st = &s.settings;
        self.backoff_ms = if self.backoff_ms == 0 {
            st.retry_initial_ms
        } else {
            (self.backoff_ms.saturating_mul(2)).min(st.retry_max_ms)
        };
        self.not_before = host::now() + Duration::from_millis(self.backoff_ms);
        self.retry = Some(batch);
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some(s) = self.shared.clone() else { return };
        let batch = match self.in_flight.take() {
            Some((t, b)) if t == token => b,
            other => {
                self.in_flight = other;
                return;
            }
        };
        let status = host::call_response_header(":status")
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(0);
        let n = batch.records.len() as u64;
        match status {
            200..=299 => {
                host::increment(s.metrics.batches_sent, 1);
                host::increment(s.metrics.records_sent, n);
                self.backoff_ms = 0;
                self.not_before = Duration::ZERO;
            }
            400 | 413 | 422 => {
                let body = host::call_response_body(body_size.min(512));
                host::increment(s.metrics.records_rejected, n);
                host::log(
                    LogLevel::Error,
                    &format!(
                        "usage: the sidecar refused batch {} ({n} records) with {status}: {}",
                        batch.id,
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
            _ => {
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "usage: batch {} ({n} records) failed ({}); resending",
                        batch.id,
                        if status == 0 {
                            "no response".to_string()
                        } else {
                            format!("status {status}")
                        }
                    ),
                );
                self.failed(&s, batch);
                return;
            }
        }
        self.send(&s, false);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = host::plugin_configuration() else {
            host::log(LogLevel::Error, "usage: configuration: missing");
            return false;
        };
        let settings = match Settings::from_json(&bytes) {
            Ok(s) => s,
            Err(e) => {
                host::log(LogLevel::Error, &format!("usage: {e}"));
                return false;
            }
        };
        let queue = match hostcalls::register_shared_queue(&settings.queue) {
            Ok(q) => q,
            Err(e) => {
                host::log(
                    LogLevel::Error,
                    &format!("usage: queue: cannot register {:?}: {e:?}", settings.queue),
                );
                return false;
            }
        };
        host::set_tick_period(Duration::from_millis(settings.flush_interval_ms));
        let metrics = Metrics {
            records: counter("records"),
            enqueue_failed: counter("enqueue_failed"),
            batches_sent: counter("batches_sent"),
            records_sent: counter("records_sent"),
            batch_failures: counter("batch_failures"),
            records_dropped: counter("records_dropped"),
            records_rejected: counter("records_rejected"),
        };
        host::log(
            LogLevel::Info,
            &format!(
                "usage: configured, batches of up to {} records to cluster {} every {} ms",
                settings.max_batch_records, settings.cluster, settings.flush_interval_ms
            ),
        );
        self.shared = Some(Rc::new(Shared {
            settings,
            queue,
            metrics,
        }));
        true
    }

    fn on_tick(&mut self) {
        let Some(s) = self.shared.clone() else { return };
        self.drain(&s);
        self.send(&s, true);
    }

    fn on_queue_ready(&mut self, _queue: u32) {
        let Some(s) = self.shared.clone() else { return };
        self.drain(&s);
        self.send(&s, false);
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            shared: self.shared.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    shared: Option<Rc<Shared>>,
}

fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// An int64 attribute (8 bytes, little-endian), negative as 0.
fn int_property(path: &[&str]) -> u64 {
    property(path)
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(i64::from_le_bytes)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0)
}

fn text(b: Option<Vec<u8>>) -> Cow<'static, str> {
    match b.map(String::from_utf8) {
        Some(Ok(s)) => Cow::Owned(s),
        _ => Cow::Borrowed(""),
    }
}

fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_log(&mut self) {
        let Some(s) = self.shared.as_ref() else {
            return;
        };
        let st = &s.settings;
        let path = text(property(&["request", "url_path"]).or_else(|| request_header(":path")));
        let status = int_property(&["response", "code"]);
        let mut r = Record {
            tenant: text(request_header(&st.tenant_header)),
            subject: text(request_header(&st.subject_header)),
            route: Cow::Borrowed(st.route_of(&path)),
            method: text(property(&["request", "method"])),
            status: u16::try_from(status).unwrap_or(0),
            request_bytes: int_property(&["request", "size"]),
            response_bytes: int_property(&["response", "size"]),
            duration_us: int_property(&["request", "duration"]) / 1000,
            time_ms: Some(host::now().as_millis() as u64),
        };
        r.sanitize(&st.anonymous_tenant);
        let Ok(bytes) = serde_json::to_vec(&r) else {
            return;
        };
        match hostcalls::enqueue_shared_queue(s.queue, Some(&bytes)) {
            Ok(()) => host::increment(s.metrics.records, 1),
            Err(e) => {
                host::increment(s.metrics.enqueue_failed, 1);
                host::log(LogLevel::Warn, &format!("usage: enqueue: {e:?}"));
            }
        }
    }
}
