//! Channels: NATS-style subjects (DESIGN.md). Dot-separated tokens; in a
//! pattern `*` matches exactly one token and `>` (last only) one or more.
//!
//! A [`Subject`] names one channel (what is published); a [`Pattern`] is
//! what a client subscribes to. Both are validated once, at parse time.

use std::fmt;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 256;
/// Most tokens a channel name may have.
pub const MAX_TOKENS: usize = 16;

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// Longer than [`MAX_CHANNEL_BYTES`].
    #[error("channel name is {0} bytes, more than {MAX_CHANNEL_BYTES}")]
    TooLong(usize),
    /// More than [`MAX_TOKENS`] tokens.
    #[error("channel name has {0} tokens, more than {MAX_TOKENS}")]
    TooManyTokens(usize),
    /// Two dots in a row, or a leading or trailing dot.
    #[error("channel {0:?} has an empty token")]
    EmptyToken(String),
    /// A character outside printable ASCII, or whitespace.
    #[error("channel {name:?} has a forbidden character {ch:?}")]
    BadCharacter { name: String, ch: char },
    /// A wildcard in a subject (a concrete channel).
    #[error("channel {0:?} has a wildcard; a published channel must be concrete")]
    Wildcard(String),
    /// `>` before the last token, or `*`/`>` mixed with other characters in a token.
    #[error("channel {0:?} misplaces a wildcard: `*` and `>` are whole tokens, `>` only last")]
    MisplacedWildcard(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens, last only.
    Rest,
}

fn tokenize(name: &str) -> Result<Vec<Token>, ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong(name.len()));
    }
    if let Some(ch) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ChannelError::BadCharacter {
            name: name.to_string(),
            ch,
        });
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > MAX_TOKENS {
        return Err(ChannelError::TooManyTokens(parts.len()));
    }
    let last = parts.len() - 1;
    let mut tokens = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let t = match *p {
            "" => return Err(ChannelError::EmptyToken(name.to_string())),
            "*" => Token::One,
            ">" if i == last => Token::Rest,
            ">" => return Err(ChannelError::MisplacedWildcard(name.to_string())),
            p if p.contains(['*', '>']) => {
                return Err(ChannelError::MisplacedWildcard(name.to_string()))
            }
            p => Token::Literal(p.to_string()),
        };
        tokens.push(t);
    }
    Ok(tokens)
}

/// A concrete channel, e.g. `pricing.curves.EU-ETS.DEC26`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    name: String,
}

