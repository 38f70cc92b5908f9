//! The names of the identity headers auth sets and everything behind it
//! reads (DESIGN.md's table): one type for the filters and the sidecar.

use serde::Deserialize;

/// Identity header names; each defaults to DESIGN.md's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    /// The verified `sub`. Default `x-auth-subject`.
    pub subject: String,
    /// The verified `iss`. Default `x-auth-issuer`.
    pub issuer: String,
    /// The tenant claim. Default `x-auth-tenant`.
    pub tenant: String,
    /// The roles, comma-separated. Default `x-auth-roles`.
    pub roles: String,
    /// The selected claims, base64url JSON. Default `x-auth-claims`.
    pub claims: String,
    /// The verified `exp`, whole seconds. Default `x-auth-expires`.
    pub expires: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            subject: "x-auth-subject".into(),
            issuer: "x-auth-issuer".into(),
            tenant: "x-auth-tenant".into(),
            roles: "x-auth-roles".into(),
            claims: "x-auth-claims".into(),
            expires: "x-auth-expires".into(),
        }
    }
}

impl IdentityHeaders {
    /// Every name, in DESIGN.md's order (empty ones included).
    pub fn names(&self) -> [&str; 6] {
        [
            &self.subject,
            &self.issuer,
            &self.tenant,
            &self.roles,
            &self.claims,
            &self.expires,
        ]
    }
}
