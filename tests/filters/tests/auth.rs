//! The auth filter, built for wasm32-wasip1, in the host emulator: tokens
//! signed with keys generated here, JWKS served by emulated clusters.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use common::*;
use filter_tests::{auth_config, load_auth, Req};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{CallRequest, Host, Message, Reply, Stream};

fn echo(req: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: serde_json::to_vec(
            &req.headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
        trailers: None,
    }
}

fn host() -> Host {
    Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build()
}

fn inline_config() -> Value {
    json!({
        "providers": {"keycloak": {
            "issuer": ISSUER, "audiences": ["pricing-api"],
            "jwks": {"inline": {"keys": [ec_jwk("ec-1"), rsa_key(2048).jwk("rsa-1")]}}
        }},
        "sources": [{"header": {"name": "authorization", "prefix": "Bearer "}}, {"query": "access_token"}],
        "rules": [
            {"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}},
            {"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}}
        ]
    })
}

fn es256() -> String {
    token(
        &json!({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}),
        &claims(),
    )
}

struct Env {
    host: Host,
    chain: wasm_host::Chain,
}

impl Env {
    fn new(host: Host, config: Value) -> Env {
        let p = load_auth(&host, &config).unwrap_or_else(|e| panic!("load: {e}"));
        let chain = host.chain(&[&p]).with_upstream(echo);
        Env { host, chain }
    }

    fn send(&self, req: &Req) -> Stream {
        let s = self.host.stream(&self.chain);
        s.request_headers(&req.pairs(), true);
        s
    }

    fn counter(&self, n: &str) -> u64 {
        self.host.counter(&format!("wasmcustom.auth.{n}"))
    }
}

fn upstream_header(s: &Stream, name: &str) -> Option<String> {
    s.upstream_request().and_then(|m| m.header(name))
}

#[test]
fn a_valid_token_becomes_identity_headers_and_spoofed_ones_are_removed() {
    let e = Env::new(host(), inline_config());
    let s = e.send(
        &Req::get("/api/v1/curves/EU-ETS")
            .header("authorization", &format!("Bearer {}", es256()))
            .header("x-auth-roles", "admin")
            .header("x-auth-tenant", "someone-else")
            .header("x-auth-expires", "99999999999")
            .header("x-auth-anything", "x"),
    );
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(
        upstream_header(&s, "x-auth-subject").as_deref(),
        Some("4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60")
    );
    assert_eq!(
        upstream_header(&s, "x-auth-issuer").as_deref(),
        Some(ISSUER)
    );
    assert_eq!(
        upstream_header(&s, "x-auth-tenant").as_deref(),
        Some("acme")
    );
    assert_eq!(
        upstream_header(&s, "x-auth-roles").as_deref(),
        Some("trader,viewer")
    );
    assert_eq!(
        upstream_header(&s, "x-auth-claims").as_deref(),
        Some(es256().split('.').nth(1).unwrap())
    );
    assert_eq!(
        upstream_header(&s, "x-auth-expires"),
        Some((NOW + 300).to_string()),
        "the token's exp, not the client's"
    );
    assert_eq!(
        s.upstream_request()
            .unwrap()
            .header_all("x-auth-expires")
            .len(),
        1
    );
    assert_eq!(upstream_header(&s, "x-auth-anything"), None);
    assert_eq!(
        s.upstream_request()
            .unwrap()
            .header_all("x-auth-roles")
            .len(),
        1
    );
    assert_eq!(
        upstream_header(&s, "authorization"),
        None,
        "the token is not forwarded by default"
    );
    // Unauthenticated requests lose spoofed headers too.
    let s = e.send(&Req::get("/public/docs").header("x-auth-subject", "admin"));
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(upstream_header(&s, "x-auth-subject"), None);
    assert_eq!((e.counter("allowed"), e.counter("anonymous")), (1, 1));
}

#[test]
fn missing_and_invalid_tokens_get_401_with_rfc6750_challenges() {
    let e = Env::new(host(), inline_config());
    let s = e.send(&Req::get("/api/v1/curves/EU-ETS"));
    let r = s.local_reply().map(|_| s.response().unwrap()).unwrap();
    assert_eq!(r.status(), Some(401));
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Bearer realm="254carbon""#)
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"error": "invalid_token", "message": "token missing"})
    );
    assert!(s.upstream_request().is_none());

    let bad = |t: &str| {
        let s = e.send(&Req::get("/api/v1/x").header("authorization", &format!("Bearer {t}")));
        let r = s.response().unwrap();
        assert_eq!(r.status(), Some(401), "{t}");
        r.header("www-authenticate").unwrap()
    };
    let expired = {
        let mut c = claims();
        c["exp"] = json!(NOW - 120);
        token(&json!({"alg": "ES256", "kid": "ec-1"}), &c)
    };
    let wrong_aud = {
        let mut c = claims();
        c["aud"] = json!("other");
        token(&json!({"alg": "ES256", "kid": "ec-1"}), &c)
    };
    let other_issuer = {
        let mut c = claims();
        c["iss"] = json!("https://evil.example");
        token(&json!({"alg": "ES256", "kid": "ec-1"}), &c)
    };
    let forged = {
        let t = es256();
        let p: Vec<&str> = t.split('.').collect();
        let mut c = claims();
        c["realm_access"] = json!({"roles": ["admin"]});
        format!("{}.{}.{}", p[0], b64(c.to_string().as_bytes()), p[2])
    };
    let none = token(&json!({"alg": "none"}), &claims());
    let huge = "a".repeat(9000);
    for t in [
        "garbage",
        "a.b",
        "a.b.c",
        &expired,
        &wrong_aud,
        &other_issuer,
        &forged,
        &none,
        &huge,
    ] {
        assert_eq!(
            bad(t),
            r#"Bearer realm="254carbon", error="invalid_token", error_description="invalid token""#
        );
    }
    for code in [
        "malformed",
        "expired",
        "audience",
        "unknown_issuer",
        "bad_signature",
        "algorithm",
        "too_large",
    ] {
        assert!(e.counter(&format!("denied.{code}")) >= 1, "{code}");
    }
    assert_eq!(e.counter("denied.missing"), 1);
    assert_eq!(e.counter("denied"), 10);
    // Two different tokens in two places: refused.
    let s = e.send(
        &Req::get(&format!("/api/v1/x?access_token={}", bad_token()))
            .header("authorization", &format!("Bearer {}", es256())),
    );
    assert_eq!(s.response().unwrap().status(), Some(401));
    assert_eq!(e.counter("denied.conflicting"), 1);
}