impl Subject {
    pub fn parse(name: &str) -> Result<Subject, ChannelError> {
        for t in tokenize(name)? {
            if !matches!(t, Token::Literal(_)) {
                return Err(ChannelError::Wildcard(name.to_string()));
            }
        }
        Ok(Subject {
            name: name.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.name.split('.')
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A subscription pattern, e.g. `pricing.curves.*.DEC26` or `pricing.curves.EU-ETS.>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    name: String,
    tokens: Vec<Token>,
}

impl Pattern {
    pub fn parse(name: &str) -> Result<Pattern, ChannelError> {
        Ok(Pattern {
            tokens: tokenize(name)?,
            name: name.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether the pattern has no wildcard (it names one channel).
    pub fn is_concrete(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }

    /// Whether `subject` is one of the channels this pattern names.
    pub fn matches(&self, subject: &Subject) -> bool {
        let mut subject = subject.tokens();
        for t in &self.tokens {
            match t {
                Token::Rest => return subject.next().is_some(),
                Token::One => {
                    if subject.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(l) => {
                    if subject.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        subject.next().is_none()
    }

    /// Whether every channel this pattern names is also named by `other`,
    /// i.e. a subscription to `self` stays inside what `other` allows.
    pub fn is_within(&self, other: &Pattern) -> bool {
        let mut mine = self.tokens.iter();
        for theirs in &other.tokens {
            match (theirs, mine.next()) {
                (_, None) => return false,
                // `>` covers one or more of anything, and ours has at least one left.
                (Token::Rest, Some(_)) => return true,
                // `*` covers one literal or one `*`, never our `>` (which may be several).
                (Token::One, Some(Token::Literal(_) | Token::One)) => {}
                (Token::One, Some(Token::Rest)) => return false,
                (Token::Literal(a), Some(Token::Literal(b))) if a == b => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        mine.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }
    fn s(s: &str) -> Subject {
        Subject::parse(s).unwrap()
    }

    #[test]
    fn matching() {
        let cases = [
            (
                "pricing.curves.EU-ETS.DEC26",
                "pricing.curves.EU-ETS.DEC26",
                true,
            ),
            (
                "pricing.curves.*.DEC26",
                "pricing.curves.EU-ETS.DEC26",
                true,
            ),
            (
                "pricing.curves.*.DEC26",
                "pricing.curves.EU-ETS.DEC27",
                false,
            ),
            ("pricing.curves.*", "pricing.curves.EU-ETS.DEC26", false),
            ("pricing.curves.>", "pricing.curves.EU-ETS.DEC26", true),
            ("pricing.curves.>", "pricing.curves.EU-ETS", true),
            ("pricing.curves.>", "pricing.curves", false),
            ("pricing.>", "pricing", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
            (
                "pricing.curves.EU-ETS",
                "pricing.curves.EU-ETS.DEC26",
                false,
            ),
            (
                "pricing.curves.EU-ETS.DEC26",
                "pricing.curves.EU-ETS",
                false,
            ),
        ];
        for (pat, subj, want) in cases {
            assert_eq!(p(pat).matches(&s(subj)), want, "{pat} vs {subj}");
        }
    }

    #[test]
    fn containment() {
        let cases = [
            (
                "pricing.curves.EU-ETS.DEC26",
                "pricing.curves.EU-ETS.>",
                true,
            ),
            ("pricing.curves.EU-ETS.>", "pricing.curves.EU-ETS.>", true),
            ("pricing.curves.EU-ETS.*", "pricing.curves.EU-ETS.>", true),
            ("pricing.curves.*.DEC26", "pricing.curves.EU-ETS.>", false),
            ("pricing.curves.>", "pricing.curves.EU-ETS.>", false),
            ("pricing.curves.EU-ETS", "pricing.curves.EU-ETS.>", false),
            ("pricing.curves.*.DEC26", "pricing.curves.*.*", true),
            ("pricing.curves.>", "pricing.curves.*", false),
            ("pricing.curves.x", "pricing.curves.*", true),
            ("a.b", ">", true),
            (">", ">", true),
            (">", "*", false),
        ];
        for (mine, theirs, want) in cases {
            assert_eq!(
                p(mine).is_within(&p(theirs)),
                want,
                "{mine} within {theirs}"
            );
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        assert_eq!(Pattern::parse(""), Err(ChannelError::Empty));
        assert!(matches!(
            Pattern::parse("a..b"),
            Err(ChannelError::EmptyToken(_))
        ));
        assert!(matches!(
            Pattern::parse(".a"),
            Err(ChannelError::EmptyToken(_))
        ));
        assert!(matches!(
            Pattern::parse("a."),
            Err(ChannelError::EmptyToken(_))
        ));
        assert!(matches!(
            Pattern::parse("a.>.b"),
            Err(ChannelError::MisplacedWildcard(_))
        ));
        assert!(matches!(
            Pattern::parse("a.b*"),
            Err(ChannelError::MisplacedWildcard(_))
        ));
        assert!(matches!(
            Pattern::parse("a.b c"),
            Err(ChannelError::BadCharacter { ch: ' ', .. })
        ));
        assert!(matches!(
            Pattern::parse("a.\u{e9}"),
            Err(ChannelError::BadCharacter { .. })
        ));
        assert!(matches!(
            Subject::parse("a.*"),
            Err(ChannelError::Wildcard(_))
        ));
        assert!(matches!(
            Subject::parse("a.>"),
            Err(ChannelError::Wildcard(_))
        ));
        let long = "a".repeat(MAX_CHANNEL_BYTES + 1);
        assert_eq!(
            Pattern::parse(&long),
            Err(ChannelError::TooLong(MAX_CHANNEL_BYTES + 1))
        );
        let many = vec!["t"; MAX_TOKENS + 1].join(".");
        assert_eq!(
            Pattern::parse(&many),
            Err(ChannelError::TooManyTokens(MAX_TOKENS + 1))
        );
        assert_eq!(
            Pattern::parse("a..b").unwrap_err().to_string(),
            "channel \"a..b\" has an empty token"
        );
    }

    /// Exhaustive cross-check on a small alphabet: `matches` agrees with a
    /// reference definition, and `is_within` agrees with "every subject the
    /// first matches, the second matches" over all subjects up to 4 tokens.
    #[test]
    fn matches_and_containment_agree_with_their_definitions() {
        let lits = ["a", "b"];
        let mut subjects = Vec::new();
        let mut frontier: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..4 {
            let mut next = Vec::new();
            for f in &frontier {
                for l in lits {
                    let mut v = f.clone();
                    v.push(l);
                    subjects.push(v.join("."));
                    next.push(v);
                }
            }
            frontier = next;
        }
        let mut patterns = Vec::new();
        let mut frontier: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..3 {
            let mut next = Vec::new();
            for f in &frontier {
                for t in ["a", "b", "*", ">"] {
                    let mut v = f.clone();
                    v.push(t);
                    if let Ok(pat) = Pattern::parse(&v.join(".")) {
                        patterns.push(pat);
                    }
                    if t != ">" {
                        next.push(v);
                    }
                }
            }
            frontier = next;
        }
        let reference = |pat: &str, subj: &str| -> bool {
            let pt: Vec<&str> = pat.split('.').collect();
            let st: Vec<&str> = subj.split('.').collect();
            for (i, t) in pt.iter().enumerate() {
                match *t {
                    ">" => return st.len() > i,
                    "*" => {
                        if st.len() <= i {
                            return false;
                        }
                    }
                    l => {
                        if st.get(i) != Some(&l) {
                            return false;
                        }
                    }
                }
            }
            st.len() == pt.len()
        };
        let subjects: Vec<Subject> = subjects.iter().map(|x| s(x)).collect();
        for pat in &patterns {
            for subj in &subjects {
                assert_eq!(
                    pat.matches(subj),
                    reference(pat.as_str(), subj.as_str()),
                    "{pat} vs {subj}"
                );
            }
        }
        // Containment: exact on subjects up to 4 tokens for patterns up to 3
        // (a `>` pattern also names longer subjects, which the 4-token
        // universe represents: one extra token is enough to tell them apart).
        for a in &patterns {
            for b in &patterns {
                let by_definition = subjects.iter().all(|x| !a.matches(x) || b.matches(x));
                assert_eq!(a.is_within(b), by_definition, "{a} within {b}");
            }
        }
    }
}
