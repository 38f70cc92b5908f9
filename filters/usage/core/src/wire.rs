//! The batch format of `POST /v1/usage`: one JSON object holding a batch
//! id, usage records (one per HTTP stream, from the usage filter) and
//! application metrics (the old metrics service's `{name, value, labels}`).
//!
//! ```json
//! {"batch": "4f1c0a9e2b7d5a13-17",
//!  "records": [{"tenant": "acme", "subject": "alice",
//!               "route": "/api/v1/curves/{market}/latest", "method": "GET",
//!               "status": 200, "request_bytes": 0, "response_bytes": 512,
//!               "duration_us": 1830, "time_ms": 1795000000000}],
//!  "metrics": [{"name": "curve_builds", "value": 1,
//!               "labels": {"tenant": "acme"}, "time_ms": 1795000000000}]}
//! ```
//!
//! Parsing borrows from the input where it can. [`Batch::validate`]
//! checks everything a receiver relies on and names the first bad field
//! (`records[3].status: ...`), so a receiver can refuse a batch whole
//! before applying any of it. [`Record::sanitize`] makes any record the
//! filter builds valid, so the filter never sends a batch that is refused.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Longest batch id, in bytes.
pub const MAX_BATCH_ID: usize = 128;
/// Longest tenant, subject or route, in bytes.
pub const MAX_TEXT: usize = 256;
/// Longest method, in bytes.
pub const MAX_METHOD: usize = 32;
/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME: usize = 128;
/// Most labels on one application metric.
pub const MAX_LABELS: usize = 16;
/// Longest label name, in bytes.
pub const MAX_LABEL_NAME: usize = 64;

/// One batch. `records` and `metrics` may each be absent or empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<'a> {
    /// The idempotency key: a receiver applies a batch id once.
    #[serde(borrow)]
    pub batch: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Record<'a>>,
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metric<'a>>,
}

/// The usage of one HTTP stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record<'a> {
    /// The caller's tenant (`x-auth-tenant`), or the filter's
    /// `anonymous` value.
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    /// The caller (`x-auth-subject`); empty when anonymous.
    #[serde(borrow, default)]
    pub subject: Cow<'a, str>,
    /// The route template the path matched (not the path: bounded).
    #[serde(borrow)]
    pub route: Cow<'a, str>,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// Response status; 0 when the stream ended without a response.
    pub status: u16,
    /// Request body bytes received from the client.
    #[serde(default)]
    pub request_bytes: u64,
    /// Response body bytes sent to the client.
    #[serde(default)]
    pub response_bytes: u64,
    /// From the request's first byte to the end of the stream.
    #[serde(default)]
    pub duration_us: u64,
    /// When the stream ended, ms since the Unix epoch; absent: when the
    /// receiver got the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
}

/// An application metric event: `value` is added to the series
/// `(name, labels)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    pub value: f64,
    /// Label names to values; kept sorted by name.
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "labels"
    )]
    pub labels: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
}

