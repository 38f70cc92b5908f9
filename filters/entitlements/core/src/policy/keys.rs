//! Decision cache keys: every input a policy's decision depends on,
//! length-prefixed, and nothing else.

use super::config::ChannelAction;
use super::matching::{query_param, HttpRequest};
use super::Policy;

/// The identity as it arrived (raw header values), for cache keys: a
/// cache hit needs neither the roles split nor the claims decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityKey<'a> {
    pub subject: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub roles: Option<&'a str>,
    /// The encoded payload, as received.
    pub claims: Option<&'a str>,
}

fn key_field(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

impl Policy {
    /// Writes the decision cache key of an HTTP request into `out`
    /// (cleared first): every input the policy's decision depends on,
    /// each length-prefixed so that no two different inputs share a key.
    pub fn http_key(&self, out: &mut Vec<u8>, id: &IdentityKey<'_>, r: &HttpRequest<'_>) {
        self.http_request_key(out, r);
        self.identity_key(out, id);
    }

    /// Writes the request half of [`Policy::http_key`] into `out` (cleared
    /// first): for callers that key identities separately (the filter
    /// appends the id of the decoded identity).
    pub fn http_request_key(&self, out: &mut Vec<u8>, r: &HttpRequest<'_>) {
        out.clear();
        out.push(b'H');
        key_field(out, Some(r.method));
        key_field(out, Some(r.host));
        key_field(out, Some(r.path));
        for h in &self.key_headers {
            key_field(out, r.header(h));
        }
        for q in &self.key_query {
            match r.query.map(|query| query_param(query, q)) {
                Some(Some(v)) => key_field(out, Some(&v)),
                _ => key_field(out, None),
            }
        }
    }

    /// Writes the decision cache key of a channel request into `out`.
    pub fn channel_key(
        &self,
        out: &mut Vec<u8>,
        id: &IdentityKey<'_>,
        pattern: &str,
        action: ChannelAction,
    ) {
        out.clear();
        out.push(match action {
            ChannelAction::Subscribe => b'S',
            ChannelAction::Publish => b'P',
        });
        key_field(out, Some(pattern));
        self.identity_key(out, id);
    }

    /// Appends the identity half of a cache key to `out`: the identity
    /// headers, and the claims if a condition reads them.
    pub fn identity_key(&self, out: &mut Vec<u8>, id: &IdentityKey<'_>) {
        key_field(out, id.subject);
        key_field(out, id.issuer);
        key_field(out, id.tenant);
        key_field(out, id.roles);
        if self.uses_claims {
            key_field(out, id.claims);
        }
    }
}
