//! One percent-decoder for query strings and form values, shared by the
//! filters, the sidecar and the dev stack, so that a rule on a query
//! parameter sees exactly what the upstream's parser sees.
//!
//! The rules are those of the WHATWG `application/x-www-form-urlencoded`
//! parser (what browsers, Go's `net/url` in its lenient paths, and Python's
//! `urllib.parse.unquote_plus` do):
//! - `+` is a space;
//! - `%` followed by **exactly two ASCII hex digits** is that byte; nothing
//!   else after `%` is an escape (no sign: `%+4` is not byte 0x04, the way
//!   `u8::from_str_radix` would read it);
//! - a `%` that does not start an escape is kept as it is (`100%` stays
//!   `100%`, `%zz` stays `%zz`): bad escapes are literal, for every caller;
//! - the bytes must be UTF-8 for a `String` ([`decode`] says `None`); the
//!   bytes themselves are [`decode_bytes`].

/// The value of an ASCII hex digit (no sign, no space: what every
/// percent-escape here is read with, paths included).
pub fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `s` decoded to bytes (see the module's rules).
pub fn decode_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let escape = match (b.get(i + 1).copied(), b.get(i + 2).copied()) {
                    (Some(h), Some(l)) => hex_digit(h).zip(hex_digit(l)),
                    _ => None,
                };
                match escape {
                    Some((h, l)) => {
                        out.push(h << 4 | l);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// `s` decoded, or `None` when the bytes are not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    String::from_utf8(decode_bytes(s)).ok()
}

/// `s` percent-encoded for a query value: everything but RFC 3986's
/// unreserved characters (`A-Z a-z 0-9 - . _ ~`) as `%XX`, so
/// [`decode`] gives `s` back.
pub fn encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let hex = |n: u8| char::from(HEX.get(usize::from(n)).copied().unwrap_or(b'0'));
            out.push('%');
            out.push(hex(b >> 4));
            out.push(hex(b & 15));
        }
    }
    out
}

/// The value of the first parameter of `query` (without the `?`) whose
/// decoded name is `name`: pairs split on `&`, the value after the first
/// `=` (none: the empty value). The first match decides, as upstream
/// parsers' "get" does: a value that is not UTF-8 is `None`, not a reason
/// to look at a later one.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k).as_deref() == Some(name)).then(|| decode(v))
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn encode_keeps_only_unreserved_and_decodes_back() {
        assert_eq!(encode("pg-6f1d.9_~"), "pg-6f1d.9_~");
        assert_eq!(encode("a b+c/%&="), "a%20b%2Bc%2F%25%26%3D");
        for s in ["", "€ x", "t:acme corp", "%+4"] {
            assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn escapes_plus_and_literals() {
        assert_eq!(decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(decode("%2B").as_deref(), Some("+"));
        assert_eq!(decode("%e2%82%AC").as_deref(), Some("€"));
        assert_eq!(decode("100%").as_deref(), Some("100%"));
        assert_eq!(decode("%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(decode("%%41").as_deref(), Some("%A"));
        assert_eq!(decode("").as_deref(), Some(""));
    }

    #[test]
    fn a_sign_is_not_a_hex_digit() {
        // u8::from_str_radix("+4", 16) is Ok(4); an upstream keeps these.
        assert_eq!(decode("%+4").as_deref(), Some("% 4"));
        assert_eq!(decode("%-4").as_deref(), Some("%-4"));
        assert_eq!(decode_bytes("%+F"), b"% F");
    }

    #[test]
    fn not_utf8_is_none_but_the_bytes_are_there() {
        assert_eq!(decode("%ff"), None);
        assert_eq!(decode_bytes("%ff%00"), vec![0xff, 0]);
    }

    #[test]
    fn query_values() {
        let q = "a=1&token=x%2Ey&b&token=second&c=%ff";
        assert_eq!(query_value(q, "token").as_deref(), Some("x.y"));
        assert_eq!(query_value(q, "b").as_deref(), Some(""));
        assert_eq!(query_value(q, "missing"), None);
        // The first match decides, even when it does not decode.
        assert_eq!(query_value("c=%ff&c=ok", "c"), None);
        // Names are decoded too.
        assert_eq!(query_value("x%5Fy=1", "x_y").as_deref(), Some("1"));
        assert_eq!(query_value("&&a=1&", "a").as_deref(), Some("1"));
        assert_eq!(query_value("a==1", "a").as_deref(), Some("=1"));
    }
}
