//! The usage filter as a [`Filter`]: at `on_log` every stream becomes one
//! record (tenant, subject, route template, method, status, body bytes
//! both ways, duration) pushed into a shared queue. The root context of
//! each worker VM drains the queue into what it holds and posts batches to
//! the sidecar (`POST /v1/usage`, [`crate::wire`]'s format): a full batch
//! at once, the rest every `flush_interval_ms`. One batch per VM is in
//! flight; a failed one is resent under the same batch id (the sidecar
//! applies an id once) after an exponential backoff; while the sidecar is
//! away a VM holds at most `max_pending_records`, dropping the oldest
//! beyond. A request is never delayed: nothing happens until it is over.

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::wire::Record;
use filter_common::config::ConfigError;
use filter_common::filter::Filter;
use filter_common::host::{Host, Level, Map};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::time::Duration;

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

/// One worker VM's usage state.
pub struct Usage {
    settings: Settings,
    queue: u32,
    metrics: Metrics,
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

impl Usage {
    fn held(&self) -> usize {
        self.open.len()
            + self.retry.as_ref().map_or(0, |b| b.records.len())
            + self.in_flight.as_ref().map_or(0, |(_, b)| b.records.len())
    }

    /// Moves what the queue holds into `open`, dropping the oldest records
    /// (never the batch in flight) beyond `max_pending_records`.
    fn drain<H: Host>(&mut self, h: &H) {
        while let Ok(Some(r)) = h.dequeue(self.queue) {
            self.open.push_back(r);
        }
        let mut over = self
            .held()
            .saturating_sub(self.settings.max_pending_records);
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
            h.increment(self.metrics.records_dropped, dropped);
            h.log(
                Level::Warn,
                &format!(
                    "usage: dropped the {dropped} oldest records: more than max_pending_records ({}) held",
                    self.settings.max_pending_records
                ),
            );
        }
    }

    /// Sends the next batch unless one is in flight or a backoff runs: a
    /// failed batch first, then a full one, then (`partial`) any records.
    fn send<H: Host>(&mut self, h: &H, partial: bool) {
        if self.in_flight.is_some() || h.now() < self.not_before {
            return;
        }
        let max = self.settings.max_batch_records;
        let batch = match self.retry.take() {
            Some(b) => b,
            None => {
                let n = self.open.len().min(max);
                if n == 0 || (n < max && !partial) {
                    return;
                }
                self.next_seq += 1;
                Batch {
                    id: format!("{}-{}", self.nonce, self.next_seq),
                    records: self.open.drain(..n).collect(),
                }
            }
        };
        let st = &self.settings;
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
        let timeout = Duration::from_millis(st.timeout_ms);
        match h.http_call(&st.cluster, &headers, Some(&batch.body()), timeout) {
            Ok(token) => self.in_flight = Some((token, batch)),
            Err(e) => {
                h.log(
                    Level::Warn,
                    &format!("usage: cannot call cluster {}: {e}", st.cluster),
                );
                self.failed(h, batch);
            }
        }
    }

    fn failed<H: Host>(&mut self, h: &H, batch: Batch) {
        h.increment(self.metrics.batch_failures, 1);
        let st = &self.settings;
        self.backoff_ms = if self.backoff_ms == 0 {
            st.retry_initial_ms
        } else {
            (self.backoff_ms.saturating_mul(2)).min(st.retry_max_ms)
        };
        self.not_before = h.now() + Duration::from_millis(self.backoff_ms);
        self.retry = Some(batch);
    }

