//! Templates with captures: paths such as `/api/v1/curves/{market}/**` and
//! channels such as `pricing.curves.{market}.>`.
//!
//! Path templates: `{name}` captures one segment, `*` matches one segment,
//! `**` (last only) zero or more. Channel templates: `{name}` captures one
//! token, `*` one token, `>` (last only) one or more.

use crate::channel::Pattern;

/// Captured values, by name, in template order.
pub type Captures = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Capture(String),
    One,
    Rest,
}

fn capture_name(p: &str) -> Option<&str> {
    let name = p.strip_prefix('{')?.strip_suffix('}')?;
    Some(name)
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_parts(parts: &[&str], rest: &str, one: &str) -> Result<Vec<Part>, String> {
    let mut out = Vec::with_capacity(parts.len());
    let mut names: Vec<&str> = Vec::new();
    let last = parts.len().saturating_sub(1);
    for (i, p) in parts.iter().enumerate() {
        let part = if *p == rest {
            if i != last {
                return Err(format!("`{rest}` may only be last"));
            }
            Part::Rest
        } else if *p == one {
            Part::One
        } else if let Some(n) = capture_name(p) {
            if !valid_name(n) {
                return Err(format!("bad capture name {n:?}"));
            }
            if names.contains(&n) {
                return Err(format!("capture {{{n}}} appears twice"));
            }
            names.push(n);
            Part::Capture(n.to_string())
        } else if p.contains(['{', '}', '*']) {
            return Err(format!(
                "{p:?}: `{{name}}` and `{one}` must be a whole segment"
            ));
        } else {
            Part::Lit((*p).to_string())
        };
        out.push(part);
    }
    Ok(out)
}

fn names(parts: &[Part]) -> impl Iterator<Item = &str> {
    parts.iter().filter_map(|p| match p {
        Part::Capture(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate(Vec<Part>);

impl PathTemplate {
    pub fn parse(t: &str) -> Result<PathTemplate, String> {
        let rest = t
            .strip_prefix('/')
            .ok_or_else(|| format!("template {t:?} must start with '/'"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts
            .iter()
            .take(parts.len().saturating_sub(1))
            .any(|p| p.is_empty())
        {
            return Err(format!("template {t:?} has an empty segment"));
        }
        Ok(PathTemplate(parse_parts(&parts, "**", "*")?))
    }

    /// Names of the captures, in order.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        names(&self.0)
    }

    /// The literal segments before the first wildcard or capture: every
    /// path the template matches starts with them.
    pub fn leading_literals(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map_while(|p| match p {
            Part::Lit(l) => Some(l.as_str()),
            _ => None,
        })
    }

    /// Matches a normalised path; on success appends the captures.
    pub fn matches(&self, path: &str, caps: &mut Captures) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut segs = rest.split('/');
        let mark = caps.len();
        for part in &self.0 {
            match part {
                Part::Rest => return true,
                Part::Lit(l) => {
                    if segs.next() != Some(l.as_str()) {
                        caps.truncate(mark);
                        return false;
                    }
                }
                Part::One | Part::Capture(_) => match segs.next() {
                    Some(s) if !s.is_empty() => {
                        if let Part::Capture(n) = part {
                            caps.push((n.clone(), s.to_string()));
                        }
                    }
                    _ => {
                        caps.truncate(mark);
                        return false;
                    }
                },
            }
        }
        if segs.next().is_some() {
            caps.truncate(mark);
            return false;
        }
        true
    }
}

/// A compiled channel template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate(Vec<Part>);

impl ChannelTemplate {
    pub fn parse(t: &str) -> Result<ChannelTemplate, String> {
        let parts: Vec<&str> = t.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("channel template {t:?} has an empty token"));
        }
        Ok(ChannelTemplate(parse_parts(&parts, ">", "*")?))
    }

    /// Names of the captures, in order.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        names(&self.0)
    }

    /// Whether every channel of the subscription `pattern` is inside this
    /// template; captures take the pattern's token. A capture facing a `*`
    /// in the pattern captures `*` (which a condition like "{market} in
    /// claim markets" then refuses unless the claim grants `*`); facing a
    /// `>` it cannot match, since `>` may span several tokens.
    pub fn covers(&self, pattern: &Pattern, caps: &mut Captures) -> bool {
        let mark = caps.len();
        let mut toks = pattern.as_str().split('.');
        let ok = (|| {
            for part in &self.0 {
                let tok = toks.next();
                match (part, tok) {
                    (_, None) => return false,
                    (Part::Rest, Some(_)) => return true,
                    (Part::Lit(l), Some(t)) => {
                        if l != t {
                            return false;
                        }
                    }
                    (Part::One | Part::Capture(_), Some(">")) => return false,
                    (Part::One, Some(_)) => {}
                    (Part::Capture(n), Some(t)) => caps.push((n.clone(), t.to_string())),
                }
            }
            toks.next().is_none()
        })();
        if !ok {
            caps.truncate(mark);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn pm(t: &str, path: &str) -> Option<Captures> {
        let mut c = Vec::new();
        PathTemplate::parse(t)
            .unwrap()
            .matches(path, &mut c)
            .then_some(c)
    }

    fn cap(pairs: &[(&str, &str)]) -> Captures {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn path_templates() {
        let t = "/api/v1/curves/{market}/**";
        assert_eq!(
            pm(t, "/api/v1/curves/EU-ETS/DEC26"),
            Some(cap(&[("market", "EU-ETS")]))
        );
        assert_eq!(
            pm(t, "/api/v1/curves/EU-ETS"),
            Some(cap(&[("market", "EU-ETS")]))
        );
        assert_eq!(
            pm(t, "/api/v1/curves/EU-ETS/a/b/c"),
            Some(cap(&[("market", "EU-ETS")]))
        );
        assert_eq!(
            pm(t, "/api/v1/curves/"),
            None,
            "an empty segment is not a market"
        );
        assert_eq!(pm(t, "/api/v1/curve/EU-ETS"), None);
        let t = "/api/v1/{kind}/{id}";
        assert_eq!(
            pm(t, "/api/v1/curves/42"),
            Some(cap(&[("kind", "curves"), ("id", "42")]))
        );
        assert_eq!(pm(t, "/api/v1/curves/42/x"), None);
        assert_eq!(pm(t, "/api/v1/curves"), None);
        assert_eq!(pm("/api/*/health", "/api/v2/health"), Some(vec![]));
        assert_eq!(pm("/", "/"), Some(vec![]));
        assert_eq!(pm("/**", "/anything/at/all"), Some(vec![]));
        for bad in [
            "api",
            "/a/**/b",
            "/a/{b",
            "/a/x{b}",
            "/a/{1b}",
            "/a/{b}/{b}",
            "/a//b",
            "/a/b*",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    fn cc(t: &str, p: &str) -> Option<Captures> {
        let mut c = Vec::new();
        ChannelTemplate::parse(t)
            .unwrap()
            .covers(&Pattern::parse(p).unwrap(), &mut c)
            .then_some(c)
    }

    #[test]
    fn channel_templates() {
        let t = "pricing.curves.{market}.>";
        assert_eq!(
            cc(t, "pricing.curves.EU-ETS.DEC26"),
            Some(cap(&[("market", "EU-ETS")]))
        );
        assert_eq!(
            cc(t, "pricing.curves.EU-ETS.>"),
            Some(cap(&[("market", "EU-ETS")]))
        );
        assert_eq!(
            cc(t, "pricing.curves.*.DEC26"),
            Some(cap(&[("market", "*")]))
        );
        assert_eq!(cc(t, "pricing.curves.>"), None, "> may span markets");
        assert_eq!(cc(t, "pricing.curves.EU-ETS"), None);
        assert_eq!(cc(t, "pricing.>"), None);
        assert_eq!(cc("pricing.curves.*", "pricing.curves.CAISO"), Some(vec![]));
        assert_eq!(cc("pricing.curves.*", "pricing.curves.>"), None);
        for bad in ["a..b", "a.>.b", "a.{m", "a.x*"] {
            assert!(ChannelTemplate::parse(bad).is_err(), "{bad}");
        }
    }
}
