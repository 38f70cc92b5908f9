//! The entitlements filter, built for wasm32-wasip1, in the host emulator.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use filter_tests::{entitlements_config, load_entitlements, Req};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasm_host::{CallRequest, Host, Message, Reply, Stream};

const POLICY: &str = include_str!("../../../filters/entitlements/examples/policy.json");

fn policy() -> Value {
    serde_json::from_str(POLICY).unwrap()
}

fn upstream_ok(req: &Message) -> Message {
    Message {
        headers: vec![
            (":status".into(), b"200".to_vec()),
            (
                "x-seen-path".into(),
                req.header(":path").unwrap_or_default().into_bytes(),
            ),
        ]
        .into(),
        body: b"ok".to_vec(),
        trailers: None,
    }
}

struct Env {
    host: Host,
    chain: wasm_host::Chain,
}

fn env_with(config: Value) -> Env {
    let host = Host::builder().workers(2).build();
    let p = load_entitlements(&host, &config).unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    Env { host, chain }
}

fn env() -> Env {
    env_with(json!({"policy": policy()}))
}

impl Env {
    fn send(&self, req: &Req) -> Stream {
        let s = self.host.stream(&self.chain);
        s.request_headers(&req.pairs(), true);
        s
    }

    /// Status and body of the response the client got.
    fn status(&self, req: &Req) -> (u16, Value) {
        let s = self.send(req);
        let r = s.response().expect("a response");
        let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status().unwrap(), body)
    }

    fn counter(&self, name: &str) -> u64 {
        self.host
            .counter(&format!("wasmcustom.entitlements.{name}"))
    }
}

fn alice() -> Value {
    json!({"entitlements": {"markets": ["EU-ETS", "UK-ETS"]}, "plan": "professional", "azp": "web"})
}

fn forbidden(rule: &str) -> (u16, Value) {
    (403, json!({"error": "forbidden", "rule": rule}))
}

#[test]
fn a_curve_is_served_only_for_a_market_in_the_contract() {
    let e = env();
    let ok = e.send(&Req::get("/api/v1/curves/EU-ETS/DEC26").identity(
        "alice",
        "acme",
        &["viewer"],
        &alice(),
    ));
    let r = ok.response().unwrap();
    assert_eq!((r.status(), r.body_text().as_str()), (Some(200), "ok"));
    assert_eq!(
        e.status(&Req::get("/api/v1/curves/CAISO/DEC26").identity(
            "alice",
            "acme",
            &["viewer"],
            &alice()
        )),
        forbidden("default")
    );
    let s = e.send(&Req::get("/api/v1/curves/CAISO/DEC26").identity(
        "alice",
        "acme",
        &["viewer"],
        &alice(),
    ));
    let r = s.response().unwrap();
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(
        s.upstream_request().is_none(),
        "a denied request never reaches the upstream"
    );
    assert_eq!(e.counter("allowed"), 1);
    assert_eq!(e.counter("denied"), 2);
    assert_eq!(e.counter("rule.curves-read"), 1);
    assert_eq!(e.counter("rule.default"), 2);
}

#[test]
fn without_identity_only_public_routes_pass() {
    let e = env();
    assert_eq!(e.status(&Req::get("/healthz")).0, 200);
    assert_eq!(
        e.status(&Req::get("/api/v1/instruments/EUA")),
        forbidden("default")
    );
    assert_eq!(
        e.status(&Req::get("/api/v1/curves/EU-ETS/DEC26")),
        forbidden("default")
    );
}

#[test]
fn publishing_needs_the_trader_role_and_the_market() {
    let e = env();
    let post = |roles: &[&str], market: &str| {
        e.status(
            &Req::new("POST", &format!("/api/v1/curves/{market}/DEC26")).identity(
                "bob",
                "acme",
                roles,
                &alice(),
            ),
        )
        .0
    };
    assert_eq!(post(&["trader"], "EU-ETS"), 200);
    assert_eq!(post(&["viewer"], "EU-ETS"), 403);
    assert_eq!(post(&["trader"], "CAISO"), 403);
}

