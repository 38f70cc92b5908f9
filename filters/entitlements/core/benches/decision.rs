//! Cost of one entitlements decision for a 200-rule policy, natively.
//!
//! Rows: the evaluation alone, with the path index (only the rules the
//! path can reach) and without it (every rule looked at); the filter's miss
//! path (cache key, lookup that misses, evaluation, insert — a new path
//! every call, so the cache keeps evicting); the hit path (cache key and
//! lookup). `cargo bench -p entitlements-core --bench decision [-- --quick]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use benchkit::fixtures::{entitlements_policy, CLAIMS};
use benchkit::Plan;
use entitlements_core::cache::DecisionCache;
use entitlements_core::identity::Identity;
use entitlements_core::policy::{HttpRequest, IdentityKey, Policy, Request};
use std::hint::black_box;

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 20_000,
        },
        Plan {
            samples: 10,
            per_sample: 2_000,
        },
    );
    let policy = Policy::from_json(entitlements_policy(200).as_bytes()).expect("policy");
    assert_eq!(policy.len(), 200);
    let claims: serde_json::Value = serde_json::from_str(CLAIMS).expect("claims");
    let identity = Identity {
        subject: Some("4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60".into()),
        issuer: Some("https://idp.254carbon.test/realms/carbon".into()),
        tenant: Some("acme".into()),
        roles: vec!["viewer".into(), "trader".into()],
        claims,
    };
    let raw = IdentityKey {
        subject: identity.subject.as_deref(),
        issuer: identity.issuer.as_deref(),
        tenant: identity.tenant.as_deref(),
        roles: Some("viewer,trader"),
        claims: Some("eyJzdWIiOiI0ZjFjMmE5ZS04ZDJiLTRlNmYtOWEwYy0xYjJjM2Q0ZTVmNjAifQ"),
    };
    let headers = vec![("x-desk".to_string(), "power".to_string())];
    let mut req = HttpRequest::new("GET", "api.254carbon.test", "/api/v1/curves/EU-ETS/DEC26");
    req.headers = &headers;
    req.query = Some("at=2026-11-26");
    let check = policy.evaluate(&identity, &Request::Http(req));
    assert!(check.allowed && check.rule == "curves-read", "{check:?}");

    let mut miss_cache = DecisionCache::new(10_000, 4096);
    let mut hit_cache = DecisionCache::new(10_000, 4096);
    let mut key = Vec::new();
    let mut key2 = Vec::new();
    let mut paths: Vec<String> = (0..4096)
        .map(|i| format!("/api/v1/curves/EU-ETS/M{i}"))
        .collect();
    paths.shrink_to_fit();
    let mut i = 0usize;
    let mut version = 1u64;

    let rows = benchkit::run(
        plan,
        &mut [
            (
                "evaluate (200 rules, indexed)",
                Box::new(|| {
                    black_box(policy.decide(black_box(&identity), &Request::Http(req)));
                }),
            ),
            (
                "evaluate (200 rules, scan: no index)",
                Box::new(|| {
                    black_box(policy.decide_scan(black_box(&identity), &Request::Http(req)));
                }),
            ),
            (
                "cache miss: key + lookup + evaluate + insert",
                Box::new(|| {
                    i += 1;
                    if i.is_multiple_of(paths.len()) {
                        version += 1; // start over so that every lookup misses
                    }
                    let mut r = req;
                    r.path = &paths[i % paths.len()];
                    policy.http_key(&mut key, &raw, &r);
                    if miss_cache.get(version, &key).is_none() {
                        let v = policy.decide(&identity, &Request::Http(r));
                        miss_cache.put(version, &key, v);
                    }
                }),
            ),
            (
                "cache hit: key + lookup",
                Box::new(|| {
                    policy.http_key(&mut key2, &raw, &req);
                    let v = match hit_cache.get(1, &key2) {
                        Some(v) => v,
                        None => {
                            let v = policy.decide(&identity, &Request::Http(req));
                            hit_cache.put(1, &key2, v);
                            v
                        }
                    };
                    black_box(v);
                }),
            ),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!(
                "One decision, 200-rule policy, native ({} samples × {} calls)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    if let Some(p) = benchkit::write_json(
        env!("CARGO_MANIFEST_DIR"),
        "entitlements-native",
        plan,
        &rows,
    ) {
        println!("wrote {p}");
    }
}
