//! Policies: matching, keys, response fields, configuration errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use ratelimit_core::config::{client_ip, RequestView, Settings};
use ratelimit_core::fields::{body, fields};
use ratelimit_core::gcra::Outcome;
use serde_json::{json, Value};

fn settings(v: Value) -> Result<Settings, String> {
    Settings::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())
}

fn carbon() -> Settings {
    settings(json!({"policies": [
        {"id": "per-tenant", "match": {"path": {"prefix": "/api/"}, "authenticated": true},
         "key": ["tenant"], "rate": {"requests": 600, "per": "minute"}, "burst": 100},
        {"id": "trial-curves", "match": {"methods": ["GET"], "path": {"template": "/api/v1/curves/{market}/**"}, "roles_any": ["trial"]},
         "key": ["subject"], "rate": {"requests": 10, "per": "minute"}},
        {"id": "anonymous", "match": {"authenticated": false}, "key": ["client_ip"], "rate": {"requests": 5, "per": "second"}},
        {"id": "api-key", "key": [{"header": "x-api-key"}, "route"], "rate": {"requests": 1000, "per": "hour"}, "shadow": true}
    ]}))
    .unwrap()
}

fn req<'a>(path: &'a str, subject: Option<&'a str>, roles: Option<&'a str>) -> RequestView<'a> {
    RequestView {
        method: "GET",
        path,
        subject,
        tenant: subject.map(|_| "acme"),
        roles,
        client_ip: Some("10.1.2.3"),
    }
}

#[test]
fn policies_match_on_route_and_identity() {
    let s = carbon();
    let ids = |r: &RequestView<'_>| {
        s.policies
            .iter()
            .filter(|p| p.matches(r))
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&req(
            "/api/v1/curves/EU-ETS/DEC26",
            Some("u1"),
            Some("viewer,trial")
        )),
        vec!["per-tenant", "trial-curves", "api-key"]
    );
    assert_eq!(
        ids(&req("/api/v1/instruments", Some("u1"), Some("viewer"))),
        vec!["per-tenant", "api-key"]
    );
    assert_eq!(
        ids(&req("/api/v1/curves/EU-ETS", None, None)),
        vec!["anonymous", "api-key"]
    );
    assert_eq!(s.policies[0].rate.burst, 100);
    assert_eq!(s.policies[1].rate.burst, 10, "burst defaults to the rate");
}

#[test]
fn keys_combine_parts_unambiguously() {
    let s = carbon();
    let r = req("/api/x", Some("u1"), None);
    assert_eq!(s.policies[0].key(&r, |_| None), "per-tenant|4:acme");
    assert_eq!(
        s.policies[3].key(&r, |h| (h == "x-api-key").then(|| "k-1".to_string())),
        "api-key|3:k-1|0:"
    );
    assert_eq!(s.policies[3].key(&r, |_| None), "api-key|-|0:");
    assert_eq!(
        s.policies[2].key(&req("/", None, None), |_| None),
        "anonymous|8:10.1.2.3"
    );
    assert_eq!(client_ip("10.0.0.1:5000"), "10.0.0.1");
    assert_eq!(client_ip("[::1]:443"), "::1");
    assert_eq!(client_ip("10.0.0.1"), "10.0.0.1");
}

#[test]
fn response_fields_follow_the_draft_and_the_x_trio() {
    let s = carbon();
    let o = Outcome {
        allowed: false,
        remaining: 0,
        reset_ns: 36_000_000_000,
        retry_after_ns: 600_000_000,
    };
    let f = fields(&s.policies[0], &o);
    let get = |n: &str| f.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("ratelimit-policy"), Some("\"per-tenant\";q=100;w=10")); // 100 refill at 600 a minute in 10 s
    assert_eq!(get("ratelimit"), Some("\"per-tenant\";r=0;t=36"));
    assert_eq!(
        (
            get("x-ratelimit-limit"),
            get("x-ratelimit-remaining"),
            get("x-ratelimit-reset")
        ),
        (Some("100"), Some("0"), Some("36"))
    );
    assert_eq!(get("retry-after"), Some("1"));
    assert_eq!(
        serde_json::from_str::<Value>(&body(&o)).unwrap(),
        json!({"error": "rate_limited", "retry_after": 1})
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let err = |v: Value| settings(v).err().unwrap_or_else(|| panic!("accepted"));
    let p = |extra: Value| {
        let mut pol = json!({"id": "a", "rate": {"requests": 1, "per": "second"}});
        for (k, v) in extra.as_object().unwrap() {
            pol[k] = v.clone();
        }
        json!({"policies": [pol]})
    };
    assert!(err(p(json!({"rate": {"requests": 0, "per": "second"}})))
        .contains("policies[0].rate.requests"));
    assert!(
        err(p(json!({"rate": {"requests": 1, "per": "week"}}))).contains("unknown variant `week`")
    );
    assert!(err(p(json!({"burst": 0}))).contains("policies[0].burst"));
    assert!(err(p(json!({"key": []}))).contains("policies[0].key"));
    assert!(err(p(json!({"key": [{"header": "X-Key"}]}))).contains("policies[0].key[0].header"));
    assert!(err(p(json!({"match": {"path": {"template": "/a/**/b"}}})))
        .contains("policies[0].match.path.template"));
    assert!(err(p(json!({"id": "a,b"}))).contains("policies[0].id"));
    assert!(err(p(json!({"limit": 5}))).contains("unknown field `limit`"));
    assert!(err(json!({"policies": [], "table": {"slots": 0}})).contains("table.slots"));
    let dup = json!({"policies": [{"id": "a", "rate": {"requests": 1, "per": "second"}}, {"id": "a", "rate": {"requests": 1, "per": "second"}}]});
    assert!(err(dup).contains("policies[1].id: duplicate"));
}
