//! Tokens signed with keys generated here, verified against JWKS
//! documents shaped like Keycloak's; every bad input refused with a reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use auth_core::claims::ClaimRules;
use auth_core::error::Reason;
use auth_core::jwk::JwkSet;
use auth_core::jwt::{Alg, Token};
use auth_core::verify::verify_token;
use common::*;
use serde_json::{json, Value};

fn set(keys: Vec<Value>) -> JwkSet {
    JwkSet::parse(json!({ "keys": keys }).to_string().as_bytes(), true).unwrap()
}

fn all_keys() -> JwkSet {
    set(vec![
        rsa_key(2048).jwk_any_alg("rsa-1"),
        ec_jwk("ec-1"),
        ed_jwk("ed-1"),
        hs_jwk("hs-1"),
    ])
}

fn check(token: &str, keys: &JwkSet) -> Result<(), Reason> {
    let t = Token::parse(token, 8192)?;
    verify_token(&t, keys, &[])
}

#[test]
fn every_algorithm_verifies_and_a_flipped_bit_does_not() {
    let keys = all_keys();
    for (alg, kid) in [
        ("RS256", "rsa-1"),
        ("RS384", "rsa-1"),
        ("RS512", "rsa-1"),
        ("PS256", "rsa-1"),
        ("PS384", "rsa-1"),
        ("PS512", "rsa-1"),
        ("ES256", "ec-1"),
        ("EdDSA", "ed-1"),
        ("HS256", "hs-1"),
    ] {
        let t = token(&json!({"alg": alg, "kid": kid, "typ": "JWT"}), &claims());
        assert_eq!(check(&t, &keys), Ok(()), "{alg}");
        // Without kid: every key that fits the algorithm is tried.
        let t2 = token(&json!({"alg": alg}), &claims());
        assert_eq!(check(&t2, &keys), Ok(()), "{alg} without kid");
        // A modified payload (same signature) fails.
        let parts: Vec<&str> = t.split('.').collect();
        let mut other = claims();
        other["sub"] = json!("mallory");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(other.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            check(&forged, &keys),
            Err(Reason::BadSignature),
            "{alg} forged"
        );
    }
}

#[test]
fn alg_none_and_unknown_algorithms_are_refused() {
    let keys = all_keys();
    let none = token(&json!({"alg": "none"}), &claims());
    assert_eq!(check(&none, &keys), Err(Reason::Algorithm("none".into())));
    let hs512 = format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"HS512"}"#),
        b64(claims().to_string().as_bytes())
    );
    assert_eq!(check(&hs512, &keys), Err(Reason::Algorithm("HS512".into())));
    // An allow-list narrows further.
    let hs = token(&json!({"alg": "HS256"}), &claims());
    let t = Token::parse(&hs, 8192).unwrap();
    assert_eq!(
        verify_token(&t, &keys, &[Alg::RS256]),
        Err(Reason::Algorithm("HS256".into()))
    );
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion: the attacker HMACs with the public key's bytes
    // and sets alg HS256, hoping the verifier uses the RSA key as a secret.
    use hmac::{KeyInit, Mac};
    let keys = set(vec![rsa_key(2048).jwk("rsa-1")]);
    let public = rsa_key(2048).jwk("rsa-1").to_string();
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","kid":"rsa-1"}"#),
        b64(claims().to_string().as_bytes())
    );
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(public.as_bytes()).unwrap();
    m.update(input.as_bytes());
    let forged = format!("{input}.{}", b64(&m.finalize().into_bytes()));
    assert!(matches!(
        check(&forged, &keys),
        Err(Reason::UnknownKey { .. })
    ));
    // And an RS256 key may not verify PS256 when the JWK pins RS256.
    let ps = token(&json!({"alg": "PS256", "kid": "rsa-1"}), &claims());
    assert!(matches!(check(&ps, &keys), Err(Reason::UnknownKey { .. })));
}

#[test]
fn unknown_kid_is_told_apart_from_a_bad_signature() {
    let keys = all_keys();
    let t = token(&json!({"alg": "RS256", "kid": "rotated-2"}), &claims());
    assert_eq!(
        check(&t, &keys),
        Err(Reason::UnknownKey {
            kid: Some("rotated-2".into()),
            alg: "RS256".into()
        })
    );
    assert!(keys.has_kid("rsa-1") && !keys.has_kid("rotated-2"));
}