mod labels {
    //! Labels as a JSON object, held as a sorted list of pairs (one
    //! allocation, and a canonical order for keys and storage).
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};
    use std::borrow::Cow;

    type Pairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

    pub fn serialize<S: Serializer>(pairs: &Pairs<'_>, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(pairs.len()))?;
        for (k, v) in pairs {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pairs<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of label names to string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<'de>, A::Error> {
                let mut out: Pairs<'de> = Vec::new();
                while let Some((k, v)) = map.next_entry::<Borrowed<'de>, Borrowed<'de>>()? {
                    if out.len() >= super::MAX_LABELS {
                        return Err(serde::de::Error::custom(format_args!(
                            "more than {} labels",
                            super::MAX_LABELS
                        )));
                    }
                    out.push((k.0, v.0));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                if out.windows(2).any(|w| matches!(w, [a, b] if a.0 == b.0)) {
                    return Err(serde::de::Error::custom("a label appears twice"));
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }

    /// A string borrowed from the input when it has no escapes.
    struct Borrowed<'a>(Cow<'a, str>);

    impl<'de> serde::Deserialize<'de> for Borrowed<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct S;
            impl<'de> Visitor<'de> for S {
                type Value = Borrowed<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Borrowed<'de>, E> {
                    Ok(Borrowed(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Borrowed<'de>, E> {
                    Ok(Borrowed(Cow::Owned(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Borrowed<'de>, E> {
                    Ok(Borrowed(Cow::Owned(v)))
                }
            }
            d.deserialize_str(S)
        }
    }
}

/// Parses and validates a batch; the error names the field.
pub fn parse(body: &[u8]) -> Result<Batch<'_>, String> {
    let b: Batch<'_> = serde_json::from_slice(body).map_err(|e| format!("batch: {e}"))?;
    b.validate()?;
    Ok(b)
}

fn text_ok(field: &str, s: &str, max: usize, empty_ok: bool) -> Result<(), String> {
    if s.is_empty() && !empty_ok {
        return Err(format!("{field}: must not be empty"));
    }
    if s.len() > max {
        return Err(format!("{field}: longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field}: control characters are not allowed"));
    }
    Ok(())
}

/// Whether `s` may be a batch id: 1..=128 of `A-Z a-z 0-9 . _ : -`.
pub fn valid_batch_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_BATCH_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whether `s` is a method token (RFC 9110 `tchar`s, upper or lower case).
fn valid_method(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_METHOD
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Whether `s` is a metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`, ≤ 128 bytes.
pub fn valid_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= MAX_METRIC_NAME
        && matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// Whether `s` is a label name: `[a-zA-Z_][a-zA-Z0-9_]*`, ≤ 64 bytes, not
/// reserved (`__` prefix, `le`, `quantile`).
pub fn valid_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= MAX_LABEL_NAME
        && !s.starts_with("__")
        && s != "le"
        && s != "quantile"
        && matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl Batch<'_> {
    /// Checks every field a receiver relies on; the error names the first
    /// bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_batch_id(&self.batch) {
            return Err(format!(
                "batch: {:?} is not 1 to {MAX_BATCH_ID} of A-Z a-z 0-9 . _ : -",
                truncate(&self.batch, 40)
            ));
        }
        for (i, r) in self.records.iter().enumerate() {
            r.validate().map_err(|e| format!("records[{i}].{e}"))?;
        }
        for (i, m) in self.metrics.iter().enumerate() {
            m.validate().map_err(|e| format!("metrics[{i}].{e}"))?;
        }
        Ok(())
    }
}

impl Record<'_> {
    pub fn validate(&self) -> Result<(), String> {
        text_ok("tenant", &self.tenant, MAX_TEXT, false)?;
        text_ok("subject", &self.subject, MAX_TEXT, true)?;
        text_ok("route", &self.route, MAX_TEXT, false)?;
        if !valid_method(&self.method) {
            return Err(format!(
                "method: {:?} is not an HTTP method token",
                truncate(&self.method, 40)
            ));
        }
        if self.status != 0 && !(100..=599).contains(&self.status) {
            return Err(format!(
                "status: {} is not an HTTP status (100-599, or 0 for none)",
                self.status
            ));
        }
        Ok(())
    }

    /// Makes the record valid: over-long text cut at a character boundary,
    /// control characters replaced, an empty tenant or route replaced by
    /// `fallback_tenant` / `"other"`, a bad method by `"OTHER"`, a bad
    /// status by 0.
    pub fn sanitize(&mut self, fallback_tenant: &str) {
        fix_text(&mut self.tenant, MAX_TEXT, fallback_tenant);
        fix_text(&mut self.subject, MAX_TEXT, "");
        fix_text(&mut self.route, MAX_TEXT, "other");
        if !valid_method(&self.method) {
            self.method = Cow::Borrowed("OTHER");
        }
        if self.status != 0 && !(100..=599).contains(&self.status) {
            self.status = 0;
        }
    }

    /// `"2xx"` etc., `"none"` for status 0.
    pub fn status_class(&self) -> &'static str {
        status_class(self.status)
    }
}

/// The class of an HTTP status: `"1xx"` .. `"5xx"`, `"none"` otherwise.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

fn fix_text(s: &mut Cow<'_, str>, max: usize, fallback: &str) {
    if s.chars().any(char::is_control) {
        *s = Cow::Owned(s.replace(char::is_control, " "));
    }
    if s.len() > max {
        let cut = truncate(s, max).len();
        s.to_mut().truncate(cut);
    }
    if s.is_empty() && !fallback.is_empty() {
        let mut f = fallback.to_string();
        f.truncate(truncate(fallback, max).len());
        *s = Cow::Owned(f);
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

impl Metric<'_> {
    pub fn validate(&self) -> Result<(), String> {
        if !valid_metric_name(&self.name) {
            return Err(format!(
                "name: {:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most {MAX_METRIC_NAME} bytes)",
                truncate(&self.name, 40)
            ));
        }
        if !self.value.is_finite() {
            return Err("value: must be a finite number".into());
        }
        for (k, v) in &self.labels {
            if !valid_label_name(k) {
                return Err(format!(
                    "labels.{}: not a label name ([a-zA-Z_][a-zA-Z0-9_]*, at most {MAX_LABEL_NAME} bytes, not __*, le or quantile)",
                    truncate(k, 40)
                ));
            }
            text_ok(&format!("labels.{k}"), v, MAX_TEXT, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const GOOD: &str = r#"{"batch":"a1-7","records":[{"tenant":"acme","subject":"alice","route":"/api/v1/curves/{market}/latest","method":"GET","status":200,"request_bytes":0,"response_bytes":512,"duration_us":1830,"time_ms":1795000000000}],"metrics":[{"name":"curve_builds","value":2.5,"labels":{"tenant":"acme","kind":"fwd"}}]}"#;

    #[test]
    fn a_good_batch_parses_borrowed_and_round_trips() {
        let b = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(b.batch, "a1-7");
        assert!(matches!(b.records[0].tenant, Cow::Borrowed(_)));
        assert_eq!(b.records[0].status_class(), "2xx");
        assert_eq!(
            b.metrics[0].labels,
            vec![
                (Cow::Borrowed("kind"), Cow::Borrowed("fwd")),
                (Cow::Borrowed("tenant"), Cow::Borrowed("acme"))
            ],
            "labels sorted by name"
        );
        let again = serde_json::to_string(&b).unwrap();
        assert_eq!(parse(again.as_bytes()).unwrap(), b);
    }

    #[test]
    fn escaped_strings_are_accepted() {
        let b = parse(
            br#"{"batch":"x","records":[{"tenant":"a\"b","route":"/r","method":"GET","status":0}]}"#,
        )
        .unwrap();
        assert_eq!(b.records[0].tenant, "a\"b");
        assert_eq!(b.records[0].status_class(), "none");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"batch":"","records":[]}"#, "batch:"),
            (r#"{"batch":"a b"}"#, "batch:"),
            (r#"{"records":[]}"#, "missing field `batch`"),
            (r#"{"batch":"x","extra":1}"#, "unknown field `extra`"),
            (
                r#"{"batch":"x","records":[{"tenant":"","route":"/r","method":"GET","status":200}]}"#,
                "records[0].tenant: must not be empty",
            ),
            (
                r#"{"batch":"x","records":[{"tenant":"t","route":"/r","method":"GET","status":200},{"tenant":"t","route":"/r","method":"GET","status":700}]}"#,
                "records[1].status: 700",
            ),
            (
                r#"{"batch":"x","records":[{"tenant":"t","route":"/r","method":"G T","status":200}]}"#,
                "records[0].method:",
            ),
            (
                r#"{"batch":"x","records":[{"tenant":"t","route":"/r","method":"GET","status":-1}]}"#,
                "invalid value",
            ),
            (
                r#"{"batch":"x","metrics":[{"name":"1x","value":1}]}"#,
                "metrics[0].name:",
            ),
            (
                r#"{"batch":"x","metrics":[{"name":"x","value":1,"labels":{"__a":"v"}}]}"#,
                "metrics[0].labels.__a:",
            ),
            (
                r#"{"batch":"x","metrics":[{"name":"x","value":1,"labels":{"a":"v","a":"w"}}]}"#,
                "a label appears twice",
            ),
            (
                r#"{"batch":"x","metrics":[{"name":"x","value":1,"labels":{"a":1}}]}"#,
                "a string",
            ),
            (
                r#"{"batch":"x","metrics":[{"name":"x"}]}"#,
                "missing field `value`",
            ),
        ];
        for (body, want) in cases {
            let e = parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let long = format!(
            r#"{{"batch":"x","records":[{{"tenant":"{}","route":"/r","method":"GET","status":200}}]}}"#,
            "t".repeat(MAX_TEXT + 1)
        );
        assert!(parse(long.as_bytes())
            .unwrap_err()
            .contains("records[0].tenant: longer"));
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!(r#""l{i}":"v""#)).collect();
        let body = format!(
            r#"{{"batch":"x","metrics":[{{"name":"x","value":1,"labels":{{{}}}}}]}}"#,
            many.join(",")
        );
        assert!(parse(body.as_bytes())
            .unwrap_err()
            .contains("more than 16 labels"));
    }

    #[test]
    fn sanitize_makes_any_record_valid() {
        let long = "é".repeat(MAX_TEXT);
        let mut r = Record {
            tenant: Cow::Owned(String::new()),
            subject: Cow::Owned(long.clone()),
            route: Cow::Owned("a\nb".into()),
            method: Cow::Owned("BAD METHOD".into()),
            status: 999,
            request_bytes: 0,
            response_bytes: 0,
            duration_us: 0,
            time_ms: None,
        };
        assert!(r.validate().is_err());
        r.sanitize("anonymous");
        r.validate().unwrap();
        assert_eq!(r.tenant, "anonymous");
        assert_eq!(r.route, "a b");
        assert_eq!(r.method, "OTHER");
        assert_eq!(r.status, 0);
        assert!(r.subject.len() <= MAX_TEXT && long.starts_with(r.subject.as_ref()));
    }
}
