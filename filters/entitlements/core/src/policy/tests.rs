use super::*;
use crate::channel::Pattern;
use crate::identity::Identity;
use serde_json::json;
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn policy(v: serde_json::Value) -> Policy {
    Policy::from_json(v.to_string().as_bytes()).unwrap()
}

fn err(v: serde_json::Value) -> String {
    match Policy::from_json(v.to_string().as_bytes()) {
        Ok(_) => panic!("accepted: {v}"),
        Err(e) => e.to_string(),
    }
}

fn who(tenant: &str, roles: &[&str], claims: serde_json::Value) -> Identity {
    Identity {
        subject: Some("alice".into()),
        issuer: Some("https://idp.254carbon.test/realms/carbon".into()),
        tenant: Some(tenant.into()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        claims,
    }
}

fn ch(pattern: &Pattern, action: ChannelAction) -> Request<'_> {
    Request::Channel { pattern, action }
}

fn get<'a>(path: &'a str) -> Request<'a> {
    Request::Http(HttpRequest::new("GET", "api.254carbon.test", path))
}

fn carbon() -> Policy {
    policy(json!({
        "rules": [
            {"id": "curves-read", "effect": "allow",
             "match": {"methods": ["GET", "HEAD"], "path": {"template": "/api/v1/curves/{market}/**"}},
             "when": [{"attr": "claims.markets", "op": "in", "capture": "market"}]},
            {"id": "curves-publish", "effect": "allow",
             "match": {"channel": "pricing.curves.{market}.>", "actions": ["publish"]},
             "when": [{"attr": "roles", "op": "contains", "value": "trader"}, {"attr": "claims.markets", "op": "in", "capture": "market"}]},
            {"id": "curves-subscribe", "effect": "allow",
             "match": {"channel": "pricing.curves.{market}.>"},
             "when": [{"attr": "claims.markets", "op": "contains", "capture": "market"}]},
            {"id": "admin", "effect": "allow",
             "match": {"path": {"prefix": "/admin/"}},
             "when": [{"attr": "roles", "op": "contains", "value": "admin"}]},
            {"id": "suspended", "effect": "deny",
             "when": [{"attr": "claims.status", "op": "eq", "value": "suspended"}]}
        ]
    }))
}

#[test]
fn captured_market_must_be_in_the_markets_claim() {
    let p = carbon();
    let alice = who(
        "acme",
        &["viewer"],
        json!({"markets": ["EU-ETS", "UK-ETS"]}),
    );
    let d = p.evaluate(&alice, &get("/api/v1/curves/EU-ETS/DEC26"));
    assert_eq!((d.allowed, d.rule), (true, "curves-read"));
    let d = p.evaluate(&alice, &get("/api/v1/curves/CAISO/DEC26"));
    assert_eq!((d.allowed, d.rule), (false, "default"));
    let d = p.evaluate(&alice, &get("/admin/users"));
    assert_eq!((d.allowed, d.rule), (false, "default"));
}

#[test]
fn deny_wins_over_allow() {
    let p = carbon();
    let bob = who(
        "acme",
        &["admin"],
        json!({"markets": ["EU-ETS"], "status": "suspended"}),
    );
    let d = p.evaluate(&bob, &get("/api/v1/curves/EU-ETS/DEC26"));
    assert_eq!((d.allowed, d.rule), (false, "suspended"));
    let d = p.evaluate(&bob, &get("/admin/users"));
    assert_eq!((d.allowed, d.rule), (false, "suspended"));
}

