use super::*;
use filter_common::double::FakeHost;
use filter_common::filter::configure;
use serde_json::{json, Value};
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const START: Duration = Duration::from_secs(1_800_000_000);

fn worker(h: &FakeHost, cfg: &Value) -> RateLimit {
    *h.config.borrow_mut() = Some(cfg.to_string().into_bytes());
    configure::<RateLimit, _>(h).expect("configured")
}

fn per_tenant(requests: u64, extra: Value) -> Value {
    let mut cfg = json!({"policies": [{"id": "per-tenant", "key": ["tenant"],
        "rate": {"requests": requests, "per": "minute"}}]});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    cfg
}

fn request(h: &FakeHost, r: &mut RateLimit, tenant: &str) -> (Flow, Stream) {
    h.stream(
        2,
        &[
            (":method", "GET"),
            (":path", "/a?x"),
            ("x-auth-tenant", tenant),
        ],
    );
    let mut s = Stream::default();
    (r.on_request_headers(h, &mut s, 2), s)
}

#[test]
fn the_limit_is_exact_across_workers_and_a_refusal_carries_every_field() {
    let a = FakeHost::at(START);
    let b = a.sibling();
    let cfg = per_tenant(3, json!({}));
    let (mut ra, mut rb) = (worker(&a, &cfg), worker(&b, &cfg));
    let flows: Vec<Flow> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                request(&a, &mut ra, "acme").0
            } else {
                request(&b, &mut rb, "acme").0
            }
        })
        .collect();
    assert_eq!(
        flows,
        [Flow::Continue, Flow::Continue, Flow::Continue, Flow::Pause]
    );
    assert_eq!(request(&a, &mut ra, "beta").0, Flow::Continue, "own bucket");
    let r = b.last_reply().expect("429");
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json(),
        json!({"error": "rate_limited", "retry_after": 20})
    );
    assert_eq!(r.header("retry-after"), Some("20"));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"per-tenant\";q=3;w=60")
    );
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(a.metric_value("ratelimit.allowed"), 4);
    assert_eq!(a.metric_value("ratelimit.limited"), 1);
    assert_eq!(a.metric_value("ratelimit.policy.per-tenant.limited"), 1);
    a.advance(Duration::from_secs(20));
    assert_eq!(request(&b, &mut rb, "acme").0, Flow::Continue, "refilled");
}

#[test]
fn fields_on_allowed_responses_come_from_the_closest_enforced_policy() {
    let h = FakeHost::at(START);
    let cfg = json!({"headers_on_allowed": true, "policies": [
        {"id": "wide", "key": ["tenant"], "rate": {"requests": 100, "per": "minute"}},
        {"id": "narrow", "key": ["tenant"], "rate": {"requests": 5, "per": "minute"}},
        {"id": "trial", "shadow": true, "key": ["tenant"], "rate": {"requests": 1, "per": "hour"}},
    ]});
    let mut r = worker(&h, &cfg);
    let (flow, mut s) = request(&h, &mut r, "acme");
    assert_eq!(flow, Flow::Continue);
    r.on_response_headers(&h, &mut s);
    assert_eq!(
        h.response_header("ratelimit").as_deref(),
        Some("\"narrow\";r=4;t=12")
    );
    // The shadow policy is over its limit from the second request on: it
    // counts and logs, never refuses.
    assert_eq!(request(&h, &mut r, "acme").0, Flow::Continue);
    assert_eq!(h.metric_value("ratelimit.shadow_limited"), 1);
    assert!(h.logged("shadow limit trial for"));
}

#[test]
fn a_table_too_small_fails_open_or_closed() {
    for (on_error, want) in [("allow", Flow::Continue), ("deny", Flow::Pause)] {
        let h = FakeHost::at(START);
        let cfg = per_tenant(
            1,
            json!({"on_error": on_error, "table": {"slots": 1, "hash_seed": 7}}),
        );
        let mut r = worker(&h, &cfg);
        assert_eq!(request(&h, &mut r, "a").0, Flow::Continue);
        assert_eq!(request(&h, &mut r, "b").0, want, "{on_error}");
        let m = if on_error == "allow" {
            "fail_open"
        } else {
            "fail_closed"
        };
        assert_eq!(h.metric_value(&format!("ratelimit.{m}")), 1);
    }
}

fn global(extra: Value) -> Value {
    let mut cfg = json!({"policies": [
        {"id": "p", "key": ["tenant"], "rate": {"requests": 5, "per": "minute"}},
        {"id": "s", "shadow": true, "key": ["tenant"], "rate": {"requests": 1, "per": "minute"}},
    ], "global": {"cluster": "rls", "domain": "carbon", "timeout_ms": 50}});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    cfg
}