#[test]
fn malformed_tokens_are_refused_with_a_reason() {
    let keys = all_keys();
    let good = token(&json!({"alg": "ES256"}), &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let malformed = |t: &str| match check(t, &keys) {
        Err(Reason::Malformed(why)) => why,
        other => panic!("{t:?}: {other:?}"),
    };
    assert!(malformed("").contains("empty segment") || malformed("").contains("segments"));
    assert!(malformed("garbage").contains("1 segments"));
    assert!(malformed("a.b").contains("2 segments"));
    assert!(malformed(&format!("{good}.x")).contains("4 segments"));
    assert!(malformed(&format!("{}.{}.", parts[0], parts[1])).contains("empty segment"));
    assert!(
        malformed(&format!("{}!.{}.{}", parts[0], parts[1], parts[2]))
            .contains("header is not base64url")
    );
    assert!(
        malformed(&format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]))
            .contains("header is not a JSON object")
    );
    assert!(malformed(&format!("{}.{}.{}", b64(b"{}"), parts[1], parts[2])).contains("no alg"));
    assert!(
        malformed(&format!("{}.{}.{}", parts[0], b64(b"[1,2]"), parts[2]))
            .contains("payload is not a JSON object")
    );
    assert!(malformed(&format!("{}=.{}.{}", parts[0], parts[1], parts[2])).contains("base64url"));
    assert!(malformed(&format!(
        "{}.{}.{}",
        b64(br#"{"alg":"ES256","crit":["exp"]}"#),
        parts[1],
        parts[2]
    ))
    .contains("crit"));
    assert!(matches!(
        Token::parse(&"a".repeat(10_000), 8192),
        Err(Reason::TooLarge {
            len: 10_000,
            max: 8192
        })
    ));
    // A signature of the wrong length for the algorithm just fails.
    for (alg, kid) in [
        ("RS256", "rsa-1"),
        ("ES256", "ec-1"),
        ("EdDSA", "ed-1"),
        ("HS256", "hs-1"),
    ] {
        let t = token(&json!({"alg": alg, "kid": kid}), &claims());
        let input = t.rsplit_once('.').unwrap().0;
        assert_eq!(
            check(&format!("{input}.{}", b64(b"short")), &keys),
            Err(Reason::BadSignature),
            "{alg}"
        );
    }
}

#[test]
fn rsa_signatures_not_below_the_modulus_are_refused() {
    use rsa::traits::PublicKeyParts;
    let keys = set(vec![rsa_key(2048).jwk("rsa-1")]);
    let t = token(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims());
    let input = t.rsplit_once('.').unwrap().0;
    let n = rsa_key(2048).key.n().to_be_bytes();
    assert_eq!(
        check(&format!("{input}.{}", b64(&n)), &keys),
        Err(Reason::BadSignature)
    );
    assert_eq!(
        check(&format!("{input}.{}", b64(&[0xff; 256])), &keys),
        Err(Reason::BadSignature)
    );
}

