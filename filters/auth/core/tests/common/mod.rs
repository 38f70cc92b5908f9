//! Keys generated for the tests, and tokens signed with them.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use serde_json::{json, Value};
use std::sync::OnceLock;

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub struct Rsa {
    pub key: rsa::PrivateKey,
}

pub fn rsa_key(bits: usize) -> &'static Rsa {
    static K2048: OnceLock<Rsa> = OnceLock::new();
    static K1024: OnceLock<Rsa> = OnceLock::new();
    let cell = if bits == 2048 { &K2048 } else { &K1024 };
    cell.get_or_init(|| Rsa {
        key: rsa::PrivateKey::new(&mut rand::rng(), bits).unwrap(),
    })
}

impl Rsa {
    pub fn jwk(&self, kid: &str) -> Value {
        use rsa::traits::PublicKeyParts;
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
               "n": b64(&self.key.n().to_be_bytes()), "e": b64(&self.key.e().to_be_bytes())})
    }

    pub fn jwk_any_alg(&self, kid: &str) -> Value {
        let mut j = self.jwk(kid);
        j.as_object_mut().unwrap().remove("alg");
        j
    }

    pub fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
        let k = self.key.clone();
        match alg {
            "RS256" => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k)
                .sign(input)
                .to_vec(),
            "RS384" => rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new(k)
                .sign(input)
                .to_vec(),
            "RS512" => rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new(k)
                .sign(input)
                .to_vec(),
            "PS256" => rsa::pss::SigningKey::<sha2::Sha256>::new(k)
                .sign_with_rng(&mut rand::rng(), input)
                .to_vec(),
            "PS384" => rsa::pss::SigningKey::<sha2::Sha384>::new(k)
                .sign_with_rng(&mut rand::rng(), input)
                .to_vec(),
            "PS512" => rsa::pss::SigningKey::<sha2::Sha512>::new(k)
                .sign_with_rng(&mut rand::rng(), input)
                .to_vec(),
            a => panic!("{a}"),
        }
    }
}

pub fn ec_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap()
}

pub fn ec_jwk(kid: &str) -> Value {
    let point = ec_key().verifying_key().to_sec1_bytes();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

pub fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
}

pub fn ed_jwk(kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(ed_key().verifying_key().as_bytes())})
}

pub const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-dev-only";

pub fn hs_jwk(kid: &str) -> Value {
    json!({"kty": "oct", "kid": kid, "k": b64(HS_SECRET)})
}

/// Signs `header.payload` with the named algorithm.
pub fn sign(alg: &str, input: &[u8]) -> Vec<u8> {
    match alg {
        "ES256" => {
            use p256::ecdsa::signature::Signer;
            let s: p256::ecdsa::Signature = ec_key().sign(input);
            s.to_bytes().to_vec()
        }
        "EdDSA" => {
            use ed25519_dalek::Signer;
            ed_key().sign(input).to_bytes().to_vec()
        }
        "HS256" => {
            use hmac::{KeyInit, Mac};
            let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(HS_SECRET).unwrap();
            m.update(input);
            m.finalize().into_bytes().to_vec()
        }
        rsa_alg => rsa_key(2048).sign(rsa_alg, input),
    }
}

/// A compact JWS with this header and payload, signed with `alg`'s test key.
pub fn token(header: &Value, payload: &Value) -> String {
    let alg = header["alg"].as_str().unwrap_or("none");
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let sig = if alg == "none" {
        vec![0]
    } else {
        sign(alg, input.as_bytes())
    };
    format!("{input}.{}", b64(&sig))
}

pub const ISSUER: &str = "https://idp.254carbon.test/realms/carbon";
pub const NOW: u64 = 1_790_000_000;

/// Keycloak-shaped claims, valid at [`NOW`].
pub fn claims() -> Value {
    json!({
        "exp": NOW + 300, "iat": NOW - 60, "jti": "b7c2", "iss": ISSUER,
        "aud": ["pricing-api", "account"], "sub": "4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60",
        "typ": "Bearer", "azp": "web", "tenant": "acme",
        "realm_access": {"roles": ["trader", "viewer"]},
        "entitlements": {"markets": ["EU-ETS"]}
    })
}
