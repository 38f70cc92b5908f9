//! One token against the configuration and the key sets at hand, without
//! any host: parse, pick the provider by `iss` among those the route
//! accepts, check the signature with its keys, check the claim rules, and
//! compute the identity. When the keys are missing (not fetched yet, or a
//! `kid` the set lacks), the caller is told which provider's keys it
//! needs, and decides whether to fetch and wait.
//!
//! The auth filter and the sidecar's in-band verifier run the same steps
//! on the same configuration.

use crate::config::{Requirement, Settings};
use crate::error::Reason;
use crate::jwk::JwkSet;
use crate::jwt::Token;
use crate::verify::verify_token;
use serde_json::{Map, Value};

/// A token that passed.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Index of its provider in [`Settings::providers`].
    pub provider: usize,
    /// The provider's issuer (`iss`).
    pub issuer: String,
    /// `sub`, when it is a string.
    pub subject: Option<String>,
    /// When the token is acceptable ([`crate::claims::ClaimRules::window`]).
    pub window: (f64, f64),
    /// `exp`, whole seconds since the epoch, rounded down.
    pub expires: Option<u64>,
    /// The provider's clock skew, seconds.
    pub skew: u64,
    /// The verified payload.
    pub claims: Map<String, Value>,
    /// The identity headers ([`Settings::identity_headers`]).
    pub headers: Vec<(String, String)>,
}

/// What became of a token.
#[derive(Debug)]
pub enum Outcome {
    Verified(Box<Verified>),
    Denied(Reason),
    /// Provider `provider` has no keys yet (`kid: None`), or none for this
    /// `kid`: fetch them (if allowed) and try again.
    NeedKeys {
        provider: usize,
        kid: Option<String>,
        /// The token's `alg` (for the refusal if the keys never come).
        alg: String,
    },
}

impl Outcome {
    /// The refusal when the keys a [`Outcome::NeedKeys`] asked for are not
    /// coming: no set at all, or still no key for the `kid`.
    pub fn keys_unavailable(
        settings: &Settings,
        provider: usize,
        kid: Option<String>,
        alg: String,
    ) -> Reason {
        match kid {
            Some(kid) => Reason::UnknownKey {
                kid: Some(kid),
                alg,
            },
            None => Reason::JwksUnavailable(
                settings
                    .providers
                    .get(provider)
                    .map_or(String::new(), |p| p.rules.issuer.clone()),
            ),
        }
    }
}

/// Verifies `token` for a route requiring `req`, at `now` (seconds since
/// the epoch), with `keys(provider)` giving each provider's set in force.
pub fn authenticate<'k>(
    settings: &Settings,
    req: &Requirement,
    token: &str,
    keys: impl Fn(usize) -> Option<&'k JwkSet>,
    now: u64,
) -> Outcome {
    let t = match Token::parse(token, settings.max_token_bytes) {
        Ok(t) => t,
        Err(r) => return Outcome::Denied(r),
    };
    let iss = t.issuer().unwrap_or("");
    let p = match settings.provider_for(iss, req) {
        Ok(p) => p,
        Err(r) => return Outcome::Denied(r),
    };
    let Some(provider) = settings.providers.get(p) else {
        return Outcome::Denied(Reason::UnknownIssuer(iss.to_string()));
    };
    let Some(set) = keys(p) else {
        return Outcome::NeedKeys {
            provider: p,
            kid: None,
            alg: t.alg.name().to_string(),
        };
    };
    match verify_token(&t, set, &provider.algorithms) {
        Ok(()) => {}
        Err(Reason::UnknownKey { kid: Some(kid), .. }) if !set.has_kid(&kid) => {
            return Outcome::NeedKeys {
                provider: p,
                kid: Some(kid),
                alg: t.alg.name().to_string(),
            }
        }
        Err(r) => return Outcome::Denied(r),
    }
    if let Err(r) = provider.rules.check(&t.claims, now) {
        return Outcome::Denied(r);
    }
    let expires = t
        .claims
        .get("exp")
        .and_then(Value::as_f64)
        .map(|e| e.max(0.0).floor() as u64);
    Outcome::Verified(Box::new(Verified {
        provider: p,
        issuer: provider.rules.issuer.clone(),
        subject: t
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string),
        window: provider.rules.window(&t.claims),
        expires,
        skew: provider.rules.clock_skew,
        headers: settings.identity_headers(&t.claims, t.payload_b64),
        claims: t.claims,
    }))
}
