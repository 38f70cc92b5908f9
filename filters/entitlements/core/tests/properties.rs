//! Property tests for the pattern matching the policy rests on: channel
//! patterns against a brute-force reference, templates against the values
//! they were filled with, and path normalisation's invariants.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use entitlements_core::channel::{Pattern, Subject};
use entitlements_core::identity::Identity;
use entitlements_core::path::{normalize, EscapedSlashes, PathOptions};
use entitlements_core::policy::{HttpRequest, Policy, Request};
use entitlements_core::template::{ChannelTemplate, PathTemplate};
use proptest::prelude::*;

/// Pattern tokens from a tiny alphabet, so that matches are frequent.
fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
    let tok = || prop::sample::select(vec!["a", "b", "c", "*"]).prop_map(str::to_string);
    let last = prop::sample::select(vec!["", ">", "a", "b", "*"]).prop_map(str::to_string);
    (prop::collection::vec(tok(), 0..4), last).prop_map(|(mut v, last)| {
        if !last.is_empty() {
            v.push(last);
        }
        if v.is_empty() {
            v.push("a".into());
        }
        v
    })
}

/// Every subject over {a, b, c, z} (z appears in no pattern) up to `max` tokens.
fn all_subjects(max: usize) -> Vec<Subject> {
    let mut out: Vec<Vec<&str>> = vec![vec![]];
    let mut all = Vec::new();
    for _ in 0..max {
        let mut next = Vec::new();
        for s in &out {
            for t in ["a", "b", "c", "z"] {
                let mut s = s.clone();
                s.push(t);
                all.push(Subject::parse(&s.join(".")).unwrap());
                next.push(s);
            }
        }
        out = next;
    }
    all
}

