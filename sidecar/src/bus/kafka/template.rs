//! From a Kafka record to a channel message: a template per topic names
//! the channel from the record's key (and optionally a field of its JSON
//! value); the value becomes the message's `data`.
//!
//! ```text
//! 254carbon.pricing.curve.updates.v1=pricing.curves.{key}
//!     key EU-ETS.DEC26, value {"mid": 71.25}  →  pricing.curves.EU-ETS.DEC26, {"mid": 71.25}
//! 254carbon.pricing.instrument.updates.v1=instruments.{value.kind}.{key}
//! ```
//!
//! Every template holds `{key}`: Kafka keeps a key's records in one
//! partition, so a channel's messages then come from one partition and its
//! offsets can number them ([`super`]). A record that makes no channel is
//! refused with a [`Refusal`], never a panic.

use bytes::Bytes;
use entitlements_core::channel::Subject;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// The record's key (UTF-8).
    Key,
    /// The topic's name.
    Topic,
    /// A string or integer field of the value (a JSON object), by path.
    Field(Vec<String>),
}

/// How a topic's records become channel messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

/// Why a record made no channel message (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key (or an empty one).
    NoKey,
    /// The key is not UTF-8.
    KeyNotUtf8,
    /// No value, or a JSON `null` (a compacted topic's tombstone).
    NoValue,
    /// The value is not one JSON value.
    NotJson,
    /// The template's value field is missing, or not a string or integer.
    NoField,
    /// The name the template makes is not a channel (wildcards, spaces,
    /// empty tokens, too long…).
    InvalidChannel,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::NoKey,
        Refusal::KeyNotUtf8,
        Refusal::NoValue,
        Refusal::NotJson,
        Refusal::NoField,
        Refusal::InvalidChannel,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoKey => "no_key",
            Refusal::KeyNotUtf8 => "key_not_utf8",
            Refusal::NoValue => "no_value",
            Refusal::NotJson => "not_json",
            Refusal::NoField => "no_field",
            Refusal::InvalidChannel => "invalid_channel",
        }
    }
}

