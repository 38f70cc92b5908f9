//! The four filters in the emulator's strict host profile
//! (`wasm_host::Profile::Strict`): the tick period set once per root
//! context, shared-data CAS 0 that only creates, request-header removal that
//! does nothing, integer attributes as decimal strings. Their decisions must
//! be the ones they make on Envoy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use common::*;
use filter_tests::{
    demo_upstream as upstream, load_auth, load_entitlements, ratelimit_config, usage_config, Req,
};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{CallRequest, Host, Message, Plugin, Profile, Reply, Stream};

fn strict(workers: usize) -> Host {
    Host::builder()
        .workers(workers)
        .profile(Profile::Strict)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build()
}

/// No worker VM of `p` trapped (a second tick period would have).
fn healthy(host: &Host, p: &Plugin) {
    for w in 0..host.workers() {
        assert!(!p.failed(w), "{} worker {w}: {:?}", p.name(), p.failure(w));
    }
}

/// A cluster that records its calls and answers with what it is told.
#[derive(Clone)]
struct Server {
    calls: Arc<Mutex<Vec<CallRequest>>>,
    next: Arc<Mutex<Reply>>,
}

impl Server {
    fn install(host: &Host, cluster: &str, first: Reply) -> Server {
        let s = Server {
            calls: Arc::default(),
            next: Arc::new(Mutex::new(first)),
        };
        let t = s.clone();
        host.add_cluster(cluster, move |req| {
            t.calls.lock().unwrap().push(req.clone());
            t.next.lock().unwrap().clone()
        });
        s
    }

    fn answer(&self, r: Reply) {
        *self.next.lock().unwrap() = r;
    }

    fn calls(&self) -> Vec<CallRequest> {
        self.calls.lock().unwrap().clone()
    }
}

fn send(host: &Host, chain: &wasm_host::Chain, req: &Req) -> Stream {
    let s = host.stream(chain);
    s.request_headers(&req.pairs(), true);
    s
}

fn ok(_: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: b"ok".to_vec(),
        trailers: None,
    }
}

// ---- auth: a remote JWKS ----

const CERTS: &str = "/realms/carbon/protocol/openid-connect/certs";

fn es256() -> String {
    token(
        &json!({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}),
        &claims(),
    )
}

#[test]
fn auth_waits_for_a_remote_jwks_and_replaces_spoofed_identity() {
    let host = strict(2);
    let idp = Server::install(
        &host,
        "keycloak",
        Reply::ok(200, json!({"keys": [ec_jwk("ec-1")]}).to_string()),
    );
    let auth = load_auth(
        &host,
        &json!({
            "providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"], "jwks": {
                "remote": {"cluster": "keycloak", "path": CERTS, "refresh_interval_s": 600}
            }}},
            "jwks_wait_ms": 2000
        }),
    )
    .unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&auth]).with_upstream(ok);
    let spoofed = |path: &str| {
        Req::get(path)
            .header("authorization", &format!("Bearer {}", es256()))
            .header("x-auth-subject", "admin")
            .header("x-auth-tenant", "someone-else")
    };
    // One request on each worker; both wait for the first key set.
    let s1 = send(&host, &chain, &spoofed("/a"));
    let s2 = send(&host, &chain, &spoofed("/b"));
    assert_ne!(s1.worker(), s2.worker());
    assert!(s1.response().is_none() && s2.response().is_none());
    host.advance(Duration::from_millis(100));
    assert_eq!(s1.response().unwrap().status(), Some(200));
    // The other worker's tick (its period set once) finds the shared set.
    host.advance(Duration::from_millis(100));
    assert_eq!(s2.response().unwrap().status(), Some(200));
    healthy(&host, &auth);
    for s in [&s1, &s2] {
        let up = s.upstream_request().unwrap();
        // Removal did nothing, but replace leaves only the verified value.
        assert_eq!(
            up.header_all("x-auth-subject"),
            vec!["4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"]
        );
        assert_eq!(up.header_all("x-auth-tenant"), vec!["acme"]);
        assert_eq!(up.header_all("x-auth-issuer"), vec![ISSUER]);
        assert_eq!(
            up.header_all("x-auth-expires"),
            vec![(NOW + 300).to_string()]
        );
    }
    let paths: Vec<String> = idp.calls().iter().map(|c| c.path().to_string()).collect();
    assert_eq!(paths, vec![CERTS], "one fetch for both workers");
    let counter = |n: &str| host.counter(&format!("wasmcustom.auth.{n}"));
    assert_eq!(counter("jwks_fetch_success"), 1);
    assert_eq!(counter("waited_for_keys"), 2);
    // The fetch lease in shared data (read, then CAS) lets one worker refresh.
    host.advance(Duration::from_secs(599));
    assert_eq!(idp.calls().len(), 1);
    host.advance(Duration::from_secs(2));
    assert_eq!(idp.calls().len(), 2);
    assert_eq!(counter("jwks_fetch_success"), 2);
    // A bad token is still refused.
    let s = send(
        &host,
        &chain,
        &Req::get("/a").header("authorization", "Bearer a.b.c"),
    );
    assert_eq!(s.response().unwrap().status(), Some(401));
    healthy(&host, &auth);
}

