//! The grants feed's wire and shared-data formats (issue 17): what the
//! sidecar answers at `GET /internal/v1/grants` (a [`Page`]) and how the
//! entitlements filter keeps the grants in an Envoy's shared data, one
//! copy for all worker VMs ([`crate::filter::grants`] does the fetching
//! and the reading).
//!
//! A page (the contract is in the sidecar's README, "Grants feed"):
//!
//! ```json
//! {"epoch": "pg-6f1d9a0c", "version": 42, "snapshot": false,
//!  "holders": [{"tenant": "acme", "grants": [["curves:CAISO", "read"]]},
//!              {"subject": "svc-reports", "grants": []}],
//!  "next": null}
//! ```
//!
//! Shared data under a prefix `<p>` (config `grants.shared_key`):
//! - `<p>/t/<tenant>`, `<p>/s/<subject>`: one holder's grants, an
//!   [`entry`]: the generation it belongs to, a newline, then one
//!   `<resource> <action>` line per grant (resources and actions hold no
//!   spaces). Proxy-wasm 0.2.1 cannot delete a key: a holder that holds
//!   nothing any more is an entry with no lines.
//! - `<p>.state`: the [`State`] (JSON): the version in force (epoch,
//!   version, generation) and a snapshot being loaded, with the cursor of
//!   the next page.
//! - `<p>.log`: the [`Log`] (JSON): the holders changed by the last
//!   deltas, so a worker drops only those from its caches.
//! - `<p>.next`: the fetch lease ([`filter_common::remote::Lease`]).
//!
//! A snapshot is written under a new generation while the previous one
//! stays in force: readers accept entries of the generation in force and
//! of the one loading (a holder rewritten by the load shows its newer
//! state; one not yet rewritten its older), and only once the last page
//! is in does the new generation take over, when entries of older
//! generations (holders the snapshot no longer lists) read as empty. A
//! half-loaded snapshot is never in force.

use crate::grants::{check_action, check_holder, check_resource, Holder, HolderGrants};
use serde::{Deserialize, Serialize};

/// Longest epoch and cursor accepted, bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// One page of the feed, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub epoch: String,
    pub version: u64,
    pub snapshot: bool,
    /// Holders with their complete grants, in the feed's order.
    pub holders: Vec<(Holder, Vec<(String, String)>)>,
    pub next: Option<String>,
    /// Grants on the page.
    pub grants: usize,
}

#[derive(Deserialize)]
struct PageDoc {
    epoch: String,
    version: u64,
    snapshot: bool,
    holders: Vec<HolderDoc>,
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HolderDoc {
    tenant: Option<String>,
    subject: Option<String>,
    grants: Vec<(String, String)>,
}

fn token(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_TOKEN_LEN || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{field}: must be 1 to {MAX_TOKEN_LEN} printable ASCII bytes"
        ));
    }
    Ok(())
}

/// The order of holders on the feed: tenants first, then by name.
fn order(h: &Holder) -> (u8, &[u8]) {
    match h {
        Holder::Tenant(t) => (0, t.as_bytes()),
        Holder::Subject(s) => (1, s.as_bytes()),
    }
}

/// Parses and checks a page: every holder and grant valid, holders in the
/// feed's order and each once, none with more than `max_holder_grants`
/// grants (`holder_field` names that bound in the error). `Err` says what
/// is wrong; nothing of a refused page is used.
pub fn parse_page(
    body: &[u8],
    max_holder_grants: usize,
    holder_field: &str,
) -> Result<Page, String> {
    let doc: PageDoc =
        serde_json::from_slice(body).map_err(|e| format!("not a grants page: {e}"))?;
    token("epoch", &doc.epoch)?;
    if let Some(n) = &doc.next {
        token("next", n)?;
    }
    let mut holders: Vec<(Holder, Vec<(String, String)>)> = Vec::with_capacity(doc.holders.len());
    let mut grants = 0usize;
    for (i, h) in doc.holders.into_iter().enumerate() {
        let holder = match (h.tenant, h.subject) {
            (Some(t), None) => Holder::Tenant(t),
            (None, Some(s)) => Holder::Subject(s),
            _ => return Err(format!("holders[{i}]: exactly one of tenant and subject")),
        };
        check_holder(&holder).map_err(|e| format!("holders[{i}].{e}"))?;
        if let Some((prev, _)) = holders.last() {
            if order(prev) >= order(&holder) {
                return Err(format!(
                    "holders[{i}]: out of order or repeated (tenants first, then by name)"
                ));
            }
        }
        if h.grants.len() > max_holder_grants {
            return Err(format!(
                "holders[{i}]: {} grants, more than {holder_field} {max_holder_grants}",
                h.grants.len()
            ));
        }
        for (j, (r, a)) in h.grants.iter().enumerate() {
            check_resource(r).map_err(|e| format!("holders[{i}].grants[{j}].{e}"))?;
            check_action(a).map_err(|e| format!("holders[{i}].grants[{j}].{e}"))?;
        }
        grants += h.grants.len();
        holders.push((holder, h.grants));
    }
    Ok(Page {
        epoch: doc.epoch,
        version: doc.version,
        snapshot: doc.snapshot,
        holders,
        next: doc.next,
        grants,
    })
}

