//! The four filters as a whole, the built `.wasm` files in the emulator as
//! Envoy chains them (usage, auth, entitlements, ratelimit), driven by
//! random request sequences (issue 25): methods and paths of any shape,
//! header names odd or duplicated, forged identity headers, a valid, bad
//! or no token, bodies in random chunks, streams reset half way. The
//! invariants: no VM traps; every stream that is not reset ends with one
//! decision — the upstream got it, or a local reply answered it, never
//! both; no identity header a client sent reaches the upstream; the VMs'
//! memory stays within a bound. (Coverage-guided fuzzing of the same
//! per-worker code natively: `fuzz/`, target `chain`.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use common::*;
use filter_tests::{auth_config, entitlements_config, ratelimit_config, usage_config};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{Host, Message, Plugin, Reply};

const POLICY: &str = include_str!("../../../filters/entitlements/examples/policy.json");
const FORGED: &str = "forged-by-the-client";

struct World {
    host: Host,
    chain: wasm_host::Chain,
    plugins: Vec<Plugin>,
    upstream: Arc<Mutex<Vec<Message>>>,
}

fn world() -> World {
    let host = Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    host.add_cluster("sidecar", |_| Reply::ok(200, "{}"));
    let load = |c| host.load(c).unwrap_or_else(|e| panic!("{e}"));
    let usage = load(usage_config(
        &json!({"cluster": "sidecar", "flush_interval_ms": 1000}),
    ));
    let auth = load(auth_config(&json!({
        "providers": {"kc": {"issuer": ISSUER, "audiences": ["pricing-api"],
                              "jwks": {"inline": {"keys": [ec_jwk("ec-1")]}}}},
        "sources": [{"header": {"name": "authorization", "prefix": "Bearer "}}, {"query": "access_token"}],
        "rules": [{"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}},
                  {"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}}]
    })));
    let policy: Value = serde_json::from_str(POLICY).unwrap();
    let ent = load(entitlements_config(&json!({"policy": policy})));
    let rl = load(ratelimit_config(&json!({"policies": [
        {"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 50, "per": "second"}, "burst": 20}
    ]})));
    let upstream: Arc<Mutex<Vec<Message>>> = Arc::default();
    let seen = upstream.clone();
    let chain = host
        .chain(&[&usage, &auth, &ent, &rl])
        .with_upstream(move |m: &Message| {
            seen.lock().unwrap().push(m.clone());
            Message {
                headers: vec![(":status".into(), b"200".to_vec())].into(),
                body: b"{}".to_vec(),
                trailers: None,
            }
        });
    World {
        host,
        chain,
        plugins: vec![usage, auth, ent, rl],
        upstream,
    }
}

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    token: u8,
    forge: bool,
    body: Vec<Vec<u8>>,
    reset_after: Option<usize>,
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("authorization".to_string()),
        Just("x-auth-subject".to_string()),
        Just("X-Auth-Tenant".to_string()),
        Just("x-auth-claims".to_string()),
        Just("cookie".to_string()),
        Just("content-length".to_string()),
        "[a-zA-Z0-9_.~!#$%&'*+^`|-]{1,20}",
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![
            Just("GET".to_string()),
            Just("POST".to_string()),
            Just("HEAD".to_string()),
            "[A-Z]{0,8}"
        ],
        prop_oneof![
            Just("/api/v1/curves/EU-ETS/latest".to_string()),
            Just("/api/v1/curves/PJM/history?from=1&to=2".to_string()),
            Just("/healthz".to_string()),
            Just("/public/x".to_string()),
            "/[a-zA-Z0-9%./_?&=+-]{0,60}",
            "\\PC{0,40}",
        ],
        prop::collection::vec((name(), "\\PC{0,40}"), 0..8),
        0u8..4,
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
        prop::option::of(0usize..4),
    )
        .prop_map(
            |(method, path, headers, token, forge, body, reset_after)| Request {
                method,
                path,
                headers,
                token,
                forge,
                body,
                reset_after,
            },
        )
}

fn bearer() -> String {
    let mut c = claims();
    c["exp"] = json!(NOW + 3600);
    format!(
        "Bearer {}",
        token(&json!({"alg": "ES256", "kid": "ec-1"}), &c)
    )
}

impl World {
    /// Sends one request; checks its decision.
    fn send(&self, r: &Request) {
        let mut h: Vec<(String, String)> = vec![
            (":method".into(), r.method.clone()),
            (":path".into(), r.path.clone()),
            (":authority".into(), "api".into()),
        ];
        h.extend(
            r.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        if r.forge {
            for n in [
                "x-auth-subject",
                "x-auth-tenant",
                "x-auth-roles",
                "x-auth-claims",
                "x-auth-issuer",
            ] {
                h.push((n.into(), FORGED.into()));
            }
        }
        match r.token {
            1 => h.push(("authorization".into(), bearer())),
            2 => h.push(("authorization".into(), "Bearer not.a.token".into())),
            _ => {}
        }
        let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let before = self.upstream.lock().unwrap().len();
        let s = self.host.stream(&self.chain);
        s.request_headers(&pairs, r.body.is_empty());
        for (i, chunk) in r.body.iter().enumerate() {
            if r.reset_after == Some(i) {
                s.reset();
                break;
            }
            s.request_body(chunk, i + 1 == r.body.len());
        }
        for (i, p) in self.plugins.iter().enumerate() {
            for w in 0..2 {
                assert!(!p.failed(w), "plugin {i} trapped on worker {w}: {r:?}");
            }
        }
        if s.was_reset() {
            return;
        }
        let reached = self.upstream.lock().unwrap().len() - before;
        let local = s.local_reply().is_some();
        assert!(
            s.is_complete(),
            "a stream left undecided: {r:?}\n{:?}",
            s.trace()
        );
        assert!(
            (reached == 1) != local,
            "upstream {reached} time(s) and local reply {local}: {r:?}"
        );
        if reached == 1 {
            let m = self.upstream.lock().unwrap().last().unwrap().clone();
            for (k, v) in m.headers.iter() {
                assert!(
                    !(k.starts_with("x-auth-") && v.as_slice() == FORGED.as_bytes()),
                    "the client's {k} reached the upstream: {r:?}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_request_sequences_get_one_decision_each(reqs in prop::collection::vec(request(), 1..12)) {
        let w = world();
        for r in &reqs {
            w.send(r);
            w.host.advance(Duration::from_millis(37));
        }
        // Bounded memory: no VM grew past 64 MiB on hostile input.
        for p in &w.plugins {
            for worker in 0..2 {
                prop_assert!(p.memory_size(worker) <= 64 << 20, "{} bytes", p.memory_size(worker));
            }
        }
    }
}

#[test]
fn the_driver_sees_both_decisions() {
    // The invariants above mean something only if both outcomes happen.
    let w = world();
    let r = |token, path: &str, forge| Request {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        token,
        forge,
        body: vec![],
        reset_after: None,
    };
    w.send(&r(1, "/api/v1/curves/EU-ETS/latest", true));
    assert_eq!(
        w.upstream.lock().unwrap().len(),
        1,
        "a valid token reaches the upstream"
    );
    w.send(&r(0, "/api/v1/curves/EU-ETS/latest", true));
    w.send(&r(2, "/api/v1/curves/EU-ETS/latest", false));
    assert_eq!(
        w.upstream.lock().unwrap().len(),
        1,
        "no token and a bad one are answered locally"
    );
}