#[test]
fn keycloak_jwks_keeps_signature_keys_and_says_why_others_are_skipped() {
    let small = rsa_key(1024).jwk("small");
    let mut enc = rsa_key(2048).jwk("enc-1");
    enc["use"] = json!("enc");
    enc["alg"] = json!("RSA-OAEP");
    let mut x5c = rsa_key(2048).jwk("sig-1");
    x5c["x5c"] = json!(["MIIC..."]);
    x5c["x5t"] = json!("abc");
    let doc = json!({"keys": [
        x5c, enc, small,
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "kid": "bad-point", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
        {"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)},
        {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
        "not an object"
    ]});
    let s = JwkSet::parse(doc.to_string().as_bytes(), false).unwrap();
    assert_eq!(s.keys.len(), 1, "{:?}", s.skipped);
    assert_eq!(s.keys[0].kid.as_deref(), Some("sig-1"));
    let notes = s.skipped.join("\n");
    for want in [
        "kid \"enc-1\"): use \"enc\"",
        "kid \"small\"): modulus is 1024 bits, fewer than 2048",
        "kid \"p384\"): curve Some(\"P-384\") not supported",
        "kid \"bad-point\"): not a P-256 point",
        "kid \"hs\"): symmetric keys only inline",
        "kid \"no-n\"): no n",
        "keys[7]",
    ] {
        assert!(notes.contains(want), "{want} not in\n{notes}");
    }
    assert!(JwkSet::parse(b"{\"keys\": 5}", false).is_err());
    assert!(JwkSet::parse(b"<html>", false).is_err());
    let many: Vec<Value> = (0..100).map(|i| ec_jwk(&format!("k{i}"))).collect();
    let s = JwkSet::parse(json!({"keys": many}).to_string().as_bytes(), false).unwrap();
    assert_eq!(s.keys.len(), auth_core::jwk::MAX_KEYS);
}

fn rules() -> ClaimRules {
    ClaimRules {
        issuer: ISSUER.into(),
        audiences: vec!["pricing-api".into()],
        clock_skew: 60,
        require_exp: true,
        max_lifetime: None,
        required: vec![],
    }
}

fn claims_check(r: &ClaimRules, c: Value, now: u64) -> Result<(), Reason> {
    r.check(c.as_object().unwrap(), now)
}

#[test]
fn claim_rules_check_issuer_audience_and_time() {
    let r = rules();
    assert_eq!(claims_check(&r, claims(), NOW), Ok(()));
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        c
    };
    assert_eq!(
        claims_check(&r, with("iss", json!("https://evil")), NOW),
        Err(Reason::UnknownIssuer("https://evil".into()))
    );
    assert_eq!(
        claims_check(&r, with("aud", json!("account")), NOW),
        Err(Reason::Audience)
    );
    assert_eq!(
        claims_check(&r, with("aud", json!("pricing-api")), NOW),
        Ok(())
    );
    // exp within the skew passes, beyond it fails.
    assert_eq!(claims_check(&r, claims(), NOW + 300 + 59), Ok(()));
    assert_eq!(
        claims_check(&r, claims(), NOW + 300 + 60),
        Err(Reason::Expired)
    );
    assert_eq!(
        claims_check(&r, with("nbf", json!(NOW + 61)), NOW),
        Err(Reason::NotYetValid)
    );
    assert_eq!(claims_check(&r, with("nbf", json!(NOW + 59)), NOW), Ok(()));
    assert!(matches!(
        claims_check(&r, with("exp", json!("1790000300")), NOW),
        Err(Reason::Malformed(_))
    ));
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(claims_check(&r, no_exp.clone(), NOW), Err(Reason::NoExpiry));
    assert_eq!(
        claims_check(
            &ClaimRules {
                require_exp: false,
                ..rules()
            },
            no_exp,
            NOW
        ),
        Ok(())
    );
    // Fractional NumericDates are fine.
    assert_eq!(
        claims_check(&r, with("exp", json!(NOW as f64 + 0.5)), NOW),
        Ok(())
    );
}

#[test]
fn lifetime_and_required_claims() {
    let r = ClaimRules {
        max_lifetime: Some(600),
        ..rules()
    };
    assert_eq!(claims_check(&r, claims(), NOW), Ok(()));
    let mut long = claims();
    long["exp"] = json!(NOW + 86_400);
    assert!(matches!(
        claims_check(&r, long, NOW),
        Err(Reason::Lifetime(_))
    ));
    let mut no_iat = claims();
    no_iat.as_object_mut().unwrap().remove("iat");
    assert!(matches!(
        claims_check(&r, no_iat, NOW),
        Err(Reason::Lifetime(_))
    ));
    let r = ClaimRules {
        required: vec![
            ("typ".into(), vec!["Bearer".into()]),
            ("tenant".into(), vec![]),
            ("azp".into(), vec!["web".into(), "mobile".into()]),
        ],
        ..rules()
    };
    assert_eq!(claims_check(&r, claims(), NOW), Ok(()));
    let mut c = claims();
    c["typ"] = json!("Refresh");
    assert_eq!(claims_check(&r, c, NOW), Err(Reason::Claim("typ".into())));
    let mut c = claims();
    c.as_object_mut().unwrap().remove("tenant");
    assert_eq!(
        claims_check(&r, c, NOW),
        Err(Reason::Claim("tenant".into()))
    );
    assert_eq!(
        rules().expires_at(claims().as_object().unwrap()),
        Some(NOW + 300 + 60)
    );
}

#[test]
fn rsa_keys_of_other_sizes_verify() {
    // Sizes that are not a multiple of the 32-bit limb, and a 3072-bit key.
    for bits in [2090, 3072] {
        let signer = Rsa {
            key: rsa::PrivateKey::new(&mut rand::rng(), bits).unwrap(),
        };
        let keys = set(vec![signer.jwk_any_alg("k")]);
        for alg in ["RS256", "PS384"] {
            let header = format!(r#"{{"alg":"{alg}"}}"#);
            let input = format!(
                "{}.{}",
                b64(header.as_bytes()),
                b64(claims().to_string().as_bytes())
            );
            let t = format!("{input}.{}", b64(&signer.sign(alg, input.as_bytes())));
            assert_eq!(check(&t, &keys), Ok(()), "{bits} bits {alg}");
        }
    }
}
