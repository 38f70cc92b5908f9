//! Per-minute rollups for billing: a batch becomes rows keyed by (minute,
//! tenant, route, method, status class) and (minute, metric name, labels),
//! summed within the batch, sorted by key (so concurrent writers lock rows
//! in one order). [`MemRollups`] keeps them in memory for a bounded window;
//! the PostgreSQL writer upserts the same rows.

use foldhash::fast::RandomState;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use usage_core::wire::{status_class, Batch};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct UsageKey {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub tenant: String,
    pub route: String,
    pub method: String,
    pub status_class: &'static str,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageVal {
    pub requests: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_us_sum: u64,
    pub duration_us_max: u64,
}

impl UsageVal {
    pub fn add(&mut self, o: &UsageVal) {
        self.requests += o.requests;
        self.request_bytes = self.request_bytes.saturating_add(o.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(o.response_bytes);
        self.duration_us_sum = self.duration_us_sum.saturating_add(o.duration_us_sum);
        self.duration_us_max = self.duration_us_max.max(o.duration_us_max);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AppKey {
    pub minute: i64,
    pub name: String,
    /// The labels as a JSON object with sorted keys (canonical).
    pub labels: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AppVal {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl AppVal {
    fn of(v: f64) -> AppVal {
        AppVal {
            count: 1,
            sum: v,
            min: v,
            max: v,
        }
    }
    pub fn add(&mut self, o: &AppVal) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// The rows of one or more batches, sorted by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    pub usage: Vec<(UsageKey, UsageVal)>,
    pub app: Vec<(AppKey, AppVal)>,
}

fn minute_of(time_ms: Option<u64>, now_ms: u64) -> i64 {
    i64::try_from(time_ms.unwrap_or(now_ms) / 60_000).unwrap_or(i64::MAX)
}

/// The canonical JSON text of sorted labels.
pub fn labels_json(labels: &[(Cow<'_, str>, Cow<'_, str>)]) -> String {
    let mut m = serde_json::Map::new();
    for (k, v) in labels {
        m.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    serde_json::Value::Object(m).to_string()
}

impl Rollup {
    /// Sums a (validated) batch per key; records without `time_ms` count
    /// in the minute of `now_ms`.
    pub fn of_batch(b: &Batch<'_>, now_ms: u64) -> Rollup {
        type K<'a> = (i64, &'a str, &'a str, &'a str, &'static str);
        let mut usage: HashMap<K<'_>, UsageVal, RandomState> = HashMap::default();
        for r in &b.records {
            let k = (
                minute_of(r.time_ms, now_ms),
                r.tenant.as_ref(),
                r.route.as_ref(),
                r.method.as_ref(),
                status_class(r.status),
            );
            usage.entry(k).or_default().add(&UsageVal {
                requests: 1,
                request_bytes: r.request_bytes,
                response_bytes: r.response_bytes,
                duration_us_sum: r.duration_us,
                duration_us_max: r.duration_us,
            });
        }
        let mut app: HashMap<AppKey, AppVal, RandomState> = HashMap::default();
        for m in &b.metrics {
            let k = AppKey {
                minute: minute_of(m.time_ms, now_ms),
                name: m.name.to_string(),
                labels: labels_json(&m.labels),
            };
            let v = AppVal::of(m.value);
            app.entry(k).and_modify(|a| a.add(&v)).or_insert(v);
        }
        let mut usage: Vec<(UsageKey, UsageVal)> = usage
            .into_iter()
            .map(|((minute, tenant, route, method, class), v)| {
                (
                    UsageKey {
                        minute,
                        tenant: tenant.to_string(),
                        route: route.to_string(),
                        method: method.to_string(),
                        status_class: class,
                    },
                    v,
                )
            })
            .collect();
        usage.sort_by(|a, b| a.0.cmp(&b.0));
        let mut app: Vec<(AppKey, AppVal)> = app.into_iter().collect();
        app.sort_by(|a, b| a.0.cmp(&b.0));
        Rollup { usage, app }
    }

    /// Sums several rollups into one (sorted).
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Rollup>) -> Rollup {
        let mut usage: BTreeMap<UsageKey, UsageVal> = BTreeMap::new();
        let mut app: BTreeMap<AppKey, AppVal> = BTreeMap::new();
        for p in parts {
            for (k, v) in &p.usage {
                usage.entry(k.clone()).or_default().add(v);
            }
            for (k, v) in &p.app {
                app.entry(k.clone()).and_modify(|a| a.add(v)).or_insert(*v);
            }
        }
        Rollup {
            usage: usage.into_iter().collect(),
            app: app.into_iter().collect(),
        }
    }

    pub fn rows(&self) -> usize {
        self.usage.len() + self.app.len()
    }
}

/// The rollups of the last `retention` minutes, at most `max_rows` rows;
/// a new row beyond that is folded into tenant `other` (usage) or name
/// `other` (application metrics), counted in `folded`.
#[derive(Debug)]
pub struct MemRollups {
    pub usage: BTreeMap<UsageKey, UsageVal>,
    pub app: BTreeMap<AppKey, AppVal>,
    retention: i64,
    max_rows: usize,
    pub folded: u64,
}

impl MemRollups {
    pub fn new(retention_minutes: u64, max_rows: usize) -> MemRollups {
        MemRollups {
            usage: BTreeMap::new(),
            app: BTreeMap::new(),
            retention: i64::try_from(retention_minutes.max(1)).unwrap_or(i64::MAX),
            max_rows: max_rows.max(2),
            folded: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.usage.len() + self.app.len()
    }

    /// Adds a rollup; minutes already out of the window are dropped.
    pub fn add(&mut self, r: &Rollup, now_ms: u64) {
        let oldest = minute_of(None, now_ms) - self.retention + 1;
        for (k, v) in &r.usage {
            if k.minute < oldest {
                continue;
            }
            if let Some(e) = self.usage.get_mut(k) {
                e.add(v);
            } else if self.rows() < self.max_rows {
                self.usage.insert(k.clone(), *v);
            } else {
                self.folded += v.requests;
                let other = UsageKey {
                    minute: k.minute,
                    tenant: "other".into(),
                    route: "other".into(),
                    method: "OTHER".into(),
                    status_class: k.status_class,
                };
                // The fold row itself may exceed the bound by one per
                // minute and class.
                self.usage.entry(other).or_default().add(v);
            }
        }
        for (k, v) in &r.app {
            if k.minute < oldest {
                continue;
            }
            if let Some(e) = self.app.get_mut(k) {
                e.add(v);
            } else if self.rows() < self.max_rows {
                self.app.insert(k.clone(), *v);
            } else {
                self.folded += v.count;
                let other = AppKey {
                    minute: k.minute,
                    name: "other".into(),
                    labels: "{}".into(),
                };
                self.app.entry(other).and_modify(|a| a.add(v)).or_insert(*v);
            }
        }
    }

    /// Forgets minutes older than the window.
    pub fn expire(&mut self, now_ms: u64) {
        let oldest = minute_of(None, now_ms) - self.retention + 1;
        let keep_u = self.usage.split_off(&UsageKey {
            minute: oldest,
            tenant: String::new(),
            route: String::new(),
            method: String::new(),
            status_class: "",
        });
        self.usage = keep_u;
        let keep_a = self.app.split_off(&AppKey {
            minute: oldest,
            name: String::new(),
            labels: String::new(),
        });
        self.app = keep_a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(body: &str) -> Batch<'_> {
        usage_core::wire::parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn a_batch_is_summed_per_minute_and_key() {
        let b = batch(
            r#"{"batch":"b","records":[
            {"tenant":"acme","route":"/r","method":"GET","status":200,"request_bytes":1,"response_bytes":10,"duration_us":5,"time_ms":120000},
            {"tenant":"acme","route":"/r","method":"GET","status":204,"request_bytes":2,"response_bytes":20,"duration_us":7,"time_ms":179999},
            {"tenant":"acme","route":"/r","method":"GET","status":503,"duration_us":1,"time_ms":180000},
            {"tenant":"beta","route":"/r","method":"GET","status":200}],
            "metrics":[{"name":"m","value":2,"labels":{"b":"2","a":"1"},"time_ms":60000},{"name":"m","value":-1,"labels":{"a":"1","b":"2"},"time_ms":61000}]}"#,
        );
        let r = Rollup::of_batch(&b, 600_000);
        assert_eq!(r.usage.len(), 3);
        let (k, v) = &r.usage[0];
        assert_eq!(
            (k.minute, k.tenant.as_str(), k.status_class),
            (2, "acme", "2xx")
        );
        assert_eq!(
            *v,
            UsageVal {
                requests: 2,
                request_bytes: 3,
                response_bytes: 30,
                duration_us_sum: 12,
                duration_us_max: 7
            }
        );
        assert_eq!((r.usage[1].0.minute, r.usage[1].0.status_class), (3, "5xx"));
        assert_eq!(
            (r.usage[2].0.minute, r.usage[2].0.tenant.as_str()),
            (10, "beta")
        );
        assert_eq!(r.app.len(), 1);
        assert_eq!(r.app[0].0.labels, r#"{"a":"1","b":"2"}"#);
        assert_eq!(
            r.app[0].1,
            AppVal {
                count: 2,
                sum: 1.0,
                min: -1.0,
                max: 2.0
            }
        );
        let twice = Rollup::merge([&r, &r]);
        assert_eq!(twice.usage[0].1.requests, 4);
        assert_eq!(twice.app[0].1.count, 4);
    }

    #[test]
    fn memory_rollups_are_bounded_and_expire() {
        let mut m = MemRollups::new(2, 3);
        let b = batch(
            r#"{"batch":"b","records":[
            {"tenant":"a","route":"/r","method":"GET","status":200,"time_ms":0},
            {"tenant":"a","route":"/r","method":"GET","status":200,"time_ms":60000},
            {"tenant":"b","route":"/r","method":"GET","status":200,"time_ms":60000},
            {"tenant":"c","route":"/r","method":"GET","status":200,"time_ms":60000},
            {"tenant":"d","route":"/r","method":"GET","status":200,"time_ms":60000}]}"#,
        );
        m.add(&Rollup::of_batch(&b, 60_000), 60_000);
        // Minute 0 is in the window (2 minutes), so 3 rows fill it: a@0,
        // a@1, b@1; c and d fold into other@1.
        assert_eq!(m.folded, 2);
        assert_eq!(m.usage.len(), 4);
        assert!(m.usage.keys().any(|k| k.tenant == "other" && k.minute == 1));
        m.expire(120_000);
        assert!(m.usage.keys().all(|k| k.minute >= 1));
        assert_eq!(m.usage.len(), 3);
    }
}
