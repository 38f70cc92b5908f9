//! A Kafka record becoming a channel message (`sidecar::bus::kafka::
//! template`): the operator's template for a topic, then the record's key
//! and value. Invariants: a template that parses parses again from what it
//! keeps; a record maps the same way twice; what it maps to is a channel
//! that parses again to itself, and `data` is the record's JSON value as
//! written, trimmed (not `null`); with a template of text and `{key}` only, the channel is that
//! text around the key.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use sidecar::bus::kafka::template::Template;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    template: &'a str,
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
}

/// Templates as an operator would write them, so that records get past
/// the template's own checks.
const FIXED: [&str; 4] = [
    "pricing.curves.{key}",
    "instruments.{value.kind}.{key}",
    "{topic}.{key}.{value.a.b}",
    "x{{y}}.{key}",
];

fuzz_target!(|i: Input<'_>| {
    let mut templates: Vec<Template> = FIXED.iter().map(|t| Template::parse(t).unwrap()).collect();
    if let Ok(t) = Template::parse(i.template) {
        assert_eq!(t.as_str(), i.template);
        let again = Template::parse(t.as_str()).expect("a template parses again");
        assert_eq!(again, t);
        templates.push(t);
    }
    for t in &templates {
        let got = t.map(i.topic, i.key, i.value);
        assert_eq!(got, t.map(i.topic, i.key, i.value), "not repeatable");
        let Ok((channel, data)) = got else { continue };
        let name = channel.as_str();
        let reparsed = entitlements_core::channel::Subject::parse(name).expect("a channel");
        assert_eq!(reparsed.as_str(), name);
        // JSON as the sidecar checks it everywhere (`/publish`, NATS): its
        // syntax, so a number beyond f64's range passes as written.
        let raw: &RawValue = serde_json::from_slice(&data).expect("data is JSON");
        assert_eq!(
            raw.get().as_bytes(),
            &data[..],
            "data is not one JSON value, trimmed"
        );
        assert_ne!(raw.get(), "null", "a tombstone became a message");
        let value: &RawValue = serde_json::from_slice(i.value.unwrap()).unwrap();
        assert_eq!(raw.get(), value.get(), "data is not the record's value");
        if t.as_str() == FIXED[0] {
            let key = std::str::from_utf8(i.key.unwrap()).unwrap();
            assert_eq!(name, format!("pricing.curves.{key}"));
        }
    }
});
