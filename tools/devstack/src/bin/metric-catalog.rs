//! The metric catalogue: every metric the code defines, as JSON on stdout,
//! read from the code itself so that dashboards and alerts can be checked
//! against it (`scripts/check-monitoring.sh`) and never drift.
//!
//! - **sidecar**: the registry built as `sidecar::app` builds it (the hub's
//!   metrics, the grants', the rate limit service's with `--rls-listen`)
//!   and rendered by `/metrics`' own code (`server::render_metrics`, with
//!   the usage families), plus the parts that need a server or a file to
//!   start (the Kafka bus, the token verifier, the usage PostgreSQL writer)
//!   registered or rendered through the same `register` / render functions
//!   on their idle metric structs. Names as Prometheus scrapes them
//!   (`_total` on counters). Label names are those of the samples the
//!   rendering shows; a family with no sample yet (a label set created on
//!   first use) has `labels: null` unless a public helper creates one here.
//! - **filters**: each core's `Metrics::define` run against the host test
//!   double (`filter_common::double`), which records every name defined;
//!   per-item names (a rule's, a policy's) come from a configuration whose
//!   ids are placeholders, reported as patterns.
//!
//! Envoy's names: a proxy-wasm metric `auth.denied` is the stat
//! `wasmcustom.auth.denied` inside Envoy (the namespace Envoy's wasm
//! extension registers, what `proxyStatsMatcher` / `stats_matcher` match);
//! `/stats` shows `auth.denied`, and `/stats/prometheus` shows
//! `auth_denied`: a registered custom namespace is stripped and the rest
//! sanitized (`[^a-zA-Z0-9_]` to `_`) without the `envoy_` prefix other
//! stats get (Envoy's `PrometheusStatsFormatter::metricName`). Counters keep
//! their name (no `_total`).

use filter_common::double::FakeHost;
use filter_common::host::MetricKind;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// A placeholder id for per-item names; valid as a rule and a policy id.
const ID: &str = "ID-PLACEHOLDER";

fn main() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metric-catalog: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(catalogue()) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(e) => {
            eprintln!("metric-catalog: {e}");
            std::process::exit(1);
        }
    }
}

async fn catalogue() -> Result<Value, String> {
    Ok(json!({
        "sidecar": sidecar_families().await?,
        "filters": filters()?,
        "envoy_naming": {
            "stat": "wasmcustom.<name>",
            "stats_endpoint": "<name>",
            "prometheus": "<name> with every character outside [a-zA-Z0-9_] replaced by _, no envoy_ prefix, counters without _total",
            "source": "envoyproxy/envoy source/server/admin/prometheus_stats.cc (PrometheusStatsFormatter::metricName: a registered custom stat namespace is stripped, no envoy_ prefix); source/extensions/common/wasm/plugin.cc (ensureCustomStatNamespaceRegistered: \"wasmcustom\")"
        }
    }))
}

// ---------------------------------------------------------------- sidecar

