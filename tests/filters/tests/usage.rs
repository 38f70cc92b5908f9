//! The usage filter in the emulator: records at on_log through the shared
//! queue, batches to a cluster, retries under the same id, the bound.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use filter_tests::{demo_upstream as upstream, usage_config};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasm_host::{CallRequest, Host, Reply};

type Calls = Arc<Mutex<Vec<CallRequest>>>;

struct Env {
    host: Host,
    chain: wasm_host::Chain,
    calls: Calls,
    /// What the cluster answers next (cycled through the last one).
    replies: Arc<Mutex<Vec<Reply>>>,
}

fn config(extra: Value) -> Value {
    let mut c = json!({
        "cluster": "sidecar",
        "flush_interval_ms": 1000,
        "max_batch_records": 5,
        "routes": ["/api/v1/curves/{market}/latest", "/api/v1/instruments/**"],
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn env(workers: usize, cfg: Value) -> Env {
    let host = Host::builder().workers(workers).build();
    let calls: Calls = Arc::default();
    let replies: Arc<Mutex<Vec<Reply>>> = Arc::new(Mutex::new(vec![Reply::ok(200, "{}")]));
    {
        let (calls, replies) = (calls.clone(), replies.clone());
        host.add_cluster("sidecar", move |req| {
            calls.lock().unwrap().push(req.clone());
            let mut r = replies.lock().unwrap();
            if r.len() > 1 {
                r.remove(0)
            } else {
                r[0].clone()
            }
        });
    }
    let p = host
        .load(usage_config(&cfg))
        .unwrap_or_else(|e| panic!("{e}"));
    let chain = host.chain(&[&p]).with_upstream(upstream);
    Env {
        host,
        chain,
        calls,
        replies,
    }
}

impl Env {
    fn request(&self, method: &str, path: &str, tenant: Option<&str>, body: &[u8]) {
        let s = self.host.stream(&self.chain);
        let mut h = vec![(":method", method), (":path", path), (":authority", "api")];
        if let Some(t) = tenant {
            h.push(("x-auth-tenant", t));
            h.push(("x-auth-subject", "alice"));
        }
        if body.is_empty() {
            s.request_headers(&h, true);
        } else {
            s.request_headers(&h, false);
            self.host.advance(Duration::from_millis(3));
            s.request_body(body, true);
        }
        assert!(s.is_complete());
    }

    fn counter(&self, n: &str) -> u64 {
        self.host.counter(&format!("usage.{n}"))
    }

    /// The batches the cluster got, parsed.
    fn batches(&self) -> Vec<(String, Vec<Value>)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                assert_eq!(c.header(":method"), Some("POST"));
                assert_eq!(c.header(":path"), Some("/v1/usage"));
                assert_eq!(c.header("content-type"), Some("application/json"));
                // The sidecar's own parser accepts every batch.
                let b = usage_core::wire::parse(&c.body).unwrap();
                assert_eq!(
                    c.header("x-usage-records"),
                    Some(b.records.len().to_string().as_str())
                );
                let v: Value = serde_json::from_slice(&c.body).unwrap();
                (
                    v["batch"].as_str().unwrap().to_string(),
                    v["records"].as_array().unwrap().clone(),
                )
            })
            .collect()
    }
}