#[test]
fn channels_subscribe_and_publish() {
    let p = carbon();
    let trader = who("acme", &["trader"], json!({"markets": ["EU-ETS"]}));
    let viewer = who("acme", &["viewer"], json!({"markets": ["EU-ETS"]}));
    let sub = |pat: &str| Pattern::parse(pat).unwrap();
    let eu = sub("pricing.curves.EU-ETS.DEC26");
    let eu_all = sub("pricing.curves.EU-ETS.>");
    let any_market = sub("pricing.curves.*.DEC26");
    let ca = sub("pricing.curves.CAISO.>");
    assert!(
        p.evaluate(&viewer, &ch(&eu, ChannelAction::Subscribe))
            .allowed
    );
    assert_eq!(
        p.evaluate(&viewer, &ch(&eu_all, ChannelAction::Subscribe))
            .rule,
        "curves-subscribe"
    );
    assert!(
        !p.evaluate(&viewer, &ch(&any_market, ChannelAction::Subscribe))
            .allowed,
        "* spans markets not granted"
    );
    assert!(
        !p.evaluate(&viewer, &ch(&ca, ChannelAction::Subscribe))
            .allowed
    );
    assert!(
        !p.evaluate(&viewer, &ch(&eu, ChannelAction::Publish))
            .allowed,
        "viewers do not publish"
    );
    let d = p.evaluate(&trader, &ch(&eu, ChannelAction::Publish));
    assert_eq!((d.allowed, d.rule), (true, "curves-publish"));
    // A channel request never matches an HTTP rule and vice versa.
    assert!(!p.evaluate(&viewer, &get("/pricing/curves/EU-ETS")).allowed);
}

#[test]
fn operators() {
    let id = who(
        "acme",
        &["trader", "risk"],
        json!({"plan": "pro-2026", "markets": ["EU-ETS", "CAISO"], "seats": 3}),
    );
    let one = |cond: serde_json::Value| {
        policy(json!({"rules": [{"id": "r", "effect": "allow", "when": [cond]}]}))
            .evaluate(&id, &get("/x"))
            .allowed
    };
    assert!(one(json!({"attr": "tenant", "op": "eq", "value": "acme"})));
    assert!(!one(
        json!({"attr": "tenant", "op": "eq", "value": "globex"})
    ));
    assert!(one(
        json!({"attr": "tenant", "op": "ne", "value": "globex"})
    ));
    assert!(one(
        json!({"attr": "subject", "op": "in", "values": ["bob", "alice"]})
    ));
    assert!(
        !one(json!({"attr": "roles", "op": "eq", "value": "trader"})),
        "eq needs exactly one value"
    );
    assert!(one(
        json!({"attr": "roles", "op": "contains", "value": "risk"})
    ));
    assert!(one(
        json!({"attr": "roles", "op": "contains_any", "values": ["admin", "risk"]})
    ));
    assert!(!one(
        json!({"attr": "roles", "op": "contains_any", "values": ["admin"]})
    ));
    assert!(one(
        json!({"attr": "claims.plan", "op": "prefix", "value": "pro-"})
    ));
    assert!(one(
        json!({"attr": "claims.plan", "op": "suffix", "value": "2026"})
    ));
    assert!(one(
        json!({"attr": "claims.plan", "op": "regex", "value": "pro-[0-9]{4}"})
    ));
    assert!(
        !one(json!({"attr": "claims.plan", "op": "regex", "value": "pro"})),
        "regex matches the whole value"
    );
    assert!(one(
        json!({"attr": "claims.seats", "op": "eq", "value": "3"})
    ));
    assert!(one(json!({"attr": "claims.markets", "op": "exists"})));
    assert!(!one(json!({"attr": "claims.missing", "op": "exists"})));
    assert!(one(
        json!({"attr": "issuer", "op": "prefix", "value": "https://idp.254carbon.test/"})
    ));
}