/// The shared-data key suffix of a holder: `t/<tenant>` or `s/<subject>`
/// (also its key in a worker's cache and in the [`Log`]).
pub fn holder_key(h: &Holder) -> String {
    match h {
        Holder::Tenant(t) => format!("t/{t}"),
        Holder::Subject(s) => format!("s/{s}"),
    }
}

/// A holder's shared-data entry: `<generation>\n` and a line per grant.
pub fn entry<'a>(generation: u64, grants: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut v = format!("{generation}\n").into_bytes();
    for (r, a) in grants {
        v.extend_from_slice(r.as_bytes());
        v.push(b' ');
        v.extend_from_slice(a.as_bytes());
        v.push(b'\n');
    }
    v
}

/// The generation of an entry and its grants; `None` if malformed (it is
/// then read as no grants).
pub fn read_entry(v: &[u8]) -> Option<(u64, HolderGrants)> {
    let text = std::str::from_utf8(v).ok()?;
    let mut lines = text.split_terminator('\n');
    let generation = lines.next()?.parse().ok()?;
    let mut g = HolderGrants::default();
    for line in lines {
        let (r, a) = line.split_once(' ')?;
        check_resource(r).ok()?;
        check_action(a).ok()?;
        g.insert(r, a);
    }
    Some((generation, g))
}

/// The generation of an entry and the number of its grants, without
/// building them.
pub fn entry_size(v: &[u8]) -> Option<(u64, usize)> {
    let text = std::str::from_utf8(v).ok()?;
    let (head, rest) = text.split_once('\n')?;
    Some((
        head.parse().ok()?,
        rest.bytes().filter(|&b| b == b'\n').count(),
    ))
}

/// A version of the grants as one Envoy holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub epoch: String,
    pub version: u64,
    /// The generation its entries are written under.
    pub generation: u64,
    /// Grants it holds.
    pub grants: u64,
}

/// `<p>.state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The version in force (none before the first snapshot is in).
    pub current: Option<Mark>,
    /// A snapshot being loaded.
    pub loading: Option<Mark>,
    /// The next page to fetch of the answer in progress (the snapshot
    /// loading, or a paged delta of `current`).
    pub cursor: Option<String>,
}

impl State {
    pub fn parse(v: &[u8]) -> Option<State> {
        serde_json::from_slice(v).ok()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether an entry of `generation` is to be read (one of the version
    /// in force or of the snapshot loading).
    pub fn accepts(&self, generation: u64) -> bool {
        [&self.current, &self.loading]
            .into_iter()
            .flatten()
            .any(|m| m.generation == generation)
    }

    /// The generation a new snapshot is written under.
    pub fn next_generation(&self) -> u64 {
        [&self.current, &self.loading]
            .into_iter()
            .flatten()
            .map(|m| m.generation)
            .max()
            .unwrap_or(0)
            + 1
    }
}

/// `<p>.log`: every holder a delta changed after `floor`, with the
/// version that changed it, for the generation in force. Bounded: when
/// full, the oldest versions go and `floor` rises; a worker whose version
/// is below the floor empties its caches instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub generation: u64,
    pub floor: u64,
    pub changes: Vec<(u64, String)>,
}

impl Log {
    pub fn parse(v: &[u8]) -> Option<Log> {
        serde_json::from_slice(v).ok()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Adds the holders `version` changed, keeping at most `max` entries
    /// (whole versions go, oldest first). True if some went.
    pub fn push(
        &mut self,
        version: u64,
        holders: impl IntoIterator<Item = String>,
        max: usize,
    ) -> bool {
        self.changes
            .extend(holders.into_iter().map(|h| (version, h)));
        if self.changes.len() <= max {
            return false;
        }
        let cut = self.changes.len() - max;
        let floor = self.changes.get(cut - 1).map_or(self.floor, |c| c.0);
        self.changes.retain(|c| c.0 > floor);
        self.floor = self.floor.max(floor);
        true
    }

    /// The holders changed after `version`, or `None` if the log does not
    /// reach back that far (or is of another generation).
    pub fn since(&self, generation: u64, version: u64) -> Option<impl Iterator<Item = &str>> {
        (self.generation == generation && self.floor <= version).then(|| {
            self.changes
                .iter()
                .filter(move |c| c.0 > version)
                .map(|c| c.1.as_str())
        })
    }
}

#[cfg(test)]
#[path = "feed/tests.rs"]
mod tests;