// ---- entitlements: a remote policy ----

fn only_admins() -> Value {
    json!({"rules": [{"id": "admins", "effect": "allow", "when": [{"attr": "roles", "op": "contains", "value": "admin"}]}]})
}

#[test]
fn entitlements_fetch_refresh_and_revalidate_a_remote_policy() {
    let host = strict(2);
    let server = Server::install(
        &host,
        "policy",
        Reply::http(200, &[("etag", "\"v1\"")], only_admins().to_string()),
    );
    let p = load_entitlements(
        &host,
        &json!({"remote": {"cluster": "policy", "path": "/policies/entitlements.json", "refresh_interval_ms": 10000, "retry_interval_ms": 2000}}),
    )
    .unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&p]).with_upstream(ok);
    let status = |roles: &[&str]| {
        let s = send(
            &host,
            &chain,
            &Req::get("/anything").identity("alice", "acme", roles, &json!({})),
        );
        s.response().unwrap().status().unwrap()
    };
    host.advance(Duration::from_secs(2));
    assert_eq!(server.calls().len(), 1, "one fetch for both workers");
    for _ in 0..2 {
        assert_eq!(status(&["admin"]), 200);
        assert_eq!(status(&["viewer"]), 403);
    }
    let counter = |n: &str| host.counter(&format!("wasmcustom.entitlements.{n}"));
    assert_eq!(counter("policy.fetches"), 1);
    assert_eq!(counter("policy.reloads"), 2, "each worker compiled it");
    // A refresh after the interval, conditional; 304 keeps the policy.
    server.answer(Reply::http(304, &[], ""));
    host.advance(Duration::from_secs(10));
    let calls = server.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].header("if-none-match"), Some("\"v1\""));
    assert_eq!(counter("policy.not_modified"), 1);
    assert_eq!(status(&["admin"]), 200);
    assert_eq!(status(&["viewer"]), 403);
    // A changed policy replaces it on both workers.
    server.answer(Reply::http(
        200,
        &[("etag", "\"v2\"")],
        json!({"rules": [{"id": "viewers", "effect": "allow", "when": [{"attr": "roles", "op": "contains", "value": "viewer"}]}]}).to_string(),
    ));
    host.advance(Duration::from_secs(12));
    assert_eq!(server.calls().len(), 3);
    assert_eq!(counter("policy.reloads"), 4);
    assert_eq!(status(&["viewer"]), 200);
    assert_eq!(status(&["admin"]), 403);
    healthy(&host, &p);
}

// ---- ratelimit: local mode over shared data ----

#[test]
fn ratelimit_is_exact_across_four_workers() {
    let host = strict(4);
    let p = host
        .load(ratelimit_config(&json!({"policies": [{
            "id": "per-tenant", "key": ["tenant"],
            "rate": {"requests": 60, "per": "minute"}, "burst": 25
        }]})))
        .unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&p]).with_upstream(ok);
    let tenant = |t: &str| {
        Req::get("/api/v1/curves/EU-ETS")
            .header("x-auth-subject", "u")
            .header("x-auth-tenant", t)
    };
    let status = |s: &Stream| s.response().unwrap().status().unwrap();
    let streams: Vec<Stream> = (0..100)
        .map(|_| send(&host, &chain, &tenant("acme")))
        .collect();
    let admitted = streams.iter().filter(|s| status(s) == 200).count();
    assert_eq!(admitted, 25, "every CAS write landed: exactly the burst");
    let workers: std::collections::HashSet<usize> = streams.iter().map(Stream::worker).collect();
    assert_eq!(workers.len(), 4);
    let counter = |n: &str| host.counter(&format!("wasmcustom.ratelimit.{n}"));
    assert_eq!((counter("allowed"), counter("limited")), (25, 75));
    // One per second comes back, on whichever worker.
    host.advance(Duration::from_secs(1));
    let n = (0..8)
        .filter(|_| status(&send(&host, &chain, &tenant("acme"))) == 200)
        .count();
    assert_eq!(n, 1);
    assert_eq!(status(&send(&host, &chain, &tenant("other"))), 200);
    healthy(&host, &p);
}

