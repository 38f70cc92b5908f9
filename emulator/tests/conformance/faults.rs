use crate::common::*;
use serde_json::json;
use std::time::Duration;
use wasm_host::{Callback, FailurePolicy, Host, StreamOptions};

fn stream_on(host: &Host, chain: &wasm_host::Chain, worker: usize) -> wasm_host::Stream {
    let s = host.stream_with(
        chain,
        StreamOptions {
            worker: Some(worker),
            ..Default::default()
        },
    );
    s.request_headers(GET, true);
    s
}

#[test]
fn trap_fails_the_vm_with_503_for_this_and_later_streams_on_that_worker() {
    let host = Host::builder().workers(2).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"panic": "bad request data"}]}),
    );
    let chain = host.chain(&[&p]);
    let s = stream_on(&host, &chain, 0);
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(503));
    assert_eq!(s.local_reply().unwrap().details, "wasm_fail_stream");
    assert!(s.upstream_request().is_none());
    assert!(p.failed(0));
    assert!(
        p.failure(0)
            .unwrap()
            .contains("proxy_on_request_headers trapped"),
        "{:?}",
        p.failure(0)
    );
    assert!(
        !host.logs_containing("bad request data").is_empty(),
        "the SDK panic hook logs at critical"
    );
    // Later streams on the failed VM: 503 without any callback into it.
    let s2 = stream_on(&host, &chain, 0);
    assert_eq!(s2.response().unwrap().status(), Some(503));
    assert!(s2
        .trace()
        .iter()
        .all(|t| t.callback == Callback::ContextCreate));
    // The other worker's VM is unaffected (it traps on its own request, though).
    assert!(!p.failed(1));
}

#[test]
fn fail_open_skips_the_failed_filter() {
    let host = Host::builder().workers(1).build();
    let p = host
        .load(
            probe_config(json!({"request_headers": [{"panic": "boom"}]}))
                .failure_policy(FailurePolicy::FailOpen),
        )
        .unwrap();
    let chain = host.chain(&[&p]);
    let s = stream_on(&host, &chain, 0);
    assert!(
        s.upstream_request().is_some(),
        "the request went on without the filter"
    );
    s.respond(200, &[], b"ok");
    assert_eq!(s.response().unwrap().status(), Some(200));
    let s2 = stream_on(&host, &chain, 0);
    assert!(s2.upstream_request().is_some());
}

#[test]
fn runaway_callback_is_interrupted() {
    let host = Host::builder()
        .workers(1)
        .callback_timeout(Duration::from_millis(50))
        .build();
    let p = probe(&host, json!({"request_headers": ["spin"]}));
    let s = stream_on(&host, &host.chain(&[&p]), 0);
    assert_eq!(s.response().unwrap().status(), Some(503));
    assert!(
        p.failure(0).unwrap().contains("interrupted"),
        "{:?}",
        p.failure(0)
    );
}

#[test]
fn guest_memory_is_capped() {
    let host = Host::builder().workers(1).memory_limit(16 << 20).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"alloc": 1 << 20}], "request_body": [{"alloc": 64 << 20}]}),
    );
    let s = host.stream_with(
        &host.chain(&[&p]),
        StreamOptions {
            worker: Some(0),
            ..Default::default()
        },
    );
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    assert_eq!(lines(&host, "alloc="), vec!["alloc=1048576"]);
    s.request_body(b"x", true);
    assert!(
        p.failed(0),
        "a 64 MiB allocation under a 16 MiB cap must fail the VM"
    );
    assert_eq!(s.response().unwrap().status(), Some(503));
    assert!(p.memory_size(0) <= 16 << 20);
}

#[test]
fn trap_in_a_root_callback_fails_the_vm_too() {
    let host = Host::builder().workers(1).canary(false).build();
    let p = probe(
        &host,
        json!({"configure": [{"tick_ms": 10}], "tick": [{"panic": "tick failed"}]}),
    );
    host.advance(Duration::from_millis(100));
    assert!(p.failed(0));
    assert_eq!(
        lines(&host, "tick root").len(),
        1,
        "a failed VM gets no more ticks"
    );
    let s = stream_on(&host, &host.chain(&[&p]), 0);
    assert_eq!(s.response().unwrap().status(), Some(503));
}

#[test]
fn failed_vm_leaves_other_plugins_in_the_chain_working() {
    let host = Host::builder().workers(1).build();
    let a = host
        .load(
            probe_config(
                json!({"request_headers": [{"add_header": ["request_headers", "x-a", "1"]}]}),
            )
            .name("a"),
        )
        .unwrap();
    let b = host
        .load(probe_config(json!({"request_headers": [{"panic": "b fails"}]})).name("b"))
        .unwrap();
    let s = stream_on(&host, &host.chain(&[&a, &b]), 0);
    assert_eq!(s.response().unwrap().status(), Some(503));
    // a still sees the local reply on its encoder path and logs.
    let t: Vec<_> = s
        .trace()
        .into_iter()
        .filter(|t| t.filter == 0)
        .map(|t| t.callback)
        .collect();
    assert_eq!(
        t,
        vec![
            Callback::ContextCreate,
            Callback::RequestHeaders,
            Callback::ResponseHeaders,
            Callback::Log,
            Callback::Done
        ]
    );
    assert!(!a.failed(0));
}
