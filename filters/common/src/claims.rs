//! Dotted paths into a verified JSON payload (`realm_access.roles`), as
//! auth reads roles and tenants and entitlements reads conditions.

use serde_json::Value;
use std::borrow::Cow;

/// A dotted path into the claims, e.g. `realm_access.roles`. Arrays are
/// walked through: `orgs.id` on `{"orgs":[{"id":"a"},{"id":"b"}]}` gives
/// `a` and `b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    pub fn parse(path: &str) -> Result<ClaimPath, String> {
        if path.is_empty() {
            return Err("claim path is empty".into());
        }
        let segs: Vec<String> = path.split('.').map(str::to_string).collect();
        if segs.iter().any(String::is_empty) {
            return Err(format!("claim path {path:?} has an empty segment"));
        }
        Ok(ClaimPath(segs))
    }

    /// The top-level claim the path starts in.
    pub fn root(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }

    /// Every scalar the path reaches, as text (strings as they are,
    /// numbers and booleans printed); arrays at any level are flattened.
    pub fn values<'c>(&self, claims: &'c Value) -> Vec<Cow<'c, str>> {
        let mut here: Vec<&Value> = vec![claims];
        for seg in &self.0 {
            let mut next = Vec::new();
            for v in here {
                match v {
                    Value::Object(m) => next.extend(m.get(seg)),
                    Value::Array(a) => next.extend(a.iter().filter_map(|e| e.get(seg))),
                    _ => {}
                }
            }
            here = next;
        }
        let mut out = Vec::new();
        for v in here {
            push_scalars(v, &mut out);
        }
        out
    }
}

fn push_scalars<'c>(v: &'c Value, out: &mut Vec<Cow<'c, str>>) {
    match v {
        Value::String(s) => out.push(Cow::Borrowed(s)),
        Value::Number(n) => out.push(Cow::Owned(n.to_string())),
        Value::Bool(b) => out.push(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Array(a) => a.iter().for_each(|e| push_scalars(e, out)),
        Value::Null | Value::Object(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn claim_paths_walk_objects_and_arrays() {
        let c = json!({
            "realm_access": {"roles": ["trader", "viewer"]},
            "markets": ["EU-ETS", "CAISO"],
            "plan": "pro", "seats": 5, "active": true,
            "orgs": [{"id": "a"}, {"id": "b", "x": null}],
        });
        let v = |p: &str| ClaimPath::parse(p).unwrap().values(&c);
        assert_eq!(v("realm_access.roles"), vec!["trader", "viewer"]);
        assert_eq!(v("markets"), vec!["EU-ETS", "CAISO"]);
        assert_eq!(v("plan"), vec!["pro"]);
        assert_eq!(v("seats"), vec!["5"]);
        assert_eq!(v("active"), vec!["true"]);
        assert_eq!(v("orgs.id"), vec!["a", "b"]);
        assert!(v("orgs.x").is_empty());
        assert!(v("nope.deeper").is_empty());
        assert!(v("realm_access").is_empty(), "an object is not a value");
        assert!(ClaimPath::parse("a..b").is_err());
        assert!(ClaimPath::parse("").is_err());
    }
}