#[test]
fn http_matching() {
    let p = policy(json!({"rules": [
        {"id": "exact", "effect": "allow", "match": {"path": {"exact": "/health"}}},
        {"id": "host", "effect": "allow", "match": {"hosts": ["*.254carbon.test"], "methods": ["POST"]}},
        {"id": "re", "effect": "allow", "match": {"path": {"regex": "/api/v[0-9]+/instruments"}}}
    ]}));
    let id = Identity::default();
    let req = |method, host, path| Request::Http(HttpRequest::new(method, host, path));
    assert_eq!(p.evaluate(&id, &req("GET", "x", "/health")).rule, "exact");
    assert!(!p.evaluate(&id, &req("GET", "x", "/health/")).allowed);
    assert_eq!(
        p.evaluate(&id, &req("POST", "api.254carbon.test:8443", "/q"))
            .rule,
        "host"
    );
    assert!(
        !p.evaluate(&id, &req("POST", "254carbon.test", "/q"))
            .allowed,
        "*. needs a subdomain"
    );
    assert!(
        !p.evaluate(&id, &req("POST", "evil254carbon.test", "/q"))
            .allowed
    );
    assert!(
        !p.evaluate(&id, &req("GET", "api.254carbon.test", "/q"))
            .allowed
    );
    assert_eq!(
        p.evaluate(&id, &req("GET", "x", "/api/v2/instruments"))
            .rule,
        "re"
    );
    assert!(
        !p.evaluate(&id, &req("GET", "x", "/api/v2/instruments/1"))
            .allowed,
        "regex is anchored"
    );
}

#[test]
fn header_and_query_matching() {
    let p = policy(json!({"rules": [
        {"id": "api-key", "effect": "allow", "match": {"headers": {"x-api-key": {"prefix": "k_"}, "x-debug": {"present": false}}}},
        {"id": "export", "effect": "allow", "match": {"query": {"format": {"regex": "csv|parquet"}, "as of": {"exact": "2026-11-26 00:00"}}}}
    ]}));
    let id = Identity::default();
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let with = |headers: &[(String, String)], query: Option<&str>| {
        let r = HttpRequest {
            query,
            headers,
            ..HttpRequest::new("GET", "h", "/x")
        };
        p.evaluate(&id, &Request::Http(r)).rule.to_string()
    };
    assert_eq!(with(&h(&[("x-api-key", "k_123")]), None), "api-key");
    assert_eq!(
        with(&h(&[("x-api-key", "k_123"), ("x-debug", "1")]), None),
        "default"
    );
    assert_eq!(with(&h(&[("x-api-key", "nope")]), None), "default");
    assert_eq!(
        with(&[], Some("format=csv&as+of=2026-11-26%2000%3A00")),
        "export"
    );
    assert_eq!(
        with(&[], Some("format=xlsx&as+of=2026-11-26%2000%3A00")),
        "default"
    );
    assert_eq!(with(&[], Some("format=csv")), "default");
    assert_eq!(query_param("a=1&b=%zz&c", "b").as_deref(), Some("%zz"));
    assert_eq!(query_param("a=1&c", "c").as_deref(), Some(""));
    assert_eq!(query_param("a=%ff", "a"), None, "not UTF-8");
    // No sign in an escape (u8::from_str_radix would read "+4" as 4).
    assert_eq!(query_param("a=%+4", "a").as_deref(), Some("% 4"));
    assert_eq!(query_param("a=%ff&a=ok", "a"), None, "the first decides");
    assert!(err(json!({"rules": [{"id": "u", "effect": "allow", "match": {"headers": {"X-Key": {"present": true}}}}]}))
        .starts_with("rule \"u\": match.headers.X-Key:"));
    assert!(err(json!({"rules": [{"id": "r", "effect": "allow", "match": {"query": {"f": {"regex": "("}}}}]}))
        .starts_with("rule \"r\": match.query.f:"));
}

