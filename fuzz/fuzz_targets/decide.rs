//! Requests from outside against the example policy: path normalisation,
//! query parameters, channel names, the caller's identity. Invariants:
//! normalising twice changes nothing; the path index decides as a scan of
//! every rule does; a channel pattern that parses matches what it names.
#![no_main]

use arbitrary::Arbitrary;
use entitlements_core::channel::{Pattern, Subject};
use entitlements_core::identity::Identity;
use entitlements_core::path::{normalize, EscapedSlashes, PathOptions};
use entitlements_core::policy::{ChannelAction, HttpRequest, Policy, Request};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        Policy::from_json(include_bytes!(
            "../../filters/entitlements/examples/policy.json"
        ))
        .expect("the example policy")
    })
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: &'a str,
    path: &'a str,
    decode_slashes: bool,
    subject: Option<&'a str>,
    tenant: Option<&'a str>,
    roles: Vec<&'a str>,
    markets: Vec<&'a str>,
    channel: &'a str,
    publish: bool,
}

fuzz_target!(|i: Input<'_>| {
    let who = Identity {
        subject: i.subject.map(str::to_string),
        tenant: i.tenant.map(str::to_string),
        roles: i.roles.iter().map(|r| r.to_string()).collect(),
        claims: serde_json::json!({"entitlements": {"markets": i.markets}}),
        ..Identity::default()
    };
    let opts = PathOptions {
        escaped_slashes: if i.decode_slashes {
            EscapedSlashes::Decode
        } else {
            EscapedSlashes::Reject
        },
        ..PathOptions::default()
    };
    if let Ok(n) = normalize(i.path, &opts) {
        let again = normalize(&n.to_string(), &opts).expect("a normal path normalises");
        assert_eq!(again.path, n.path, "{:?}", i.path);
        let mut r = HttpRequest::new(i.method, "h", &n.path);
        r.query = n.query.as_deref();
        let r = Request::Http(r);
        assert_eq!(
            policy().decide(&who, &r),
            policy().decide_scan(&who, &r),
            "{:?}",
            i.path
        );
    }
    if let Ok(p) = Pattern::parse(i.channel) {
        if p.is_concrete() {
            let s = Subject::parse(i.channel).expect("a concrete pattern is a subject");
            assert!(p.matches(&s));
        }
        let action = if i.publish {
            ChannelAction::Publish
        } else {
            ChannelAction::Subscribe
        };
        let r = Request::Channel {
            pattern: &p,
            action,
        };
        assert_eq!(
            policy().decide(&who, &r),
            policy().decide_scan(&who, &r),
            "{:?}",
            i.channel
        );
    }
});