#[test]
fn every_stream_becomes_one_record_in_a_batch() {
    let e = env(2, config(json!({})));
    e.request(
        "GET",
        "/api/v1/curves/EU-ETS/latest?at=now",
        Some("acme"),
        b"",
    );
    e.request("POST", "/api/v1/instruments/x/y", Some("beta"), b"12345");
    e.request("GET", "/missing", None, b"");
    assert_eq!(e.counter("records"), 3);
    assert!(
        e.calls.lock().unwrap().is_empty(),
        "a partial batch waits for the tick"
    );
    e.host.advance(Duration::from_millis(1000));
    let batches = e.batches();
    let mut records: Vec<Value> = batches.iter().flat_map(|(_, r)| r.clone()).collect();
    records.sort_by_key(|r| r["route"].as_str().unwrap().to_string());
    assert_eq!(records.len(), 3);
    let now_ms = e
        .host
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let r = &records[0];
    assert_eq!(
        (
            &r["tenant"],
            &r["subject"],
            &r["route"],
            &r["method"],
            &r["status"]
        ),
        (
            &json!("acme"),
            &json!("alice"),
            &json!("/api/v1/curves/{market}/latest"),
            &json!("GET"),
            &json!(200)
        )
    );
    assert_eq!(
        (&r["request_bytes"], &r["response_bytes"]),
        (&json!(0), &json!(11))
    );
    assert!(r["time_ms"].as_u64().unwrap() <= now_ms);
    let r = &records[1];
    assert_eq!(
        (
            &r["tenant"],
            &r["method"],
            &r["request_bytes"],
            &r["duration_us"]
        ),
        (&json!("beta"), &json!("POST"), &json!(5), &json!(3000)),
        "the body arrived 3 ms after the headers"
    );
    let r = &records[2];
    assert_eq!(
        (&r["tenant"], &r["subject"], &r["route"], &r["status"]),
        (
            &json!("anonymous"),
            &json!(""),
            &json!("other"),
            &json!(404)
        )
    );
    assert_eq!(e.counter("records_sent"), 3);
    assert_eq!(e.counter("batches_sent"), batches.len() as u64);
    let ids: std::collections::HashSet<&String> = batches.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), batches.len(), "batch ids are unique across VMs");
}

#[test]
fn a_full_batch_goes_at_once() {
    let e = env(1, config(json!({})));
    for _ in 0..12 {
        e.request("GET", "/api/v1/curves/CAISO/latest", Some("acme"), b"");
    }
    // Two full batches of 5 left as the queue filled; 2 wait for the tick.
    let sizes: Vec<usize> = e.batches().iter().map(|(_, r)| r.len()).collect();
    assert_eq!(sizes, vec![5, 5]);
    e.host.advance(Duration::from_millis(1000));
    let sizes: Vec<usize> = e.batches().iter().map(|(_, r)| r.len()).collect();
    assert_eq!(sizes, vec![5, 5, 2]);
}

#[test]
fn a_failed_batch_is_resent_under_its_id_with_backoff() {
    let e = env(
        1,
        config(json!({"retry_initial_ms": 500, "retry_max_ms": 4000})),
    );
    *e.replies.lock().unwrap() = vec![
        Reply::ok(503, "{}"),
        Reply::Reset {
            delay: Duration::ZERO,
        },
        Reply::ok(200, "{}"),
    ];
    for _ in 0..3 {
        e.request("GET", "/x", Some("acme"), b"");
    }
    e.host.advance(Duration::from_millis(1000)); // tick: 503
    assert_eq!(e.batches().len(), 1);
    e.host.advance(Duration::from_millis(400)); // backoff 500 ms not over
    assert_eq!(e.batches().len(), 1);
    e.host.advance(Duration::from_millis(600)); // tick at 2000: reset
    assert_eq!(e.batches().len(), 2);
    e.host.advance(Duration::from_millis(1000)); // backoff 1000: still waiting at 3000
    e.host.advance(Duration::from_millis(1000)); // tick at 4000: 200
    let b = e.batches();
    assert_eq!(b.len(), 3);
    assert!(
        b.iter().all(|(id, r)| *id == b[0].0 && r.len() == 3),
        "{b:?}"
    );
    assert_eq!(e.counter("batch_failures"), 2);
    assert_eq!(e.counter("records_sent"), 3);
    e.request("GET", "/x", Some("acme"), b"");
    e.host.advance(Duration::from_millis(1000));
    let b = e.batches();
    assert_ne!(b[3].0, b[0].0, "a new batch gets a new id");
}

