//! Why a token was refused: one variant per reason, with a stable code for
//! metrics (`auth.denied.<code>`) and a message for logs (and for the
//! client, if configured).

/// A refusal reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// No token where the route requires one.
    #[error("token missing")]
    Missing,
    /// Longer than the configured bound.
    #[error("token is {len} bytes, more than {max}")]
    TooLarge { len: usize, max: usize },
    /// Not three base64url segments of a JWS with JSON header and payload.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Two sources carried different tokens.
    #[error("conflicting tokens in {0} and {1}")]
    Conflicting(String, String),
    /// `alg: none`, or an algorithm this verifier does not implement.
    #[error("algorithm {0:?} not accepted")]
    Algorithm(String),
    /// No key of the issuer fits the token (`kid` unknown, or no key of the
    /// algorithm's type).
    #[error("no key for kid {kid:?} and algorithm {alg}")]
    UnknownKey { kid: Option<String>, alg: String },
    #[error("signature does not verify")]
    BadSignature,
    /// `iss` names no configured provider (or not the required one).
    #[error("issuer {0:?} not accepted")]
    UnknownIssuer(String),
    #[error("audience not accepted")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp` missing where required.
    #[error("token has no exp")]
    NoExpiry,
    /// Lifetime (`exp` − `iat`) longer than allowed, or `iat` missing when a
    /// maximum lifetime is set.
    #[error("token lifetime not accepted: {0}")]
    Lifetime(String),
    /// A required claim is missing or has a value not accepted.
    #[error("claim {0:?} missing or not accepted")]
    Claim(String),
    /// The issuer's keys could not be obtained.
    #[error("keys of issuer {0:?} unavailable")]
    JwksUnavailable(String),
}

impl Reason {
    /// Stable snake_case code, for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::TooLarge { .. } => "too_large",
            Reason::Malformed(_) => "malformed",
            Reason::Conflicting(..) => "conflicting",
            Reason::Algorithm(_) => "algorithm",
            Reason::UnknownKey { .. } => "unknown_key",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownIssuer(_) => "unknown_issuer",
            Reason::Audience => "audience",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::NoExpiry => "no_expiry",
            Reason::Lifetime(_) => "lifetime",
            Reason::Claim(_) => "claim",
            Reason::JwksUnavailable(_) => "jwks_unavailable",
        }
    }

    /// Every code, for defining metrics up front.
    pub const CODES: &'static [&'static str] = &[
        "missing",
        "too_large",
        "malformed",
        "conflicting",
        "algorithm",
        "unknown_key",
        "bad_signature",
        "unknown_issuer",
        "audience",
        "expired",
        "not_yet_valid",
        "no_expiry",
        "lifetime",
        "claim",
        "jwks_unavailable",
    ];
}
