//! The auth filter in the emulator, and its core natively, side by side in
//! one run: a request with a cached token, with a cold RS256 token and a
//! cold ES256 token (the token cache off, so every request verifies), and
//! the verification alone natively.
//! `cargo bench -p filter-tests --bench auth [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use auth_core::jwk::JwkSet;
use auth_core::jwt::Token;
use auth_core::verify::verify_token;
use benchkit::Plan;
use common::*;
use filter_tests::load_auth;
use serde_json::json;
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{Chain, Host, PluginConfig};

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 20,
            per_sample: 200,
        },
        Plan {
            samples: 5,
            per_sample: 40,
        },
    );
    let host = Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    let keys = json!({"keys": [rsa_key(2048).jwk("rsa-1"), ec_jwk("ec-1")]});
    let config = |cache: usize| {
        json!({
            "providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"], "jwks": {"inline": keys}}},
            "cache_max_entries": cache
        })
    };
    let noop = host
        .load(PluginConfig::new(wasm_host::wasm_path("noop")).name("noop"))
        .unwrap();
    let cached = load_auth(&host, &config(1000)).unwrap();
    let cold = load_auth(&host, &config(0)).unwrap();
    let rs = format!(
        "Bearer {}",
        token(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims())
    );
    let es = format!(
        "Bearer {}",
        token(&json!({"alg": "ES256", "kid": "ec-1"}), &claims())
    );
    let request = |auth: &str| -> Vec<(String, String)> {
        [
            (":method", "GET"),
            (":path", "/api/v1/curves/EU-ETS/DEC26"),
            (":authority", "api.254carbon.test"),
            (":scheme", "https"),
            ("user-agent", "bench/1.0"),
            ("accept", "application/json"),
            ("x-request-id", "0f9b6c1e-5d0a-4c83-9d0e-6a1c2b3d4e5f"),
            ("authorization", auth),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let (rs_req, es_req) = (request(&rs), request(&es));
    let one = |chain: &Chain, req: &[(String, String)]| {
        let pairs: Vec<(&str, &str)> = req.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let s = host.stream(chain);
        s.request_headers(&pairs, true);
        s.respond(200, &[], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    for (c, r) in [(&cold, &rs_req), (&cold, &es_req)] {
        let s = host.stream(&host.chain(&[c]));
        let pairs: Vec<(&str, &str)> = r.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        s.request_headers(&pairs, true);
        assert!(s.upstream_request().is_some(), "{:?}", s.local_reply());
    }
    let set = JwkSet::parse(keys.to_string().as_bytes(), false).unwrap();
    let rs_tok = rs.trim_start_matches("Bearer ").to_string();
    let es_tok = es.trim_start_matches("Bearer ").to_string();
    let (c_noop, c_cached, c_cold) = (
        host.chain(&[&noop]),
        host.chain(&[&cached]),
        host.chain(&[&cold]),
    );
    let rows = benchkit::run(
        plan,
        &mut [
            (
                "emulator: 1 no-op filter",
                Box::new(|| one(&c_noop, &rs_req)),
            ),
            (
                "emulator: auth, cached token",
                Box::new(|| one(&c_cached, &rs_req)),
            ),
            (
                "emulator: auth, cold RS256",
                Box::new(|| one(&c_cold, &rs_req)),
            ),
            (
                "emulator: auth, cold ES256",
                Box::new(|| one(&c_cold, &es_req)),
            ),
            (
                "native: parse + verify RS256",
                Box::new(|| {
                    verify_token(&Token::parse(&rs_tok, 8192).unwrap(), &set, &[]).unwrap()
                }),
            ),
            (
                "native: parse + verify ES256",
                Box::new(|| {
                    verify_token(&Token::parse(&es_tok, 8192).unwrap(), &set, &[]).unwrap()
                }),
            ),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!("auth: one request in the emulator, and the verification natively ({} samples × {} calls)", plan.samples, plan.per_sample),
            &rows,
            &[0, 4],
        )
    );
    for r in &rows[1..4] {
        println!(
            "{}: {:.2} µs over the no-op filter",
            r.name,
            r.median() - rows[0].median()
        );
    }
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "auth", plan, &rows) {
        println!("wrote {p}");
    }
}
