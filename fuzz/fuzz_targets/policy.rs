//! Policy documents as an operator may write them, mistakes included: a
//! policy or an error naming what is wrong, never a panic. Invariant: a
//! policy that compiles decides a few fixed requests the same way with
//! its path index and without it.
#![no_main]

use entitlements_core::channel::Pattern;
use entitlements_core::identity::Identity;
use entitlements_core::policy::{ChannelAction, HttpRequest, Policy, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = match Policy::from_json(data) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let who = Identity {
        subject: Some("alice".into()),
        tenant: Some("acme".into()),
        roles: vec!["trader".into()],
        claims: serde_json::json!({"entitlements": {"markets": ["EU-ETS", "CAISO"]}}),
        ..Identity::default()
    };
    for path in [
        "/",
        "/api/v1/curves/EU-ETS/latest",
        "/api/v1/instruments/x",
        "/admin/v1/grants",
        "/a/b/c/d",
    ] {
        for method in ["GET", "POST"] {
            let r = Request::Http(HttpRequest::new(method, "h", path));
            assert_eq!(
                policy.decide(&who, &r),
                policy.decide_scan(&who, &r),
                "{method} {path}"
            );
        }
    }
    for ch in ["pricing.curves.EU-ETS.DEC26", "pricing.curves.>", "a"] {
        let Ok(p) = Pattern::parse(ch) else { continue };
        for action in [ChannelAction::Subscribe, ChannelAction::Publish] {
            let r = Request::Channel {
                pattern: &p,
                action,
            };
            assert_eq!(
                policy.decide(&who, &r),
                policy.decide_scan(&who, &r),
                "{ch}"
            );
        }
    }
});