#[test]
fn deny_rules_win_and_name_themselves() {
    let e = env();
    let suspended = json!({"entitlements": {"markets": ["EU-ETS"]}, "account_status": "suspended"});
    assert_eq!(
        e.status(&Req::get("/api/v1/curves/EU-ETS/DEC26").identity(
            "carol",
            "acme",
            &["viewer"],
            &suspended
        )),
        forbidden("suspended")
    );
    // The query parameter rule: CSV exports are for enterprise plans.
    assert_eq!(
        e.status(
            &Req::get("/api/v1/curves/EU-ETS/DEC26?format=csv").identity(
                "alice",
                "acme",
                &[],
                &alice()
            )
        ),
        forbidden("csv-export-enterprise-only")
    );
    let enterprise = json!({"entitlements": {"markets": ["EU-ETS"]}, "plan": "enterprise"});
    assert_eq!(
        e.status(
            &Req::get("/api/v1/curves/EU-ETS/DEC26?format=csv").identity(
                "dan",
                "bigco",
                &[],
                &enterprise
            )
        )
        .0,
        200
    );
}

#[test]
fn admin_routes_check_roles_issuer_and_subject() {
    let e = env();
    let sub = "4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60";
    let admin = |roles: &[&str], subject: &str| {
        e.status(&Req::get("/admin/tenants").identity(subject, "254carbon", roles, &json!({})))
            .0
    };
    assert_eq!(admin(&["admin"], sub), 200);
    assert_eq!(admin(&["ops", "viewer"], sub), 200);
    assert_eq!(admin(&["viewer"], sub), 403);
    assert_eq!(admin(&["admin"], "not-a-uuid"), 403);
}

#[test]
fn header_matchers_see_the_request_headers() {
    let e = env();
    let ingest = json!({"azp": "pricing-ingest"});
    let post = |ct: &str| {
        e.status(
            &Req::new("POST", "/api/v1/internal/ingest/curves")
                .header("content-type", ct)
                .identity("svc", "254carbon", &[], &ingest),
        )
        .0
    };
    assert_eq!(post("application/json; charset=utf-8"), 200);
    assert_eq!(post("text/csv"), 403);
}

#[test]
fn traversal_is_normalised_before_matching_and_upstream_sees_the_normal_path() {
    let e = env();
    let who = |r: Req| r.identity("alice", "acme", &["viewer"], &alice());
    // Climbing from an entitled market into another is judged on the target.
    for path in [
        "/api/v1/curves/EU-ETS/../CAISO/DEC26",
        "/api/v1/curves/EU-ETS/%2e%2e/CAISO/DEC26",
        "/api/v1/curves/EU-ETS/.%2E/CAISO/DEC26",
        "/api/v1/curves//EU-ETS/../../curves/CAISO/DEC26",
    ] {
        assert_eq!(
            e.status(&who(Req::get(path))),
            forbidden("default"),
            "{path}"
        );
    }
    // And the other way round: allowed, and forwarded normalised.
    let s = e.send(&who(Req::get(
        "/api/v1/curves/CAISO/../EU-ETS/./DEC26?at=now",
    )));
    assert_eq!(
        s.upstream_request().unwrap().header(":path").as_deref(),
        Some("/api/v1/curves/EU-ETS/DEC26?at=now")
    );
    assert_eq!(s.response().unwrap().status(), Some(200));
    // Encoded unreserved characters are decoded: %45 is E.
    assert_eq!(
        e.status(&who(Req::get("/api/v1/curves/%45U-ETS/DEC26"))).0,
        200
    );
    // What could be read two ways is refused with 400.
    for path in [
        "/api/v1/curves/EU-ETS%2F..%2FCAISO/DEC26",
        "/api/v1/curves/EU-ETS/..;/CAISO/x",
        "/api/v1\\curves",
        "/api/v1/%zz",
    ] {
        let (status, body) = e.status(&who(Req::get(path)));
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("invalid_path")),
            "{path}: {body}"
        );
    }
    assert_eq!(e.counter("invalid_path"), 4);
}

