//! Request paths, normalised before any rule matches them, so that a rule
//! on `/api/v1/curves/CAISO/**` cannot be walked around with encodings the
//! upstream would decode (`%2e%2e`, `%2F`, `//`, `\`, `..;`).
//!
//! Normalisation follows RFC 3986 §6.2.2 and Envoy's `normalize_path` +
//! `merge_slashes`: percent-encoded unreserved characters are decoded, hex
//! digits upper-cased, dot segments removed (never above the root), runs of
//! `/` merged. What could be read two ways is refused rather than guessed:
//! encoded slashes and backslashes (unless configured to decode them),
//! backslashes, `%00` and control characters, bad escapes, and dot segments
//! hidden behind `;` path parameters (`..;/`, which Tomcat and Jetty treat
//! as `..`).

use filter_common::form::hex_digit;
use std::fmt;

/// Default bound on the path (without the query), in bytes.
pub const DEFAULT_MAX_PATH_BYTES: usize = 8192;

/// What to do with `%2F`/`%5C` (encoded `/` and `\`) in a path; Envoy's
/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Refuse the request (default): the upstream may decode them and see
    /// a different path than the rules did.
    #[default]
    Reject,
    /// Decode them to `/` and normalise the result (what most upstreams see).
    Decode,
    /// Leave them encoded: they are then part of one segment.
    Keep,
}

/// Normalisation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathOptions {
    pub escaped_slashes: EscapedSlashes,
    /// Longest path accepted (bytes, without the query).
    pub max_bytes: usize,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            escaped_slashes: EscapedSlashes::Reject,
            max_bytes: DEFAULT_MAX_PATH_BYTES,
        }
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is not origin-form (does not start with `/`).
    #[error("path must start with '/'")]
    NotAbsolute,
    /// Longer than the configured bound.
    #[error("path is {len} bytes, more than {max}")]
    TooLong { len: usize, max: usize },
    /// `%` not followed by two hex digits.
    #[error("bad percent-encoding at byte {0}")]
    BadEscape(usize),
    /// `%2F` or `%5C` with [`EscapedSlashes::Reject`].
    #[error("encoded slash or backslash in path")]
    EscapedSlash,
    /// A raw `\`, which some upstreams treat as a separator.
    #[error("backslash in path")]
    Backslash,
    /// NUL, a control character, a non-ASCII byte, or `#`.
    #[error("forbidden byte 0x{0:02x} in path")]
    ForbiddenByte(u8),
    /// A `.`/`..` segment carrying `;` parameters.
    #[error("dot segment with path parameters in path")]
    DotSegmentParameters,
}