// ---- usage: records from decimal-string attributes ----

#[test]
fn usage_records_status_sizes_and_duration_from_decimal_attributes() {
    let host = strict(2);
    let sidecar = Server::install(&host, "sidecar", Reply::ok(200, "{}"));
    let p = host
        .load(usage_config(&json!({
            "cluster": "sidecar",
            "flush_interval_ms": 1000,
            "max_batch_records": 5,
            "routes": ["/api/v1/instruments/**"],
        })))
        .unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&p]).with_upstream(upstream);
    let request = |method: &str, path: &str, tenant: &str, body: &[u8]| {
        let s = host.stream(&chain);
        let h = [
            (":method", method),
            (":path", path),
            (":authority", "api"),
            ("x-auth-tenant", tenant),
            ("x-auth-subject", "alice"),
        ];
        if body.is_empty() {
            s.request_headers(&h, true);
        } else {
            s.request_headers(&h, false);
            host.advance(Duration::from_millis(3));
            s.request_body(body, true);
        }
        assert!(s.is_complete());
    };
    request("POST", "/api/v1/instruments/x/y", "beta", b"12345");
    request("GET", "/missing", "acme", b"");
    host.advance(Duration::from_millis(1000));
    let mut records: Vec<Value> = sidecar
        .calls()
        .iter()
        .flat_map(|c| {
            usage_core::wire::parse(&c.body).unwrap();
            let v: Value = serde_json::from_slice(&c.body).unwrap();
            v["records"].as_array().unwrap().clone()
        })
        .collect();
    records.sort_by_key(|r| r["tenant"].as_str().unwrap().to_string());
    assert_eq!(records.len(), 2);
    let pick = |r: &Value| {
        (
            r["tenant"].clone(),
            r["method"].clone(),
            r["status"].clone(),
            r["request_bytes"].clone(),
            r["response_bytes"].clone(),
            r["duration_us"].clone(),
        )
    };
    assert_eq!(
        pick(&records[0]),
        (
            json!("acme"),
            json!("GET"),
            json!(404),
            json!(0),
            json!(2),
            json!(0)
        )
    );
    assert_eq!(
        pick(&records[1]),
        (
            json!("beta"),
            json!("POST"),
            json!(200),
            json!(5),
            json!(11),
            json!(3000)
        ),
        "the body came 3 ms after the headers"
    );
    assert_eq!(
        records[1]["route"],
        json!("/api/v1/instruments/**"),
        "{records:?}"
    );
    assert_eq!(host.counter("usage.records_sent"), 2);
    healthy(&host, &p);
}

// ---- known gap ----

/// What removal does on Envoy, without removal: a host where
/// `proxy_remove_header_map_value` does nothing still must not forward a
/// client's identity headers (auth rewrites the map without them when a
/// removal left one in place): not on an anonymous request of an
/// `allow_missing` route, no other `x-auth-*` name, not the token header.
#[test]
fn auth_forwards_no_client_identity_headers_without_removal() {
    let host = strict(1);
    let auth = load_auth(
        &host,
        &json!({
            "providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"],
                                        "jwks": {"inline": {"keys": [ec_jwk("ec-1")]}}}},
            "rules": [{"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}}]
        }),
    )
    .unwrap_or_else(|e| panic!("load: {e}"));
    let chain = host.chain(&[&auth]).with_upstream(ok);
    let forwarded = |req: Req| {
        let s = send(&host, &chain, &req);
        let up = s.upstream_request().unwrap();
        let mut names: Vec<String> = up
            .headers
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("x-auth-") || k == "authorization")
            .collect();
        names.sort();
        (names, up.header_all("x-auth-subject"))
    };
    let (names, subject) = forwarded(
        Req::get("/public/docs")
            .header("x-auth-subject", "admin")
            .header("x-auth-tenant", "someone-else"),
    );
    assert_eq!(
        (names, subject),
        (Vec::<String>::new(), vec![]),
        "anonymous request"
    );
    let (names, subject) = forwarded(
        Req::get("/a")
            .header("authorization", &format!("Bearer {}", es256()))
            .header("x-auth-anything", "x"),
    );
    assert_eq!(
        names,
        [
            "x-auth-claims",
            "x-auth-expires",
            "x-auth-issuer",
            "x-auth-roles",
            "x-auth-subject",
            "x-auth-tenant"
        ],
        "authenticated request: only auth's own headers"
    );
    assert_eq!(subject, vec!["4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"]);
}
