//! Where a token is looked for (a header with a prefix, a query parameter,
//! a cookie) on fuzzed headers and queries, and the one percent-decoder
//! (`filter_common::form`) under it. Invariants: decoding never grows the
//! input; `encode` then `decode` gives the value back; a query value found
//! is the decoding of some `name=value` pair.
#![no_main]

use arbitrary::Arbitrary;
use auth_core::config::SourceConfig;
use filter_common::form;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    authorization: Option<&'a str>,
    cookie: Option<&'a str>,
    query: Option<&'a str>,
    name: &'a str,
}

fuzz_target!(|i: Input<'_>| {
    if let Some(q) = i.query {
        assert!(form::decode_bytes(q).len() <= q.len());
        if let Some(v) = form::query_value(q, i.name) {
            assert!(
                q.split('&').any(|pair| {
                    let (n, val) = pair.split_once('=').unwrap_or((pair, ""));
                    form::decode(n).as_deref() == Some(i.name)
                        && form::decode(val).as_deref() == Some(v.as_str())
                }),
                "{v:?} is no pair's value in {q:?}"
            );
        }
    }
    assert_eq!(form::decode(&form::encode(i.name)).as_deref(), Some(i.name));
    let sources = [
        SourceConfig::Header {
            name: "authorization".into(),
            prefix: Some("Bearer ".into()),
        },
        SourceConfig::Query("access_token".into()),
        SourceConfig::Cookie("token".into()),
    ];
    let header = |n: &str| match n {
        "authorization" => i.authorization.map(str::to_string),
        "cookie" => i.cookie.map(str::to_string),
        _ => None,
    };
    let _ = auth_core::source::find(&sources, header, i.query);
});
