//! The dev identity provider (127.0.0.1:8090), Keycloak-shaped: an RSA key
//! generated at start, OIDC discovery and the JWKS under
//! `/realms/254carbon`, and a token endpoint for development
//! (`GET /dev/token?sub=&tenant=&roles=&markets=&ttl=`, what
//! `scripts/token.sh` calls). Never run it anywhere but a laptop.

use crate::web::{json, query_param, Body};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::{json as j, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub const REALM_PATH: &str = "/realms/254carbon";
pub const AUDIENCE: &str = "254carbon-api";

pub struct Idp {
    key: rsa::pkcs1v15::SigningKey<sha2::Sha256>,
    jwk: Value,
    kid: String,
    /// `http://<addr>` as clients reach it.
    base: String,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// What a token says.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub sub: String,
    pub tenant: Option<String>,
    pub roles: Vec<String>,
    pub markets: Vec<String>,
    pub ttl_s: u64,
}

impl Default for TokenRequest {
    fn default() -> Self {
        TokenRequest {
            sub: "alice".into(),
            tenant: Some("acme".into()),
            roles: vec!["trader".into()],
            markets: vec!["EU-ETS".into(), "CAISO".into()],
            ttl_s: 3600,
        }
    }
}

impl Idp {
    /// A fresh 2048-bit key; `base` is `http://127.0.0.1:8090`.
    pub fn new(base: &str) -> Result<Idp, String> {
        let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).map_err(|e| e.to_string())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let kid = format!("dev-{now:x}");
        let jwk = j!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                      "n": b64(&key.n().to_be_bytes()), "e": b64(&key.e().to_be_bytes())});
        Ok(Idp {
            key: rsa::pkcs1v15::SigningKey::new(key),
            jwk,
            kid,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    pub fn issuer(&self) -> String {
        format!("{}{REALM_PATH}", self.base)
    }

    /// A signed RS256 access token.
    pub fn token(&self, r: &TokenRequest) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut claims = j!({
            "iss": self.issuer(), "aud": AUDIENCE, "sub": r.sub, "typ": "Bearer",
            "azp": "dev-cli", "iat": now, "nbf": now, "exp": now + r.ttl_s,
            "jti": format!("{:x}", rand::random::<u64>()),
            "realm_access": {"roles": r.roles},
            "entitlements": {"markets": r.markets},
        });
        if let Some(t) = &r.tenant {
            claims["tenant"] = j!(t);
        }
        let header = j!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(input.as_bytes()).to_vec();
        format!("{input}.{}", b64(&sig))
    }

    pub fn handle(self: &Arc<Self>, req: &Request<Bytes>) -> Response<Body> {
        let path = req.uri().path();
        let certs = format!("{REALM_PATH}/protocol/openid-connect/certs");
        let discovery = format!("{REALM_PATH}/.well-known/openid-configuration");
        match (req.method(), path) {
            (&Method::GET, p) if p == discovery => json(
                StatusCode::OK,
                &j!({
                    "issuer": self.issuer(),
                    "jwks_uri": format!("{}{certs}", self.base),
                    "token_endpoint": format!("{}/dev/token", self.base),
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "response_types_supported": ["token"],
                    "subject_types_supported": ["public"],
                }),
            ),
            (&Method::GET, p) if p == certs => {
                let mut r = json(StatusCode::OK, &j!({"keys": [self.jwk]}));
                r.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("max-age=300"),
                );
                r
            }
            (&Method::GET | &Method::POST, "/dev/token") => {
                let q = req.uri().query();
                let list = |k: &str| -> Option<Vec<String>> {
                    query_param(q, k).map(|v| {
                        v.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                };
                let d = TokenRequest::default();
                let ttl = match query_param(q, "ttl").map(|t| t.parse::<u64>()) {
                    None => d.ttl_s,
                    Some(Ok(t)) if (1..=86_400).contains(&t) => t,
                    Some(_) => {
                        return json(
                            StatusCode::BAD_REQUEST,
                            &j!({"error": "invalid_request", "message": "ttl: 1 to 86400 seconds"}),
                        )
                    }
                };
                let t = TokenRequest {
                    sub: query_param(q, "sub").unwrap_or(d.sub),
                    tenant: match query_param(q, "tenant") {
                        Some(t) if t.is_empty() => None,
                        Some(t) => Some(t),
                        None => d.tenant,
                    },
                    roles: list("roles").unwrap_or(d.roles),
                    markets: list("markets").unwrap_or(d.markets),
                    ttl_s: ttl,
                };
                let token = self.token(&t);
                if query_param(q, "format").as_deref() == Some("raw") {
                    let mut r = Response::new(http_body_util::Full::new(Bytes::from(token + "\n")));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain"),
                    );
                    return r;
                }
                json(
                    StatusCode::OK,
                    &j!({"access_token": token, "token_type": "Bearer", "expires_in": t.ttl_s}),
                )
            }
            _ => json(StatusCode::NOT_FOUND, &j!({"error": "not_found"})),
        }
    }
}
