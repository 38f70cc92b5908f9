//! A compact JWS from outside: parsed, then verified against a fixed key
//! set (RSA, P-256, an HMAC secret). Refused with a reason or verified;
//! never a panic. Invariants: what the signature covers is the token's
//! first two segments, as received; a token that verifies still verifies
//! after a round trip through its own segments.
#![no_main]

use auth_core::jwk::JwkSet;
use auth_core::jwt::Token;
use auth_core::verify::verify_token;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const JWKS: &str = r#"{"keys": [
  {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "e": "AQAB", "n": "1sUbxVNSFDjG04SeWWRoRcsUr5uqcoCHmTVL7s-aGPxmQ1dpGwxrrosdHGyuuvRev3KeN6kcL57CVTXpRVSA8xOO80uBzHrtU8h0T82TXLhVcCuaGLj4kwVwlrIMVUL1YCAJFz23gBBqeO2A6LcpzrBS-ippNJXV5H9jFdkNhgij0eiCoifHOLdfD-aeUQEN35X7VNkpSTqX8Ik3vRIQ8d_uOSWkFM8T7mLZ7pp1zz6cEzEMREEg-H12GvpczkmoM0iENAdFeAoKRMRkUbVWAQJwXNjSJyBK1VDM0ejf2hdgajjmId6zTrxmVO2-WsSSIRhRyS0tHqE_aDpk8HLI_w"},
  {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": "OjPEcwEuizPf_lubSsOmhYr5NaHS6rcCyLayZmrrv-w", "y": "AkzbzsL9X1KD3BxOyxq8dd9BsqRpxVcuA2ILPuKIpsg"},
  {"kty": "oct", "kid": "hs-1", "alg": "HS256", "k": "ZnV6ei1zZWNyZXQtZnV6ei1zZWNyZXQtZnV6ei1zZWM"}
]}"#;

fn keys() -> &'static JwkSet {
    static K: OnceLock<JwkSet> = OnceLock::new();
    K.get_or_init(|| JwkSet::parse(JWKS.as_bytes(), true).expect("the fixed key set"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let t = match Token::parse(s, 8192) {
        Ok(t) => t,
        Err(reason) => {
            assert!(!reason.to_string().is_empty());
            return;
        }
    };
    let mut segments = s.split('.');
    let (h, p) = (segments.next().unwrap_or(""), segments.next().unwrap_or(""));
    assert_eq!(t.signing_input.len(), h.len() + 1 + p.len());
    assert!(s.starts_with(t.signing_input));
    assert_eq!(t.payload_b64, p);
    if verify_token(&t, keys(), &[]).is_ok() {
        let again = Token::parse(s, 8192).expect("parsed once");
        assert!(verify_token(&again, keys(), &[]).is_ok());
    }
});
