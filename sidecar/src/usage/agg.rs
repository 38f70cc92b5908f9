//! Usage as Prometheus series: counters and a duration histogram per
//! (tenant, route, status class), application metrics as summaries per
//! (name, labels), streaming usage per tenant. Every dimension is capped:
//! the first `max_tenants` tenants (and `max_routes` routes,
//! `max_app_series` application series) get their own series, the rest
//! fold into `other`, and the folds are counted (`usage_folded_total`).

use crate::expo::{float_label, Kind, Value, Writer};
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use usage_core::wire::Batch;

/// Upper bounds of the duration histogram, µs (exposed in seconds).
pub const BUCKETS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

fn class_index(status: u16) -> u8 {
    match status / 100 {
        1..=5 => (status / 100 - 1) as u8,
        _ => 5,
    }
}

/// Bounds of the aggregation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tenants: usize,
    pub max_routes: usize,
    pub max_app_series: usize,
}

#[derive(Debug, Clone, Default)]
struct Series {
    requests: u64,
    request_bytes: u64,
    response_bytes: u64,
    duration_us: u64,
    /// Per bucket (not cumulative); the `+Inf` bucket is `requests`.
    buckets: [u64; BUCKETS_US.len()],
}

/// Strings to small ids, at most `max` of them besides `other` (id 0).
#[derive(Debug)]
struct Interner {
    ids: HashMap<Box<str>, u32, RandomState>,
    names: Vec<Box<str>>,
    max: usize,
}

impl Interner {
    fn new(max: usize) -> Interner {
        Interner {
            ids: HashMap::default(),
            names: vec!["other".into()],
            max,
        }
    }

    /// The id of `s`; `(0, true)` when it is folded into `other`.
    fn id(&mut self, s: &str) -> (u32, bool) {
        if let Some(&i) = self.ids.get(s) {
            return (i, false);
        }
        if s == "other" {
            return (0, false);
        }
        if self.ids.len() >= self.max {
            return (0, true);
        }
        let i = self.names.len() as u32;
        self.names.push(s.into());
        self.ids.insert(s.into(), i);
        (i, false)
    }

    fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("other", |n| n)
    }
}

/// A tenant's WebSocket usage, updated by the sessions and the writers.
#[derive(Debug, Default)]
pub struct StreamUsage {
    pub connections: AtomicI64,
    pub opened: AtomicU64,
    pub messages: AtomicU64,
}

#[derive(Debug, Default, Clone)]
struct AppSeries {
    count: u64,
    sum: f64,
}

type AppKey = (Box<str>, Vec<(Box<str>, Box<str>)>);

/// A counter family of the series: name, help, the value.
type CounterFamily = (&'static str, &'static str, fn(&Series) -> u64);

/// What folding into `other` happened, per dimension.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub tenant: u64,
    pub route: u64,
    pub app_series: u64,
}

#[derive(Debug)]
pub struct Agg {
    limits: Limits,
    tenants: Interner,
    routes: Interner,
    series: HashMap<(u32, u32, u8), Series, RandomState>,
    app: HashMap<AppKey, AppSeries, RandomState>,
    streams: Vec<Option<Arc<StreamUsage>>>,
    pub folded: Folded,
    pub records: u64,
    pub metric_events: u64,
}

impl Agg {
    pub fn new(limits: Limits) -> Agg {
        Agg {
            limits,
            tenants: Interner::new(limits.max_tenants),
            routes: Interner::new(limits.max_routes),
            series: HashMap::default(),
            app: HashMap::default(),
            streams: Vec::new(),
            folded: Folded::default(),
            records: 0,
            metric_events: 0,
        }
    }

