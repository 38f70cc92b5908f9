//! Signature verification: a token against a key set.

use crate::error::Reason;
use crate::jwk::{JwkSet, Material};
use crate::jwt::{Alg, Token};
use crate::rsa::{self, Hash};
use hmac::{KeyInit, Mac};
use p256::ecdsa::signature::Verifier;

/// Checks one signature with one key (which must fit the algorithm).
pub fn signature_ok(alg: Alg, material: &Material, input: &[u8], sig: &[u8]) -> bool {
    match (alg, material) {
        (Alg::RS256, Material::Rsa(k)) => rsa::verify_pkcs1v15(k, Hash::Sha256, input, sig),
        (Alg::RS384, Material::Rsa(k)) => rsa::verify_pkcs1v15(k, Hash::Sha384, input, sig),
        (Alg::RS512, Material::Rsa(k)) => rsa::verify_pkcs1v15(k, Hash::Sha512, input, sig),
        (Alg::PS256, Material::Rsa(k)) => rsa::verify_pss(k, Hash::Sha256, input, sig),
        (Alg::PS384, Material::Rsa(k)) => rsa::verify_pss(k, Hash::Sha384, input, sig),
        (Alg::PS512, Material::Rsa(k)) => rsa::verify_pss(k, Hash::Sha512, input, sig),
        (Alg::ES256, Material::P256(k)) => {
            p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| k.verify(input, &s).is_ok())
        }
        (Alg::EdDSA, Material::Ed25519(k)) => <[u8; 64]>::try_from(sig).is_ok_and(|s| {
            k.verify_strict(input, &ed25519_dalek::Signature::from_bytes(&s))
                .is_ok()
        }),
        (Alg::HS256, Material::Hmac(secret)) => {
            match <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret) {
                Ok(mut mac) => {
                    mac.update(input);
                    mac.verify_slice(sig).is_ok()
                }
                Err(_) => false,
            }
        }
        _ => false,
    }
}

/// Verifies a token's signature with the keys of its issuer: by `kid` when
/// the token names one, else with every key that fits the algorithm.
pub fn verify_token(token: &Token<'_>, keys: &JwkSet, allowed: &[Alg]) -> Result<(), Reason> {
    if !allowed.is_empty() && !allowed.contains(&token.alg) {
        return Err(Reason::Algorithm(token.alg.name().to_string()));
    }
    let mut tried = false;
    for k in keys.candidates(token.kid.as_deref(), token.alg) {
        tried = true;
        if signature_ok(
            token.alg,
            &k.material,
            token.signing_input.as_bytes(),
            &token.signature,
        ) {
            return Ok(());
        }
    }
    if tried {
        Err(Reason::BadSignature)
    } else {
        Err(Reason::UnknownKey {
            kid: token.kid.clone(),
            alg: token.alg.name().to_string(),
        })
    }
}
