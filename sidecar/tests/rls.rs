//! The rate limit service against the real Redis on 127.0.0.1:6379, and
//! end to end: ratelimit.wasm (global mode) in the emulator → gRPC over
//! HTTP/2 → this service → Redis.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use ratelimit_core::rls::{Code, Descriptor, Request};
use serde_json::json;
use sidecar::rls::{serve, Limiter};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasm_host::{Host, Message, PluginConfig};

const REDIS: &str = "127.0.0.1:6379";

fn prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("254carbon-test-{}-{t}|", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn descriptor(tenant: &str, per_minute: u32) -> Descriptor {
    Descriptor {
        entries: vec![
            ("policy".into(), "per-tenant".into()),
            ("tenant".into(), tenant.into()),
        ],
        limit: Some((per_minute, 2)),
    }
}

#[test]
fn redis_counts_each_descriptor_with_gcra() {
    let rt = runtime();
    let limiter = Limiter::new(REDIS, 2, &prefix());
    rt.block_on(async {
        let req = Request {
            domain: "carbon".into(),
            descriptors: vec![descriptor("acme", 3)],
            hits_addend: 0,
        };
        let started = Instant::now();
        let mut codes = Vec::new();
        for i in 0..5 {
            let r = limiter
                .should_rate_limit(&req)
                .await
                .unwrap_or_else(|e| panic!("hit {i} on Redis at {REDIS}: {e}"));
            codes.push((r.overall, r.statuses[0].remaining));
        }
        assert_eq!(
            codes,
            vec![
                (Code::Ok, 2),
                (Code::Ok, 1),
                (Code::Ok, 0),
                (Code::OverLimit, 0),
                (Code::OverLimit, 0)
            ]
        );
        // The wait until one more: 20 s (3 per minute) from the first hit,
        // less the time the hits took (Redis' clock runs meanwhile; on a
        // loaded machine that can be more than a second).
        let r = limiter
            .should_rate_limit(&req)
            .await
            .unwrap_or_else(|e| panic!("hit 5 on Redis at {REDIS}: {e}"));
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap();
        let wait = r.statuses[0].reset_ns;
        let earliest = 20_000_000_000u64.saturating_sub(elapsed + 5_000_000);
        assert!(
            (earliest..=20_000_000_000).contains(&wait),
            "wait {wait} ns, expected 20 s less the {elapsed} ns since the first hit"
        );
        // Another tenant, and a descriptor without a limit, are untouched.
        let other = Request {
            domain: "carbon".into(),
            descriptors: vec![descriptor("other", 3), Descriptor::default()],
            hits_addend: 0,
        };
        let r = limiter
            .should_rate_limit(&other)
            .await
            .unwrap_or_else(|e| panic!("tenant other on Redis at {REDIS}: {e}"));
        assert_eq!(
            r.overall,
            Code::Ok,
            "tenant other has its own bucket: {r:?}"
        );
        assert_eq!(r.statuses[1].limit, None, "{r:?}");
    });
}

#[test]
fn redis_down_is_an_error_not_a_hang() {
    let rt = runtime();
    let limiter = Limiter::new("127.0.0.1:1", 1, &prefix());
    let req = Request {
        domain: "carbon".into(),
        descriptors: vec![descriptor("acme", 3)],
        hits_addend: 0,
    };
    let err = rt.block_on(limiter.should_rate_limit(&req)).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

fn ok(_: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: vec![],
        trailers: None,
    }
}

fn filter_with_service(
    limiter: Limiter,
    rt: &tokio::runtime::Runtime,
) -> (Host, wasm_host::Chain, tokio::sync::oneshot::Sender<()>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(serve(listener, Arc::new(limiter), async move {
        let _ = stopped.await;
    }));
    let host = Host::builder().workers(2).real_clock(true).build();
    host.add_grpc_server("ratelimit", addr);
    let cfg = json!({
        "policies": [{"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 3, "per": "minute"}}],
        "global": {"cluster": "ratelimit", "domain": "carbon", "timeout_ms": 5000}
    });
    let p = host
        .load(
            PluginConfig::new(wasm_host::wasm_path("ratelimit"))
                .name("ratelimit")
                .root_id("ratelimit")
                .vm_id("ratelimit")
                .config_json(&cfg),
        )
        .unwrap();
    let chain = host.chain(&[&p]).with_upstream(ok);
    (host, chain, stop)
}

fn send(host: &Host, chain: &wasm_host::Chain, tenant: &str) -> u16 {
    let s = host.stream(chain);
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", "/api/v1/curves/EU-ETS"),
            (":authority", "api"),
            ("x-auth-subject", "u"),
            ("x-auth-tenant", tenant),
        ],
        true,
    );
    // Longer than the filter's timeout (5 s), so the call always ends here.
    assert!(
        host.wait_for_callouts(Duration::from_secs(10)),
        "tenant {tenant}: the rate limit call still pending after 10 s: {:?}",
        host.pending_calls()
    );
    s.response()
        .unwrap_or_else(|| panic!("tenant {tenant}: no response after the rate limit call"))
        .status()
        .unwrap_or_else(|| panic!("tenant {tenant}: a response without :status"))
}

#[test]
fn the_filter_in_global_mode_is_limited_by_the_service_and_redis() {
    let rt = runtime();
    let (host, chain, stop) = filter_with_service(Limiter::new(REDIS, 2, &prefix()), &rt);
    let statuses: Vec<u16> = (0..5).map(|_| send(&host, &chain, "acme")).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    assert_eq!(send(&host, &chain, "other"), 200);
    // Every 200 was the service's answer, not the filter failing open
    // (a timeout or an error would also let the request through).
    assert_eq!(
        host.counter("wasmcustom.ratelimit.fail_open"),
        0,
        "the service failed to answer: {:?}",
        host.logs_containing("ratelimit:")
    );
    let _ = stop.send(());
}

#[test]
fn without_redis_the_service_answers_unavailable_and_the_filter_fails_open() {
    let rt = runtime();
    let (host, chain, stop) = filter_with_service(Limiter::new("127.0.0.1:1", 1, &prefix()), &rt);
    assert_eq!(send(&host, &chain, "acme"), 200);
    assert_eq!(host.counter("wasmcustom.ratelimit.fail_open"), 1);
    let _ = stop.send(());
}