fn bad_token() -> String {
    token(&json!({"alg": "HS256"}), &claims())
}

#[test]
fn reasons_are_exposed_only_when_configured() {
    let mut cfg = inline_config();
    cfg["expose_reasons"] = json!(true);
    let e = Env::new(host(), cfg);
    let mut c = claims();
    c["exp"] = json!(NOW - 120);
    let s = e.send(&Req::get("/x").header(
        "authorization",
        &format!("Bearer {}", token(&json!({"alg": "ES256"}), &c)),
    ));
    let r = s.response().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["message"],
        "token expired"
    );
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains(r#"error_description="token expired""#));
}

#[test]
fn bypass_routes_and_query_tokens() {
    let e = Env::new(host(), inline_config());
    assert_eq!(
        e.send(&Req::get("/healthz")).response().unwrap().status(),
        Some(200)
    );
    assert_eq!(e.counter("bypassed"), 1);
    // A WebSocket upgrade carrying its token in the query.
    let s =
        e.send(&Req::get(&format!("/ws?access_token={}", es256())).header("upgrade", "websocket"));
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert!(upstream_header(&s, "x-auth-subject").is_some());
}

#[test]
fn verified_tokens_are_cached_and_rechecked_for_expiry() {
    let host = Host::builder()
        .workers(1)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    let e = Env::new(host, inline_config());
    let t = token(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims());
    for _ in 0..3 {
        let s = e.send(&Req::get("/x").header("authorization", &format!("Bearer {t}")));
        assert_eq!(s.response().unwrap().status(), Some(200));
    }
    assert_eq!(
        (e.counter("jwt_cache_miss"), e.counter("jwt_cache_hit")),
        (1, 2)
    );
    // Past exp + skew the cached token is refused.
    e.host.advance(Duration::from_secs(300 + 60));
    let s = e.send(&Req::get("/x").header("authorization", &format!("Bearer {t}")));
    assert_eq!(s.response().unwrap().status(), Some(401));
    assert_eq!(e.counter("denied.expired"), 1);
}

// ---- remote keys ----

struct Idp {
    calls: Arc<Mutex<Vec<CallRequest>>>,
    jwks: Arc<Mutex<Reply>>,
}

impl Idp {
    fn install(host: &Host, keys: Vec<Value>) -> Idp {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let jwks = Arc::new(Mutex::new(Reply::ok(
            200,
            json!({"keys": keys}).to_string(),
        )));
        let (c, j) = (calls.clone(), jwks.clone());
        host.add_cluster("keycloak", move |req| {
            c.lock().unwrap().push(req.clone());
            if req.path().ends_with("/.well-known/openid-configuration") {
                return Reply::ok(200, json!({"issuer": ISSUER, "jwks_uri": "https://idp.254carbon.test/realms/carbon/protocol/openid-connect/certs"}).to_string());
            }
            j.lock().unwrap().clone()
        });
        Idp { calls, jwks }
    }

