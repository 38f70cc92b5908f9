//! Finding the token: headers (with a prefix such as `Bearer `), query
//! parameters, cookies, in the configured order. Two places carrying
//! different tokens is refused rather than guessed between.

use crate::config::SourceConfig;
use crate::error::Reason;

/// Where a token was found (index into the sources) and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub source: usize,
    pub token: String,
}

/// A readable name of a source, for logs and the conflict reason.
pub fn describe(s: &SourceConfig) -> String {
    match s {
        SourceConfig::Header { name, .. } => format!("header {name}"),
        SourceConfig::Query(n) => format!("query parameter {n}"),
        SourceConfig::Cookie(n) => format!("cookie {n}"),
    }
}

fn from_cookie(cookie: &str, name: &str) -> Option<String> {
    cookie.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Looks for a token in every source. `header` returns a request header
/// (lower-case name); `query` is the raw query string.
pub fn find(
    sources: &[SourceConfig],
    header: impl Fn(&str) -> Option<String>,
    query: Option<&str>,
) -> Result<Option<Found>, Reason> {
    let mut found: Option<Found> = None;
    for (i, s) in sources.iter().enumerate() {
        let token = match s {
            SourceConfig::Header { name, prefix } => header(name).and_then(|v| match prefix {
                None => Some(v.trim().to_string()),
                Some(p) => {
                    let head = v.get(..p.len())?;
                    head.eq_ignore_ascii_case(p)
                        .then(|| v.get(p.len()..).map(|t| t.trim().to_string()))
                        .flatten()
                }
            }),
            SourceConfig::Query(n) => query.and_then(|q| filter_common::form::query_value(q, n)),
            SourceConfig::Cookie(n) => header("cookie").and_then(|c| from_cookie(&c, n)),
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            continue;
        };
        match &found {
            None => found = Some(Found { source: i, token }),
            Some(f) if f.token == token => {}
            Some(f) => {
                let first = sources.get(f.source).map(describe).unwrap_or_default();
                return Err(Reason::Conflicting(first, describe(s)));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn sources() -> Vec<SourceConfig> {
        vec![
            SourceConfig::Header {
                name: "authorization".into(),
                prefix: Some("Bearer ".into()),
            },
            SourceConfig::Header {
                name: "x-api-token".into(),
                prefix: None,
            },
            SourceConfig::Query("access_token".into()),
            SourceConfig::Cookie("carbon_at".into()),
        ]
    }

    fn run(headers: &[(&str, &str)], query: Option<&str>) -> Result<Option<Found>, Reason> {
        find(
            &sources(),
            |n| {
                headers
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            },
            query,
        )
    }

    fn tok(source: usize, t: &str) -> Result<Option<Found>, Reason> {
        Ok(Some(Found {
            source,
            token: t.into(),
        }))
    }

    #[test]
    fn each_source_in_turn() {
        assert_eq!(
            run(&[("authorization", "Bearer abc.def.ghi")], None),
            tok(0, "abc.def.ghi")
        );
        assert_eq!(
            run(&[("authorization", "bearer   abc ")], None),
            tok(0, "abc")
        );
        assert_eq!(run(&[("x-api-token", "t1")], None), tok(1, "t1"));
        assert_eq!(run(&[], Some("a=1&access_token=x%2Ey&b")), tok(2, "x.y"));
        // The shared decoder: a sign is not a hex digit, a bad escape is
        // literal, and the first parameter of the name decides.
        assert_eq!(run(&[], Some("access_token=x%+4")), tok(2, "x% 4"));
        assert_eq!(
            run(&[], Some("access_token=%zz&access_token=y")),
            tok(2, "%zz")
        );
        assert_eq!(
            run(&[("cookie", "a=1; carbon_at=\"c.d.e\"; z=2")], None),
            tok(3, "c.d.e")
        );
        assert_eq!(run(&[], None), Ok(None));
        // Another scheme is not a token of this source.
        assert_eq!(
            run(&[("authorization", "Basic dXNlcjpwYXNz")], None),
            Ok(None)
        );
        assert_eq!(run(&[("authorization", "Bearer ")], None), Ok(None));
    }

    #[test]
    fn the_same_token_twice_is_fine_two_different_ones_are_not() {
        assert_eq!(
            run(&[("authorization", "Bearer t")], Some("access_token=t")),
            tok(0, "t")
        );
        assert_eq!(
            run(&[("authorization", "Bearer t")], Some("access_token=u")),
            Err(Reason::Conflicting(
                "header authorization".into(),
                "query parameter access_token".into()
            ))
        );
    }
}