fn status(code: rls::Code, limit: Option<u32>, remaining: u32, reset_s: u64) -> rls::Status {
    rls::Status {
        code,
        limit: limit.map(|n| (n, 2, String::new())), // unit 2: minute
        remaining,
        reset_ns: reset_s * 1_000_000_000,
    }
}

fn answer(h: &FakeHost, r: &mut RateLimit, s: &mut Stream, grpc: u32, resp: &rls::Response) {
    let token = s.pending.as_ref().map(|p| p.0).expect("a call in flight");
    let msg = resp.encode();
    *h.grpc_message.borrow_mut() = msg.clone();
    r.on_grpc_call_response(h, s, token, grpc, msg.len());
}

#[test]
fn global_mode_asks_the_service_and_applies_its_answer() {
    let h = FakeHost::at(START);
    let mut r = worker(&h, &global(json!({"headers_on_allowed": true})));
    let (flow, mut s) = request(&h, &mut r, "acme");
    assert_eq!(flow, Flow::Pause, "waits for the service");
    let call = h.last_call().unwrap();
    assert_eq!(call.cluster, "rls");
    assert_eq!(
        call.grpc,
        Some((rls::SERVICE.to_string(), rls::METHOD.to_string()))
    );
    let req = rls::Request::decode(call.body.as_deref().unwrap()).unwrap();
    assert_eq!((req.domain.as_str(), req.descriptors.len()), ("carbon", 2));
    answer(
        &h,
        &mut r,
        &mut s,
        0,
        &rls::Response {
            overall: rls::Code::Ok,
            statuses: vec![
                status(rls::Code::Ok, Some(10), 7, 30),
                status(rls::Code::OverLimit, Some(1), 0, 50),
            ],
            ..rls::Response::default()
        },
    );
    assert_eq!(*h.resumed.borrow(), [2], "resumed by its own stream");
    assert_eq!(h.metric_value("ratelimit.shadow_limited"), 1);
    r.on_response_headers(&h, &mut s);
    assert_eq!(
        h.response_header("ratelimit-policy").as_deref(),
        Some("\"p\";q=10;w=60"),
        "the service's limit"
    );

    let (_, mut s) = request(&h, &mut r, "acme");
    answer(
        &h,
        &mut r,
        &mut s,
        0,
        &rls::Response {
            overall: rls::Code::OverLimit,
            statuses: vec![
                status(rls::Code::OverLimit, Some(10), 0, 43),
                status(rls::Code::Ok, None, 0, 0),
            ],
            response_headers: vec![("x-from-rls".into(), "1".into())],
            ..rls::Response::default()
        },
    );
    let reply = h.last_reply().unwrap();
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.json(),
        json!({"error": "rate_limited", "retry_after": 43})
    );
    assert_eq!(reply.header("x-ratelimit-limit"), Some("10"));
    assert_eq!(reply.header("x-from-rls"), Some("1"));
    assert_eq!(h.resumed.borrow().len(), 1, "not resumed");

    // Over the limit with no statuses: the first policy refuses.
    let (_, mut s) = request(&h, &mut r, "acme");
    answer(
        &h,
        &mut r,
        &mut s,
        0,
        &rls::Response {
            overall: rls::Code::OverLimit,
            ..rls::Response::default()
        },
    );
    assert_eq!(h.last_reply().unwrap().json()["retry_after"], json!(1));
}

#[test]
fn a_failing_service_fails_open_or_closed() {
    for (on_error, grpc, resumed, reply) in [
        ("allow", 14, 1, None),
        ("deny", 14, 0, Some(503)),
        ("deny", 0, 0, Some(503)), // an answer without an overall code
    ] {
        let h = FakeHost::at(START);
        let mut r = worker(&h, &global(json!({"on_error": on_error})));
        let (_, mut s) = request(&h, &mut r, "acme");
        answer(&h, &mut r, &mut s, grpc, &rls::Response::default());
        assert_eq!(h.resumed.borrow().len(), resumed, "{on_error} {grpc}");
        assert_eq!(h.last_reply().map(|r| r.status), reply);
    }
    // A cluster that does not exist: decided at once.
    let h = FakeHost::at(START);
    h.clusters.borrow_mut().push("other".into());
    let mut r = worker(&h, &global(json!({})));
    assert_eq!(request(&h, &mut r, "acme").0, Flow::Continue);
    assert!(h.logged("cannot call \"rls\""));
    assert_eq!(h.metric_value("ratelimit.fail_open"), 1);
}

#[test]
fn configuration_errors_name_the_field() {
    let h = FakeHost::at(START).with_config(&json!({"policies": [{"id": "a", "key": ["tenant"],
        "rate": {"requests": 0, "per": "minute"}}]}));
    assert!(configure::<RateLimit, _>(&h).is_none());
    assert!(
        h.logged("policies[0].rate.requests"),
        "{:?}",
        h.logs.borrow()
    );
}