#[test]
fn escaped_slashes_can_be_decoded_instead_of_refused() {
    let e = env_with(json!({"policy": policy(), "path": {"escaped_slashes": "decode"}}));
    let who = |r: Req| r.identity("alice", "acme", &["viewer"], &alice());
    assert_eq!(
        e.status(&who(Req::get("/api/v1/curves/EU-ETS%2F..%2FCAISO/DEC26"))),
        forbidden("default")
    );
    let s = e.send(&who(Req::get("/api/v1/curves%2FEU-ETS/DEC26")));
    assert_eq!(
        s.upstream_request().unwrap().header(":path").as_deref(),
        Some("/api/v1/curves/EU-ETS/DEC26")
    );
}

#[test]
fn overlong_paths_are_refused() {
    let e = env_with(json!({"policy": policy(), "path": {"max_bytes": 64}}));
    let long = format!("/api/v1/curves/EU-ETS/{}", "x".repeat(64));
    let (status, body) = e.status(&Req::get(&long).identity("alice", "acme", &[], &alice()));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_path"))
    );
}

#[test]
fn malformed_claims_fail_closed() {
    let e = env();
    for claims in ["%%%", "bm90IGpzb24", "WzEsMl0"] {
        // not base64url; "not json"; [1,2] (not an object)
        let r = Req::get("/api/v1/curves/EU-ETS/DEC26")
            .header("x-auth-subject", "alice")
            .header("x-auth-claims", claims);
        assert_eq!(e.status(&r), forbidden("invalid_identity"), "{claims}");
    }
    assert_eq!(e.counter("invalid_identity"), 3);
    // Oversized claims likewise.
    let e = env_with(json!({"policy": policy(), "max_claims_bytes": 16}));
    assert_eq!(
        e.status(&Req::get("/api/v1/curves/EU-ETS/DEC26").identity("alice", "acme", &[], &alice())),
        forbidden("invalid_identity")
    );
}

#[test]
fn identity_header_names_are_configurable() {
    let e = env_with(json!({
        "policy": {"rules": [{"id": "t", "effect": "allow", "when": [{"attr": "tenant", "op": "eq", "value": "acme"}]}]},
        "identity_headers": {"tenant": "x-carbon-tenant"}
    }));
    assert_eq!(
        e.status(&Req::get("/x").header("x-carbon-tenant", "acme"))
            .0,
        200
    );
    assert_eq!(
        e.status(&Req::get("/x").header("x-auth-tenant", "acme")).0,
        403
    );
}

#[test]
fn shadow_rules_are_counted_and_logged_but_not_enforced() {
    let e = env();
    let r =
        Req::get("/api/v1/analytics/var/portfolio").identity("tina", "newco-trial", &[], &alice());
    assert_eq!(e.status(&r).0, 200);
    assert_eq!(e.counter("shadow_denied"), 1);
    assert_eq!(e.counter("rule.analytics-premium"), 1);
    assert_eq!(
        e.host.logs_containing("shadow deny by trial-tenants").len(),
        1
    );
    // A whole policy in shadow mode lets everything through.
    let mut p = policy();
    p["shadow"] = json!(true);
    let e = env_with(json!({"policy": p}));
    assert_eq!(e.status(&Req::get("/api/v1/curves/CAISO/DEC26")).0, 200);
    assert_eq!(e.counter("shadow_denied"), 1);
    assert_eq!(e.counter("denied"), 0);
}