async fn sidecar_families() -> Result<Value, String> {
    use sidecar::expo::{Format, Writer};

    let config = <sidecar::config::Config as clap::Parser>::try_parse_from([
        "sidecar",
        "--policy",
        "/dev/null",
        // The rate limit service's metrics are registered with it.
        "--rls-listen",
        "127.0.0.1:0",
    ])
    .map_err(|e| format!("sidecar config: {e}"))?;
    let policy = entitlements_core::policy::Policy::from_json(br#"{"default":"deny","rules":[]}"#)
        .map_err(|e| format!("policy: {e}"))?;
    let app = sidecar::app(&config, policy);
    // Label names of families filled on first use, through their helpers.
    // (The hub's metrics are inside the app; a second instance shows the
    // same names.)
    let extra = sidecar::metrics::Metrics::new();
    extra.revoked(ID, 0);
    extra.policy_reload("file", true);
    let mut m = prometheus_client::registry::Registry::default();
    extra.register(&mut m);
    let grants = sidecar::grants::live::GrantsMetrics::default();
    grants.reload(sidecar::grants::live::Reload::Ok);
    grants.feed(sidecar::grants::live::FeedAnswer::Snapshot);
    grants.register(&mut m);
    // A batch with one record, so the per-tenant families show labels.
    let batch = format!(
        r#"{{"batch":"catalogue-1","records":[{{"tenant":"{ID}","subject":"s","route":"/r","method":"GET","status":200}}]}}"#
    );
    app.usage
        .ingest(batch.as_bytes())
        .await
        .map_err(|e| format!("usage batch: {e:?}"))?;
    let _stream = app.usage.stream_usage(ID);

    let mut parts = vec![(
        "always",
        sidecar::server::render_metrics(&app, Format::Prometheus),
    )];
    parts.push(("labels", prom(&m)));

    let mut kafka = prometheus_client::registry::Registry::default();
    let k = sidecar::bus::kafka::KafkaMetrics::default();
    k.register(&mut kafka);
    parts.push(("--bus kafka", prom(&kafka)));

    let mut verifier = prometheus_client::registry::Registry::default();
    let v = sidecar::verifier::VerifierMetrics::default();
    v.proof("ws", "verified");
    v.register(&mut verifier);
    parts.push(("--auth-config", prom(&verifier)));

    let mut pg = String::new();
    sidecar::usage::render_postgres(
        &sidecar::usage::pg::PgStats::default(),
        &mut Writer {
            out: &mut pg,
            format: Format::Prometheus,
        },
    );
    parts.push(("--usage-postgres", pg));

    // Every family registered, also those without a child yet (the text
    // encoder leaves them out): the registries' descriptors.
    let mut registered: Vec<(String, String, &str)> = Vec::new();
    for (when, r) in [
        ("always", &app.registry),
        ("--bus kafka", &kafka),
        ("--auth-config", &verifier),
    ] {
        for (name, help) in descriptors(&format!("{r:?}"))? {
            registered.push((name, help, when));
        }
    }

    let mut families: Vec<Family> = Vec::new();
    for (when, text) in parts {
        for f in parse_exposition(&text)? {
            match families.iter_mut().find(|g| g.name == f.name) {
                // The `labels` part only adds label names to families
                // already listed.
                Some(g) => {
                    if let Some(l) = f.labels {
                        g.labels.get_or_insert_with(BTreeSet::new).extend(l);
                    }
                }
                None if when == "labels" => {
                    // A family the app has registered without a child yet.
                    let base = f.name.strip_suffix("_total").unwrap_or(&f.name);
                    match registered
                        .iter()
                        .find(|(n, _, _)| n == base || *n == f.name)
                    {
                        Some((_, _, w)) => families.push(Family {
                            when: w.to_string(),
                            ..f
                        }),
                        None => {
                            return Err(format!(
                                "{} is registered by the helpers' metrics but not by sidecar::app",
                                f.name
                            ))
                        }
                    }
                }
                None => families.push(Family {
                    when: when.to_string(),
                    ..f
                }),
            }
        }
    }
    for (name, help, when) in registered {
        let rendered = families
            .iter()
            .any(|f| f.name == name || f.name.strip_suffix("_total") == Some(name.as_str()));
        if !rendered {
            families.push(Family {
                name,
                kind: "unknown".into(),
                help,
                labels: None,
                when: when.to_string(),
            });
        }
    }
    families.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Value::Array(
        families
            .into_iter()
            .map(|f| {
                let series: Vec<String> = match f.kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{}{s}", f.name))
                        .collect(),
                    "summary" => ["", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{}{s}", f.name))
                        .collect(),
                    // A family without a child: its type shows with the
                    // first one (a counter's series has `_total`).
                    "unknown" => vec![f.name.clone(), format!("{}_total", f.name)],
                    _ => vec![f.name.clone()],
                };
                json!({
                    "name": f.name,
                    "type": f.kind,
                    "help": f.help,
                    "series": series,
                    "labels": f.labels,
                    "when": f.when,
                })
            })
            .collect(),
    ))
}

/// (full name, help) of every descriptor in a registry's `Debug` text:
/// `Registry { prefix: Some(Prefix("sidecar")), .. metrics: [(Descriptor {
/// name: "ws_connections", help: "..", unit: None }, Gauge { .. })..] }`.
/// The sidecar registers under one level of sub-registries; a deeper one is
/// refused rather than misnamed.
fn descriptors(debug: &str) -> Result<Vec<(String, String)>, String> {
    let re = regex_lite::Regex::new(
        r#"Registry \{ prefix: (?:None|Some\(Prefix\("([^"]*)"\)\))|Descriptor \{ name: "([^"]*)", help: "((?:[^"\\]|\\.)*)""#,
    )
    .map_err(|e| e.to_string())?;
    if debug.matches("sub_registries: [Registry").count() > 1 {
        return Err(
            "a registry nested more than one level: metric-catalog cannot name its families".into(),
        );
    }
    let mut prefix: Option<String> = None;
    let mut out = Vec::new();
    for c in re.captures_iter(debug) {
        if let Some(name) = c.get(2) {
            let name = match &prefix {
                Some(p) => format!("{p}_{}", name.as_str()),
                None => name.as_str().to_string(),
            };
            let help = c.get(3).map_or("", |m| m.as_str()).replace("\\\"", "\"");
            out.push((name, help));
        } else {
            prefix = c.get(1).map(|m| m.as_str().to_string());
        }
    }
    Ok(out)
}

fn prom(r: &prometheus_client::registry::Registry) -> String {
    sidecar::expo::to_prometheus(&sidecar::metrics::render(r))
}

struct Family {
    name: String,
    kind: String,
    help: String,
    /// Label names seen on samples (`le`, `quantile` left out); `None`
    /// when the family had no sample.
    labels: Option<BTreeSet<String>>,
    when: String,
}

