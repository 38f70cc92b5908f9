//! The auth and entitlements filters as a whole, natively with the host
//! double (the same per-worker code the `.wasm` runs): a request with
//! fuzzed method, path, headers (odd names, duplicates, non-UTF-8 values,
//! forged identity), with or without a valid token, through auth and then
//! entitlements. Invariants: each filter either lets the request go on or
//! answers it itself with exactly one local reply (inline keys and an
//! inline policy: nothing to wait for); a request that goes on carries no
//! identity header the client sent.
#![no_main]

use arbitrary::Arbitrary;
use auth_core::filter::Auth;
use entitlements_core::filter::Entitlements;
use filter_common::double::FakeHost;
use filter_common::filter::{configure, Filter, Flow};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

/// A token of the `jwt` target's HMAC key, valid until 2100.
const TOKEN: &str = include_str!("../corpus/jwt/hs256");
const FORGED: &[u8] = b"forged-by-the-client";
const JWKS: &str = r#"{"keys": [{"kty": "oct", "kid": "hs-1", "alg": "HS256", "k": "ZnV6ei1zZWNyZXQtZnV6ei1zZWNyZXQtZnV6ei1zZWM"}]}"#;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    /// 0: no token, 1: the valid one, 2: the bytes of `other`.
    token: u8,
    other: &'a str,
    forge: bool,
}

fn auth_config() -> String {
    serde_json::json!({
        "providers": {"dev": {"issuer": "http://127.0.0.1:8090/realms/254carbon",
            "audiences": ["access-layer"], "algorithms": ["HS256"],
            "jwks": {"inline": serde_json::from_str::<serde_json::Value>(JWKS).unwrap()}}},
        "sources": [{"header": {"name": "authorization", "prefix": "Bearer "}}, {"query": "access_token"}],
        "rules": [{"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}},
                  {"match": {"path": {"exact": "/ws"}}, "requires": {"allow_missing": true, "forward_token": true}}]
    })
    .to_string()
}

fuzz_target!(|i: Input<'_>| {
    let h = FakeHost::at(Duration::from_secs(1_795_000_000));
    *h.config.borrow_mut() = Some(auth_config().into_bytes());
    let mut auth = configure::<Auth, _>(&h).expect("the auth configuration");
    let policy: serde_json::Value = serde_json::from_slice(include_bytes!(
        "../../filters/entitlements/examples/policy.json"
    ))
    .expect("the example policy is JSON");
    *h.config.borrow_mut() = Some(
        serde_json::json!({ "policy": policy })
            .to_string()
            .into_bytes(),
    );
    let mut ent = configure::<Entitlements, _>(&h).expect("the example policy");

    let mut request: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), i.method.as_bytes().to_vec()),
        (":path".into(), i.path.as_bytes().to_vec()),
        (":authority".into(), b"api".to_vec()),
    ];
    for (k, v) in &i.headers {
        request.push((k.to_ascii_lowercase(), v.to_vec()));
    }
    if i.forge {
        for n in [
            "x-auth-subject",
            "x-auth-tenant",
            "x-auth-roles",
            "x-auth-claims",
            "x-auth-issuer",
            "x-auth-expires",
        ] {
            request.push((n.into(), FORGED.to_vec()));
        }
    }
    match i.token % 3 {
        1 => request.push((
            "authorization".into(),
            format!("Bearer {}", TOKEN.trim()).into_bytes(),
        )),
        2 => request.push((
            "authorization".into(),
            format!("Bearer {}", i.other).into_bytes(),
        )),
        _ => {}
    }
    *h.request.borrow_mut() = request;
    h.effective.set(2);

    let before = h.replies.borrow().len();
    let flow = auth.on_request_headers(&h, &mut (), 2);
    if decided(&h, flow, before) {
        return;
    }
    let before = h.replies.borrow().len();
    let flow = ent.on_request_headers(&h, &mut (), 2);
    decided(&h, flow, before);
});

/// True when the filter answered the request itself (one reply); else it
/// goes on, and no identity header the client sent is in it.
fn decided(h: &FakeHost, flow: Flow, before: usize) -> bool {
    let replies = h.replies.borrow().len() - before;
    match flow {
        Flow::Pause => {
            assert_eq!(replies, 1, "paused with {replies} local replies");
            true
        }
        _ => {
            assert_eq!(replies, 0, "went on after a local reply");
            for (k, v) in h.request.borrow().iter() {
                assert!(
                    !(k.starts_with("x-auth-") && v.as_slice() == FORGED),
                    "the client's {k} went on"
                );
            }
            false
        }
    }
}
