//! The ratelimit filter (local mode) in the emulator: several worker VMs,
//! a clock the test moves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use filter_tests::{ratelimit_config, Req};
use serde_json::{json, Value};
use std::time::Duration;
use wasm_host::{Host, Message, Stream, StreamOptions};

fn ok(_: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())],
        body: vec![],
        trailers: None,
    }
}

struct Env {
    host: Host,
    chain: wasm_host::Chain,
}

fn env(workers: usize, config: Value) -> Env {
    let host = Host::builder().workers(workers).build();
    let p = host
        .load(ratelimit_config(&config))
        .unwrap_or_else(|e| panic!("{e}"));
    let chain = host.chain(&[&p]).with_upstream(ok);
    Env { host, chain }
}

impl Env {
    fn send(&self, r: Req) -> Stream {
        let s = self.host.stream(&self.chain);
        s.request_headers(&r.pairs(), true);
        s
    }

    fn from(&self, ip: &str, r: Req) -> Stream {
        let s = self.host.stream_with(
            &self.chain,
            StreamOptions {
                source: format!("{ip}:40000"),
                ..StreamOptions::default()
            },
        );
        s.request_headers(&r.pairs(), true);
        s
    }

    fn status(&self, s: &Stream) -> u16 {
        s.response().unwrap().status().unwrap()
    }

    fn counter(&self, n: &str) -> u64 {
        self.host.counter(&format!("wasmcustom.ratelimit.{n}"))
    }
}

fn tenant_policy(requests: u64, per: &str, burst: u64) -> Value {
    json!({"policies": [{"id": "per-tenant", "key": ["tenant"], "rate": {"requests": requests, "per": per}, "burst": burst}]})
}

fn as_tenant(t: &str) -> Req {
    Req::get("/api/v1/curves/EU-ETS")
        .header("x-auth-subject", "u")
        .header("x-auth-tenant", t)
}

#[test]
fn the_limit_is_exact_across_four_worker_vms() {
    let e = env(4, tenant_policy(60, "minute", 25));
    // Requests land on the four VMs in turn; the clock does not move.
    let streams: Vec<Stream> = (0..100).map(|_| e.send(as_tenant("acme"))).collect();
    let admitted = streams.iter().filter(|s| e.status(s) == 200).count();
    assert_eq!(admitted, 25);
    let workers: std::collections::HashSet<usize> = streams.iter().map(|s| s.worker()).collect();
    assert_eq!(workers.len(), 4);
    assert_eq!((e.counter("allowed"), e.counter("limited")), (25, 75));
    // Another tenant has its own bucket.
    assert_eq!(e.status(&e.send(as_tenant("other"))), 200);
}

#[test]
fn buckets_refill_at_the_rate() {
    let e = env(2, tenant_policy(60, "minute", 3));
    for _ in 0..3 {
        assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    }
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 429);
    e.host.advance(Duration::from_millis(999));
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 429);
    e.host.advance(Duration::from_millis(1));
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 200, "one per second");
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 429);
    e.host.advance(Duration::from_secs(60));
    let n = (0..10)
        .filter(|_| e.status(&e.send(as_tenant("acme"))) == 200)
        .count();
    assert_eq!(n, 3, "never more than the burst");
}

#[test]
fn refusals_carry_the_body_and_every_field() {
    let e = env(1, tenant_policy(10, "minute", 1));
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    let s = e.send(as_tenant("acme"));
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(429));
    assert!(s.upstream_request().is_none());
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"error": "rate_limited", "retry_after": 6})
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("retry-after").as_deref(), Some("6"));
    assert_eq!(
        r.header("ratelimit-policy").as_deref(),
        Some("\"per-tenant\";q=1;w=60")
    );
    assert_eq!(
        r.header("ratelimit").as_deref(),
        Some("\"per-tenant\";r=0;t=6")
    );
    assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset").as_deref(), Some("6"));
}

#[test]
fn fields_on_allowed_responses_when_configured() {
    let mut cfg = tenant_policy(10, "minute", 5);
    cfg["headers_on_allowed"] = json!(true);
    let e = env(1, cfg);
    let s = e.send(as_tenant("acme"));
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("4"));
    assert_eq!(
        r.header("ratelimit").as_deref(),
        Some("\"per-tenant\";r=4;t=6")
    );
    let e = env(1, tenant_policy(10, "minute", 5));
    assert_eq!(
        e.send(as_tenant("acme"))
            .response()
            .unwrap()
            .header("x-ratelimit-remaining"),
        None
    );
}

#[test]
fn shadow_policies_count_but_never_refuse() {
    let e = env(
        2,
        json!({"policies": [{"id": "trial", "shadow": true, "key": ["tenant"], "rate": {"requests": 1, "per": "hour"}}]}),
    );
    for _ in 0..5 {
        assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    }
    assert_eq!(e.counter("shadow_limited"), 4);
    assert_eq!(e.counter("policy.trial.limited"), 4);
    assert_eq!(e.counter("limited"), 0);
}

#[test]
fn memory_stays_bounded_under_key_churn() {
    let e = env(
        2,
        json!({
            "policies": [{"id": "per-ip", "key": ["client_ip"], "rate": {"requests": 1, "per": "second"}}],
            "table": {"slots": 64}
        }),
    );
    for i in 0..5_000u32 {
        let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
        e.from(&ip, Req::get("/"));
        if i % 10 == 9 {
            e.host.advance(Duration::from_secs(1));
        }
    }
    assert!(
        e.host.shared_data_len() <= 64,
        "{} shared-data entries",
        e.host.shared_data_len()
    );
    assert!(
        e.counter("slots_recycled") > 4_000,
        "{}",
        e.counter("slots_recycled")
    );
    // The same client still gets its exact limit.
    assert_eq!(e.status(&e.from("192.168.0.1", Req::get("/"))), 200);
    assert_eq!(e.status(&e.from("192.168.0.1", Req::get("/"))), 429);
}

#[test]
fn collisions_fail_open_or_closed_as_configured() {
    let cfg = |on_error: &str| {
        json!({
            "policies": [{"id": "p", "key": ["client_ip"], "rate": {"requests": 1, "per": "hour"}}],
            "table": {"slots": 2}, "on_error": on_error
        })
    };
    let e = env(1, cfg("allow"));
    let statuses: Vec<u16> = (0..4)
        .map(|i| e.status(&e.from(&format!("10.0.0.{i}"), Req::get("/"))))
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 4);
    assert_eq!(e.counter("fail_open"), 2);
    let e = env(1, cfg("deny"));
    let statuses: Vec<u16> = (0..4)
        .map(|i| e.status(&e.from(&format!("10.0.0.{i}"), Req::get("/"))))
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2);
    assert_eq!(e.counter("fail_closed"), 2);
}

#[test]
fn configuration_errors_name_the_field() {
    let host = Host::builder().workers(1).build();
    let err = |cfg: Value| match host.load(ratelimit_config(&cfg)) {
        Ok(_) => panic!("accepted {cfg}"),
        Err(e) => e.logs().join("\n"),
    };
    assert!(
        err(json!({"policies": [{"id": "a", "rate": {"requests": 0, "per": "minute"}}]}))
            .contains("policies[0].rate.requests")
    );
    assert!(err(json!({"policies": [], "mode": "x"})).contains("unknown field `mode`"));
}
