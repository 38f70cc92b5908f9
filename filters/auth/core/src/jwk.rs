//! JSON Web Keys (RFC 7517/7518/8037): the keys an issuer signs with, as a
//! JWKS document serves them (Keycloak's `/protocol/openid-connect/certs`)
//! or as configured inline.
//!
//! Keys that cannot verify signatures here are skipped with a note rather
//! than failing the set: encryption keys (`use: enc`, Keycloak publishes
//! one), unsupported curves or types. Keys that claim to be signature keys
//! but are broken (RSA under 2048 bits, a point not on the curve) are
//! skipped too, and said so.

use crate::jwt::{Alg, B64};
use crate::rsa::RsaPublicKey;
use base64::Engine as _;
use serde::Deserialize;

/// Most keys taken from one set.
pub const MAX_KEYS: usize = 64;

/// Verification material.
#[derive(Clone)]
pub enum Material {
    Rsa(RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    /// A shared secret (HS256; development only, never from a remote set).
    Hmac(Vec<u8>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Material::Rsa(k) => write!(f, "{k:?}"),
            Material::P256(_) => f.write_str("P-256"),
            Material::Ed25519(_) => f.write_str("Ed25519"),
            Material::Hmac(_) => f.write_str("HMAC secret"),
        }
    }
}

/// A usable signature key.
#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's `alg`, when it names one: then only that algorithm.
    pub alg: Option<Alg>,
    pub material: Material,
}

impl Jwk {
    /// Whether this key may verify a token signed with `alg`: the key type
    /// must be the algorithm's (no HS256 with an RSA key's bytes: the
    /// algorithm-confusion attack), and the key's own `alg` must agree.
    pub fn fits(&self, alg: Alg) -> bool {
        let kind = matches!(
            (alg, &self.material),
            (
                Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512,
                Material::Rsa(_)
            ) | (Alg::ES256, Material::P256(_))
                | (Alg::EdDSA, Material::Ed25519(_))
                | (Alg::HS256, Material::Hmac(_))
        );
        kind && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    k: Option<String>,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// A parsed key set, with notes on the keys skipped.
#[derive(Debug, Clone, Default)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
    pub skipped: Vec<String>,
}

fn b64(field: &str, v: &Option<String>) -> Result<Vec<u8>, String> {
    let s = v.as_deref().ok_or_else(|| format!("no {field}"))?;
    B64.decode(s)
        .map_err(|_| format!("{field} is not base64url"))
}

fn parse_key(raw: RawJwk, allow_symmetric: bool) -> Result<Jwk, String> {
    if let Some(u) = raw.use_.as_deref() {
        if u != "sig" {
            return Err(format!("use {u:?}"));
        }
    }
    if let Some(ops) = &raw.key_ops {
        if !ops.iter().any(|o| o == "verify") {
            return Err("key_ops without verify".into());
        }
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(a) => Some(Alg::parse(a).map_err(|_| format!("alg {a:?} not supported"))?),
    };
    let material = match raw.kty.as_deref() {
        Some("RSA") => {
            let n = b64("n", &raw.n)?;
            let e = b64("e", &raw.e)?;
            Material::Rsa(RsaPublicKey::new(&n, &e).map_err(|e| e.to_string())?)
        }
        Some("EC") => match raw.crv.as_deref() {
            Some("P-256") => {
                let x = b64("x", &raw.x)?;
                let y = b64("y", &raw.y)?;
                if x.len() != 32 || y.len() != 32 {
                    return Err("P-256 coordinates must be 32 bytes".into());
                }
                let mut sec1 = Vec::with_capacity(65);
                sec1.push(0x04);
                sec1.extend_from_slice(&x);
                sec1.extend_from_slice(&y);
                Material::P256(
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                        .map_err(|_| "not a P-256 point".to_string())?,
                )
            }
            c => return Err(format!("curve {c:?} not supported")),
        },
        Some("OKP") => match raw.crv.as_deref() {
            Some("Ed25519") => {
                let x: [u8; 32] = b64("x", &raw.x)?
                    .try_into()
                    .map_err(|_| "Ed25519 key must be 32 bytes".to_string())?;
                Material::Ed25519(
                    ed25519_dalek::VerifyingKey::from_bytes(&x)
                        .map_err(|_| "not an Ed25519 point".to_string())?,
                )
            }
            c => return Err(format!("curve {c:?} not supported")),
        },
        Some("oct") if allow_symmetric => {
            let k = b64("k", &raw.k)?;
            if k.len() < 32 {
                return Err("HS256 secret shorter than 32 bytes".into());
            }
            Material::Hmac(k)
        }
        Some("oct") => return Err("symmetric keys only inline".into()),
        k => return Err(format!("kty {k:?} not supported")),
    };
    let jwk = Jwk {
        kid: raw.kid,
        alg,
        material,
    };
    if let Some(a) = alg {
        if !jwk.fits(a) {
            return Err(format!("alg {a} does not fit the key type"));
        }
    }
    Ok(jwk)
}

impl JwkSet {
    /// Parses `{"keys": [...]}`. Fails only if the document is not a key
    /// set; unusable keys are skipped with a note naming them.
    pub fn parse(json: &[u8], allow_symmetric: bool) -> Result<JwkSet, String> {
        let raw: RawSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut set = JwkSet::default();
        for (i, v) in raw.keys.into_iter().enumerate() {
            if set.keys.len() >= MAX_KEYS {
                set.skipped
                    .push(format!("keys[{i}] and after: more than {MAX_KEYS} keys"));
                break;
            }
            let name = v
                .get("kid")
                .and_then(|k| k.as_str())
                .map_or(format!("keys[{i}]"), |k| format!("keys[{i}] (kid {k:?})"));
            match serde_json::from_value::<RawJwk>(v) {
                Ok(raw) => match parse_key(raw, allow_symmetric) {
                    Ok(k) => set.keys.push(k),
                    Err(why) => set.skipped.push(format!("{name}: {why}")),
                },
                Err(e) => set.skipped.push(format!("{name}: {e}")),
            }
        }
        Ok(set)
    }

    /// The keys to try for a token: the one(s) with its `kid` if it has one,
    /// else every key that fits the algorithm.
    pub fn candidates<'s>(
        &'s self,
        kid: Option<&'s str>,
        alg: Alg,
    ) -> impl Iterator<Item = &'s Jwk> {
        self.keys
            .iter()
            .filter(move |k| k.fits(alg) && kid.is_none_or(|id| k.kid.as_deref() == Some(id)))
    }

    /// Whether any key has this `kid` (to tell a rotation from a forgery).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}