    /// Adds a validated batch.
    pub fn add(&mut self, b: &Batch<'_>) {
        for r in &b.records {
            let (t, ft) = self.tenants.id(&r.tenant);
            let (rt, fr) = self.routes.id(&r.route);
            self.folded.tenant += u64::from(ft);
            self.folded.route += u64::from(fr);
            let s = self
                .series
                .entry((t, rt, class_index(r.status)))
                .or_default();
            s.requests += 1;
            s.request_bytes = s.request_bytes.saturating_add(r.request_bytes);
            s.response_bytes = s.response_bytes.saturating_add(r.response_bytes);
            s.duration_us = s.duration_us.saturating_add(r.duration_us);
            if let Some(i) = BUCKETS_US.iter().position(|&le| r.duration_us <= le) {
                if let Some(c) = s.buckets.get_mut(i) {
                    *c += 1;
                }
            }
        }
        self.records += b.records.len() as u64;
        for m in &b.metrics {
            self.metric_events += 1;
            let key: AppKey = (
                m.name.as_ref().into(),
                m.labels
                    .iter()
                    .map(|(k, v)| (k.as_ref().into(), v.as_ref().into()))
                    .collect(),
            );
            let s = if let Some(s) = self.app.get_mut(&key) {
                s
            } else if self.app.len() < self.limits.max_app_series {
                self.app.entry(key).or_default()
            } else {
                self.folded.app_series += 1;
                self.app.entry(("other".into(), Vec::new())).or_default()
            };
            s.count += 1;
            s.sum += m.value;
        }
    }

    /// The streaming counters of `tenant` (or of `other` beyond the cap).
    pub fn stream_usage(&mut self, tenant: &str) -> Arc<StreamUsage> {
        let (t, folded) = self.tenants.id(tenant);
        self.folded.tenant += u64::from(folded);
        let i = t as usize;
        if self.streams.len() <= i {
            self.streams.resize(i + 1, None);
        }
        match self.streams.get_mut(i) {
            Some(slot) => slot.get_or_insert_with(Default::default).clone(),
            None => Arc::default(),
        }
    }

    pub fn tenants(&self) -> usize {
        self.tenants.ids.len()
    }

    pub fn series(&self) -> usize {
        self.series.len()
    }

    /// Writes the usage families, series sorted by labels.
    pub fn render(&self, w: &mut Writer<'_>) {
        let mut keys: Vec<(&str, &str, &str, &Series)> = self
            .series
            .iter()
            .map(|(&(t, r, c), s)| {
                (
                    self.tenants.name(t),
                    self.routes.name(r),
                    CLASSES.get(c as usize).copied().unwrap_or("none"),
                    s,
                )
            })
            .collect();
        keys.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let counters: [CounterFamily; 3] = [
            (
                "usage_requests",
                "Requests through the mesh, by tenant, route template and status class.",
                |s| s.requests,
            ),
            (
                "usage_request_bytes",
                "Request body bytes received from clients.",
                |s| s.request_bytes,
            ),
            (
                "usage_response_bytes",
                "Response body bytes sent to clients.",
                |s| s.response_bytes,
            ),
        ];
        for (name, help, get) in counters {
            w.family(name, Kind::Counter, help);
            let total = format!("{name}_total");
            for (t, r, c, s) in &keys {
                w.sample(
                    &total,
                    &[("tenant", t), ("route", r), ("status_class", c)],
                    get(s).into(),
                );
            }
        }
        w.family(
            "usage_request_duration_seconds",
            Kind::Histogram,
            "Request durations, from the first byte to the end of the stream.",
        );
        let les: Vec<String> = BUCKETS_US
            .iter()
            .map(|&us| float_label(us as f64 / 1e6))
            .collect();
        for (t, r, c, s) in &keys {
            let mut cum = 0u64;
            for (le, n) in les.iter().zip(s.buckets.iter()) {
                cum += n;
                w.sample(
                    "usage_request_duration_seconds_bucket",
                    &[("tenant", t), ("route", r), ("status_class", c), ("le", le)],
                    cum.into(),
                );
            }
            let labels = [("tenant", *t), ("route", *r), ("status_class", *c)];
            w.sample(
                "usage_request_duration_seconds_bucket",
                &[labels[0], labels[1], labels[2], ("le", "+Inf")],
                s.requests.into(),
            );
            w.sample(
                "usage_request_duration_seconds_sum",
                &labels,
                (s.duration_us as f64 / 1e6).into(),
            );
            w.sample(
                "usage_request_duration_seconds_count",
                &labels,
                s.requests.into(),
            );
        }

        let mut streams: Vec<(&str, &StreamUsage)> = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((self.tenants.name(i as u32), s.as_deref()?)))
            .collect();
        streams.sort_by(|a, b| a.0.cmp(b.0));
        w.family(
            "usage_ws_connections",
            Kind::Gauge,
            "Open WebSocket connections, by tenant.",
        );
        for (t, s) in &streams {
            w.sample(
                "usage_ws_connections",
                &[("tenant", t)],
                Value::Int(s.connections.load(Ordering::Relaxed)),
            );
        }
        w.family(
            "usage_ws_connections_opened",
            Kind::Counter,
            "WebSocket connections accepted, by tenant.",
        );
        for (t, s) in &streams {
            w.sample(
                "usage_ws_connections_opened_total",
                &[("tenant", t)],
                s.opened.load(Ordering::Relaxed).into(),
            );
        }
        w.family(
            "usage_ws_messages",
            Kind::Counter,
            "Live messages written to WebSocket clients, by tenant.",
        );
        for (t, s) in &streams {
            w.sample(
                "usage_ws_messages_total",
                &[("tenant", t)],
                s.messages.load(Ordering::Relaxed).into(),
            );
        }

