//! The proof of the identity headers on `/ws`, `/publish/` and `/admin/`
//! (`--identity-proof`, issue 26).
//!
//! The `x-auth-*` headers are what the gateway's auth filter set after it
//! verified a token; a workload that reaches the sidecar without passing
//! the filters can set them too. With `token` (the default) the sidecar
//! believes them only together with the bearer token they came from (the
//! auth filter forwards it on these routes: `requires.forward_token`):
//! it verifies that token with its own verifier (`--auth-config`, the
//! auth filter's configuration, the same code) and requires every identity
//! header it was given to be the one the token yields. A token without
//! identity headers stands for them (a client straight to the sidecar with
//! its token); no token and no headers is an anonymous connection, which
//! may authenticate in-band (`auth`). With `none` the headers are trusted
//! as they come.

use crate::server::App;
use filter_common::identity::IdentityHeaders;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

/// What proves the identity headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IdentityProof {
    /// The bearer token they came from, verified and compared.
    #[default]
    Token,
    /// Nothing: the headers are trusted as they come.
    None,
}

/// Why a request's identity is refused: a 401 with this code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `identity_unproven`, `identity_mismatch` or `invalid_token`.
    pub error: &'static str,
    pub message: String,
    /// The metric's `result`.
    pub result: &'static str,
}

/// The identity header names, in the order they are compared.
fn names(h: &IdentityHeaders) -> [&str; 6] {
    [
        &h.subject, &h.issuer, &h.tenant, &h.roles, &h.claims, &h.expires,
    ]
}

/// Whether `h` carries any identity header.
pub fn claims_identity(h: &HeaderMap, names_of: &IdentityHeaders) -> bool {
    names(names_of)
        .iter()
        .any(|n| !n.is_empty() && h.contains_key(*n))
}

/// Checks the identity of a request to `endpoint` (`ws`, `publish`,
/// `admin`): `Ok`
/// with the headers to take it from (`None`: as they are, nothing to
/// prove or proof off), or why not. Counted in
/// `sidecar_identity_proofs_total{endpoint,result}`.
pub async fn check(
    app: &App,
    endpoint: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<HeaderMap>, Refused> {
    let r = prove(app, headers, query).await;
    if let Some(v) = &app.ctx.verifier {
        let result = match &r {
            Ok(Some(_)) => "verified",
            Ok(None) if app.cfg.identity_proof == IdentityProof::None => "trusted",
            Ok(None) => "anonymous",
            Err(e) => e.result,
        };
        v.metrics.proof(endpoint, result);
    }
    r
}

async fn prove(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<HeaderMap>, Refused> {
    if app.cfg.identity_proof == IdentityProof::None {
        return Ok(None);
    }
    let ids = &app.cfg.identity;
    let claimed = claims_identity(headers, ids);
    let Some(verifier) = app.ctx.verifier.as_ref() else {
        return if claimed {
            Err(Refused {
                error: "identity_unproven",
                message: "identity headers cannot be proven here: the sidecar has no \
                          --auth-config to verify tokens with"
                    .into(),
                result: "no_verifier",
            })
        } else {
            Ok(None)
        };
    };
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let found =
        auth_core::source::find(&verifier.settings().sources, header, query).map_err(|r| {
            Refused {
                error: "invalid_token",
                message: r.to_string(),
                result: r.code(),
            }
        })?;
    let Some(found) = found else {
        return if claimed {
            Err(Refused {
                error: "identity_unproven",
                message: "identity headers without the token they came from".into(),
                result: "missing",
            })
        } else {
            Ok(None)
        };
    };
    let v = verifier.verify(&found.token).await.map_err(|r| Refused {
        error: "invalid_token",
        message: r.to_string(),
        result: r.code(),
    })?;
    let yields = |n: &str| {
        v.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, x)| x.as_str())
    };
    if claimed {
        for n in names(ids).into_iter().filter(|n| !n.is_empty()) {
            let given: Vec<&[u8]> = headers
                .get_all(n)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            let want = yields(n).map(str::as_bytes);
            let same = match (given.as_slice(), want) {
                ([], None) => true,
                ([g], Some(w)) => *g == w,
                _ => false,
            };
            if !same {
                return Err(Refused {
                    error: "identity_mismatch",
                    message: format!("{n} is not what the token says"),
                    result: "mismatch",
                });
            }
        }
    }
    // The identity from the token: the verified values, whatever came.
    let mut out = headers.clone();
    for n in names(ids).into_iter().filter(|n| !n.is_empty()) {
        out.remove(n);
        if let (Some(value), Ok(name)) = (yields(n), HeaderName::from_bytes(n.as_bytes())) {
            if let Ok(value) = HeaderValue::from_str(value) {
                out.insert(name, value);
            }
        }
    }
    Ok(Some(out))
}