#[test]
fn shadow_rules_and_shadow_policy() {
    let rules = json!([
        {"id": "allow-all", "effect": "allow"},
        {"id": "block-caiso", "effect": "deny", "shadow": true, "match": {"path": {"prefix": "/api/v1/curves/CAISO"}}}
    ]);
    let p = policy(json!({"rules": rules}));
    let id = Identity::default();
    let d = p.evaluate(&id, &get("/api/v1/curves/CAISO/x"));
    assert_eq!(
        d,
        Decision {
            allowed: true,
            rule: "allow-all",
            shadow_denied: Some("block-caiso")
        }
    );
    let d = p.evaluate(&id, &get("/api/v1/curves/EU-ETS/x"));
    assert_eq!(
        d,
        Decision {
            allowed: true,
            rule: "allow-all",
            shadow_denied: None
        }
    );
    let p = policy(
        json!({"shadow": true, "rules": [{"id": "only-admin", "effect": "allow", "when": [{"attr": "roles", "op": "contains", "value": "admin"}]}]}),
    );
    let d = p.evaluate(&id, &get("/x"));
    assert_eq!(
        d,
        Decision {
            allowed: true,
            rule: "default",
            shadow_denied: Some("default")
        }
    );
    let p = policy(json!({"default": "allow", "rules": []}));
    assert!(p.evaluate(&id, &get("/x")).allowed);
}

#[test]
fn configuration_errors_name_the_rule_and_field() {
    let r = |rule: serde_json::Value| err(json!({"rules": [rule]}));
    assert!(err(json!({"rules": [], "extra": 1})).contains("unknown field `extra`"));
    assert!(r(json!({"id": "a", "effect": "allow", "mtach": {}})).contains("unknown field `mtach`"));
    assert!(r(json!({"id": "a", "effect": "maybe"})).contains("unknown variant `maybe`"));
    assert_eq!(
        err(json!({"rules": [{"id": "a", "effect": "allow"}, {"id": "a", "effect": "deny"}]})),
        "rule \"a\": id: duplicate rule id"
    );
    assert_eq!(
        r(json!({"id": "", "effect": "allow"})),
        "rule \"#0\": id: must not be empty"
    );
    assert!(
        r(json!({"id": "t", "effect": "allow", "match": {"path": {"template": "/a/{m"}}}))
            .starts_with("rule \"t\": match.path.template:")
    );
    assert!(
        r(json!({"id": "x", "effect": "allow", "match": {"path": {"regex": "(["}}}))
            .starts_with("rule \"x\": match.path.regex:")
    );
    assert!(
        r(json!({"id": "c", "effect": "allow", "match": {"channel": "a..b"}}))
            .starts_with("rule \"c\": match.channel:")
    );
    assert!(
        r(json!({"id": "m", "effect": "allow", "match": {"methods": ["get"]}}))
            .starts_with("rule \"m\": match.methods[0]:")
    );
    assert!(
        r(json!({"id": "k", "effect": "allow", "when": [{"attr": "email", "op": "exists"}]}))
            .starts_with("rule \"k\": when[0].attr:")
    );
    assert!(
        r(json!({"id": "v", "effect": "allow", "when": [{"attr": "tenant", "op": "eq"}]}))
            .starts_with("rule \"v\": when[0].value: required")
    );
    assert!(r(json!({"id": "w", "effect": "allow", "when": [{"attr": "tenant", "op": "in", "values": []}]})).starts_with("rule \"w\": when[0].values:"));
    assert!(r(json!({"id": "g", "effect": "allow", "when": [{"attr": "claims.m", "op": "in", "capture": "market"}]}))
        .contains("when[0].capture: no {market} in the rule's template"));
    assert!(r(json!({"id": "h", "effect": "allow", "match": {"channel": "a.{m}"}, "when": [{"attr": "claims.m", "op": "prefix", "capture": "m"}]}))
        .contains("when[0].op: Prefix cannot compare a capture"));
    assert!(r(
        json!({"id": "j", "effect": "allow", "match": {"channel": "a.>", "methods": ["GET"]}})
    )
    .starts_with("rule \"j\": match:"));
    assert!(r(json!({"id": "default", "effect": "allow"})).contains("reserved"));
    assert!(
        r(json!({"id": "q", "effect": "allow", "match": {"actions": ["publish"]}}))
            .starts_with("rule \"q\": match.actions:")
    );
}