/// The obvious recursive definition of NATS matching.
fn reference_matches(pattern: &[String], subject: &[&str]) -> bool {
    match (pattern.split_first(), subject.split_first()) {
        (None, None) => true,
        (Some((p, _)), _) if p == ">" => !subject.is_empty(),
        (Some((p, prest)), Some((s, srest))) => {
            (p == "*" || p == s) && reference_matches(prest, srest)
        }
        _ => false,
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    // Small alphabets, many cases: every wildcard combination comes up.
    #![proptest_config(config(2048))]

    #[test]
    fn pattern_matching_agrees_with_the_reference(toks in pattern_tokens()) {
        let p = Pattern::parse(&toks.join(".")).unwrap();
        for s in all_subjects(toks.len() + 1) {
            let st: Vec<&str> = s.tokens().collect();
            prop_assert_eq!(p.matches(&s), reference_matches(&toks, &st), "{} vs {}", p, s);
        }
    }

    #[test]
    fn is_within_means_every_channel_is_also_matched(a in pattern_tokens(), b in pattern_tokens()) {
        let pa = Pattern::parse(&a.join(".")).unwrap();
        let pb = Pattern::parse(&b.join(".")).unwrap();
        // Subjects one token longer than either pattern, over an alphabet
        // with a token neither pattern names, witness any difference.
        let subjects = all_subjects(a.len().max(b.len()) + 1);
        let contained = subjects.iter().all(|s| !pa.matches(s) || pb.matches(s));
        prop_assert_eq!(pa.is_within(&pb), contained, "{} within {}", pa, pb);
    }

}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn channel_templates_capture_what_was_filled_in(
        lits in prop::collection::vec("[a-z]{1,3}", 1..4),
        values in prop::collection::vec("[A-Z0-9-]{1,6}", 1..4),
        rest in prop::option::of(prop::collection::vec("[a-z]{1,3}", 1..3)),
    ) {
        // pricing.<lit>.{c0}.<lit>.{c1}... [.>]
        let mut t = vec!["pricing".to_string()];
        let mut channel = vec!["pricing".to_string()];
        for (i, v) in values.iter().enumerate() {
            t.push(format!("{{c{i}}}"));
            channel.push(v.clone());
            if let Some(l) = lits.get(i) {
                t.push(l.clone());
                channel.push(l.clone());
            }
        }
        if let Some(rest) = &rest {
            t.push(">".into());
            channel.extend(rest.iter().cloned());
        }
        let tmpl = ChannelTemplate::parse(&t.join(".")).unwrap();
        let mut caps = Vec::new();
        let pat = Pattern::parse(&channel.join(".")).unwrap();
        prop_assert!(tmpl.covers(&pat, &mut caps), "{} covers {}", t.join("."), pat);
        let want: Vec<(String, String)> =
            values.iter().enumerate().map(|(i, v)| (format!("c{i}"), v.clone())).collect();
        prop_assert_eq!(caps, want);
        // One token fewer is never covered (and leaves no captures behind).
        channel.pop();
        if channel.len() > 1 {
            let mut caps = Vec::new();
            let shorter = Pattern::parse(&channel.join(".")).unwrap();
            if rest.as_ref().is_none_or(|r| r.len() == 1) {
                prop_assert!(!tmpl.covers(&shorter, &mut caps));
                prop_assert!(caps.is_empty());
            }
        }
    }

    #[test]
    fn path_templates_capture_what_was_filled_in(
        segs in prop::collection::vec(prop_oneof!["[a-z]{1,4}".prop_map(|s| (false, s)), "[A-Za-z0-9._~-]{1,8}".prop_map(|s| (true, s))], 1..6),
        tail in prop::option::of(prop::collection::vec("[a-z0-9]{1,4}", 0..3)),
    ) {
        let mut t = String::new();
        let mut path = String::new();
        let mut want = Vec::new();
        for (i, (capture, s)) in segs.iter().enumerate() {
            if *capture {
                t.push_str(&format!("/{{v{i}}}"));
                want.push((format!("v{i}"), s.clone()));
            } else {
                t.push('/');
                t.push_str(s);
            }
            path.push('/');
            path.push_str(s);
        }
        if let Some(tail) = &tail {
            t.push_str("/**");
            for s in tail {
                path.push('/');
                path.push_str(s);
            }
        }
        let tmpl = PathTemplate::parse(&t).unwrap();
        let mut caps = Vec::new();
        prop_assert!(tmpl.matches(&path, &mut caps), "{} matches {}", t, path);
        prop_assert_eq!(&caps, &want);
        // A path with an extra segment matches only with `**`.
        let mut caps = Vec::new();
        prop_assert_eq!(tmpl.matches(&format!("{path}/extra"), &mut caps), tail.is_some());
    }

    #[test]
    fn normalisation_is_idempotent_and_leaves_no_dot_segments(
        segs in prop::collection::vec(prop_oneof![
            prop::sample::select(vec![".", "..", "", "%2e", "%2E%2e", ".%2e"]).prop_map(str::to_string),
            "[a-zA-Z0-9_~-]{1,5}", "%[46][1-9a-fA-F]", "%7[eE]",
        ], 0..10),
        trailing in any::<bool>(),
    ) {
        let mut raw = String::new();
        for s in &segs {
            raw.push('/');
            raw.push_str(s);
        }
        if trailing || raw.is_empty() {
            raw.push('/');
        }
        let opts = PathOptions::default();
        let n = normalize(&raw, &opts).unwrap();
        prop_assert!(n.path.starts_with('/'), "{:?} -> {:?}", raw, n.path);
        prop_assert!(!n.path.contains("//"), "{:?} -> {:?}", raw, n.path);
        for seg in n.path.split('/') {
            prop_assert!(seg != "." && seg != "..", "{:?} -> {:?}", raw, n.path);
            prop_assert!(!seg.to_ascii_lowercase().contains("%2e"), "{:?} -> {:?}", raw, n.path);
        }
        prop_assert_eq!(&normalize(&n.path, &opts).unwrap().path, &n.path);
    }

    #[test]
    fn encoding_unreserved_characters_changes_nothing(path in "(/[a-zA-Z0-9._~-]{0,6}){1,6}", mask in any::<u64>()) {
        let opts = PathOptions::default();
        let plain = normalize(&path, &opts).unwrap();
        let encoded: String = path
            .bytes()
            .enumerate()
            .map(|(i, b)| if b != b'/' && mask >> (i % 64) & 1 == 1 { format!("%{b:02x}") } else { (b as char).to_string() })
            .collect();
        prop_assert_eq!(normalize(&encoded, &opts).unwrap().path, plain.path);
    }

    #[test]
    fn a_prefix_cannot_be_escaped_by_encoded_traversal(
        dots in prop::sample::select(vec!["..", "%2e%2e", "%2E.", ".%2e"]),
        sep in prop::sample::select(vec!["/", "%2f", "%2F", "//"]),
        depth in 1usize..4,
    ) {
        // From inside EU-ETS, climb out and into CAISO: after normalisation
        // the path must name CAISO, so that CAISO's rules see it.
        let climb: String = (0..depth).map(|_| format!("{dots}{sep}")).collect();
        let raw = format!("/api/v1/curves/EU-ETS/{climb}CAISO/DEC26");
        for mode in [EscapedSlashes::Reject, EscapedSlashes::Decode, EscapedSlashes::Keep] {
            let opts = PathOptions { escaped_slashes: mode, ..PathOptions::default() };
            if let Ok(n) = normalize(&raw, &opts) {
                prop_assert!(!n.path.starts_with("/api/v1/curves/EU-ETS/") || !n.path.contains("CAISO") || n.path.contains("%2F"),
                    "{:?} ({:?}) -> {:?}", raw, mode, n.path);
                prop_assert!(!n.path.split('/').any(|s| s == ".."));
            }
        }
    }
}

