//! Usage metering, the sidecar's half: `POST /v1/usage` takes batches
//! (usage-core's wire format) from the usage filter and from applications,
//! refuses a bad batch whole (400 with the field), applies each batch id
//! once, aggregates into Prometheus series ([`agg`]) and per-minute
//! rollups ([`rollup`]) kept in memory and, when configured, persisted to
//! PostgreSQL ([`pg`]) before the batch is acknowledged.

pub mod agg;
pub mod pg;
pub mod rollup;

use crate::expo::{Kind, Value, Writer};
use agg::{Agg, Limits, StreamUsage};
use rollup::{MemRollups, Rollup};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Usage settings (flags `--usage-*`).
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// When set, ingest requires this value in `x-usage-secret` (from any
    /// peer); when not, only loopback peers may post.
    pub secret: Option<String>,
    pub max_batch_bytes: usize,
    pub limits: Limits,
    /// Batch ids remembered for deduplication without PostgreSQL.
    pub dedup_batches: usize,
    /// Minutes of rollups kept in memory, and most rows.
    pub rollup_minutes: u64,
    pub max_rollup_rows: usize,
    pub postgres: Option<pg::PgConfig>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            secret: None,
            max_batch_bytes: 8 << 20,
            limits: Limits {
                max_tenants: 1000,
                max_routes: 500,
                max_app_series: 10_000,
            },
            dedup_batches: 100_000,
            rollup_minutes: 120,
            max_rollup_rows: 200_000,
            postgres: None,
        }
    }
}

/// Why a batch was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestError {
    /// Malformed or invalid: 400, never retried.
    Bad(String),
    /// Not written (PostgreSQL away or behind): 503, retried.
    Unavailable(String),
}

/// An accepted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub batch: String,
    pub records: usize,
    pub metrics: usize,
    /// Its id was applied before: nothing was counted this time.
    pub duplicate: bool,
}

/// Batch ids seen lately (FIFO, bounded).
#[derive(Debug, Default)]
struct Seen {
    set: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    duplicate: AtomicU64,
    bad: AtomicU64,
    unavailable: AtomicU64,
    unauthorized: AtomicU64,
    too_large: AtomicU64,
}