impl Template {
    /// Parses a template: text with `{key}`, `{topic}` and `{value.<path>}`
    /// (`path`: field names separated by dots); `{{` and `}}` stand for
    /// braces. It must hold `{key}` and make a channel when every
    /// placeholder is one token.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(t) = tail.strip_prefix("{{") {
                text.push('{');
                rest = t;
                continue;
            }
            if let Some(t) = tail.strip_prefix("}}") {
                text.push('}');
                rest = t;
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!("template {s:?}: a '}}' without its '{{'"));
            }
            let Some(end) = tail.find('}') else {
                return Err(format!("template {s:?}: a '{{' without its '}}'"));
            };
            let name = &tail[1..end];
            let piece = match name {
                "key" => Piece::Key,
                "topic" => Piece::Topic,
                _ => match name.strip_prefix("value.") {
                    Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => {
                        Piece::Field(path.split('.').map(str::to_string).collect())
                    }
                    _ => {
                        return Err(format!(
                        "template {s:?}: unknown placeholder {{{name}}} (use {{key}}, {{topic}} \
                             or {{value.<field>}})"
                    ))
                    }
                },
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            rest = &tail[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        if !pieces.contains(&Piece::Key) {
            return Err(format!(
                "template {s:?} has no {{key}}: a channel's messages must come from one \
                 partition, which only the record's key decides"
            ));
        }
        let t = Template {
            source: s.to_string(),
            pieces,
        };
        let probe = t.probe();
        if let Err(e) = Subject::parse(&probe) {
            return Err(format!(
                "template {s:?} does not make a channel (with every placeholder `x`: {e})"
            ));
        }
        Ok(t)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn wants_fields(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Field(_)))
    }

    /// The template with every placeholder replaced by `x`.
    fn probe(&self) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Key | Piece::Topic | Piece::Field(_) => out.push('x'),
            }
        }
        out
    }

    /// Maps one record of `topic` to its channel and `data`.
    pub fn map(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(Subject, Bytes), Refusal> {
        let key = match key {
            None | Some([]) => return Err(Refusal::NoKey),
            Some(k) => std::str::from_utf8(k).map_err(|_| Refusal::KeyNotUtf8)?,
        };
        let value = value.ok_or(Refusal::NoValue)?;
        let raw = serde_json::from_slice::<&serde_json::value::RawValue>(value)
            .map_err(|_| Refusal::NotJson)?;
        let data = raw.get();
        if data == "null" {
            return Err(Refusal::NoValue);
        }
        let doc = if self.wants_fields() {
            Some(serde_json::from_str::<serde_json::Value>(data).map_err(|_| Refusal::NotJson)?)
        } else {
            None
        };
        let mut missing = false;
        let mut name = String::with_capacity(self.source.len() + key.len() + 16);
        for p in &self.pieces {
            match p {
                Piece::Text(t) => name.push_str(t),
                Piece::Key => name.push_str(key),
                Piece::Topic => name.push_str(topic),
                Piece::Field(path) => {
                    let mut at = doc.as_ref();
                    for f in path {
                        at = at.and_then(|v| v.get(f));
                    }
                    match at {
                        Some(serde_json::Value::String(s)) if !s.is_empty() => name.push_str(s),
                        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => {
                            name.push_str(&n.to_string())
                        }
                        _ => missing = true,
                    }
                }
            }
        }
        if missing {
            return Err(Refusal::NoField);
        }
        let channel = Subject::parse(&name).map_err(|_| Refusal::InvalidChannel)?;
        Ok((channel, Bytes::copy_from_slice(data.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(t: &str, key: &[u8], value: &[u8]) -> Result<(String, String), Refusal> {
        Template::parse(t)
            .unwrap()
            .map("254carbon.pricing.curve.updates.v1", Some(key), Some(value))
            .map(|(c, d)| {
                (
                    c.as_str().to_string(),
                    String::from_utf8(d.to_vec()).unwrap(),
                )
            })
    }

    /// Found by the `kafka_record` fuzz target: a value is checked as JSON
    /// the way `/publish` and the NATS bus check it, by its syntax, so a
    /// number beyond f64's range passes as written (a client's parser
    /// decides what it is); the value is never rewritten.
    #[test]
    fn a_value_passes_as_written_even_a_number_beyond_f64() {
        assert_eq!(
            map("pricing.curves.{key}", b"A", b" 9999e999 "),
            Ok(("pricing.curves.A".into(), "9999e999".into()))
        );
        assert_eq!(
            map("pricing.curves.{key}", b"A", br#"{"px":1e400,"n":1.50}"#),
            Ok(("pricing.curves.A".into(), r#"{"px":1e400,"n":1.50}"#.into()))
        );
    }

    #[test]
    fn maps_the_seed_topic() {
        assert_eq!(
            map(
                "pricing.curves.{key}",
                b"EU-ETS.DEC26",
                b" {\"mid\": 71.25} "
            ),
            Ok((
                "pricing.curves.EU-ETS.DEC26".into(),
                "{\"mid\": 71.25}".into()
            ))
        );
        assert_eq!(
            map(
                "instruments.{value.kind}.{key}",
                b"EUA",
                br#"{"kind":"futures","px":1}"#
            ),
            Ok((
                "instruments.futures.EUA".into(),
                r#"{"kind":"futures","px":1}"#.into()
            ))
        );
        assert_eq!(
            map("a.{value.m.id}.{key}", b"k", br#"{"m":{"id":7}}"#),
            Ok(("a.7.k".into(), r#"{"m":{"id":7}}"#.into()))
        );
        assert_eq!(
            Template::parse("t.{topic}.{key}")
                .unwrap()
                .map("feed", Some(b"k"), Some(b"1"))
                .map(|(c, _)| c.as_str().to_string()),
            Ok("t.feed.k".into())
        );
    }

    #[test]
    fn refuses_what_makes_no_channel() {
        let t = Template::parse("pricing.curves.{key}").unwrap();
        let m = |k: Option<&[u8]>, v: Option<&[u8]>| t.map("t", k, v).map(|_| ());
        assert_eq!(m(None, Some(b"1")), Err(Refusal::NoKey));
        assert_eq!(m(Some(b""), Some(b"1")), Err(Refusal::NoKey));
        assert_eq!(m(Some(b"\xff"), Some(b"1")), Err(Refusal::KeyNotUtf8));
        assert_eq!(m(Some(b"k"), None), Err(Refusal::NoValue));
        assert_eq!(m(Some(b"k"), Some(b"null")), Err(Refusal::NoValue));
        assert_eq!(m(Some(b"k"), Some(b"{\"a\":")), Err(Refusal::NotJson));
        assert_eq!(m(Some(b"k"), Some(b"1 2")), Err(Refusal::NotJson));
        assert_eq!(m(Some(b"k"), Some(b"\xff")), Err(Refusal::NotJson));
        for bad in [&b"a.*"[..], b">", b"a..b", b"a b", b".a", b"a."] {
            assert_eq!(
                m(Some(bad), Some(b"1")),
                Err(Refusal::InvalidChannel),
                "{bad:?}"
            );
        }
        let long = vec![b'a'; 300];
        assert_eq!(m(Some(&long), Some(b"1")), Err(Refusal::InvalidChannel));
        let f = Template::parse("i.{value.kind}.{key}").unwrap();
        for v in [
            &br#"{}"#[..],
            br#"{"kind":""}"#,
            br#"{"kind":1.5}"#,
            br#"{"kind":{}}"#,
            b"[1]",
            b"3",
        ] {
            assert_eq!(
                f.map("t", Some(b"k"), Some(v)).map(|_| ()),
                Err(Refusal::NoField),
                "{v:?}"
            );
        }
        assert_eq!(
            f.map("t", Some(b"k"), Some(br#"{"kind":"a.*"}"#))
                .map(|_| ()),
            Err(Refusal::InvalidChannel)
        );
    }

    #[test]
    fn refuses_bad_templates_with_the_reason() {
        for (t, says) in [
            ("pricing.curves", "has no {key}"),
            ("pricing.{value.kind}", "has no {key}"),
            ("pricing.{nope}.{key}", "unknown placeholder {nope}"),
            ("pricing.{value.}.{key}", "unknown placeholder"),
            ("pricing.{value..a}.{key}", "unknown placeholder"),
            ("pricing.{key", "without its '}'"),
            ("pricing.}{key}", "without its '{'"),
            ("pricing..{key}", "does not make a channel"),
            ("pricing.*.{key}", "does not make a channel"),
            ("pricing curves.{key}", "does not make a channel"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(says), "{t}: {e}");
        }
        let t = Template::parse("a{{b}}.{key}").unwrap();
        assert_eq!(t.probe(), "a{b}.x", "doubled braces are literal");
    }
}
