//! Claim validation after the signature: issuer, audience, time window,
//! lifetime, required claims. Time is passed in (seconds since the epoch).

use crate::error::Reason;
use serde_json::{Map, Value};

/// What a provider requires of a verified payload.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    pub issuer: String,
    /// Accepted audiences; empty accepts any (or none).
    pub audiences: Vec<String>,
    /// Tolerance on `exp`, `nbf` and `iat`, seconds.
    pub clock_skew: u64,
    pub require_exp: bool,
    /// Longest accepted `exp − iat`, seconds; requires `iat`.
    pub max_lifetime: Option<u64>,
    /// Claim (top-level name) → accepted values; an empty list only
    /// requires presence. A claim holding an array passes if any element
    /// is accepted.
    pub required: Vec<(String, Vec<String>)>,
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Reason> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| Reason::Malformed(format!("{name} is not a NumericDate"))),
        Some(_) => Err(Reason::Malformed(format!("{name} is not a number"))),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl ClaimRules {
    /// Checks the claims at `now` (seconds since the epoch).
    pub fn check(&self, claims: &Map<String, Value>, now: u64) -> Result<(), Reason> {
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.issuer => {}
            Some(Value::String(iss)) => return Err(Reason::UnknownIssuer(iss.clone())),
            _ => return Err(Reason::UnknownIssuer(String::new())),
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err(Reason::Audience);
            }
        }
        let now = now as f64;
        let skew = self.clock_skew as f64;
        let exp = numeric_date(claims, "exp")?;
        let nbf = numeric_date(claims, "nbf")?;
        let iat = numeric_date(claims, "iat")?;
        match exp {
            Some(exp) if now >= exp + skew => return Err(Reason::Expired),
            None if self.require_exp => return Err(Reason::NoExpiry),
            _ => {}
        }
        if nbf.is_some_and(|nbf| now + skew < nbf) {
            return Err(Reason::NotYetValid);
        }
        if let Some(max) = self.max_lifetime {
            let (Some(exp), Some(iat)) = (exp, iat) else {
                return Err(Reason::Lifetime("max_lifetime needs exp and iat".into()));
            };
            if exp - iat > max as f64 {
                return Err(Reason::Lifetime(format!(
                    "{} s, more than {max} s",
                    exp - iat
                )));
            }
            if iat > now + skew {
                return Err(Reason::Lifetime("issued in the future".into()));
            }
        }
        for (name, accepted) in &self.required {
            let values: Vec<String> = match claims.get(name) {
                None | Some(Value::Null) => return Err(Reason::Claim(name.clone())),
                Some(Value::Array(a)) => a.iter().filter_map(scalar_text).collect(),
                Some(v) => scalar_text(v).into_iter().collect(),
            };
            if !accepted.is_empty() && !values.iter().any(|v| accepted.contains(v)) {
                return Err(Reason::Claim(name.clone()));
            }
        }
        Ok(())
    }

    /// The seconds during which verified claims stay acceptable: from
    /// `nbf − skew` to `exp + skew` (open ends where absent). With
    /// [`ClaimRules::check_window`], what a cache re-checks on a hit: the
    /// other rules do not change with time.
    pub fn window(&self, claims: &Map<String, Value>) -> (f64, f64) {
        let skew = self.clock_skew as f64;
        let date = |n| numeric_date(claims, n).ok().flatten();
        (
            date("nbf").map_or(f64::NEG_INFINITY, |nbf| nbf - skew),
            date("exp").map_or(f64::INFINITY, |exp| exp + skew),
        )
    }

    /// Whether `now` falls in a [`ClaimRules::window`].
    pub fn check_window(window: (f64, f64), now: u64) -> Result<(), Reason> {
        let now = now as f64;
        if now >= window.1 {
            Err(Reason::Expired)
        } else if now < window.0 {
            Err(Reason::NotYetValid)
        } else {
            Ok(())
        }
    }

    /// When a verified token stops being acceptable (its `exp` plus the
    /// skew), for caches; `None` if it has no `exp`.
    pub fn expires_at(&self, claims: &Map<String, Value>) -> Option<u64> {
        numeric_date(claims, "exp")
            .ok()
            .flatten()
            .map(|e| (e.max(0.0) as u64).saturating_add(self.clock_skew))
    }
}
