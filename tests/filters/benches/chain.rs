//! The full chain in the emulator, as Envoy runs it: usage → auth (cached
//! RS256 token) → entitlements (200 rules, decision cache hit) → ratelimit
//! (local mode, every request admitted), two worker VMs, against one no-op
//! filter and against the four filters' own single-filter costs in the same
//! run. The usage filter's batches go to a cluster that answers at once.
//! `cargo bench -p filter-tests --bench chain [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../../filters/auth/core/tests/common/mod.rs"]
mod common;

use benchkit::Plan;
use common::*;
use filter_tests::{entitlements_config, load_auth, ratelimit_config, usage_config};
use serde_json::{json, Value};
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{Chain, Host, PluginConfig, Reply};

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 20,
            per_sample: 500,
        },
        Plan {
            samples: 5,
            per_sample: 100,
        },
    );
    let host = Host::builder()
        .workers(2)
        .start_time(UNIX_EPOCH + Duration::from_secs(NOW))
        .build();
    host.add_cluster("sidecar", |_| Reply::ok(200, "{}"));
    let keys = json!({"keys": [rsa_key(2048).jwk("rsa-1")]});
    let noop = host
        .load(PluginConfig::new(wasm_host::wasm_path("noop")).name("noop"))
        .unwrap();
    let usage = host
        .load(usage_config(&json!({
            "cluster": "sidecar", "max_batch_records": 500,
            "routes": ["/api/v1/curves/{market}/**"]})))
        .unwrap();
    let auth = load_auth(
        &host,
        &json!({"providers": {"keycloak": {"issuer": ISSUER, "audiences": ["pricing-api"],
                                            "jwks": {"inline": keys}}}}),
    )
    .unwrap();
    let policy: Value =
        serde_json::from_str(&benchkit::fixtures::entitlements_policy(200)).unwrap();
    let ent = host
        .load(entitlements_config(&json!({"policy": policy})))
        .unwrap();
    let rl = host
        .load(ratelimit_config(
            &json!({"policies": [{"id": "per-tenant", "key": ["tenant"],
            "rate": {"requests": 1_000_000_000u64, "per": "second"}}]}),
        ))
        .unwrap();
    let bearer = format!(
        "Bearer {}",
        token(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims())
    );
    let request: Vec<(&str, &str)> = vec![
        (":method", "GET"),
        (":path", "/api/v1/curves/EU-ETS/DEC26"),
        (":authority", "api.254carbon.test"),
        (":scheme", "https"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("authorization", &bearer),
    ];
    let one = |chain: &Chain| {
        let s = host.stream(chain);
        s.request_headers(&request, true);
        s.respond(
            200,
            &[("content-type", "application/json")],
            b"{\"ok\":true}",
        );
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    let c_noop = host.chain(&[&noop]);
    let c_full = host.chain(&[&usage, &auth, &ent, &rl]);
    let c_usage = host.chain(&[&usage]);
    let c_auth = host.chain(&[&auth]);
    // The full chain answers 200 (the token, the policy and the limit fit).
    let s = host.stream(&c_full);
    s.request_headers(&request, true);
    assert!(s.upstream_request().is_some(), "{:?}", s.local_reply());
    let rows = benchkit::run(
        plan,
        &mut [
            ("1 no-op filter", Box::new(|| one(&c_noop))),
            (
                "full chain: usage, auth (cached), entitlements (200 rules), ratelimit",
                Box::new(|| one(&c_full)),
            ),
            ("usage alone", Box::new(|| one(&c_usage))),
            ("auth alone (cached token)", Box::new(|| one(&c_auth))),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!(
                "the full chain: one request in the emulator, 2 VMs ({} samples × {} requests)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    println!(
        "full chain: {:.2} µs over the no-op filter",
        rows[1].median() - rows[0].median()
    );
    assert_eq!(host.counter("wasmcustom.ratelimit.limited"), 0);
    assert!(host.counter("wasmcustom.usage.records") > 0);
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "chain", plan, &rows) {
        println!("wrote {p}");
    }
}
