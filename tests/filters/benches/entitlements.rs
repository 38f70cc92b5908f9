//! One request through the entitlements filter in the emulator, with the
//! 200-rule policy of the native bench: request headers with identity,
//! the decision, a 200 response, end of stream.
//!
//! Rows: a no-op filter (the emulator's cost of one filter, the reference);
//! entitlements answering from its decision cache; missing the decision
//! cache (a new path every request, the caller's decoded identity cached);
//! missing both caches (a new caller and path every request: claims
//! decoded, evaluated, two inserts); and with both caches off.
//! `cargo bench -p filter-tests --bench entitlements [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use benchkit::fixtures::{entitlements_policy, CLAIMS};
use benchkit::Plan;
use filter_tests::{claims_header, load_entitlements};
use serde_json::{json, Value};
use wasm_host::{Chain, Host, PluginConfig};

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 2000,
        },
        Plan {
            samples: 10,
            per_sample: 300,
        },
    );
    let host = Host::builder().workers(2).build();
    let policy: Value = serde_json::from_str(&entitlements_policy(200)).unwrap();
    let noop = host
        .load(PluginConfig::new(wasm_host::wasm_path("noop")).name("noop"))
        .unwrap();
    let cached = load_entitlements(&host, &json!({"policy": policy})).unwrap();
    let uncached = load_entitlements(
        &host,
        &json!({"policy": policy, "cache": {"max_entries": 0, "max_identities": 0}}),
    )
    .unwrap();
    let claims = claims_header(&serde_json::from_str(CLAIMS).unwrap());
    let request: Vec<(&str, &str)> = vec![
        (":method", "GET"),
        (":path", "/api/v1/curves/EU-ETS/DEC26?at=2026-11-26"),
        (":authority", "api.254carbon.test"),
        (":scheme", "https"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("x-request-id", "0f9b6c1e-5d0a-4c83-9d0e-6a1c2b3d4e5f"),
        ("x-auth-subject", "4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"),
        ("x-auth-issuer", "https://idp.254carbon.test/realms/carbon"),
        ("x-auth-tenant", "acme"),
        ("x-auth-roles", "viewer,trader"),
        ("x-auth-claims", &claims),
    ];
    let one = |chain: &Chain| {
        let s = host.stream(chain);
        s.request_headers(&request, true);
        s.respond(200, &[("content-type", "application/json")], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    // The policy allows the request: check once, outside the timing.
    let check = host.stream(&host.chain(&[&uncached]));
    check.request_headers(&request, true);
    assert!(
        check.upstream_request().is_some(),
        "{:?}",
        check.local_reply()
    );

    // A new path on every request: the decision cache always misses
    // (key, lookup, claims decoded, evaluation, insert, evictions).
    let paths: Vec<String> = (0..100_000)
        .map(|i| format!("/api/v1/curves/EU-ETS/M{i}?at=2026-11-26"))
        .collect();
    let mut i = 0usize;
    let mut miss_request = request.clone();
    let mut one_miss = |chain: &Chain| {
        i = (i + 1) % paths.len();
        miss_request[1] = (":path", paths[i].as_str());
        let s = host.stream(chain);
        s.request_headers(&miss_request, true);
        s.respond(200, &[("content-type", "application/json")], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    // A new caller and a new path on every request: both the identity and
    // the decision cache miss (claims decoded every time).
    let subjects: Vec<String> = (0..100_000).map(|i| format!("caller-{i}")).collect();
    let mut j = 0usize;
    let mut stranger_request = request.clone();
    let mut one_stranger = |chain: &Chain| {
        j = (j + 1) % paths.len();
        stranger_request[1] = (":path", paths[j].as_str());
        stranger_request[7] = ("x-auth-subject", subjects[j].as_str());
        let s = host.stream(chain);
        s.request_headers(&stranger_request, true);
        s.respond(200, &[("content-type", "application/json")], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    let c_noop = host.chain(&[&noop]);
    let c_hit = host.chain(&[&cached]);
    let c_miss = host.chain(&[&uncached]);
    let rows = benchkit::run(
        plan,
        &mut [
            ("1 no-op filter", Box::new(|| one(&c_noop))),
            ("entitlements, cache hit", Box::new(|| one(&c_hit))),
            (
                "entitlements, decision cache miss (new path, same caller)",
                Box::new(|| one_miss(&c_hit)),
            ),
            (
                "entitlements, both caches miss (new path, new caller)",
                Box::new(|| one_stranger(&c_hit)),
            ),
            (
                "entitlements, no caches (decode + evaluate)",
                Box::new(|| one(&c_miss)),
            ),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!(
                "One request through the entitlements filter in the emulator, 200 rules ({} samples × {} requests, 2 worker VMs)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    for r in &rows[1..] {
        println!(
            "{}: {:.2} µs over the no-op filter",
            r.name,
            r.median() - rows[0].median()
        );
    }
    if let Some(p) = benchkit::write_json(
        env!("CARGO_MANIFEST_DIR"),
        "entitlements-emulator",
        plan,
        &rows,
    ) {
        println!("wrote {p}");
    }
}
