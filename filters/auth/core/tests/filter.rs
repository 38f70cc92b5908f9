//! The auth filter's per-worker logic with the host double: identity
//! headers, refusals, requests waiting for keys, the JWKS lifecycle across
//! workers, discovery, unknown kids, time advanced by hand.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use auth_core::filter::Auth;
use common::*;
use filter_common::double::FakeHost;
use filter_common::filter::{configure, Filter, Flow};
use serde_json::{json, Value};
use std::time::Duration;

const AT: Duration = Duration::from_secs(NOW);

fn config(jwks: Value) -> Value {
    json!({
        "providers": {"kc": {"issuer": ISSUER, "audiences": ["pricing-api"],
            "algorithms": ["ES256", "HS256"], "jwks": jwks}},
        "sources": [{"header": {"name": "authorization", "prefix": "Bearer "}}],
        "jwks_wait_ms": 500,
        "rules": [{"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}}]
    })
}

fn remote() -> Value {
    json!({"remote": {"cluster": "idp", "path": "/jwks", "retry_initial_ms": 1000,
        "unknown_kid_refetch_s": 30}})
}

fn es(kid: &str) -> String {
    token(
        &json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
        &claims(),
    )
}

fn worker(h: &FakeHost, cfg: &Value) -> Auth {
    *h.config.borrow_mut() = Some(cfg.to_string().into_bytes());
    configure::<Auth, _>(h).expect("configured")
}

fn send(h: &FakeHost, a: &mut Auth, id: u32, path: &str, token: Option<&str>) -> Flow {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        (":method", "GET"),
        (":path", path),
        ("x-auth-subject", "mallory"),
    ];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    h.stream(id, &headers);
    a.on_request_headers(h, &mut (), id)
}

fn jwks(kids: &[&str]) -> Vec<u8> {
    json!({"keys": kids.iter().map(|k| ec_jwk(k)).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
}

#[test]
fn a_verified_token_becomes_identity_headers_and_the_rest_401() {
    let h = FakeHost::at(AT);
    let mut a = worker(&h, &config(json!({"inline": {"keys": [ec_jwk("k1")]}})));
    assert!(h.ticks.borrow().is_empty(), "inline keys: no tick");
    assert_eq!(send(&h, &mut a, 2, "/api", Some(&es("k1"))), Flow::Continue);
    assert_eq!(
        h.request_values("x-auth-subject"),
        ["4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"],
        "the client's copy is gone, the verified one replaces it"
    );
    assert_eq!(h.request_header("x-auth-tenant").as_deref(), Some("acme"));
    assert_eq!(
        h.request_header("x-auth-expires"),
        Some((NOW + 300).to_string())
    );
    assert_eq!(h.request_header("authorization"), None, "not forwarded");
    // From the cache the second time.
    send(&h, &mut a, 3, "/api", Some(&es("k1")));
    assert_eq!(h.metric_value("auth.jwt_cache_hit"), 1);
    assert_eq!(h.metric_value("auth.allowed"), 2);

    assert_eq!(send(&h, &mut a, 4, "/api", None), Flow::Pause);
    let r = h.last_reply().unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="254carbon""#)
    );
    assert_eq!(
        r.json(),
        json!({"error": "invalid_token", "message": "token missing"})
    );
    assert_eq!(send(&h, &mut a, 5, "/public/x", None), Flow::Continue);
    assert_eq!(h.request_header("x-auth-subject"), None);
    assert_eq!(h.metric_value("auth.anonymous"), 1);
    assert_eq!(send(&h, &mut a, 6, "/api", Some("e30.e30.AA")), Flow::Pause);
    assert!(h
        .last_reply()
        .unwrap()
        .header("www-authenticate")
        .unwrap()
        .contains(r#"error="invalid_token""#));
    assert_eq!(h.metric_value("auth.denied"), 2);
    h.advance(Duration::from_secs(400)); // past exp and the default skew
    assert_eq!(
        send(&h, &mut a, 7, "/api", Some(&es("k1"))),
        Flow::Pause,
        "expired, cached or not"
    );
    assert_eq!(h.metric_value("auth.denied.expired"), 1);
}

#[test]
fn requests_wait_for_the_first_key_set_fetched_once_for_all_workers() {
    let a = FakeHost::at(AT).strict();
    let b = a.sibling();
    let cfg = config(remote());
    let (mut wa, mut wb) = (worker(&a, &cfg), worker(&b, &cfg));
    assert_eq!(*a.ticks.borrow(), [Duration::from_millis(100)]);
    assert_eq!(send(&a, &mut wa, 2, "/api", Some(&es("k1"))), Flow::Pause);
    assert_eq!(send(&a, &mut wa, 3, "/api", Some(&es("k1"))), Flow::Pause);
    assert_eq!(a.metric_value("auth.waited_for_keys"), 2);
    wa.on_tick(&a);
    wb.on_tick(&b);
    let calls = a.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(b.take_calls().is_empty(), "one fetch for every worker");
    assert_eq!(
        (calls[0].cluster.as_str(), calls[0].header(":path")),
        ("idp", Some("/jwks"))
    );
    let n = a.answer(Some(200), &[], &jwks(&["k1"]));
    wa.on_http_call_response(&a, calls[0].token, n);
    assert_eq!(*a.resumed.borrow(), [2, 3], "both resumed");
    assert_eq!(a.metric_value("auth.jwks_fetch_success"), 1);
    // The other worker takes the shared set at its next look.
    b.advance(Duration::from_secs(1));
    wb.on_tick(&b);
    assert_eq!(
        send(&b, &mut wb, 9, "/api", Some(&es("k1"))),
        Flow::Continue
    );
    assert!(b.take_calls().is_empty());
    assert_eq!(a.ticks.borrow().len(), 1, "the tick was set once");
}

#[test]
fn a_waiter_gets_401_when_the_keys_do_not_come_in_time() {
    let h = FakeHost::at(AT);
    let mut a = worker(&h, &config(remote()));
    assert_eq!(send(&h, &mut a, 2, "/api", Some(&es("k1"))), Flow::Pause);
    a.on_tick(&h);
    let c = h.take_calls().pop().unwrap();
    h.answer(Some(503), &[], b"");
    a.on_http_call_response(&h, c.token, 0);
    assert!(h.logged("keys of provider kc not fetched (status 503); retry in 1000 ms"));
    assert!(h.replies.borrow().is_empty(), "still waiting");
    h.advance(Duration::from_millis(400));
    a.on_tick(&h);
    assert!(h.replies.borrow().is_empty());
    h.advance(Duration::from_millis(100));
    a.on_tick(&h);
    let r = h.last_reply().expect("401 at jwks_wait_ms");
    assert_eq!(r.status, 401);
    assert_eq!(h.metric_value("auth.denied.jwks_unavailable"), 1);
    assert!(h.resumed.borrow().is_empty());
    // A stream that went away is not answered.
    send(&h, &mut a, 3, "/api", Some(&es("k1")));
    a.on_log(&h, &mut (), 3);
    h.advance(Duration::from_secs(1));
    h.replies.borrow_mut().clear();
    a.on_tick(&h);
    assert!(h.replies.borrow().is_empty());
}

#[test]
fn an_unknown_kid_refetches_at_most_once_per_window() {
    let h = FakeHost::at(AT);
    let mut a = worker(&h, &config(remote()));
    a.on_tick(&h);
    let c = h.take_calls().pop().unwrap();
    let n = h.answer(Some(200), &[("etag", "\"a\"")], &jwks(&["k1"]));
    a.on_http_call_response(&h, c.token, n);
    // A rotated key, too soon after the fetch: refused at once.
    assert_eq!(send(&h, &mut a, 2, "/api", Some(&es("k2"))), Flow::Pause);
    assert_eq!(h.last_reply().unwrap().status, 401);
    h.advance(Duration::from_secs(30));
    h.replies.borrow_mut().clear();
    assert_eq!(send(&h, &mut a, 3, "/api", Some(&es("k2"))), Flow::Pause);
    assert!(h.replies.borrow().is_empty(), "waits for the refetch");
    a.on_tick(&h);
    let c = h.take_calls().pop().expect("refetched at once");
    assert_eq!(c.header("if-none-match"), Some("\"a\""));
    let n = h.answer(Some(200), &[], &jwks(&["k1", "k2"]));
    a.on_http_call_response(&h, c.token, n);
    assert_eq!(*h.resumed.borrow(), [3]);
    assert_eq!(h.metric_value("auth.jwks_fetch_success"), 2);
}

#[test]
fn discovery_finds_the_jwks_uri_once() {
    let h = FakeHost::at(AT);
    let cfg = config(json!({"discovery": {"cluster": "idp"}}));
    let mut a = worker(&h, &cfg);
    a.on_tick(&h);
    let c = h.take_calls().pop().unwrap();
    assert_eq!(
        c.header(":path"),
        Some("/realms/carbon/.well-known/openid-configuration")
    );
    let doc = json!({"issuer": ISSUER, "jwks_uri": "https://keys.254carbon.test/certs"});
    let n = h.answer(Some(200), &[], doc.to_string().as_bytes());
    a.on_http_call_response(&h, c.token, n);
    let c = h.take_calls().pop().expect("then the keys");
    assert_eq!(
        (c.header(":authority"), c.header(":path")),
        (Some("keys.254carbon.test"), Some("/certs"))
    );
    let n = h.answer(Some(200), &[], &jwks(&["k1"]));
    a.on_http_call_response(&h, c.token, n);
    assert_eq!(send(&h, &mut a, 2, "/api", Some(&es("k1"))), Flow::Continue);
    // The next refresh goes straight to the keys.
    h.advance(Duration::from_secs(600));
    a.on_tick(&h);
    assert_eq!(
        h.take_calls().pop().unwrap().header(":path"),
        Some("/certs")
    );
}

#[test]
fn configuration_errors_are_refused_with_the_field() {
    let h = FakeHost::at(AT).with_config(&json!({"providers": {}}));
    assert!(configure::<Auth, _>(&h).is_none());
    assert!(
        h.logged("auth: configuration: providers: at least one"),
        "{:?}",
        h.logs.borrow()
    );
    assert_eq!(Auth::NAME, "auth");
}

#[test]
fn no_client_identity_header_survives_a_host_whose_removal_does_nothing() {
    let h = FakeHost::at(AT).strict();
    let mut a = worker(&h, &config(json!({"inline": {"keys": [ec_jwk("k1")]}})));
    assert_eq!(send(&h, &mut a, 2, "/public/x", None), Flow::Continue);
    assert_eq!(h.request_header("x-auth-subject"), None, "anonymous: gone");
    assert_eq!(send(&h, &mut a, 3, "/api", Some(&es("k1"))), Flow::Continue);
    assert_eq!(
        h.request_values("x-auth-subject"),
        ["4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"]
    );
    assert_eq!(h.request_header("authorization"), None, "not forwarded");
    assert_eq!(
        h.request_header(":path").as_deref(),
        Some("/api"),
        "the rest kept"
    );
}

#[test]
fn a_route_may_forward_the_token_that_others_strip() {
    let h = FakeHost::at(AT);
    let mut cfg = config(json!({"inline": {"keys": [ec_jwk("k1")]}}));
    cfg["rules"] =
        json!([{"match": {"path": {"exact": "/ws"}}, "requires": {"forward_token": true}}]);
    let mut a = worker(&h, &cfg);
    let t = es("k1");
    assert_eq!(send(&h, &mut a, 2, "/ws", Some(&t)), Flow::Continue);
    assert_eq!(
        h.request_header("authorization"),
        Some(format!("Bearer {t}")),
        "kept on /ws, where the sidecar checks it"
    );
    assert_eq!(send(&h, &mut a, 3, "/api", Some(&t)), Flow::Continue);
    assert_eq!(
        h.request_header("authorization"),
        None,
        "stripped elsewhere"
    );
    // And the other way round: the default forwards, one route does not.
    cfg["output"] = json!({"forward_token": true});
    cfg["rules"] =
        json!([{"match": {"path": {"prefix": "/api"}}, "requires": {"forward_token": false}}]);
    let mut a = worker(&h, &cfg);
    assert_eq!(send(&h, &mut a, 4, "/api", Some(&t)), Flow::Continue);
    assert_eq!(h.request_header("authorization"), None);
    assert_eq!(send(&h, &mut a, 5, "/ws", Some(&t)), Flow::Continue);
    assert_eq!(
        h.request_header("authorization"),
        Some(format!("Bearer {t}"))
    );
}
