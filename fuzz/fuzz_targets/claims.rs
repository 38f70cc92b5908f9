//! `x-auth-claims` (base64url JSON) as the entitlements filter reads it,
//! keeping only the claims the policy reads. Invariant: what it keeps is
//! what a full parse has under those names, and it refuses only what a
//! full parse refuses.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use entitlements_core::identity::decode_claims;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    header: &'a str,
    roots: Vec<String>,
}

fuzz_target!(|i: Input<'_>| {
    let mut roots = i.roots;
    roots.sort();
    roots.dedup();
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(i.header) else {
        return;
    };
    let kept = decode_claims(&json, &roots);
    let full: Result<serde_json::Map<String, serde_json::Value>, _> = serde_json::from_slice(&json);
    match (kept, full) {
        (Ok(kept), Ok(full)) => {
            let want: serde_json::Map<_, _> = full
                .into_iter()
                .filter(|(k, _)| roots.binary_search(k).is_ok())
                .collect();
            assert_eq!(kept, serde_json::Value::Object(want));
        }
        (Ok(kept), Err(e)) => panic!("kept {kept} of a document a full parse refuses: {e}"),
        (Err(e), Ok(_)) => panic!("refused a document a full parse takes: {e}"),
        (Err(_), Err(_)) => {}
    }
});
