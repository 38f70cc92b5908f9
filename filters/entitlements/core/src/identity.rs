//! The verified identity a decision is made about (what auth put in the
//! `x-auth-*` headers), and claim paths into its verified payload.

pub use filter_common::claims::ClaimPath;
use serde_json::Value;
use std::borrow::Cow;

/// The caller, as auth verified it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// `x-auth-subject` (the token's `sub`).
    pub subject: Option<String>,
    /// `x-auth-issuer`.
    pub issuer: Option<String>,
    /// `x-auth-tenant`.
    pub tenant: Option<String>,
    /// `x-auth-roles`, split on commas.
    pub roles: Vec<String>,
    /// The verified payload (`x-auth-claims`), `Null` when absent.
    pub claims: Value,
}

impl Identity {
    /// Splits an `x-auth-roles` value: comma separated, blanks trimmed, empties dropped.
    pub fn parse_roles(header: &str) -> Vec<String> {
        header
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Parses a verified payload (a JSON object), keeping only the top-level
/// claims in `roots` (sorted) and skipping the rest without building them:
/// a policy reads a few claims of a payload that may carry many.
pub fn decode_claims(json: &[u8], roots: &[String]) -> Result<Value, String> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keep<'r>(&'r [String]);
    impl<'de> Visitor<'de> for Keep<'_> {
        type Value = serde_json::Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if self.0.binary_search_by(|r| r.as_str().cmp(&key)).is_ok() {
                    out.insert(key.into_owned(), map.next_value::<Value>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    impl<'de> DeserializeSeed<'de> for Keep<'_> {
        type Value = serde_json::Map<String, Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let map = Keep(roots)
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn decoding_keeps_only_the_claims_read() {
        let roots = vec!["entitlements".to_string(), "plan".to_string()];
        let v = decode_claims(
            br#"{"sub":"a","entitlements":{"markets":["EU-ETS"]},"big":[1,2,{"x":"y"}],"plan":"pro"}"#,
            &roots,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"entitlements": {"markets": ["EU-ETS"]}, "plan": "pro"})
        );
        // Escaped keys are compared decoded.
        assert_eq!(
            decode_claims(br#"{"pl\u0061n":"x"}"#, &roots).unwrap(),
            json!({"plan": "x"})
        );
        assert!(decode_claims(b"[1,2]", &roots).is_err());
        assert!(decode_claims(b"{\"plan\":1} trailing", &roots).is_err());
        assert!(decode_claims(b"{\"plan\":", &roots).is_err());
    }

    #[test]
    fn roles_header_is_split_on_commas() {
        assert_eq!(
            Identity::parse_roles(" trader, viewer,,admin "),
            vec!["trader", "viewer", "admin"]
        );
        assert!(Identity::parse_roles("").is_empty());
    }
}