/// A normalised request target: the path rules match, and the raw query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    pub path: String,
    /// The query without `?`, unchanged (`None` if there was no `?`).
    pub query: Option<String>,
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.query {
            Some(q) => write!(f, "{}?{q}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn upper_hex(v: u8) -> char {
    char::from_digit(u32::from(v), 16).map_or('0', |c| c.to_ascii_uppercase())
}

/// Normalises a `:path` (with or without query).
pub fn normalize(raw: &str, opts: &PathOptions) -> Result<NormalPath, PathError> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (raw, None),
    };
    if path.len() > opts.max_bytes {
        return Err(PathError::TooLong {
            len: path.len(),
            max: opts.max_bytes,
        });
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Percent-decoding of unreserved characters (and of slashes when
    //    configured), upper-case hex for the rest; forbidden bytes refused.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).copied().and_then(hex_digit),
                    bytes.get(i + 2).copied().and_then(hex_digit),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape(i)),
                };
                let c = h * 16 + l;
                if c < 0x20 || c == 0x7f {
                    return Err(PathError::ForbiddenByte(c));
                }
                if c == b'/' || c == b'\\' {
                    match opts.escaped_slashes {
                        EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                        EscapedSlashes::Decode => decoded.push('/'),
                        EscapedSlashes::Keep => {
                            decoded.push_str(if c == b'/' { "%2F" } else { "%5C" })
                        }
                    }
                } else if unreserved(c) {
                    decoded.push(char::from(c));
                } else {
                    decoded.push('%');
                    decoded.push(upper_hex(h));
                    decoded.push(upper_hex(l));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b if !(0x21..0x7f).contains(&b) || b == b'#' => {
                return Err(PathError::ForbiddenByte(b))
            }
            b => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // 2. Merge slashes and remove dot segments (RFC 3986 §5.2.4), never
    //    climbing above the root.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        let bare = seg.split(';').next().unwrap_or(seg);
        if (bare == "." || bare == "..") && bare != seg {
            return Err(PathError::DotSegmentParameters);
        }
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Ok(NormalPath { path, query })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn n(raw: &str) -> Result<String, PathError> {
        normalize(raw, &PathOptions::default()).map(|p| p.to_string())
    }

    #[test]
    fn ordinary_paths_are_unchanged() {
        for p in [
            "/",
            "/api/v1/curves/EU-ETS",
            "/api/v1/curves/EU-ETS/",
            "/a/b?c=d&e=%2F",
            "/a%20b",
            "/a:b@c!$&'()*+,;=d",
        ] {
            assert_eq!(n(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn normalisation() {
        let cases = [
            ("/api//v1///curves", "/api/v1/curves"),
            ("/api/./v1/curves/.", "/api/v1/curves/"),
            ("/api/v1/curves/EU-ETS/../CAISO", "/api/v1/curves/CAISO"),
            ("/api/v1/../../../../etc/passwd", "/etc/passwd"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/%61pi/v1", "/api/v1"),
            ("/api/%7euser", "/api/~user"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2e/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("/api/%2e/admin", "/api/admin"),
            ("/api/a%3fb", "/api/a%3Fb"),
            ("/api/a%3Fb?x=1", "/api/a%3Fb?x=1"),
            ("/api/%252e%252e/admin", "/api/%252e%252e/admin"),
            ("/api/%25", "/api/%25"),
            (
                "/api/v1/curves/EU-ETS/..?q=/../x",
                "/api/v1/curves/?q=/../x",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn traversal_tricks_that_bypassed_other_proxies_are_refused() {
        let cases = [
            (
                "/api/v1/curves/EU-ETS%2F..%2FCAISO",
                PathError::EscapedSlash,
            ),
            (
                "/api/v1/curves/EU-ETS%2f..%2fCAISO",
                PathError::EscapedSlash,
            ),
            (
                "/api/v1/curves/EU-ETS%5C..%5CCAISO",
                PathError::EscapedSlash,
            ),
            ("/api/v1/curves/EU-ETS\\..\\CAISO", PathError::Backslash),
            ("/api/v1/curves/..;/admin", PathError::DotSegmentParameters),
            (
                "/api/v1/curves/.;x=1/admin",
                PathError::DotSegmentParameters,
            ),
            (
                "/api/v1/curves/%2e%2e;/admin",
                PathError::DotSegmentParameters,
            ),
            ("/api/v1%00/admin", PathError::ForbiddenByte(0)),
            ("/api/v1%0a/admin", PathError::ForbiddenByte(0x0a)),
            ("/api/v1/a b", PathError::ForbiddenByte(b' ')),
            ("/api/v1/a#frag", PathError::ForbiddenByte(b'#')),
            ("/api/v1/%zz", PathError::BadEscape(8)),
            ("/api/v1/%2", PathError::BadEscape(8)),
            ("api/v1", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ];
        for (raw, want) in cases {
            assert_eq!(n(raw), Err(want.clone()), "{raw}");
        }
        assert!(matches!(
            n("/a/\u{e9}"),
            Err(PathError::ForbiddenByte(0xc3))
        ));
    }

    #[test]
    fn escaped_slashes_can_be_decoded_or_kept() {
        let decode = PathOptions {
            escaped_slashes: EscapedSlashes::Decode,
            ..PathOptions::default()
        };
        let keep = PathOptions {
            escaped_slashes: EscapedSlashes::Keep,
            ..PathOptions::default()
        };
        let raw = "/api/v1/curves/EU-ETS%2F..%2FCAISO";
        assert_eq!(
            normalize(raw, &decode).unwrap().path,
            "/api/v1/curves/CAISO"
        );
        assert_eq!(
            normalize(raw, &keep).unwrap().path,
            "/api/v1/curves/EU-ETS%2F..%2FCAISO"
        );
        assert_eq!(normalize("/a%5cb", &keep).unwrap().path, "/a%5Cb");
    }

    #[test]
    fn length_is_bounded() {
        let opts = PathOptions {
            max_bytes: 16,
            ..PathOptions::default()
        };
        assert_eq!(
            normalize("/0123456789abcde", &opts).unwrap().path,
            "/0123456789abcde"
        );
        assert_eq!(
            normalize("/0123456789abcdef", &opts),
            Err(PathError::TooLong { len: 17, max: 16 })
        );
        // The query does not count.
        assert!(normalize("/a?0123456789abcdef0123", &opts).is_ok());
        let long = format!("/{}", "a/".repeat(DEFAULT_MAX_PATH_BYTES));
        assert!(matches!(n(&long), Err(PathError::TooLong { .. })));
    }

    /// Normalising twice changes nothing, and a normalised path never holds
    /// `//`, a dot segment or a decodable unreserved escape: checked over
    /// every path of up to 5 pieces from a set of tricky pieces.
    #[test]
    fn normalisation_is_idempotent_and_leaves_nothing_to_undo() {
        let pieces = [
            "a", "/", ".", "..", "%2e", "%2E%2e", "%41", "%3f", "~", ";x",
        ];
        let mut frontier = vec![String::from("/")];
        let mut checked = 0;
        for _ in 0..5 {
            let mut next = Vec::new();
            for f in &frontier {
                for p in pieces {
                    let raw = format!("{f}{p}");
                    if let Ok(once) = normalize(&raw, &PathOptions::default()) {
                        let twice = normalize(&once.path, &PathOptions::default()).unwrap();
                        assert_eq!(once, twice, "{raw}");
                        assert!(!once.path.contains("//"), "{raw} -> {}", once.path);
                        for seg in once.path.split('/') {
                            assert!(seg != "." && seg != "..", "{raw} -> {}", once.path);
                        }
                        assert!(
                            !once.path.contains("%2E") && !once.path.contains("%41"),
                            "{raw} -> {}",
                            once.path
                        );
                        checked += 1;
                    }
                    next.push(raw);
                }
            }
            frontier = next;
        }
        assert!(checked > 10_000, "{checked}");
    }
}
