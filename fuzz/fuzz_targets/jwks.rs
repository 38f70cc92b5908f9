//! JWKS documents and OIDC discovery documents from an identity provider:
//! a key set or a reason, never a panic. Invariant: a set that parses
//! parses again to the same kids.
#![no_main]

use auth_core::jwk::JwkSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for symmetric in [false, true] {
        match JwkSet::parse(data, symmetric) {
            Ok(set) => {
                let again = JwkSet::parse(data, symmetric).expect("parsed once");
                assert_eq!(format!("{set:?}"), format!("{again:?}"));
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
    let _ = auth_core::config::discovered_jwks_uri(data);
});