/// The usage state of one sidecar.
#[derive(Debug)]
pub struct Usage {
    cfg: UsageConfig,
    agg: Mutex<Agg>,
    mem: Mutex<MemRollups>,
    seen: Mutex<Seen>,
    pg: Option<pg::Persister>,
    stats: Stats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Usage {
    /// In memory only (PostgreSQL settings are ignored).
    pub fn in_memory(cfg: UsageConfig) -> Usage {
        Usage {
            agg: Mutex::new(Agg::new(cfg.limits)),
            mem: Mutex::new(MemRollups::new(cfg.rollup_minutes, cfg.max_rollup_rows)),
            seen: Mutex::new(Seen::default()),
            pg: None,
            stats: Stats::default(),
            cfg,
        }
    }

    /// With PostgreSQL when configured: connects and migrates first.
    pub async fn start(cfg: UsageConfig, shutdown: CancellationToken) -> Result<Usage, String> {
        let pg = match &cfg.postgres {
            Some(p) => Some(pg::Persister::start(p.clone(), shutdown).await?),
            None => None,
        };
        let mut u = Usage::in_memory(cfg);
        u.pg = pg;
        Ok(u)
    }

    pub fn max_batch_bytes(&self) -> usize {
        self.cfg.max_batch_bytes
    }

    /// Whether a request may use the ingest and rollup endpoints: with a
    /// secret, the right `x-usage-secret`; without, a loopback peer.
    pub fn authorized(&self, peer: Option<SocketAddr>, secret: Option<&[u8]>) -> bool {
        let ok = match &self.cfg.secret {
            Some(s) => secret.is_some_and(|given| constant_time_eq(given, s.as_bytes())),
            None => peer.is_some_and(|p| p.ip().is_loopback()),
        };
        if !ok {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    pub fn too_large(&self) {
        self.stats.too_large.fetch_add(1, Ordering::Relaxed);
    }

    /// Parses, validates and applies a batch: all of it or nothing.
    pub async fn ingest(&self, body: &[u8]) -> Result<Accepted, IngestError> {
        let batch = match usage_core::wire::parse(body) {
            Ok(b) => b,
            Err(e) => {
                self.stats.bad.fetch_add(1, Ordering::Relaxed);
                return Err(IngestError::Bad(e));
            }
        };
        let now = now_ms();
        let rollup = Arc::new(Rollup::of_batch(&batch, now));
        let new = match &self.pg {
            Some(p) => {
                match p
                    .write(
                        &batch.batch,
                        batch.records.len(),
                        batch.metrics.len(),
                        rollup.clone(),
                    )
                    .await
                {
                    Ok(new) => new,
                    Err(e) => {
                        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                        return Err(IngestError::Unavailable(e));
                    }
                }
            }
            None => self.first_time(&batch.batch),
        };
        if new {
            lock(&self.agg).add(&batch);
            lock(&self.mem).add(&rollup, now);
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.duplicate.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Accepted {
            batch: batch.batch.to_string(),
            records: batch.records.len(),
            metrics: batch.metrics.len(),
            duplicate: !new,
        })
    }

    /// Remembers `id`; false if it was remembered already.
    fn first_time(&self, id: &str) -> bool {
        let mut s = lock(&self.seen);
        if s.set.contains(id) {
            return false;
        }
        if s.order.len() >= self.cfg.dedup_batches.max(1) {
            if let Some(old) = s.order.pop_front() {
                s.set.remove(&old);
            }
        }
        s.set.insert(id.into());
        s.order.push_back(id.into());
        true
    }

    /// The streaming counters of a tenant.
    pub fn stream_usage(&self, tenant: &str) -> Arc<StreamUsage> {
        lock(&self.agg).stream_usage(tenant)
    }

    /// Drops in-memory rollups older than the window.
    pub fn expire(&self) {
        lock(&self.mem).expire(now_ms());
    }

    /// The in-memory rollups as JSON, optionally of one tenant.
    pub fn rollups_json(&self, tenant: Option<&str>) -> serde_json::Value {
        let m = lock(&self.mem);
        let usage: Vec<serde_json::Value> = m
            .usage
            .iter()
            .filter(|(k, _)| tenant.is_none_or(|t| k.tenant == t))
            .map(|(k, v)| {
                serde_json::json!({
                    "minute": k.minute * 60,
                    "tenant": k.tenant, "route": k.route, "method": k.method,
                    "status_class": k.status_class,
                    "requests": v.requests, "request_bytes": v.request_bytes,
                    "response_bytes": v.response_bytes,
                    "duration_us_sum": v.duration_us_sum, "duration_us_max": v.duration_us_max,
                })
            })
            .collect();
        let app: Vec<serde_json::Value> = m
            .app
            .iter()
            .map(|(k, v)| {
                serde_json::json!({
                    "minute": k.minute * 60, "name": k.name,
                    "labels": serde_json::from_str::<serde_json::Value>(&k.labels).unwrap_or_default(),
                    "count": v.count, "sum": v.sum, "min": v.min, "max": v.max,
                })
            })
            .collect();
        serde_json::json!({"usage": usage, "metrics": app, "folded": m.folded})
    }

    /// Writes the usage families and the ingest's own metrics.
    pub fn render(&self, w: &mut Writer<'_>) {
        let (folded, tenants, series, records, events) = {
            let a = lock(&self.agg);
            a.render(w);
            (
                a.folded,
                a.tenants(),
                a.series(),
                a.records,
                a.metric_events,
            )
        };
        let (rows, rows_folded) = {
            let m = lock(&self.mem);
            (m.rows(), m.folded)
        };
        let s = &self.stats;
        let get = |a: &AtomicU64| Value::from(a.load(Ordering::Relaxed));
        w.family(
            "usage_ingest_batches",
            Kind::Counter,
            "Batches posted to /v1/usage, by outcome.",
        );
        for (outcome, v) in [
            ("accepted", &s.accepted),
            ("duplicate", &s.duplicate),
            ("bad", &s.bad),
            ("too_large", &s.too_large),
            ("unauthorized", &s.unauthorized),
            ("unavailable", &s.unavailable),
        ] {
            w.sample(
                "usage_ingest_batches_total",
                &[("outcome", outcome)],
                get(v),
            );
        }
        w.family(
            "usage_ingest_records",
            Kind::Counter,
            "Usage records aggregated.",
        );
        w.sample("usage_ingest_records_total", &[], records.into());
        w.family(
            "usage_ingest_metric_events",
            Kind::Counter,
            "Application metric events aggregated.",
        );
        w.sample("usage_ingest_metric_events_total", &[], events.into());
        w.family(
            "usage_folded",
            Kind::Counter,
            "Records, events and rollup rows counted under `other` because a cap was reached, by dimension.",
        );
        for (dim, v) in [
            ("tenant", folded.tenant),
            ("route", folded.route),
            ("app_series", folded.app_series),
            ("rollup_rows", rows_folded),
        ] {
            w.sample("usage_folded_total", &[("dimension", dim)], v.into());
        }
        w.family(
            "usage_tenants",
            Kind::Gauge,
            "Tenants with their own series.",
        );
        w.sample("usage_tenants", &[], (tenants as u64).into());
        w.family(
            "usage_series",
            Kind::Gauge,
            "Series of (tenant, route, status class).",
        );
        w.sample("usage_series", &[], (series as u64).into());
        w.family(
            "usage_rollup_rows",
            Kind::Gauge,
            "Per-minute rollup rows held in memory.",
        );
        w.sample("usage_rollup_rows", &[], (rows as u64).into());
        if let Some(p) = &self.pg {
            render_postgres(&p.stats, w);
        }
    }
}

/// Writes the PostgreSQL rollup writer's families (with `--usage-postgres`;
/// public so the metric catalogue renders them from the same code).
pub fn render_postgres(st: &pg::PgStats, w: &mut Writer<'_>) {
    let get = |a: &AtomicU64| Value::from(a.load(Ordering::Relaxed));
    w.family(
        "usage_postgres_connected",
        Kind::Gauge,
        "1 while the rollup writer has a PostgreSQL connection.",
    );
    w.sample(
        "usage_postgres_connected",
        &[],
        Value::Int(i64::from(st.connected.load(Ordering::Relaxed))),
    );
    for (name, help, v) in [
        (
            "usage_postgres_transactions",
            "Transactions committed.",
            &st.transactions,
        ),
        (
            "usage_postgres_batches",
            "Batches written (new ids).",
            &st.batches,
        ),
        (
            "usage_postgres_duplicate_batches",
            "Batches whose id was written before.",
            &st.duplicates,
        ),
        ("usage_postgres_rows", "Rollup rows upserted.", &st.rows),
        (
            "usage_postgres_errors",
            "Transactions that failed (their batches got 503).",
            &st.errors,
        ),
        (
            "usage_postgres_queue_full",
            "Batches refused because the writer's queue was full.",
            &st.queue_full,
        ),
    ] {
        w.family(name, Kind::Counter, help);
        w.sample(&format!("{name}_total"), &[], get(v));
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    /// Found by the `usage_batch` fuzz target: serde_json's default float
    /// parser is not correctly rounded, so a metric value a filter wrote
    /// could be read here one unit in the last place off
    /// (2.8888888888888888e150 came back as …884e150). With its
    /// `float_roundtrip` feature (this crate's Cargo.toml) every value is
    /// read as Rust reads it, and what is written reads back the same.
    #[test]
    fn metric_values_read_back_exactly() {
        for text in [
            "2.8888888888888888e150",
            "0.30000000000000004",
            "1.7976931348623157e308",
            "5e-324",
        ] {
            let doc = format!(r#"{{"batch":"f-1","metrics":[{{"name":"m","value":{text}}}]}}"#);
            let b = usage_core::wire::parse(doc.as_bytes()).unwrap();
            let want: f64 = text.parse().unwrap();
            assert_eq!(b.metrics[0].value.to_bits(), want.to_bits(), "{text}");
            let again = serde_json::to_vec(&b).unwrap();
            let b2 = usage_core::wire::parse(&again).unwrap();
            assert_eq!(b2.metrics[0].value.to_bits(), want.to_bits(), "{text}");
        }
    }
}
