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
        headers: vec![(":status".into(), b"200".to_vec())].into(),
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
        Some("\"per-tenant\";q=1;w=6"),
        "a quota of the burst per its refill time (10 a minute: one per 6 s)"
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
    assert!(err(json!({"policies": [], "global": {"cluster": ""}})).contains("global.cluster"));
}

// ---- global mode: the Envoy Rate Limit Service API ----

use ratelimit_core::rls;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wasm_host::Reply;

/// A rate limit service: `limit` hits per descriptor, counted here.
fn install_rls(host: &Host, limit: u32) -> Arc<Mutex<Vec<rls::Request>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let counts = Arc::new(Mutex::new(HashMap::<Vec<(String, String)>, u32>::new()));
    let s = seen.clone();
    host.add_grpc_cluster("ratelimit", move |call| {
        assert_eq!(
            (call.service.as_str(), call.method.as_str()),
            (rls::SERVICE, rls::METHOD)
        );
        let req = rls::Request::decode(&call.message).unwrap();
        s.lock().unwrap().push(req.clone());
        let mut counts = counts.lock().unwrap();
        let statuses: Vec<rls::Status> = req
            .descriptors
            .iter()
            .map(|d| {
                let n = counts.entry(d.entries.clone()).or_default();
                *n += 1;
                rls::Status {
                    code: if *n > limit {
                        rls::Code::OverLimit
                    } else {
                        rls::Code::Ok
                    },
                    limit: Some((limit, 2, "from-service".into())),
                    remaining: limit.saturating_sub(*n),
                    reset_ns: 42_500_000_000,
                }
            })
            .collect();
        let overall = if statuses.iter().any(|s| s.code == rls::Code::OverLimit) {
            rls::Code::OverLimit
        } else {
            rls::Code::Ok
        };
        Reply::grpc(
            rls::Response {
                overall,
                statuses,
                response_headers: vec![("x-rls".into(), "yes".into())],
                raw_body: vec![],
            }
            .encode(),
        )
    });
    seen
}

fn global(policies: Value) -> Value {
    json!({"policies": policies, "global": {"cluster": "ratelimit", "domain": "carbon", "timeout_ms": 50}})
}

#[test]
fn global_mode_asks_the_service_and_applies_its_answer() {
    let host = Host::builder().workers(2).build();
    let seen = install_rls(&host, 2);
    let p = host.load(ratelimit_config(&global(json!([
        {"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 2, "per": "minute"}},
        {"id": "watch", "shadow": true, "key": ["route"], "rate": {"requests": 1, "per": "hour"}}
    ])))).unwrap();
    let e = Env {
        chain: host.chain(&[&p]).with_upstream(ok),
        host,
    };
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    let s = e.send(as_tenant("acme"));
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(429));
    assert_eq!(
        r.header("ratelimit-policy").as_deref(),
        Some("\"per-tenant\";q=2;w=60")
    );
    assert_eq!(r.header("retry-after").as_deref(), Some("43"));
    assert_eq!(r.header("x-rls").as_deref(), Some("yes"));
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"error": "rate_limited", "retry_after": 43})
    );
    // The third request also put the shadow policy over its limit: counted only.
    assert_eq!(e.counter("shadow_limited"), 1);
    assert_eq!(e.counter("policy.per-tenant.limited"), 1);
    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(req.domain, "carbon");
    assert_eq!(
        req.descriptors[0],
        rls::Descriptor {
            entries: vec![
                ("policy".into(), "per-tenant".into()),
                ("tenant".into(), "acme".into())
            ],
            limit: Some((2, 2))
        }
    );
    assert_eq!(
        req.descriptors[1].entries,
        vec![
            ("policy".to_string(), "watch".to_string()),
            ("route".to_string(), "watch".to_string())
        ]
    );
}

#[test]
fn a_service_that_does_not_answer_does_not_hang_the_request() {
    for (on_error, want) in [("allow", 200), ("deny", 503)] {
        let host = Host::builder().workers(1).build();
        host.add_grpc_cluster("ratelimit", |_| Reply::Never);
        let mut cfg = global(
            json!([{"id": "p", "key": ["tenant"], "rate": {"requests": 1, "per": "second"}}]),
        );
        cfg["on_error"] = json!(on_error);
        let p = host.load(ratelimit_config(&cfg)).unwrap();
        let e = Env {
            chain: host.chain(&[&p]).with_upstream(ok),
            host,
        };
        let s = e.send(as_tenant("acme"));
        assert!(s.response().is_none(), "waits for the service");
        e.host.advance(Duration::from_millis(50));
        assert_eq!(s.response().unwrap().status(), Some(want), "{on_error}");
        assert_eq!(
            e.counter(if on_error == "allow" {
                "fail_open"
            } else {
                "fail_closed"
            }),
            1
        );
    }
    // Garbage from the service is a failure too.
    let host = Host::builder().workers(1).build();
    host.add_grpc_cluster("ratelimit", |_| Reply::grpc(vec![0x0a, 0xff]));
    let p = host
        .load(ratelimit_config(&global(
            json!([{"id": "p", "key": ["tenant"], "rate": {"requests": 1, "per": "second"}}]),
        )))
        .unwrap();
    let e = Env {
        chain: host.chain(&[&p]).with_upstream(ok),
        host,
    };
    assert_eq!(e.status(&e.send(as_tenant("acme"))), 200);
    assert_eq!(e.counter("fail_open"), 1);
}

#[test]
fn global_mode_sends_fields_on_allowed_responses_when_configured() {
    let host = Host::builder().workers(1).build();
    install_rls(&host, 5);
    let mut cfg = global(
        json!([{"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 5, "per": "minute"}}]),
    );
    cfg["headers_on_allowed"] = json!(true);
    let p = host.load(ratelimit_config(&cfg)).unwrap();
    let e = Env {
        chain: host.chain(&[&p]).with_upstream(ok),
        host,
    };
    let s = e.send(as_tenant("acme"));
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("4"));
    assert_eq!(
        r.header("ratelimit-policy").as_deref(),
        Some("\"per-tenant\";q=5;w=60")
    );
}
