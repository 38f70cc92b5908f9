//! Arbitrary input never panics: random strings and mutated real tokens
//! are refused with a reason, and random JWKS documents parse or fail.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use auth_core::jwk::JwkSet;
use auth_core::jwt::Token;
use auth_core::verify::verify_token;
use common::*;
use proptest::prelude::*;
use serde_json::json;

fn keys() -> JwkSet {
    JwkSet::parse(
        json!({"keys": [rsa_key(2048).jwk_any_alg("rsa-1"), ec_jwk("ec-1"), ed_jwk("ed-1"), hs_jwk("hs-1")]})
            .to_string()
            .as_bytes(),
        true,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_strings_are_refused(s in "\\PC{0,300}") {
        let keys = keys();
        if let Ok(t) = Token::parse(&s, 8192) {
            prop_assert!(verify_token(&t, &keys, &[]).is_err());
        }
    }

    #[test]
    fn mutated_tokens_are_refused(alg in prop::sample::select(vec!["RS256", "PS256", "ES256", "EdDSA", "HS256"]),
                                  pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let keys = keys();
        let t = token(&json!({"alg": alg}), &claims());
        let mut b = t.clone().into_bytes();
        let i = pos.index(b.len());
        prop_assume!(b[i] != byte);
        b[i] = byte;
        let Ok(mutated) = String::from_utf8(b) else { return Ok(()); };
        if let Ok(parsed) = Token::parse(&mutated, 8192) {
            // Changing the token must not keep a valid signature, except in
            // base64 padding bits that decode to the same bytes.
            let same = Token::parse(&t, 8192).unwrap();
            if parsed.signing_input == same.signing_input && parsed.signature == same.signature {
                return Ok(());
            }
            prop_assert!(verify_token(&parsed, &keys, &[]).is_err(), "{} accepted", mutated);
        }
    }

    #[test]
    fn random_jwks_documents_do_not_panic(keys in prop::collection::vec(
        (prop::sample::select(vec!["RSA", "EC", "OKP", "oct", "x"]), "[A-Za-z0-9_-]{0,40}", "[A-Za-z0-9_-]{0,8}",
         prop::option::of(prop::sample::select(vec!["P-256", "Ed25519", "P-384"]))), 0..6)) {
        let doc = json!({"keys": keys.iter().map(|(kty, a, b, crv)| json!({"kty": kty, "n": a, "e": b, "x": a, "y": a, "k": a, "crv": crv})).collect::<Vec<_>>()});
        let _ = JwkSet::parse(doc.to_string().as_bytes(), true);
    }
}