    fn serve(&self, r: Reply) {
        *self.jwks.lock().unwrap() = r;
    }

    fn paths(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.path().to_string())
            .collect()
    }
}

fn remote_config(jwks: Value) -> Value {
    json!({
        "providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"], "jwks": jwks}},
        "jwks_wait_ms": 2000
    })
}

fn keycloak_remote() -> Value {
    json!({"remote": {"cluster": "keycloak", "path": "/realms/carbon/protocol/openid-connect/certs", "refresh_interval_s": 600, "unknown_kid_refetch_s": 30}})
}

#[test]
fn requests_wait_for_the_first_jwks_which_is_fetched_once_for_all_workers() {
    let host = host();
    let idp = Idp::install(&host, vec![ec_jwk("ec-1")]);
    let e = Env::new(host, remote_config(keycloak_remote()));
    let s1 = e.send(&Req::get("/a").header("authorization", &format!("Bearer {}", es256())));
    let s2 = e.send(&Req::get("/b").header("authorization", &format!("Bearer {}", es256())));
    assert!(
        s1.response().is_none() && s2.response().is_none(),
        "paused until keys arrive"
    );
    e.host.advance(Duration::from_millis(100));
    assert_eq!(s1.response().unwrap().status(), Some(200));
    assert_eq!(
        upstream_header(&s1, "x-auth-tenant").as_deref(),
        Some("acme")
    );
    // The other worker picks the shared set up at its next tick.
    e.host.advance(Duration::from_millis(100));
    assert_eq!(s2.response().unwrap().status(), Some(200));
    assert_eq!(
        idp.paths(),
        vec!["/realms/carbon/protocol/openid-connect/certs"]
    );
    assert_eq!(e.counter("jwks_fetch_success"), 1);
    assert_eq!(e.counter("waited_for_keys"), 2);
    // Refreshed after refresh_interval_s, not before.
    e.host.advance(Duration::from_secs(599));
    assert_eq!(idp.paths().len(), 1);
    e.host.advance(Duration::from_secs(2));
    assert_eq!(idp.paths().len(), 2);
}

#[test]
fn an_unreachable_jwks_fails_closed_after_the_wait_and_is_retried_with_backoff() {
    let host = host();
    let idp = Idp::install(&host, vec![]);
    idp.serve(Reply::ok(500, "down"));
    let e = Env::new(host, remote_config(keycloak_remote()));
    let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {}", es256())));
    e.host.advance(Duration::from_millis(1900));
    assert!(s.response().is_none());
    e.host.advance(Duration::from_millis(200));
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(401));
    assert_eq!(e.counter("denied.jwks_unavailable"), 1);
    let failed = e.counter("jwks_fetch_failed");
    assert!((2..=3).contains(&failed), "backoff 1 s, 2 s…: {failed}");
    // Garbage, an empty set, and silence are failures too; then it recovers.
    for bad in [
        Reply::ok(200, "<html>"),
        Reply::ok(200, r#"{"keys":[]}"#),
        Reply::Never,
    ] {
        idp.serve(bad);
        e.host.advance(Duration::from_secs(20));
    }
    assert!(e.counter("jwks_fetch_failed") > failed + 2);
    idp.serve(Reply::ok(
        200,
        json!({"keys": [ec_jwk("ec-1")]}).to_string(),
    ));
    e.host.advance(Duration::from_secs(70));
    let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {}", es256())));
    e.host.advance(Duration::from_millis(200));
    assert_eq!(s.response().unwrap().status(), Some(200));
}

#[test]
fn a_key_rotation_is_picked_up_at_the_first_token_with_the_new_kid() {
    let host = host();
    let idp = Idp::install(&host, vec![ec_jwk("ec-1")]);
    let e = Env::new(host, remote_config(keycloak_remote()));
    e.host.advance(Duration::from_millis(200));
    assert_eq!(idp.paths().len(), 1);
    // Keycloak rotates: the new key (here: the RSA key, kid rsa-2) signs.
    e.host.advance(Duration::from_secs(60));
    idp.serve(Reply::ok(
        200,
        json!({"keys": [ec_jwk("ec-1"), rsa_key(2048).jwk("rsa-2")]}).to_string(),
    ));
    let t = token(&json!({"alg": "RS256", "kid": "rsa-2"}), &claims());
    let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {t}")));
    e.host.advance(Duration::from_millis(200));
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(idp.paths().len(), 2);
    // A kid nobody has: one refetch at most per unknown_kid_refetch_s, then 401.
    let t = token(&json!({"alg": "RS256", "kid": "forged-9"}), &claims());
    for _ in 0..5 {
        let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {t}")));
        e.host.advance(Duration::from_millis(200));
        assert_eq!(s.response().unwrap().status(), Some(401));
    }
    assert_eq!(
        idp.paths().len(),
        2,
        "fetched at 60 s: the window has not passed"
    );
    assert!(e.counter("denied.unknown_key") >= 5);
}