/// A path matcher over a tiny segment alphabet, so that rules overlap.
fn path_matcher() -> impl Strategy<Value = serde_json::Value> {
    let seg = || prop::sample::select(vec!["a", "b", "c", "ab"]);
    let segs = |max| prop::collection::vec(seg(), 0..max).prop_map(|v| format!("/{}", v.join("/")));
    prop_oneof![
        segs(4).prop_map(|p| serde_json::json!({"exact": p})),
        (segs(4), prop::sample::select(vec!["", "/", "a"]))
            .prop_map(|(p, tail)| serde_json::json!({"prefix": format!("{p}{tail}")})),
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "{x}", "*"]), 0..3),
            any::<bool>()
        )
            .prop_map(|(v, rest)| {
                let v: Vec<String> = v
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        if *s == "{x}" {
                            format!("{{x{i}}}")
                        } else {
                            s.to_string()
                        }
                    })
                    .collect();
                let mut t = format!("/{}", v.join("/"));
                if rest {
                    t = format!("{}/**", t.trim_end_matches('/'));
                }
                serde_json::json!({"template": t})
            }),
        prop::sample::select(vec![
            "/a/.*", "/a/b?/c", "/(a|b)/c", "/a|/b/.*", "/ab*/.*", "/a/[bc]+", ".*"
        ])
        .prop_map(|r| serde_json::json!({"regex": r})),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn the_path_index_never_changes_a_decision(
        rules in prop::collection::vec((path_matcher(), any::<bool>(), any::<bool>()), 1..12),
        paths in prop::collection::vec(prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "ab", ""]), 0..5), 1..12),
    ) {
        let rules: Vec<serde_json::Value> = rules
            .into_iter()
            .enumerate()
            .map(|(i, (path, deny, shadow))| serde_json::json!({
                "id": format!("r{i}"),
                "effect": if deny { "deny" } else { "allow" },
                "shadow": shadow,
                "match": {"path": path},
            }))
            .collect();
        let p = Policy::from_json(serde_json::json!({"rules": rules}).to_string().as_bytes()).unwrap();
        let who = Identity::default();
        for segs in paths {
            let path = format!("/{}", segs.join("/"));
            let req = Request::Http(HttpRequest::new("GET", "h", &path));
            prop_assert_eq!(p.decide(&who, &req), p.decide_scan(&who, &req), "{}", path);
        }
    }
}