        // Application metrics: one summary family per name.
        let mut app: Vec<(&AppKey, &AppSeries)> = self.app.iter().collect();
        app.sort_by(|a, b| a.0.cmp(b.0));
        let mut last: Option<&str> = None;
        for ((name, labels), s) in app {
            let family = format!("app_{name}");
            if last != Some(name) {
                w.family(
                    &family,
                    Kind::Summary,
                    "Application metric pushed to /v1/usage: events and the sum of their values.",
                );
                last = Some(name);
            }
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (&**k, &**v)).collect();
            w.sample(&format!("{family}_count"), &l, s.count.into());
            w.sample(&format!("{family}_sum"), &l, s.sum.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fold_into_other_and_are_counted() {
        let mut a = Agg::new(Limits {
            max_tenants: 2,
            max_routes: 1,
            max_app_series: 1,
        });
        let b = usage_core::wire::parse(
            br#"{"batch":"b","records":[
            {"tenant":"t1","route":"/a","method":"GET","status":200,"duration_us":1500},
            {"tenant":"t2","route":"/b","method":"GET","status":404,"duration_us":20000000},
            {"tenant":"t3","route":"/a","method":"GET","status":0}],
            "metrics":[{"name":"x","value":1},{"name":"y","value":2},{"name":"x","value":3}]}"#,
        )
        .unwrap();
        a.add(&b);
        assert_eq!(
            a.folded,
            Folded {
                tenant: 1,
                route: 1,
                app_series: 1
            }
        );
        assert_eq!(a.tenants(), 2);
        assert_eq!(a.series(), 3);
        let s = a.series.get(&(1, 1, 1)).unwrap();
        assert_eq!(
            (s.requests, s.buckets[1]),
            (1, 1),
            "1.5 ms is in the 2.5 ms bucket"
        );
        let s = a.series.get(&(2, 0, 3)).unwrap();
        assert_eq!(
            (s.requests, s.buckets.iter().sum::<u64>()),
            (1, 0),
            "20 s only in +Inf"
        );
        assert_eq!(a.app.len(), 2);
        let x = a.app.get(&("x".into(), Vec::new())).unwrap();
        assert_eq!((x.count, x.sum), (2, 4.0));
        // A tenant folded for requests is folded for streaming too.
        let o = a.stream_usage("t9");
        o.messages.fetch_add(1, Ordering::Relaxed);
        assert!(Arc::ptr_eq(&o, &a.stream_usage("other")));
    }
}
