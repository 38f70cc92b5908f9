use super::*;
use crate::channel::Pattern;
use crate::identity::Identity;
use crate::policy::{ChannelAction, HttpRequest, Policy, Request};
use serde_json::json;
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn tenant(t: &str, r: &str, a: &str) -> Grant {
    Grant::new(Holder::Tenant(t.into()), r, a).unwrap()
}

fn subject(s: &str, r: &str, a: &str) -> Grant {
    Grant::new(Holder::Subject(s.into()), r, a).unwrap()
}

fn caller<'a>(t: &'a str, s: &'a str) -> Caller<'a> {
    Caller {
        tenant: Some(t),
        subject: Some(s),
    }
}

#[test]
fn resources_and_actions_are_checked_and_star_is_only_a_trailing_segment() {
    for ok in [
        "curves:CAISO",
        "*",
        "instruments:*",
        "a:b:*",
        "curves:EU-ETS.DEC26",
    ] {
        assert!(check_resource(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "cur*",
        "*:x",
        "a:*:b",
        ":*",
        "a b",
        "a\n",
        &"x".repeat(257),
    ] {
        let e = check_resource(bad).unwrap_err();
        assert_eq!(e.field, "resource", "{bad:?}");
    }
    assert!(check_action("read").is_ok() && check_action("*").is_ok());
    for bad in ["", "Read", "re ad", "rea*"] {
        assert_eq!(check_action(bad).unwrap_err().field, "action");
    }
    let e = Grant::new(Holder::Tenant(String::new()), "a", "read").unwrap_err();
    assert_eq!(
        e.to_string(),
        "tenant: must be 1 to 256 bytes without control characters"
    );
}

#[test]
fn what_a_wildcard_covers() {
    assert!(resource_covers("*", "anything:at:all"));
    assert!(resource_covers("instruments:*", "instruments:ICE"));
    assert!(resource_covers("instruments:*", "instruments:ICE:DEC26"));
    assert!(!resource_covers("instruments:*", "instruments:"));
    assert!(!resource_covers("instruments:*", "instruments"));
    assert!(!resource_covers("instruments:*", "instrumentsX"));
    assert!(resource_covers("curves:CAISO", "curves:CAISO"));
    assert!(!resource_covers("curves:CAISO", "curves:CAISO2"));
    assert!(
        !resource_covers("curves:CA", "curves:*"),
        "a requested `*` is literal"
    );
    assert!(action_covers("*", "publish") && !action_covers("read", "subscribe"));
}

#[test]
fn a_set_is_idempotent_and_asks_the_tenant_and_the_subject() {
    let mut s = GrantSet::new();
    assert!(s.insert(&tenant("acme", "curves:CAISO", "read")));
    assert!(
        !s.insert(&tenant("acme", "curves:CAISO", "read")),
        "idempotent"
    );
    assert!(s.insert(&subject("bob", "instruments:*", "*")));
    assert_eq!(s.len(), 2);
    assert!(s.holds(caller("acme", "alice"), "curves:CAISO", "read"));
    assert!(!s.holds(caller("acme", "alice"), "curves:CAISO", "subscribe"));
    assert!(!s.holds(caller("beta", "alice"), "curves:CAISO", "read"));
    assert!(s.holds(caller("beta", "bob"), "instruments:ICE", "publish"));
    assert!(!s.holds(
        Caller {
            tenant: None,
            subject: None
        },
        "curves:CAISO",
        "read"
    ));
    assert!(s.remove(&tenant("acme", "curves:CAISO", "read")));
    assert!(
        !s.remove(&tenant("acme", "curves:CAISO", "read")),
        "idempotent"
    );
    assert!(s.remove(&subject("bob", "instruments:*", "*")));
    assert!(s.is_empty() && s.holder(&Holder::Subject("bob".into())).is_none());
}

#[test]
fn a_clone_is_a_snapshot_and_a_holder_is_replaced_whole() {
    let mut set: GrantSet = [
        tenant("acme", "curves:CAISO", "read"),
        subject("u1", "*", "*"),
    ]
    .into_iter()
    .collect();
    let snapshot = set.clone();
    set.insert(&tenant("acme", "curves:PJM", "read"));
    set.remove(&subject("u1", "*", "*"));
    assert_eq!((snapshot.len(), set.len()), (2, 2));
    assert!(snapshot.holds(caller("-", "u1"), "curves:PJM", "read"));
    assert!(!set.holds(caller("-", "u1"), "curves:PJM", "read"));
    assert!(set.holds(caller("acme", "-"), "curves:PJM", "read"));

    let mut h = HolderGrants::default();
    assert!(h.insert("instruments:*", "read"));
    assert!(!h.insert("instruments:*", "read"));
    let acme = Holder::Tenant("acme".into());
    set.replace_holder(&acme, h);
    assert_eq!(set.len(), 1);
    assert!(!set.holds(caller("acme", "-"), "curves:CAISO", "read"));
    assert!(set.holds(caller("acme", "-"), "instruments:ICE", "read"));
    let listed: Vec<_> = set
        .holders()
        .map(|(who, g)| (who, g.iter().count()))
        .collect();
    assert_eq!(listed, vec![(acme.clone(), 1)]);
    set.replace_holder(&acme, HolderGrants::default());
    assert!(set.is_empty() && set.holder(&acme).is_none());
}

fn grants_policy() -> Policy {
    Policy::from_json(
        json!({"rules": [
            {"id": "curves-by-claim", "effect": "allow",
             "match": {"path": {"template": "/api/v1/curves/{market}/**"}},
             "when": [{"attr": "claims.entitlements.markets", "op": "in", "capture": "market"}]},
            {"id": "curves-by-grant", "effect": "allow",
             "match": {"path": {"template": "/api/v1/curves/{market}/**"}},
             "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]},
            {"id": "stream-by-grant", "effect": "allow",
             "match": {"channel": "pricing.curves.{market}.>", "actions": ["subscribe"]},
             "when": [{"grant": {"resource": "curves:{market}", "action": "subscribe"}}]}
        ]})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn acme() -> Identity {
    Identity {
        subject: Some("alice".into()),
        issuer: None,
        tenant: Some("acme".into()),
        roles: Vec::new(),
        claims: json!({"entitlements": {"markets": ["EU-ETS"]}}),
    }
}

#[test]
fn claims_or_grants_decide_over_http_and_channels() {
    let p = grants_policy();
    assert!(p.uses_grants());
    let id = acme();
    let get = |path: &'static str| Request::Http(HttpRequest::new("GET", "api", path));
    let mut g = GrantSet::new();
    let decide = |g: &GrantSet, r: &Request<'_>| p.explain(p.decide_granted(&id, r, g));
    let d = decide(&g, &get("/api/v1/curves/EU-ETS/latest"));
    assert!(d.allowed && d.rule == "curves-by-claim");
    assert!(!decide(&g, &get("/api/v1/curves/CAISO/latest")).allowed);
    g.insert(&tenant("acme", "curves:CAISO", "read"));
    let d = decide(&g, &get("/api/v1/curves/CAISO/latest"));
    assert!(d.allowed && d.rule == "curves-by-grant");
    assert!(
        !p.decide(&id, &get("/api/v1/curves/CAISO/latest")).allowed,
        "no grants given"
    );
    let caiso = Pattern::parse("pricing.curves.CAISO.>").unwrap();
    let sub = Request::Channel {
        pattern: &caiso,
        action: ChannelAction::Subscribe,
    };
    assert!(!decide(&g, &sub).allowed, "read is not subscribe");
    g.insert(&subject("alice", "curves:*", "subscribe"));
    assert!(decide(&g, &sub).allowed);
    let any = Pattern::parse("pricing.curves.*.>").unwrap();
    let wide = Request::Channel {
        pattern: &any,
        action: ChannelAction::Subscribe,
    };
    assert!(
        decide(&g, &wide).allowed,
        "`curves:*` covers the literal `curves:*` a subscription to every market asks for"
    );
    let mut only = GrantSet::new();
    only.insert(&tenant("acme", "curves:CAISO", "subscribe"));
    assert!(decide(&only, &sub).allowed);
    assert!(
        !decide(&only, &wide).allowed,
        "one market's grant is not every market's"
    );
}

#[test]
fn grant_conditions_are_checked_at_compile_time() {
    let err = |when: serde_json::Value| {
        Policy::from_json(
            json!({"rules": [{"id": "r", "effect": "allow",
                "match": {"path": {"template": "/c/{market}"}}, "when": [when]}]})
            .to_string()
            .as_bytes(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let cases = [
        (
            json!({"grant": {"resource": "curves:{nope}", "action": "read"}}),
            "no {nope}",
        ),
        (
            json!({"grant": {"resource": "curves:*", "action": "read"}}),
            "when[0].grant.resource",
        ),
        (
            json!({"grant": {"resource": "curves:{market", "action": "read"}}),
            "without `}`",
        ),
        (
            json!({"grant": {"resource": "curves:{market}", "action": "*"}}),
            "when[0].grant.action",
        ),
        (
            json!({"grant": {"resource": "c:{market}", "action": "read"}, "attr": "tenant"}),
            "stands alone",
        ),
        (json!({"op": "exists"}), "when[0].attr: required"),
        (json!({"attr": "tenant"}), "when[0].op: required"),
        (
            json!({"grant": {"resource": "c", "action": "read", "x": 1}}),
            "unknown field",
        ),
    ];
    for (when, want) in cases {
        let e = err(when.clone());
        assert!(e.contains(want), "{when}: {e}");
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod reference {
    use super::*;
    use proptest::prelude::*;

    /// The rules of the module's documentation, written another way.
    fn covers(g: &Grant, tenant: &str, subject: &str, resource: &str, action: &str) -> bool {
        let holder = match &g.holder {
            Holder::Tenant(t) => t == tenant,
            Holder::Subject(s) => s == subject,
        };
        let res = match g.resource.strip_suffix(":*") {
            _ if g.resource == "*" => true,
            Some(p) => resource
                .strip_prefix(p)
                .and_then(|r| r.strip_prefix(':'))
                .is_some_and(|r| !r.is_empty()),
            None => g.resource == resource,
        };
        holder && res && (g.action == "*" || g.action == action)
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("acme".to_string()),
            Just("beta".to_string()),
            Just("*".to_string())
        ]
    }

    fn resource() -> impl Strategy<Value = String> {
        let seg = prop_oneof![Just("curves"), Just("CAISO"), Just("EU"), Just("x")];
        (proptest::collection::vec(seg, 1..4), any::<u8>()).prop_map(|(segs, w)| {
            let r = segs.join(":");
            match w % 4 {
                0 => format!("{r}:*"),
                1 if w % 16 == 1 => "*".to_string(),
                _ => r,
            }
        })
    }

    fn action() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("read".to_string()),
            Just("subscribe".to_string()),
            Just("*".to_string())
        ]
    }

    fn grant() -> impl Strategy<Value = Grant> {
        (any::<bool>(), name(), resource(), action()).prop_map(|(t, n, r, a)| {
            let holder = if t {
                Holder::Tenant(n)
            } else {
                Holder::Subject(n)
            };
            Grant::new(holder, &r, &a).unwrap()
        })
    }

    proptest! {
        #[test]
        fn a_set_answers_like_a_scan_of_every_grant(
            grants in proptest::collection::vec(grant(), 0..40),
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            asks in proptest::collection::vec((name(), name(), resource(), action()), 1..40),
        ) {
            let mut set: GrantSet = grants.iter().cloned().collect();
            let mut kept: Vec<Grant> = grants.clone();
            for i in removed {
                if grants.is_empty() { break; }
                let g = i.get(&grants);
                set.remove(g);
                kept.retain(|k| k != g);
            }
            kept.sort();
            kept.dedup();
            prop_assert_eq!(set.len(), kept.len());
            for (t, s, r, a) in asks {
                // What is asked is literal: a `*` in it is a character.
                let r = r.replace('*', "x");
                let a = if a == "*" { "publish".to_string() } else { a };
                let want = kept.iter().any(|g| covers(g, &t, &s, &r, &a));
                prop_assert_eq!(set.holds(caller(&t, &s), &r, &a), want, "{} {} {} {}", t, s, r, a);
            }
        }
    }
}
