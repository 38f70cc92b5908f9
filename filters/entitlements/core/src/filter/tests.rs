use super::*;
use filter_common::double::FakeHost;
use filter_common::filter::configure;
use serde_json::{json, Value};
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const START: Duration = Duration::from_secs(1_800_000_000);
const POLICY: &str = include_str!("../../../examples/policy.json");

fn policy() -> Value {
    serde_json::from_str(POLICY).unwrap()
}

fn small(rule: &str, path: &str) -> Value {
    json!({"default": "deny", "rules": [{"id": rule, "effect": "allow",
        "match": {"path": {"prefix": path}}}]})
}

fn worker(h: &FakeHost, cfg: Value) -> Entitlements {
    *h.config.borrow_mut() = Some(cfg.to_string().into_bytes());
    configure::<Entitlements, _>(h).expect("configured")
}

fn claims(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn send(
    h: &FakeHost,
    e: &mut Entitlements,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Flow {
    let mut headers = vec![(":method", method), (":path", path), (":authority", "api")];
    headers.extend_from_slice(extra);
    h.stream(2, &headers);
    h.replies.borrow_mut().clear();
    e.on_request_headers(h, &mut (), 2)
}

fn reply(h: &FakeHost) -> (u32, Value) {
    let r = h.last_reply().expect("a reply");
    (r.status, r.json())
}

#[test]
fn claims_and_rules_decide_and_a_deny_names_the_rule() {
    let h = FakeHost::at(START);
    let mut e = worker(&h, json!({"policy": policy()}));
    assert!(h.ticks.borrow().is_empty(), "no remote, no tick");
    let alice = claims(&json!({"entitlements": {"markets": ["EU-ETS"]}}));
    let id = [
        ("x-auth-subject", "alice"),
        ("x-auth-claims", alice.as_str()),
    ];
    assert_eq!(
        send(&h, &mut e, "GET", "/api/v1/curves/EU-ETS/latest", &id),
        Flow::Continue
    );
    assert_eq!(
        send(&h, &mut e, "GET", "/api/v1/curves/CAISO/latest", &id),
        Flow::Pause
    );
    assert_eq!(
        reply(&h),
        (403, json!({"error": "forbidden", "rule": "default"}))
    );
    assert_eq!(h.metric_value("entitlements.allowed"), 1);
    assert_eq!(h.metric_value("entitlements.rule.curves-read"), 1);
    assert_eq!(h.metric_value("entitlements.rule.default"), 1);
    // The same caller and request again: from the caches.
    send(&h, &mut e, "GET", "/api/v1/curves/EU-ETS/latest", &id);
    assert_eq!(h.metric_value("entitlements.cache.hits"), 1);
    assert_eq!(h.metric_value("entitlements.identity_cache.hits"), 2);
}

#[test]
fn paths_are_normalised_and_rewritten() {
    let h = FakeHost::at(START);
    let mut e = worker(&h, json!({"policy": small("a", "/api/")}));
    assert_eq!(
        send(&h, &mut e, "GET", "/x/../api/./v1?q=1", &[]),
        Flow::Continue
    );
    assert_eq!(h.request_header(":path").as_deref(), Some("/api/v1?q=1"));
    assert_eq!(send(&h, &mut e, "GET", "/api/%2F", &[]), Flow::Pause);
    let (status, body) = reply(&h);
    assert_eq!((status, &body["error"]), (400, &json!("invalid_path")));
    assert_eq!(h.metric_value("entitlements.invalid_path"), 1);
    h.stream(3, &[(":method", "GET")]);
    assert_eq!(e.on_request_headers(&h, &mut (), 3), Flow::Pause, "no path");
}

#[test]
fn malformed_identity_headers_are_refused() {
    let h = FakeHost::at(START);
    let mut e = worker(&h, json!({"policy": policy(), "max_claims_bytes": 64}));
    for bad in ["***", &claims(&json!([1])), &"a".repeat(65)] {
        let flow = send(
            &h,
            &mut e,
            "GET",
            "/api/v1/curves/X/latest",
            &[("x-auth-claims", bad)],
        );
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            reply(&h),
            (
                403,
                json!({"error": "forbidden", "rule": "invalid_identity"})
            )
        );
    }
    assert_eq!(h.metric_value("entitlements.invalid_identity"), 3);
}

fn remote_cfg() -> Value {
    json!({"remote": {"cluster": "policies", "path": "/p.json",
        "refresh_interval_ms": 30_000, "retry_interval_ms": 2_000}})
}

#[test]
fn a_remote_policy_is_fetched_by_one_worker_and_used_by_all() {
    let a = FakeHost::at(START);
    let b = a.sibling();
    let (mut ea, mut eb) = (worker(&a, remote_cfg()), worker(&b, remote_cfg()));
    assert_eq!(*a.ticks.borrow(), [Duration::from_secs(1)]);
    assert_eq!(send(&a, &mut ea, "GET", "/api/x", &[]), Flow::Pause);
    assert_eq!(reply(&a).0, 503, "not loaded yet");
    ea.on_tick(&a);
    eb.on_tick(&b);
    let c = a.take_calls().pop().expect("a fetched");
    assert!(b.take_calls().is_empty(), "b saw the lease");
    assert_eq!(
        (c.cluster.as_str(), c.header(":path")),
        ("policies", Some("/p.json"))
    );
    let doc = small("v1", "/api/").to_string();
    let n = a.answer(Some(200), &[("etag", "\"1\"")], doc.as_bytes());
    ea.on_http_call_response(&a, c.token, n);
    assert_eq!(send(&a, &mut ea, "GET", "/api/x", &[]), Flow::Continue);
    eb.on_tick(&b);
    assert_eq!(
        send(&b, &mut eb, "GET", "/api/x", &[]),
        Flow::Continue,
        "b compiled it"
    );
    assert_eq!(a.metric_value("entitlements.policy.fetches"), 1);
    assert_eq!(a.metric_value("entitlements.policy.reloads"), 2);

    // An invalid document is refused; the last good one stays.
    a.advance(Duration::from_secs(30));
    ea.on_tick(&a);
    let c = a.take_calls().pop().expect("due again");
    assert_eq!(c.header("if-none-match"), Some("\"1\""));
    let n = a.answer(Some(200), &[], b"{\"rules\": 5}");
    ea.on_http_call_response(&a, c.token, n);
    assert_eq!(a.metric_value("entitlements.policy.invalid"), 1);
    assert!(a.logged("fetched policy refused, keeping the last good one"));
    assert_eq!(send(&a, &mut ea, "GET", "/api/x", &[]), Flow::Continue);
    // Retried after retry_interval_ms, every time (no doubling); a 304.
    for _ in 0..2 {
        a.advance(Duration::from_millis(1999));
        ea.on_tick(&a);
        assert!(a.take_calls().is_empty());
        a.advance(Duration::from_millis(1));
        ea.on_tick(&a);
        let c = a.take_calls().pop().expect("retried");
        a.answer(Some(503), &[], b"");
        ea.on_http_call_response(&a, c.token, 0);
    }
    assert_eq!(a.metric_value("entitlements.policy.fetch_failed"), 2);
    a.advance(Duration::from_secs(2));
    ea.on_tick(&a);
    let c = a.take_calls().pop().unwrap();
    a.answer(Some(304), &[], b"");
    ea.on_http_call_response(&a, c.token, 0);
    assert_eq!(a.metric_value("entitlements.policy.not_modified"), 1);
}

#[test]
fn configuration_errors_name_the_field() {
    for (cfg, want) in [
        (
            json!({}),
            "configuration: policy: required unless remote is set",
        ),
        (
            json!({"remote": {"cluster": "", "path": "/p"}}),
            "remote.cluster: must not be empty",
        ),
        (
            json!({"policy": policy(), "identity_headers": {"subject": "X"}}),
            "identity_headers.subject",
        ),
        (
            json!({"policy": policy(), "bogus": 1}),
            "unknown field `bogus`",
        ),
    ] {
        let h = FakeHost::at(START).with_config(&cfg);
        assert!(configure::<Entitlements, _>(&h).is_none());
        assert!(h.logged(want), "{want}: {:?}", h.logs.borrow());
    }
}

fn grants_cfg() -> Value {
    json!({
        "policy": {"default": "deny", "rules": [{
            "id": "curves-granted", "effect": "allow",
            "match": {"path": {"template": "/api/v1/curves/{market}/**"}},
            "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]
        }]},
        "grants": {"cluster": "sidecar", "page_grants": 100}
    })
}

fn page(version: u64, snapshot: bool, holders: Value) -> Vec<u8> {
    json!({"epoch": "pg-1", "version": version, "snapshot": snapshot,
        "holders": holders, "next": null})
    .to_string()
    .into_bytes()
}

/// Answers the feed call the last tick made.
fn feed(h: &FakeHost, e: &mut Entitlements, body: &[u8]) -> Call {
    e.on_tick(h);
    let c = h.take_calls().pop().expect("a feed call");
    let n = h.answer(Some(200), &[], body);
    e.on_http_call_response(h, c.token, n);
    c
}

use filter_common::double::Call;

#[test]
fn grants_from_the_feed_decide_and_a_revoke_retires_cached_decisions() {
    let a = FakeHost::at(START);
    let b = a.sibling();
    let (mut ea, mut eb) = (worker(&a, grants_cfg()), worker(&b, grants_cfg()));
    assert_eq!(*a.ticks.borrow(), [Duration::from_secs(1)]);
    let acme = [("x-auth-subject", "alice"), ("x-auth-tenant", "acme")];
    let path = "/api/v1/curves/CAISO/latest";
    assert_eq!(send(&a, &mut ea, "GET", path, &acme), Flow::Pause);
    assert_eq!(
        reply(&a),
        (
            503,
            json!({"error": "unavailable", "message": "entitlements grants not loaded yet"})
        )
    );
    let c = feed(
        &a,
        &mut ea,
        &page(
            3,
            true,
            json!([{"tenant": "acme", "grants": [["curves:CAISO", "read"]]}]),
        ),
    );
    assert_eq!(
        (c.cluster.as_str(), c.header(":path")),
        ("sidecar", Some("/internal/v1/grants?limit=100"))
    );
    assert_eq!(a.metric_value("entitlements.grants.snapshots"), 1);
    assert_eq!(a.metric_value("entitlements.grants.in_force"), 1);
    assert_eq!(send(&a, &mut ea, "GET", path, &acme), Flow::Continue);
    // The other worker: it sees the grants at its first request.
    assert_eq!(send(&b, &mut eb, "GET", path, &acme), Flow::Continue);
    assert_eq!(send(&b, &mut eb, "GET", path, &acme), Flow::Continue);
    assert_eq!(b.metric_value("entitlements.cache.hits"), 1);
    assert_eq!(
        send(&b, &mut eb, "GET", "/api/v1/curves/PJM/latest", &acme),
        Flow::Pause
    );
    assert_eq!(reply(&b).1["rule"], "default");

    // The revoke: a delta for acme; b drops alice's decisions at its tick.
    a.advance(Duration::from_secs(1));
    let c = feed(
        &a,
        &mut ea,
        &page(4, false, json!([{"tenant": "acme", "grants": []}])),
    );
    assert!(c.header(":path").unwrap().ends_with("&epoch=pg-1&after=3"));
    assert_eq!(a.metric_value("entitlements.grants.deltas"), 1);
    assert_eq!(send(&a, &mut ea, "GET", path, &acme), Flow::Pause);
    eb.on_tick(&b);
    assert_eq!(send(&b, &mut eb, "GET", path, &acme), Flow::Pause);
    assert_eq!(a.metric_value("entitlements.grants.version"), 4);
}

#[test]
fn grants_configuration_errors_name_the_field() {
    for (grants, want) in [
        (json!({"cluster": ""}), "grants.cluster: must not be empty"),
        (json!({"cluster": "s", "path": "x"}), "grants.path"),
        (
            json!({"cluster": "s", "page_grants": 0}),
            "grants.page_grants: 0 is not between 1 and 100000",
        ),
        (
            json!({"cluster": "s", "max_grants": 0}),
            "grants.max_grants",
        ),
        (json!({"cluster": "s", "token": "a b"}), "grants.token"),
        (
            json!({"cluster": "s", "refresh": 1}),
            "unknown field `refresh`",
        ),
    ] {
        let cfg = json!({"policy": policy(), "grants": grants});
        let h = FakeHost::at(START).with_config(&cfg);
        assert!(configure::<Entitlements, _>(&h).is_none());
        assert!(h.logged(want), "{want}: {:?}", h.logs.borrow());
    }
}