#[test]
fn cache_keys_hold_exactly_what_the_decision_depends_on() {
    let with_header = policy(json!({"rules": [
        {"id": "h", "effect": "allow", "match": {"headers": {"x-desk": {"exact": "power"}}, "query": {"fmt": {"exact": "csv"}}},
         "when": [{"attr": "roles", "op": "contains", "value": "trader"}]}
    ]}));
    let key =
        |p: &Policy, headers: &[(String, String)], query: Option<&str>, id: IdentityKey<'_>| {
            let mut r = HttpRequest::new("GET", "api", "/x");
            r.headers = headers;
            r.query = query;
            let mut out = Vec::new();
            p.http_key(&mut out, &id, &r);
            out
        };
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let alice = IdentityKey {
        subject: Some("alice"),
        roles: Some("trader"),
        claims: Some("e30"),
        ..IdentityKey::default()
    };
    let base = key(
        &with_header,
        &h(&[("x-desk", "power")]),
        Some("fmt=csv"),
        alice,
    );
    // A header or parameter no rule reads does not split the cache...
    assert_eq!(
        base,
        key(
            &with_header,
            &h(&[("x-desk", "power"), ("x-other", "1")]),
            Some("fmt=csv&t=123"),
            alice
        )
    );
    // ...nor do claims when no condition reads them.
    assert_eq!(
        base,
        key(
            &with_header,
            &h(&[("x-desk", "power")]),
            Some("fmt=csv"),
            IdentityKey {
                claims: Some("other"),
                ..alice
            }
        )
    );
    // Everything read does.
    assert_ne!(
        base,
        key(
            &with_header,
            &h(&[("x-desk", "gas")]),
            Some("fmt=csv"),
            alice
        )
    );
    assert_ne!(base, key(&with_header, &h(&[]), Some("fmt=csv"), alice));
    assert_ne!(
        base,
        key(
            &with_header,
            &h(&[("x-desk", "power")]),
            Some("fmt=json"),
            alice
        )
    );
    assert_ne!(
        base,
        key(
            &with_header,
            &h(&[("x-desk", "power")]),
            Some("fmt=csv"),
            IdentityKey {
                roles: Some("viewer"),
                ..alice
            }
        )
    );
    // Field boundaries are unambiguous: ("ab", "c") is not ("a", "bc").
    let a = IdentityKey {
        subject: Some("ab"),
        issuer: Some("c"),
        ..IdentityKey::default()
    };
    let b = IdentityKey {
        subject: Some("a"),
        issuer: Some("bc"),
        ..IdentityKey::default()
    };
    assert_ne!(
        key(&with_header, &[], None, a),
        key(&with_header, &[], None, b)
    );
    let absent = IdentityKey { subject: None, ..a };
    let empty = IdentityKey {
        subject: Some(""),
        ..a
    };
    assert_ne!(
        key(&with_header, &[], None, absent),
        key(&with_header, &[], None, empty)
    );
    // Claims count once a condition reads them.
    let p = carbon();
    assert!(p.uses_claims());
    assert_ne!(
        key(&p, &[], None, alice),
        key(
            &p,
            &[],
            None,
            IdentityKey {
                claims: Some("other"),
                ..alice
            }
        )
    );
}

#[test]
fn verdicts_name_rules_by_position() {
    let p = carbon();
    let alice = who("acme", &["viewer"], json!({"markets": ["EU-ETS"]}));
    let v = p.decide(&alice, &get("/api/v1/curves/EU-ETS/DEC26"));
    assert_eq!(
        v,
        Verdict {
            allowed: true,
            rule: Decider::Rule(0),
            shadow_denied: None
        }
    );
    assert_eq!(p.explain(v).rule, "curves-read");
    assert_eq!(Decider::Rule(0).slot(p.len()), 0);
    assert_eq!(Decider::Default.slot(p.len()), p.len());
    assert_eq!(p.rule_id(Decider::Rule(99)), "default");
}