/// Families of Prometheus text: `# HELP`, `# TYPE`, samples.
fn parse_exposition(text: &str) -> Result<Vec<Family>, String> {
    let mut out: Vec<Family> = Vec::new();
    let mut help = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest
                .split_once(' ')
                .map(|(_, h)| h)
                .unwrap_or("")
                .to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad TYPE line {line:?}"))?;
            out.push(Family {
                name: name.to_string(),
                kind: kind.to_string(),
                help: std::mem::take(&mut help),
                labels: None,
                when: String::new(),
            });
        } else if !line.is_empty() && !line.starts_with('#') {
            let f = out
                .last_mut()
                .ok_or_else(|| format!("sample before any TYPE: {line:?}"))?;
            let labels = f.labels.get_or_insert_with(BTreeSet::new);
            if let Some((_, rest)) = line.split_once('{') {
                for name in label_names(rest) {
                    if name != "le" && name != "quantile" {
                        labels.insert(name);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The label names of `a="x",b="y\"z"} 1`.
fn label_names(s: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim_start_matches(',').trim().to_string();
        if name.is_empty() || name.starts_with('}') {
            return names;
        }
        names.push(name);
        // The quoted value.
        if chars.next() != Some('"') {
            return names;
        }
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => {}
            }
        }
        if chars.peek() == Some(&'}') {
            return names;
        }
    }
}

// ---------------------------------------------------------------- filters

fn filters() -> Result<Value, String> {
    let mut out = serde_json::Map::new();

    let h = FakeHost::default();
    let _ = auth_core::metrics::Metrics::define(&h);
    let reason = auth_core::metrics::denied_metric(ID);
    out.insert(
        "auth".into(),
        filter(
            &h,
            &[(
                reason.as_str(),
                "code",
                auth_core::error::Reason::CODES
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
            )],
        ),
    );

    let h = FakeHost::default();
    let mut m = entitlements_core::metrics::Metrics::define(&h);
    let policy = entitlements_core::policy::Policy::from_json(
        format!(r#"{{"default":"deny","rules":[{{"id":"{ID}","effect":"allow","match":{{"path":{{"prefix":"/"}}}}}}]}}"#)
            .as_bytes(),
    )
    .map_err(|e| format!("entitlements policy: {e}"))?;
    m.define_rules(&h, &policy);
    out.insert("entitlements".into(), filter(&h, &[]));

    let h = FakeHost::default();
    let settings = ratelimit_core::config::Settings::from_json(
        format!(r#"{{"policies":[{{"id":"{ID}","rate":{{"requests":1,"per":"second"}}}}]}}"#)
            .as_bytes(),
    )
    .map_err(|e| format!("ratelimit settings: {e}"))?;
    let _ = ratelimit_core::metrics::Metrics::define(&h, &settings.policies);
    out.insert("ratelimit".into(), filter(&h, &[]));

    let h = FakeHost::default();
    let _ = usage_core::metrics::Metrics::define(&h);
    out.insert("usage".into(), filter(&h, &[]));

    Ok(Value::Object(out))
}

/// Envoy's Prometheus name of a wasm metric (see the module's comment).
fn prometheus_name(stat: &str) -> String {
    stat.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The metrics defined on `h`. A name with the placeholder id is a pattern
/// (`<id>`); `expand` lists patterns whose values the code enumerates: the
/// name with the placeholder, the placeholder's name, the values (their
/// concrete names are then reported as members of the pattern).
fn filter(h: &FakeHost, expand: &[(&str, &str, Vec<String>)]) -> Value {
    let mut metrics = Vec::new();
    for name in h.metric_names() {
        let kind = match h.metric_kind(&name) {
            Some(MetricKind::Counter) => "counter",
            Some(MetricKind::Gauge) => "gauge",
            None => "unknown",
        };
        let member = expand.iter().find_map(|(pattern, what, values)| {
            let (pre, post) = pattern.split_once(ID)?;
            let v = name.strip_prefix(pre)?.strip_suffix(post)?;
            values
                .iter()
                .any(|x| x == v)
                .then(|| format!("{pre}<{what}>{post}"))
        });
        let (name, placeholder) = match name.split_once(ID) {
            Some((pre, post)) => (format!("{pre}<id>{post}"), Some("id")),
            None => (name, None),
        };
        let prometheus = match name.split_once("<id>") {
            Some((pre, post)) => format!("{}<id>{}", prometheus_name(pre), prometheus_name(post)),
            None => prometheus_name(&name),
        };
        metrics.push(json!({
            "name": name,
            "type": kind,
            "envoy_stat": format!("wasmcustom.{name}"),
            "prometheus": prometheus,
            "pattern": placeholder.map(|_| "<id>: a rule's or policy's id from the configuration; Envoy sanitizes it like the rest"),
            "member_of": member,
        }));
    }
    let patterns: Vec<Value> = expand
        .iter()
        .map(|(pattern, what, values)| {
            let (pre, post) = pattern.split_once(ID).unwrap_or((pattern, ""));
            json!({
                "name": format!("{pre}<{what}>{post}"),
                "prometheus": format!("{}<{what}>{}", prometheus_name(pre), prometheus_name(post)),
                "values": values,
            })
        })
        .collect();
    json!({"metrics": metrics, "enumerated_patterns": patterns})
}