#[test]
fn repeated_decisions_come_from_the_cache_and_the_bound_shows_in_metrics() {
    let host = Host::builder().workers(1).build();
    let p = load_entitlements(
        &host,
        &json!({"policy": policy(), "cache": {"max_entries": 4}}),
    )
    .unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let send = |path: &str| {
        let s = host.stream(&chain);
        s.request_headers(
            &Req::get(path)
                .identity("alice", "acme", &[], &alice())
                .pairs(),
            true,
        );
        s.response().unwrap().status().unwrap()
    };
    assert_eq!(send("/api/v1/curves/EU-ETS/DEC26"), 200);
    assert_eq!(send("/api/v1/curves/EU-ETS/DEC26"), 200);
    assert_eq!(send("/api/v1/curves/CAISO/DEC26"), 403);
    assert_eq!(send("/api/v1/curves/CAISO/DEC26"), 403);
    let c = |n: &str| host.counter(&format!("wasmcustom.entitlements.{n}"));
    assert_eq!((c("cache.hits"), c("cache.misses")), (2, 2));
    // Cached decisions are counted like fresh ones.
    assert_eq!(
        (
            c("allowed"),
            c("denied"),
            c("rule.curves-read"),
            c("rule.default")
        ),
        (2, 2, 2, 2)
    );
    for i in 0..10 {
        send(&format!("/api/v1/curves/EU-ETS/M{i}"));
    }
    assert!(
        c("cache.evictions") >= 6,
        "evictions {}",
        c("cache.evictions")
    );
    // One caller: decoded once, then found in the identity cache.
    assert_eq!(
        (c("identity_cache.misses"), c("identity_cache.hits")),
        (1, 13)
    );
    // A key over the bound is decided without the cache.
    let p = load_entitlements(
        &host,
        &json!({"policy": policy(), "cache": {"max_key_bytes": 64}}),
    )
    .unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let s = host.stream(&chain);
    s.request_headers(
        &Req::get("/api/v1/curves/EU-ETS/DEC26")
            .identity("alice", "acme", &[], &alice())
            .pairs(),
        true,
    );
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(c("cache.oversized"), 1);
}

#[test]
fn the_identity_cache_is_bounded_and_counts_evictions() {
    let host = Host::builder().workers(1).build();
    let p = load_entitlements(
        &host,
        &json!({"policy": policy(), "cache": {"max_identities": 4}}),
    )
    .unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    for i in 0..20 {
        let s = host.stream(&chain);
        s.request_headers(
            &Req::get("/api/v1/curves/EU-ETS/DEC26")
                .identity(&format!("user-{i}"), "acme", &[], &alice())
                .pairs(),
            true,
        );
        assert_eq!(s.response().unwrap().status(), Some(200));
    }
    let c = |n: &str| host.counter(&format!("wasmcustom.entitlements.{n}"));
    assert_eq!(c("identity_cache.misses"), 20);
    assert!(
        c("identity_cache.evictions") >= 16,
        "{}",
        c("identity_cache.evictions")
    );
    // With the identity cache off, decisions are still cached by the raw identity.
    let p = load_entitlements(
        &host,
        &json!({"policy": policy(), "cache": {"max_identities": 0}}),
    )
    .unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let hits = c("cache.hits");
    for _ in 0..3 {
        let s = host.stream(&chain);
        s.request_headers(
            &Req::get("/api/v1/curves/EU-ETS/DEC26")
                .identity("bob", "acme", &[], &alice())
                .pairs(),
            true,
        );
        assert_eq!(s.response().unwrap().status(), Some(200));
    }
    assert_eq!(c("cache.hits") - hits, 2);
}

