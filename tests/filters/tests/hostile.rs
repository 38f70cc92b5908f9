//! The four filters as a whole, the built `.wasm` files in the emulator as
//! Envoy chains them (usage, auth, entitlements, ratelimit), driven by
//! random request sequences (issue 25): methods and paths of any shape,
//! header names odd or duplicated, forged identity headers, a valid, bad
//! or no token, bodies in random chunks, streams reset half way; and with
//! every dependency remote (key set, grants feed, rate limit service,
//! usage sink), callouts answered right but late, with garbage, with an
//! error, reset, or never. The invariants: no VM traps; every callout has
//! a timeout; every stream that is not reset ends with one
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

/// The four plugins chained in Envoy's order (usage, auth, entitlements,
/// ratelimit) before an upstream that answers 200 and keeps what reached it.
fn chained(host: Host, plugins: [Plugin; 4]) -> World {
    let upstream: Arc<Mutex<Vec<Message>>> = Arc::default();
    let seen = upstream.clone();
    let [usage, auth, ent, rl] = &plugins;
    let chain = host
        .chain(&[usage, auth, ent, rl])
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
        plugins: plugins.into(),
        upstream,
    }
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
    chained(host, [usage, auth, ent, rl])
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
        self.send_with(r, false)
    }

    /// [`World::send`], running the host's clock (up to a minute, in
    /// 50 ms steps) while the request waits on a callout.
    fn send_and_wait(&self, r: &Request) {
        self.send_with(r, true)
    }

    fn send_with(&self, r: &Request, wait: bool) {
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
        if wait {
            let mut waited = Duration::ZERO;
            while !s.is_complete() && !s.was_reset() && waited < Duration::from_secs(60) {
                self.host.advance(Duration::from_millis(50));
                waited += Duration::from_millis(50);
            }
            for (i, p) in self.plugins.iter().enumerate() {
                for w in 0..2 {
                    assert!(!p.failed(w), "plugin {i} trapped on worker {w}: {r:?}");
                }
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

// ---- callouts answering late, wrong or never ----

/// How one callout is answered.
#[derive(Debug, Clone)]
enum Answer {
    /// The right answer, `ms` later.
    Right {
        ms: u64,
    },
    /// A body that is not what was asked for.
    Garbage(Vec<u8>),
    /// An error status (HTTP 500 / gRPC UNAVAILABLE).
    Error,
    Reset,
    Never,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => (0u64..3000).prop_map(|ms| Answer::Right { ms }),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Answer::Garbage),
        1 => Just(Answer::Error),
        1 => Just(Answer::Reset),
        1 => Just(Answer::Never),
    ]
}

/// The answers, taken in turn (cycling) by every cluster; and whether a
/// callout was dispatched without a timeout (one that is never answered
/// would then hold its request for ever).
#[derive(Clone)]
struct Script {
    answers: Arc<Vec<Answer>>,
    next: Arc<Mutex<usize>>,
    untimed: Arc<Mutex<Vec<String>>>,
}

impl Script {
    fn take(&self, what: &str, timeout_ms: u32) -> Answer {
        if timeout_ms == 0 {
            self.untimed.lock().unwrap().push(what.to_string());
        }
        let mut n = self.next.lock().unwrap();
        let a = self.answers[*n % self.answers.len()].clone();
        *n += 1;
        a
    }

    fn http(&self, what: &str, timeout_ms: u32, right: Vec<u8>) -> Reply {
        match self.take(what, timeout_ms) {
            Answer::Right { ms } => Reply::ok(200, right).after(Duration::from_millis(ms)),
            Answer::Garbage(b) => Reply::ok(200, b),
            Answer::Error => Reply::ok(500, "oops"),
            Answer::Reset => Reply::Reset {
                delay: Duration::ZERO,
            },
            Answer::Never => Reply::Never,
        }
    }
}

/// The chain with every dependency remote: the auth filter's key set from
/// `idp`, the entitlements filter's grants from the sidecar's feed, the
/// ratelimit filter in global mode against a rate limit service, usage
/// flushed to the sidecar; every callout answered by the script.
fn remote_world(script: &Script) -> World {
    let host = Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    let s = script.clone();
    host.add_cluster("idp", move |c| {
        let jwks = json!({"keys": [ec_jwk("ec-1")]}).to_string().into_bytes();
        s.http(&format!("idp {}", c.path()), c.timeout_ms, jwks)
    });
    let s = script.clone();
    host.add_cluster("sidecar", move |c| {
        let right = if c.path().starts_with("/internal/v1/grants") {
            json!({"epoch": "pg-1", "version": 1, "snapshot": true, "next": null,
                   "holders": [{"tenant": "acme", "grants": [["curves:*", "read"]]}]})
            .to_string()
            .into_bytes()
        } else {
            b"{}".to_vec()
        };
        s.http(&format!("sidecar {}", c.path()), c.timeout_ms, right)
    });
    let s = script.clone();
    host.add_grpc_cluster("ratelimit", move |call| {
        let right = ratelimit_core::rls::Response {
            overall: ratelimit_core::rls::Code::Ok,
            statuses: vec![],
            response_headers: vec![],
            raw_body: vec![],
        }
        .encode();
        match s.take("ratelimit", call.timeout_ms) {
            Answer::Right { ms } => Reply::grpc(right).after(Duration::from_millis(ms)),
            Answer::Garbage(b) => Reply::grpc(b),
            Answer::Error => Reply::GrpcError {
                status: 14,
                message: "unavailable".into(),
                delay: Duration::ZERO,
            },
            Answer::Reset => Reply::Reset {
                delay: Duration::ZERO,
            },
            Answer::Never => Reply::Never,
        }
    });
    let load = |c| host.load(c).unwrap_or_else(|e| panic!("{e}"));
    let usage = load(usage_config(
        &json!({"cluster": "sidecar", "flush_interval_ms": 1000}),
    ));
    let auth = load(auth_config(&json!({
        "providers": {"kc": {"issuer": ISSUER, "audiences": ["pricing-api"],
                              "jwks": {"remote": {"cluster": "idp", "path": "/certs",
                                                  "refresh_interval_s": 5, "unknown_kid_refetch_s": 1}}}},
        "sources": [{"header": {"name": "authorization", "prefix": "Bearer "}}, {"query": "access_token"}],
        "rules": [{"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}},
                  {"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}}]
    })));
    let ent = load(entitlements_config(&json!({
        "policy": {"default": "deny", "rules": [
            {"id": "health", "effect": "allow", "match": {"path": {"exact": "/healthz"}}},
            {"id": "curves", "effect": "allow",
             "match": {"path": {"template": "/api/v1/curves/{market}/**"}},
             "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]}
        ]},
        "grants": {"cluster": "sidecar", "page_grants": 100}
    })));
    let rl = load(ratelimit_config(&json!({
        "policies": [{"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 50, "per": "second"}}],
        "global": {"cluster": "ratelimit", "domain": "254carbon", "timeout_ms": 100}
    })));
    chained(host, [usage, auth, ent, rl])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the key set's, the grants feed's and the rate limit
    /// service's callouts do — answer right but late, answer garbage, fail,
    /// reset, or never answer — no VM traps, every callout has a timeout,
    /// and every request ends with exactly one decision once the host's
    /// clock has run past the callouts' timeouts.
    #[test]
    fn callouts_late_wrong_or_never_leave_no_request_undecided(
        answers in prop::collection::vec(answer(), 1..8),
        reqs in prop::collection::vec(request(), 1..8),
        gaps in prop::collection::vec(0u64..4000, 1..8),
    ) {
        let script = Script {
            answers: Arc::new(answers),
            next: Arc::default(),
            untimed: Arc::default(),
        };
        let w = remote_world(&script);
        for (i, r) in reqs.iter().enumerate() {
            w.send_and_wait(r);
            w.host.advance(Duration::from_millis(gaps[i % gaps.len()]));
        }
        let untimed = script.untimed.lock().unwrap().clone();
        prop_assert!(untimed.is_empty(), "callouts without a timeout: {untimed:?}");
        for p in &w.plugins {
            for worker in 0..2 {
                prop_assert!(p.memory_size(worker) <= 64 << 20, "{} bytes", p.memory_size(worker));
            }
        }
    }
}

/// The property above means something only if requests do wait on
/// callouts: a late key set holds the first request until it lands; a key
/// set never answered holds it until the callout's timeout, and then it is
/// answered locally.
#[test]
fn a_request_waits_for_a_late_callout_and_is_answered_when_one_never_comes() {
    for answer in [Answer::Right { ms: 1500 }, Answer::Never] {
        let script = Script {
            answers: Arc::new(vec![answer.clone()]),
            next: Arc::default(),
            untimed: Arc::default(),
        };
        let w = remote_world(&script);
        let auth = bearer();
        let s = w.host.stream(&w.chain);
        s.request_headers(
            &[
                (":method", "GET"),
                (":path", "/api/v1/curves/EU-ETS/latest"),
                (":authority", "api"),
                ("authorization", auth.as_str()),
            ],
            true,
        );
        assert!(
            !s.is_complete(),
            "{answer:?}: decided before the key set came"
        );
        let mut waited = Duration::ZERO;
        while !s.is_complete() && waited < Duration::from_secs(60) {
            w.host.advance(Duration::from_millis(50));
            waited += Duration::from_millis(50);
        }
        assert!(s.is_complete(), "{answer:?}: still waiting after 60 s");
        match answer {
            Answer::Right { ms } => assert!(
                waited >= Duration::from_millis(ms),
                "decided after {waited:?}, before the key set came at {ms} ms"
            ),
            _ => assert!(
                s.local_reply().is_some() && w.upstream.lock().unwrap().is_empty(),
                "no key set, yet not answered locally: {:?}",
                s.trace()
            ),
        }
    }
}