    /// The record of the stream that just ended.
    fn record<'a, H: Host>(&'a self, h: &H) -> Record<'a> {
        let st = &self.settings;
        let text = |b: Option<Vec<u8>>| match b.map(String::from_utf8) {
            Some(Ok(s)) => Cow::Owned(s),
            _ => Cow::Borrowed(""),
        };
        let header = |name: &str| h.header(Map::RequestHeaders, name).ok().flatten();
        let path = h
            .text_property(&["request", "url_path"])
            .or_else(|| header(":path").and_then(|b| String::from_utf8(b).ok()))
            .unwrap_or_default();
        let int = |path: &[&str]| h.int_property(path).unwrap_or(0);
        let mut r = Record {
            tenant: text(header(&st.tenant_header)),
            subject: text(header(&st.subject_header)),
            route: Cow::Borrowed(st.route_of(&path)),
            method: text(h.property(&["request", "method"]).ok().flatten()),
            status: u16::try_from(int(&["response", "code"])).unwrap_or(0),
            request_bytes: int(&["request", "size"]),
            response_bytes: int(&["response", "size"]),
            duration_us: int(&["request", "duration"]) / 1000,
            time_ms: Some(h.now().as_millis() as u64),
        };
        r.sanitize(&st.anonymous_tenant);
        r
    }
}

impl Filter for Usage {
    const NAME: &'static str = "usage";
    type Stream = ();

    fn configure<H: Host>(h: &H, config: &[u8]) -> Result<Usage, ConfigError> {
        let settings = Settings::from_json(config)?;
        let queue = h.register_queue(&settings.queue).map_err(|e| {
            ConfigError::new(
                "queue",
                format!("cannot register {:?}: {e}", settings.queue),
            )
        })?;
        // Random keys from the host (WASI random_get) mixed with the clock:
        // distinct across VMs and restarts.
        let r = std::collections::hash_map::RandomState::new().hash_one(h.now().as_nanos());
        Ok(Usage {
            settings,
            queue,
            metrics: Metrics::define(h),
            nonce: format!("{r:016x}"),
            next_seq: 0,
            open: VecDeque::new(),
            retry: None,
            in_flight: None,
            not_before: Duration::ZERO,
            backoff_ms: 0,
        })
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.settings.flush_interval_ms))
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "configured, batches of up to {} records to cluster {} every {} ms",
            s.max_batch_records, s.cluster, s.flush_interval_ms
        )
    }

    fn on_tick<H: Host>(&mut self, h: &H) {
        self.drain(h);
        self.send(h, true);
    }

    fn on_queue_ready<H: Host>(&mut self, h: &H, _queue: u32) {
        self.drain(h);
        self.send(h, false);
    }

    fn on_http_call_response<H: Host>(&mut self, h: &H, token: u32, body_size: usize) {
        let batch = match self.in_flight.take() {
            Some((t, b)) if t == token => b,
            other => {
                self.in_flight = other;
                return;
            }
        };
        let status = h.call_status().unwrap_or(0);
        let n = batch.records.len() as u64;
        match status {
            200..=299 => {
                h.increment(self.metrics.batches_sent, 1);
                h.increment(self.metrics.records_sent, n);
                self.backoff_ms = 0;
                self.not_before = Duration::ZERO;
            }
            400 | 413 | 422 => {
                let body = h.call_response_body(body_size.min(512));
                h.increment(self.metrics.records_rejected, n);
                h.log(
                    Level::Error,
                    &format!(
                        "usage: the sidecar refused batch {} ({n} records) with {status}: {}",
                        batch.id,
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
            _ => {
                let why = if status == 0 {
                    "no response".to_string()
                } else {
                    format!("status {status}")
                };
                h.log(
                    Level::Warn,
                    &format!(
                        "usage: batch {} ({n} records) failed ({why}); resending",
                        batch.id
                    ),
                );
                self.failed(h, batch);
                return;
            }
        }
        self.send(h, false);
    }

    fn unconfigured<H: Host>(_h: &H) -> filter_common::filter::Flow {
        filter_common::filter::Flow::Continue
    }

    fn on_log<H: Host>(&mut self, h: &H, _stream: &mut (), _context_id: u32) {
        let Ok(bytes) = serde_json::to_vec(&self.record(h)) else {
            return;
        };
        match h.enqueue(self.queue, &bytes) {
            Ok(()) => h.increment(self.metrics.records, 1),
            Err(e) => {
                h.increment(self.metrics.enqueue_failed, 1);
                h.log(Level::Warn, &format!("usage: enqueue: {e}"));
            }
        }
    }
}

#[cfg(test)]
#[path = "filter/tests.rs"]
mod tests;