#[test]
fn oidc_discovery_finds_the_jwks_uri() {
    let host = host();
    let idp = Idp::install(&host, vec![ec_jwk("ec-1")]);
    let e = Env::new(
        host,
        remote_config(json!({"discovery": {"cluster": "keycloak"}})),
    );
    let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {}", es256())));
    e.host.advance(Duration::from_millis(100));
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(
        idp.paths(),
        vec![
            "/realms/carbon/.well-known/openid-configuration",
            "/realms/carbon/protocol/openid-connect/certs"
        ]
    );
    let c = idp.calls.lock().unwrap();
    assert_eq!(c[1].header(":authority"), Some("idp.254carbon.test"));
}

#[test]
fn configuration_errors_name_the_field() {
    let host = host();
    let err = |cfg: Value| match host.load(auth_config(&cfg)) {
        Ok(_) => panic!("accepted {cfg}"),
        Err(e) => e.logs().join("\n"),
    };
    assert!(err(json!({"providers": {}})).contains("providers: at least one"));
    assert!(err(
        json!({"providers": {"k": {"issuer": ISSUER, "jwks": {"remote": {"cluster": "c"}}}}})
    )
    .contains("providers.k.jwks.remote.path: required"));
    assert!(err(json!({"providers": {"k": {"issuer": ISSUER, "jwks": {"inline": {"keys": []}}}}, "extra": 1})).contains("unknown field `extra`"));
}

#[test]
fn a_huge_jwks_is_refused_and_the_last_good_set_kept() {
    let host = host();
    let idp = Idp::install(&host, vec![ec_jwk("ec-1")]);
    let mut cfg = keycloak_remote();
    cfg["remote"]["max_bytes"] = json!(4096);
    cfg["remote"]["refresh_interval_s"] = json!(10);
    let e = Env::new(host, remote_config(cfg));
    e.host.advance(Duration::from_millis(200));
    assert_eq!(e.counter("jwks_fetch_success"), 1);
    let many: Vec<Value> = (0..200).map(|i| ec_jwk(&format!("k{i}"))).collect();
    idp.serve(Reply::ok(200, json!({"keys": many}).to_string()));
    e.host.advance(Duration::from_secs(11));
    assert!(e.counter("jwks_fetch_failed") >= 1);
    assert!(!e
        .host
        .logs_containing("more than max_bytes 4096")
        .is_empty());
    let s = e.send(&Req::get("/a").header("authorization", &format!("Bearer {}", es256())));
    assert_eq!(s.response().unwrap().status(), Some(200));
}

#[test]
fn time_claims_are_checked_through_the_filter() {
    let e = Env::new(host(), inline_config());
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        format!(
            "Bearer {}",
            token(&json!({"alg": "ES256", "kid": "ec-1"}), &c)
        )
    };
    for (t, code) in [
        (with("nbf", json!(NOW + 3600)), "not_yet_valid"),
        (with("exp", json!("soon")), "malformed"),
        (with("iss", json!(5)), "unknown_issuer"),
    ] {
        let s = e.send(&Req::get("/a").header("authorization", &t));
        assert_eq!(s.response().unwrap().status(), Some(401), "{code}");
        assert_eq!(e.counter(&format!("denied.{code}")), 1, "{code}");
    }
}

#[test]
fn a_short_cache_control_max_age_brings_the_refresh_forward() {
    let host = host();
    let idp = Idp::install(&host, vec![]);
    idp.serve(Reply::http(
        200,
        &[("cache-control", "public, max-age=100")],
        json!({"keys": [ec_jwk("ec-1")]}).to_string(),
    ));
    let e = Env::new(host, remote_config(keycloak_remote()));
    e.host.advance(Duration::from_millis(200));
    assert_eq!(idp.paths().len(), 1);
    e.host.advance(Duration::from_secs(85));
    assert_eq!(idp.paths().len(), 1);
    e.host.advance(Duration::from_secs(6));
    assert_eq!(
        idp.paths().len(),
        2,
        "refreshed at 90 s, before the 100 s max-age"
    );
}
