//! A segment trie over the HTTP rules, so that a decision looks only at
//! the rules that can match the request's path.
//!
//! Each rule is filed under the path segments every path it matches must
//! start with (from an exact path, a prefix, a template's leading literal
//! segments, or a regex's literal prefix); rules with none are filed at the
//! root. A lookup walks the request path down the trie and ORs the rule
//! sets of the nodes it passes, so the candidates are a superset of the
//! matching rules, in policy order. The walk stops at the first segment
//! with no child: cost grows with path depth, not with the policy's size.

use std::collections::HashMap;

#[derive(Default)]
struct Node {
    /// Rules filed here, a bit per rule index.
    rules: Vec<u64>,
    children: HashMap<String, Node>,
}

pub struct PathIndex {
    root: Node,
    words: usize,
}

impl PathIndex {
    /// An index over `n` rules; file each with [`PathIndex::insert`].
    pub fn new(n: usize) -> PathIndex {
        PathIndex {
            root: Node::default(),
            words: n.div_ceil(64),
        }
    }

    /// Files rule `i` under `segments` (each a whole path segment).
    pub fn insert<'a>(&mut self, i: usize, segments: impl Iterator<Item = &'a str>) {
        let mut node = &mut self.root;
        for seg in segments {
            node = node.children.entry(seg.to_string()).or_default();
        }
        if node.rules.is_empty() {
            node.rules = vec![0; self.words];
        }
        if let Some(w) = node.rules.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    /// The candidate rules for `path` (normalised, starting with `/`) as a
    /// bit set, written into `out` (resized to the index's width).
    pub fn candidates(&self, path: &str, out: &mut Vec<u64>) {
        out.clear();
        out.resize(self.words, 0);
        let mut node = &self.root;
        or_into(out, &node.rules);
        let segments = path.strip_prefix('/').unwrap_or(path).split('/');
        for seg in segments {
            match node.children.get(seg) {
                Some(n) => {
                    node = n;
                    or_into(out, &node.rules);
                }
                None => break,
            }
        }
    }
}

fn or_into(out: &mut [u64], rules: &[u64]) {
    for (o, r) in out.iter_mut().zip(rules) {
        *o |= r;
    }
}

/// Iterates the set bits of a bit set, in increasing order.
pub fn ones(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        let mut word = word;
        std::iter::from_fn(move || {
            if word == 0 {
                return None;
            }
            let b = word.trailing_zeros() as usize;
            word &= word - 1;
            Some(w * 64 + b)
        })
    })
}

/// The whole segments of a literal path prefix: those followed by `/`.
/// `/api/v1/cur` gives `api`, `v1`.
pub fn prefix_segments(prefix: &str) -> impl Iterator<Item = &str> {
    let body = prefix.strip_prefix('/').unwrap_or("");
    let complete = body.rfind('/').and_then(|end| body.get(..end));
    complete.into_iter().flat_map(|c| c.split('/'))
}

/// The literal text every match of `re` (anchored at both ends by the
/// engine) starts with; empty if there is a top-level alternation or the
/// regex starts with a construct. Conservative: stops at the first
/// metacharacter, and drops a character a quantifier could remove.
pub fn regex_literal_prefix(re: &str) -> String {
    if has_top_level_alternation(re) {
        return String::new();
    }
    let mut out = String::new();
    for c in re.chars() {
        match c {
            '?' | '*' | '{' => {
                out.pop();
                break;
            }
            // `a+` still starts with `a`; nothing after it is known.
            '\\' | '.' | '+' | '(' | ')' | '[' | ']' | '|' | '^' | '$' | '}' => break,
            c => out.push(c),
        }
    }
    out
}

fn has_top_level_alternation(re: &str) -> bool {
    let mut depth = 0i32;
    let mut class = false;
    let mut escaped = false;
    for c in re.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '[' if !class => class = true,
            ']' if class => class = false,
            '(' if !class => depth += 1,
            ')' if !class => depth -= 1,
            '|' if !class && depth == 0 => return true,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn literal_prefixes_of_regexes() {
        assert_eq!(
            regex_literal_prefix("/api/v1/p5/(latest|history)/.*"),
            "/api/v1/p5/"
        );
        assert_eq!(regex_literal_prefix("/api/v1/x?/y"), "/api/v1/");
        assert_eq!(regex_literal_prefix("/api/v1/xs*"), "/api/v1/x");
        assert_eq!(regex_literal_prefix("/a|/b"), "");
        assert_eq!(regex_literal_prefix("/a/(b|c)"), "/a/");
        assert_eq!(regex_literal_prefix("/a/[|]"), "/a/");
        assert_eq!(regex_literal_prefix("(?i)/admin/.*"), "");
        assert_eq!(regex_literal_prefix("/a\\.b/c"), "/a");
        assert_eq!(regex_literal_prefix("/a{2}/"), "/");
    }

    #[test]
    fn whole_segments_of_prefixes() {
        fn segs(p: &str) -> Vec<&str> {
            prefix_segments(p).collect()
        }
        assert_eq!(segs("/api/v1/cur"), vec!["api", "v1"]);
        assert_eq!(segs("/api/v1/"), vec!["api", "v1"]);
        assert_eq!(segs("/healthz"), Vec::<&str>::new());
        assert_eq!(segs("/"), Vec::<&str>::new());
        assert_eq!(segs(""), Vec::<&str>::new());
    }

    #[test]
    fn candidates_are_the_rules_on_the_walked_path_in_order() {
        let mut ix = PathIndex::new(130);
        ix.insert(0, std::iter::empty());
        ix.insert(1, ["api", "v1"].into_iter());
        ix.insert(129, ["api", "v1", "curves"].into_iter());
        ix.insert(70, ["admin"].into_iter());
        let mut out = Vec::new();
        let got = |ix: &PathIndex, p: &str, out: &mut Vec<u64>| {
            ix.candidates(p, out);
            ones(out).collect::<Vec<_>>()
        };
        assert_eq!(got(&ix, "/api/v1/curves/EU-ETS", &mut out), vec![0, 1, 129]);
        assert_eq!(got(&ix, "/api/v1/instruments", &mut out), vec![0, 1]);
        assert_eq!(got(&ix, "/admin", &mut out), vec![0, 70]);
        assert_eq!(got(&ix, "/", &mut out), vec![0]);
    }
}
