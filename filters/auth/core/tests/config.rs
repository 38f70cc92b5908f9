//! Configuration: a Keycloak setup compiles, routes pick requirements,
//! identity headers come from configurable claim paths, errors name fields.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use auth_core::config::{KeySource, Settings};
use common::*;
use serde_json::{json, Value};

fn keycloak() -> Value {
    json!({
        "providers": {
            "keycloak": {
                "issuer": ISSUER,
                "audiences": ["pricing-api"],
                "jwks": {"discovery": {"cluster": "keycloak"}},
                "algorithms": ["RS256"],
                "required_claims": {"typ": ["Bearer"]}
            },
            "dev": {
                "issuer": "https://dev.254carbon.test",
                "jwks": {"inline": {"keys": [hs_jwk("dev-1")]}}
            }
        },
        "sources": [
            {"header": {"name": "authorization", "prefix": "Bearer "}},
            {"query": "access_token"}
        ],
        "rules": [
            {"match": {"path": {"exact": "/healthz"}}, "requires": {"bypass": true}},
            {"match": {"methods": ["OPTIONS"]}, "requires": {"bypass": true}},
            {"match": {"path": {"prefix": "/public/"}}, "requires": {"allow_missing": true}},
            {"match": {"path": {"regex": "/ws(/.*)?"}}, "requires": {"providers": ["keycloak"]}}
        ]
    })
}

fn compile(v: Value) -> Result<Settings, String> {
    Settings::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())
}

#[test]
fn a_keycloak_configuration_compiles_with_discovery_defaults() {
    let s = compile(keycloak()).unwrap();
    let kc = s.providers.iter().find(|p| p.name == "keycloak").unwrap();
    match &kc.keys {
        KeySource::Remote(r) => {
            assert!(r.discovery);
            assert_eq!(r.path, "/realms/carbon/.well-known/openid-configuration");
            assert_eq!(r.authority, "idp.254carbon.test");
            assert_eq!(
                (r.refresh_s, r.timeout_ms, r.unknown_kid_refetch_s),
                (600, 5000, 30)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kc.rules.clock_skew, 60);
    assert!(kc.rules.require_exp);
}

#[test]
fn routes_pick_requirements_first_match_wins() {
    let s = compile(keycloak()).unwrap();
    assert!(s.requirement("GET", "/healthz").bypass);
    assert!(s.requirement("OPTIONS", "/api/v1/curves").bypass);
    assert!(s.requirement("GET", "/public/docs").allow_missing);
    let ws = s.requirement("GET", "/ws");
    let kc = s
        .providers
        .iter()
        .position(|p| p.name == "keycloak")
        .unwrap();
    assert_eq!(ws.providers, vec![kc]);
    let api = s.requirement("GET", "/api/v1/curves");
    assert!(!api.bypass && !api.allow_missing && api.providers.len() == 2);
    assert!(s.provider_for(ISSUER, ws).is_ok());
    assert!(s.provider_for("https://dev.254carbon.test", ws).is_err());
}

#[test]
fn identity_headers_follow_the_output_configuration() {
    let s = compile(keycloak()).unwrap();
    let c = claims();
    let h = s.identity_headers(c.as_object().unwrap(), "PAYLOAD");
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(
        get("x-auth-subject"),
        Some("4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60")
    );
    assert_eq!(get("x-auth-issuer"), Some(ISSUER));
    assert_eq!(get("x-auth-tenant"), Some("acme"));
    assert_eq!(get("x-auth-roles"), Some("trader,viewer"));
    assert_eq!(get("x-auth-claims"), Some("PAYLOAD"));
    assert_eq!(
        get("x-auth-expires"),
        Some(c["exp"].as_u64().unwrap().to_string().as_str())
    );
    // A fractional exp is rounded down; none, no header.
    let mut c = claims();
    c["exp"] = json!(1_790_000_300.9);
    let h = s.identity_headers(c.as_object().unwrap(), "PAYLOAD");
    assert!(h.contains(&("x-auth-expires".into(), "1790000300".into())));
    c.as_object_mut().unwrap().remove("exp");
    let h = s.identity_headers(c.as_object().unwrap(), "PAYLOAD");
    assert!(h.iter().all(|(k, _)| k != "x-auth-expires"), "{h:?}");
    let mut cfg = keycloak();
    cfg["output"] = json!({
        "tenant_claim": "org.id", "roles_claims": ["realm_access.roles", "resource_access.pricing-api.roles"],
        "claims_header": "", "roles_header": "x-roles", "expires_header": ""
    });
    let s = compile(cfg).unwrap();
    let mut c = claims();
    c["org"] = json!({"id": "org-7"});
    c["resource_access"] = json!({"pricing-api": {"roles": ["publisher", "trader", "a,b"]}});
    let h = s.identity_headers(c.as_object().unwrap(), "PAYLOAD");
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("x-auth-tenant"), Some("org-7"));
    assert_eq!(get("x-roles"), Some("trader,viewer,publisher"));
    assert_eq!(get("x-auth-claims"), None);
    assert_eq!(get("x-auth-expires"), None);
}

#[test]
fn errors_name_the_field() {
    let err = |patch: &dyn Fn(&mut Value)| {
        let mut c = keycloak();
        patch(&mut c);
        compile(c).err().unwrap_or_else(|| panic!("accepted"))
    };
    assert!(
        err(&|c| c["providers"]["keycloak"]["audience"] = json!("x"))
            .contains("unknown field `audience`")
    );
    assert!(
        err(&|c| c["providers"]["keycloak"]["algorithms"] = json!(["none"]))
            .contains("providers.keycloak.algorithms[0]")
    );
    assert!(err(&|c| c["providers"]["dev"]["issuer"] = json!(ISSUER))
        .contains("is used by another provider"));
    assert!(
        err(&|c| c["providers"]["keycloak"]["jwks"] = json!({"remote": {"cluster": "kc"}}))
            .contains("providers.keycloak.jwks.remote.path: required")
    );
    assert!(err(&|c| c["providers"]["dev"]["jwks"] =
        json!({"inline": {"keys": [{"kty": "RSA", "kid": "x"}]}}))
    .contains("providers.dev.jwks.inline: no usable key"));
    assert!(
        err(&|c| c["rules"][3]["requires"]["providers"] = json!(["nope"]))
            .contains("rules[3].requires.providers[0]: no provider \"nope\"")
    );
    assert!(
        err(&|c| c["rules"][3]["match"]["path"]["regex"] = json!("("))
            .contains("rules[3].match.path.regex")
    );
    assert!(err(&|c| c["rules"][1]["match"]["methods"] = json!(["get"]))
        .contains("rules[1].match.methods[0]"));
    assert!(err(&|c| c["sources"] = json!([])).contains("sources"));
    assert!(err(&|c| c["output"] = json!({"roles_claims": ["a..b"]}))
        .contains("output.roles_claims[0]"));
    assert!(err(&|c| c["providers"] = json!({})).contains("providers: at least one"));
}