#[test]
fn configuration_errors_name_the_field_and_refuse_the_plugin() {
    let host = Host::builder().workers(1).build();
    let err = |cfg: Value| -> String {
        match host.load(entitlements_config(&cfg)) {
            Ok(_) => panic!("accepted: {cfg}"),
            Err(e) => e.logs().join("\n"),
        }
    };
    assert!(
        err(json!({"policy": {"rules": []}, "cache": {"max_entrys": 1}}))
            .contains("unknown field `max_entrys`")
    );
    assert!(err(json!({})).contains("policy: required unless remote is set"));
    assert!(err(json!({"policy": {"rules": [{"id": "a", "effect": "allow"}, {"id": "a", "effect": "deny"}]}}))
        .contains("rule \"a\": id: duplicate rule id"));
    assert!(err(json!({"policy": {"rules": [{"id": "r", "effect": "allow", "match": {"path": {"regex": "("}}}]}}))
        .contains("rule \"r\": match.path.regex:"));
    assert!(
        err(json!({"policy": {"rules": []}, "identity_headers": {"roles": "X-Roles"}}))
            .contains("identity_headers.roles")
    );
    assert!(
        err(json!({"remote": {"cluster": "p", "path": "policy.json"}})).contains("remote.path")
    );
    assert!(
        err(json!({"remote": {"cluster": "p", "path": "/p", "refresh_interval_ms": 0}}))
            .contains("remote.refresh_interval_ms")
    );
    assert!(
        err(json!({"policy": {"rules": []}, "path": {"escaped_slashes": "maybe"}}))
            .contains("unknown variant `maybe`")
    );
}

// ---- remote policy source ----

fn only_admin_policy() -> Value {
    json!({"rules": [{"id": "admins", "effect": "allow", "when": [{"attr": "roles", "op": "contains", "value": "admin"}]}]})
}

struct PolicyServer {
    calls: Arc<Mutex<Vec<CallRequest>>>,
    next: Arc<Mutex<Reply>>,
}

impl PolicyServer {
    fn install(host: &Host) -> PolicyServer {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(Mutex::new(Reply::ok(503, "")));
        let (c, n) = (calls.clone(), next.clone());
        host.add_cluster("policy", move |req| {
            c.lock().unwrap().push(req.clone());
            n.lock().unwrap().clone()
        });
        PolicyServer { calls, next }
    }

