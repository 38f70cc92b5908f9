//! Compact JWS parsing: three base64url segments, a JSON header naming the
//! algorithm, a JSON object payload. Nothing is trusted until
//! [`crate::verify`] has checked the signature.

use crate::error::Reason;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

/// base64url without padding, as RFC 7515 requires (padding refused).
pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
);

/// Signature algorithms (RFC 7518 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    EdDSA,
    HS256,
}

impl Alg {
    pub fn parse(s: &str) -> Result<Alg, Reason> {
        Ok(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "EdDSA" => Alg::EdDSA,
            "HS256" => Alg::HS256,
            other => return Err(Reason::Algorithm(other.to_string())),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
            Alg::HS256 => "HS256",
        }
    }
}

impl std::fmt::Display for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

/// A parsed, not yet verified, token.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    /// The payload, a JSON object.
    pub claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    pub signing_input: &'a str,
    /// The payload segment as received (for the `x-auth-claims` header).
    pub payload_b64: &'a str,
    pub signature: Vec<u8>,
}

fn segment(what: &str, s: &str) -> Result<Vec<u8>, Reason> {
    B64.decode(s)
        .map_err(|_| Reason::Malformed(format!("{what} is not base64url")))
}

impl<'a> Token<'a> {
    /// Parses a compact JWS of at most `max_bytes`.
    pub fn parse(token: &'a str, max_bytes: usize) -> Result<Token<'a>, Reason> {
        if token.len() > max_bytes {
            return Err(Reason::TooLarge {
                len: token.len(),
                max: max_bytes,
            });
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reason::Malformed(format!(
                "{} segments, a JWS has 3",
                token.split('.').count()
            )));
        };
        if h.is_empty() || p.is_empty() || sig.is_empty() {
            return Err(Reason::Malformed("empty segment".into()));
        }
        let header: RawHeader = serde_json::from_slice(&segment("header", h)?)
            .map_err(|_| Reason::Malformed("header is not a JSON object".into()))?;
        if header.crit.is_some() {
            return Err(Reason::Malformed(
                "crit extensions are not supported".into(),
            ));
        }
        let alg = match header.alg.as_deref() {
            None => return Err(Reason::Malformed("header has no alg".into())),
            Some(a) => Alg::parse(a)?,
        };
        let claims: Map<String, Value> = serde_json::from_slice(&segment("payload", p)?)
            .map_err(|_| Reason::Malformed("payload is not a JSON object".into()))?;
        let signature = segment("signature", sig)?;
        let signing_input = token
            .get(..h.len() + 1 + p.len())
            .ok_or_else(|| Reason::Malformed("bad segments".into()))?;
        Ok(Token {
            alg,
            kid: header.kid,
            claims,
            signing_input,
            payload_b64: p,
            signature,
        })
    }

    /// The `iss` claim, if a string.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}
