//! Signature verification natively: this crate's RSA (Montgomery on 32-bit
//! limbs) against the `rsa` crate on the same key and signature, and the
//! other algorithms. `cargo bench -p auth-core --bench verify [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use auth_core::jwk::JwkSet;
use auth_core::jwt::Token;
use auth_core::verify::verify_token;
use benchkit::Plan;
use common::*;
use serde_json::json;
use std::hint::black_box;

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 20,
            per_sample: 200,
        },
        Plan {
            samples: 5,
            per_sample: 50,
        },
    );
    let keys = JwkSet::parse(
        json!({"keys": [rsa_key(2048).jwk_any_alg("rsa-1"), ec_jwk("ec-1"), ed_jwk("ed-1"), hs_jwk("hs-1")]})
            .to_string()
            .as_bytes(),
        true,
    )
    .unwrap();
    let tokens: Vec<(&str, String)> = ["RS256", "PS256", "ES256", "EdDSA", "HS256"]
        .iter()
        .map(|a| (*a, token(&json!({"alg": a}), &claims())))
        .collect();
    let parsed: Vec<Token<'_>> = tokens
        .iter()
        .map(|(_, t)| Token::parse(t, 8192).unwrap())
        .collect();
    for t in &parsed {
        verify_token(t, &keys, &[]).unwrap();
    }
    // The same RS256 signature through the `rsa` crate.
    let rs = &parsed[0];
    let reference = {
        use rsa::pkcs1v15::{Signature, VerifyingKey};
        let vk = VerifyingKey::<sha2::Sha256>::new(rsa_key(2048).key.to_public_key());
        let sig = Signature::try_from(rs.signature.as_slice()).unwrap();
        (vk, sig)
    };
    let mut cases: Vec<benchkit::Case<'_>> = vec![(
        "RS256, rsa crate 0.10 (reference)",
        Box::new(|| {
            use rsa::signature::Verifier;
            reference
                .0
                .verify(rs.signing_input.as_bytes(), &reference.1)
                .unwrap();
        }),
    )];
    let names = [
        "RS256 (auth-core)",
        "PS256 (auth-core)",
        "ES256 (p256)",
        "EdDSA (ed25519-dalek)",
        "HS256 (hmac)",
    ];
    for (name, t) in names.iter().zip(&parsed) {
        let keys = &keys;
        cases.push((
            name,
            Box::new(move || verify_token(black_box(t), keys, &[]).unwrap()),
        ));
    }
    let rows = benchkit::run(plan, &mut cases);
    print!(
        "{}",
        benchkit::table(
            &format!(
                "Signature verification, native ({} samples × {} calls)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    if let Some(p) = benchkit::write_json(
        env!("CARGO_MANIFEST_DIR"),
        "auth-verify-native",
        plan,
        &rows,
    ) {
        println!("wrote {p}");
    }
}