    fn answer(&self, r: Reply) {
        *self.next.lock().unwrap() = r;
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

fn remote_config(inline: Option<Value>) -> Value {
    let mut c = json!({"remote": {"cluster": "policy", "path": "/policies/entitlements.json", "refresh_interval_ms": 10000, "retry_interval_ms": 2000}});
    if let Some(p) = inline {
        c["policy"] = p;
    }
    c
}

#[test]
fn a_remote_policy_is_fetched_once_for_all_workers_and_replaces_the_inline_one() {
    let host = Host::builder().workers(2).build();
    let server = PolicyServer::install(&host);
    server.answer(Reply::http(
        200,
        &[("etag", "\"v1\"")],
        only_admin_policy().to_string(),
    ));
    let p = load_entitlements(&host, &remote_config(Some(policy()))).unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let send = |roles: &[&str], path: &str| {
        let s = host.stream(&chain);
        s.request_headers(
            &Req::get(path)
                .identity("alice", "acme", roles, &alice())
                .pairs(),
            true,
        );
        s.response().unwrap().status().unwrap()
    };
    // The inline policy serves until the first fetch.
    assert_eq!(send(&[], "/healthz"), 200);
    host.advance(Duration::from_secs(1));
    assert_eq!(server.calls(), 1, "one fetch for both workers");
    let call = server.calls.lock().unwrap()[0].clone();
    assert_eq!(
        (call.method(), call.path(), call.header(":authority")),
        ("GET", "/policies/entitlements.json", Some("policy"))
    );
    // The other worker picks it up from shared data at its next tick.
    host.advance(Duration::from_secs(1));
    assert_eq!(server.calls(), 1);
    for _ in 0..4 {
        assert_eq!(send(&[], "/healthz"), 403);
        assert_eq!(send(&["admin"], "/anything"), 200);
    }
    assert_eq!(host.counter("wasmcustom.entitlements.policy.fetches"), 1);
    assert_eq!(
        host.counter("wasmcustom.entitlements.policy.reloads"),
        2,
        "each worker compiled it"
    );
    // No new fetch before the refresh interval; then a conditional one.
    server.answer(Reply::http(304, &[], ""));
    host.advance(Duration::from_secs(7));
    assert_eq!(server.calls(), 1);
    host.advance(Duration::from_secs(2));
    assert_eq!(server.calls(), 2);
    assert_eq!(
        server.calls.lock().unwrap()[1].header("if-none-match"),
        Some("\"v1\"")
    );
    assert_eq!(
        host.counter("wasmcustom.entitlements.policy.not_modified"),
        1
    );
    assert_eq!(send(&["admin"], "/anything"), 200);
}

#[test]
fn failed_or_invalid_fetches_keep_the_last_good_policy() {
    let host = Host::builder().workers(2).build();
    let server = PolicyServer::install(&host);
    server.answer(Reply::ok(200, only_admin_policy().to_string()));
    let p = load_entitlements(&host, &remote_config(None)).unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let send = |roles: &[&str]| {
        let s = host.stream(&chain);
        s.request_headers(
            &Req::get("/x")
                .identity("alice", "acme", roles, &json!({}))
                .pairs(),
            true,
        );
        s.response().unwrap().status().unwrap()
    };
    host.advance(Duration::from_secs(1));
    assert_eq!(send(&["admin"]), 200);
    // An invalid document: refused, counted, retried after retry_interval.
    server.answer(Reply::ok(
        200,
        r#"{"rules": [{"id": "x", "effect": "maybe"}]}"#,
    ));
    host.advance(Duration::from_secs(10));
    assert_eq!(host.counter("wasmcustom.entitlements.policy.invalid"), 1);
    assert!(!host
        .logs_containing("fetched policy refused, keeping the last good one")
        .is_empty());
    assert_eq!(send(&["admin"]), 200);
    // Server errors and timeouts likewise.
    server.answer(Reply::ok(500, "oops"));
    host.advance(Duration::from_secs(2));
    assert_eq!(
        host.counter("wasmcustom.entitlements.policy.fetch_failed"),
        1
    );
    server.answer(Reply::Never);
    host.advance(Duration::from_secs(2));
    host.advance(Duration::from_secs(6));
    assert!(host.counter("wasmcustom.entitlements.policy.fetch_failed") >= 2);
    assert_eq!(send(&["admin"]), 200);
    assert_eq!(send(&["viewer"]), 403);
    // Too large.
    let host2 = Host::builder().workers(1).build();
    let server2 = PolicyServer::install(&host2);
    server2.answer(Reply::ok(200, only_admin_policy().to_string()));
    let mut cfg = remote_config(Some(policy()));
    cfg["remote"]["max_bytes"] = json!(16);
    load_entitlements(&host2, &cfg).unwrap();
    host2.advance(Duration::from_secs(1));
    assert_eq!(host2.counter("wasmcustom.entitlements.policy.invalid"), 1);
    assert!(!host2
        .logs_containing("more than remote.max_bytes 16")
        .is_empty());
}

#[test]
fn without_any_policy_yet_requests_get_503() {
    let host = Host::builder().workers(1).build();
    let server = PolicyServer::install(&host);
    let p = load_entitlements(&host, &remote_config(None)).unwrap();
    let chain = host.chain(&[&p]).with_upstream(upstream_ok);
    let s = host.stream(&chain);
    s.request_headers(&Req::get("/x").pairs(), true);
    let r = s.response().unwrap();
    assert_eq!(
        (r.status(), r.header("retry-after").as_deref()),
        (Some(503), Some("1"))
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["error"],
        "unavailable"
    );
    assert_eq!(host.counter("wasmcustom.entitlements.unavailable"), 1);
    host.advance(Duration::from_secs(1));
    assert_eq!(server.calls(), 1);
    assert_eq!(
        host.counter("wasmcustom.entitlements.policy.fetch_failed"),
        1
    );
    server.answer(Reply::ok(200, only_admin_policy().to_string()));
    host.advance(Duration::from_secs(2));
    let s = host.stream(&chain);
    s.request_headers(
        &Req::get("/x")
            .identity("a", "t", &["admin"], &json!({}))
            .pairs(),
        true,
    );
    assert_eq!(s.response().unwrap().status(), Some(200));
}
