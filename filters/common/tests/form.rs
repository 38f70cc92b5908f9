//! The decoder against the `percent-encoding` crate (the `url` crate's
//! decoder) on generated strings heavy in `%`, hex digits, signs and `+`.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used)]

use filter_common::form::{decode, decode_bytes, query_value};
use proptest::prelude::*;

fn tricky() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("%".to_string()),
            Just("+".to_string()),
            Just("-".to_string()),
            Just("&".to_string()),
            Just("=".to_string()),
            "[0-9a-fA-F]",
            "[g-zG-Z]",
            Just("é".to_string()),
            any::<char>().prop_map(|c| c.to_string()),
        ],
        0..24,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// `+` aside (a space in forms, which `percent-encoding` does not do),
    /// the same bytes as the `url` crate's decoder.
    #[test]
    fn same_bytes_as_percent_encoding(s in tricky()) {
        let reference: Vec<u8> =
            percent_encoding::percent_decode_str(&s.replace('+', "%20")).collect();
        prop_assert_eq!(decode_bytes(&s), reference);
    }

    /// `decode` is `decode_bytes` when that is UTF-8.
    #[test]
    fn decode_is_the_bytes_as_utf8(s in tricky()) {
        prop_assert_eq!(decode(&s), String::from_utf8(decode_bytes(&s)).ok());
    }

    /// An encoded value comes back as it was, whatever it holds.
    #[test]
    fn round_trip(v in any::<String>(), name in "p[a-z]{1,7}") {
        let enc = percent_encoding::utf8_percent_encode(&v, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        let q = format!("other=1&{name}={enc}&{name}=later");
        prop_assert_eq!(query_value(&q, &name), Some(v));
    }
}
