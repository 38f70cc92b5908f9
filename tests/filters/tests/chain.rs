//! auth then entitlements in one chain, as Envoy runs them: entitlements
//! decides on what auth verified, never on what the client claimed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use common::*;
use filter_tests::{claims_header, load_auth, load_entitlements, Req};
use serde_json::{json, Value};
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{Host, Message, Stream};

const POLICY: &str = include_str!("../../../filters/entitlements/examples/policy.json");

fn ok(_: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: b"curve".to_vec(),
        trailers: None,
    }
}

struct Chain {
    host: Host,
    chain: wasm_host::Chain,
}

fn chain() -> Chain {
    let host = Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    let auth = load_auth(
        &host,
        &json!({
            "providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"],
                                        "jwks": {"inline": {"keys": [ec_jwk("ec-1")]}}}},
            "rules": [{"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}}]
        }),
    )
    .unwrap();
    let policy: Value = serde_json::from_str(POLICY).unwrap();
    let ent = load_entitlements(&host, &json!({"policy": policy})).unwrap();
    let chain = host.chain(&[&auth, &ent]).with_upstream(ok);
    Chain { host, chain }
}

fn bearer(c: &Value) -> String {
    format!(
        "Bearer {}",
        token(&json!({"alg": "ES256", "kid": "ec-1"}), c)
    )
}

impl Chain {
    fn send(&self, r: Req) -> Stream {
        let s = self.host.stream(&self.chain);
        s.request_headers(&r.pairs(), true);
        s
    }

    fn status(&self, r: Req) -> (u16, Value) {
        let s = self.send(r);
        let m = s.response().unwrap();
        (
            m.status().unwrap(),
            serde_json::from_slice(&m.body).unwrap_or(Value::Null),
        )
    }
}

#[test]
fn entitlements_decide_on_the_verified_token() {
    let c = chain();
    let s =
        c.send(Req::get("/api/v1/curves/EU-ETS/DEC26").header("authorization", &bearer(&claims())));
    assert_eq!(s.response().unwrap().status(), Some(200));
    let up = s.upstream_request().unwrap();
    assert_eq!(up.header("x-auth-tenant").as_deref(), Some("acme"));
    assert_eq!(up.header("authorization"), None);
    assert_eq!(
        c.status(
            Req::get("/api/v1/curves/CAISO/DEC26").header("authorization", &bearer(&claims()))
        ),
        (403, json!({"error": "forbidden", "rule": "default"}))
    );
    // A trader publishes in a market of the contract.
    let (st, _) = c.status(
        Req::new("POST", "/api/v1/curves/EU-ETS/DEC26").header("authorization", &bearer(&claims())),
    );
    assert_eq!(st, 200);
}

#[test]
fn spoofed_identity_headers_never_reach_entitlements() {
    let c = chain();
    let spoof =
        claims_header(&json!({"entitlements": {"markets": ["CAISO"]}, "plan": "enterprise"}));
    // With a valid token: auth replaces the client's claims by the token's.
    let r = Req::get("/api/v1/curves/CAISO/DEC26")
        .header("authorization", &bearer(&claims()))
        .header("x-auth-claims", &spoof)
        .header("x-auth-roles", "admin");
    assert_eq!(c.status(r).0, 403);
    // Without a token: 401 from auth; entitlements is never asked.
    let r = Req::get("/api/v1/curves/CAISO/DEC26")
        .header("x-auth-claims", &spoof)
        .header("x-auth-subject", "x");
    assert_eq!(c.status(r).0, 401);
    assert_eq!(
        c.host.counter("wasmcustom.entitlements.allowed")
            + c.host.counter("wasmcustom.entitlements.denied"),
        1
    );
    // On a route auth lets through anonymously, the spoofed headers are gone.
    let s = c.send(Req::get("/healthz").header("x-auth-claims", &spoof));
    assert_eq!(s.response().unwrap().status(), Some(200));
    assert_eq!(s.upstream_request().unwrap().header("x-auth-claims"), None);
}

#[test]
fn suspended_accounts_are_denied_whatever_they_are_entitled_to() {
    let c = chain();
    let mut cl = claims();
    cl["account_status"] = json!("suspended");
    assert_eq!(
        c.status(Req::get("/api/v1/curves/EU-ETS/DEC26").header("authorization", &bearer(&cl))),
        (403, json!({"error": "forbidden", "rule": "suspended"}))
    );
}