#[test]
fn while_the_sidecar_is_away_the_oldest_records_beyond_the_cap_are_dropped() {
    let e = env(
        1,
        config(json!({"max_pending_records": 10, "retry_initial_ms": 100, "retry_max_ms": 100})),
    );
    *e.replies.lock().unwrap() = vec![Reply::ok(500, "{}")];
    for i in 0..25 {
        let path = format!("/r/{i}");
        e.request("GET", &path, Some(&format!("t{i}")), b"");
        e.host.advance(Duration::from_millis(150));
    }
    // The VM never holds more than 10: the 15 oldest are gone.
    assert_eq!(e.counter("records_dropped"), 15);
    *e.replies.lock().unwrap() = vec![Reply::ok(200, "{}")];
    e.host.advance(Duration::from_millis(3000));
    assert_eq!(e.counter("records_sent"), 10);
    // What arrived in the end are the 10 newest records (t15..t24).
    let mut seen: Vec<String> = Vec::new();
    for (id, recs) in e.batches() {
        let _ = id;
        for r in recs {
            let t = r["tenant"].as_str().unwrap().to_string();
            if !seen.contains(&t) {
                seen.push(t);
            }
        }
    }
    let acked: Vec<String> = (15..25).map(|i| format!("t{i}")).collect();
    assert!(acked.iter().all(|t| seen.contains(t)), "{seen:?}");
    assert_eq!(e.counter("records_sent") + e.counter("records_dropped"), 25);
}

#[test]
fn a_refused_batch_is_dropped_and_counted() {
    let e = env(1, config(json!({})));
    *e.replies.lock().unwrap() = vec![
        Reply::ok(400, r#"{"error":"invalid_batch"}"#),
        Reply::ok(200, "{}"),
    ];
    e.request("GET", "/x", Some("acme"), b"");
    e.host.advance(Duration::from_millis(1000));
    e.host.advance(Duration::from_millis(1000));
    assert_eq!(e.counter("records_rejected"), 1);
    assert_eq!(e.batches().len(), 1, "not resent");
    assert!(!e.host.logs_containing("refused batch").is_empty());
}

#[test]
fn the_secret_and_authority_are_sent() {
    let e = env(
        1,
        config(json!({"secret": "s3cret", "authority": "usage.local", "path": "/ingest"})),
    );
    e.request("GET", "/x", Some("acme"), b"");
    e.host.advance(Duration::from_millis(1000));
    let c = e.calls.lock().unwrap();
    assert_eq!(c[0].header("x-usage-secret"), Some("s3cret"));
    assert_eq!(c[0].header(":authority"), Some("usage.local"));
    assert_eq!(c[0].header(":path"), Some("/ingest"));
}

#[test]
fn the_secret_may_come_from_the_vms_environment() {
    // As Istio's WasmPlugin vmConfig.env hands it a Kubernetes Secret.
    let host = Host::builder().build();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    host.add_cluster("sidecar", move |req| {
        seen.lock().unwrap().push(req.clone());
        Reply::ok(200, "{}")
    });
    let p = host
        .load(
            usage_config(&config(json!({"secret_env": "ACCESS_USAGE_SECRET"})))
                .env("ACCESS_USAGE_SECRET", "from-env-1"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let chain = host.chain(&[&p]).with_upstream(upstream);
    let s = host.stream(&chain);
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", "/x"),
            (":authority", "api"),
            ("x-auth-tenant", "acme"),
        ],
        true,
    );
    host.advance(Duration::from_millis(1000));
    let c = calls.lock().unwrap();
    assert_eq!(c[0].header("x-usage-secret"), Some("from-env-1"));
    // Unset: the configuration is refused with the field and the name.
    let e = host
        .load(usage_config(&config(
            json!({"secret_env": "ACCESS_USAGE_SECRET_UNSET"}),
        )))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("secret_env: ACCESS_USAGE_SECRET_UNSET is not set"),
        "{e}"
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let host = Host::builder().build();
    let err = |cfg: Value| match host.load(usage_config(&cfg)) {
        Ok(_) => panic!("{cfg} was accepted"),
        Err(e) => e.to_string(),
    };
    for (cfg, want) in [
        (json!({}), "missing field `cluster`"),
        (
            json!({"cluster": "c", "max_batch_records": 0}),
            "max_batch_records",
        ),
        (json!({"cluster": "c", "routes": ["nope"]}), "routes[0]"),
        (json!({"cluster": "c", "flush": 1}), "unknown field `flush`"),
    ] {
        let e = err(cfg.clone());
        assert!(
            e.contains("on_configure returned false") && e.contains(want),
            "{cfg}: {e}"
        );
    }
}
