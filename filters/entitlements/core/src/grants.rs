//! Grants: entitlements as data, (holder, resource, action), asked by the
//! policy's `grant` condition ([`crate::policy`]).
//!
//! - The **holder** is a tenant (every caller of that tenant) or a subject.
//! - The **resource** is a string such as `curves:CAISO`; its `:`-separated
//!   segments are the caller's business. A grant's resource may end in a
//!   wildcard: `*` alone matches every resource; `<prefix>:*` matches every
//!   resource that starts with `<prefix>:` and has at least one character
//!   after it (`instruments:*` matches `instruments:ICE` and
//!   `instruments:ICE:DEC26`, not `instruments` nor `instrumentsX`). A `*`
//!   anywhere else is refused. The resource asked about is always literal:
//!   a `*` in it (from a capture) is only a character.
//! - The **action** is a lower-case word (`read`, `subscribe`, `publish`);
//!   a grant's action `*` matches every action.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Longest resource or action, bytes.
pub const MAX_LEN: usize = 256;

/// Who holds a grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    Tenant(String),
    Subject(String),
}

/// One grant, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    pub holder: Holder,
    pub resource: String,
    pub action: String,
}

/// A grant refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct GrantError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> GrantError {
    GrantError {
        field,
        reason: reason.into(),
    }
}

/// Checks a holder's name: 1 to [`MAX_LEN`] bytes, no control characters.
fn check_name(field: &'static str, v: &str) -> Result<(), GrantError> {
    if v.is_empty() || v.len() > MAX_LEN || v.chars().any(char::is_control) {
        return Err(err(
            field,
            format!("must be 1 to {MAX_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Checks a grant's resource (see the module's rules for `*`).
pub fn check_resource(r: &str) -> Result<(), GrantError> {
    if r.is_empty() || r.len() > MAX_LEN || r.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err(
            "resource",
            format!("must be 1 to {MAX_LEN} bytes without spaces or control characters"),
        ));
    }
    let head = r
        .strip_suffix(":*")
        .unwrap_or(if r == "*" { "" } else { r });
    if head.contains('*') {
        return Err(err(
            "resource",
            format!("{r:?}: `*` only as the whole resource or after the last `:`"),
        ));
    }
    if head.is_empty() && r != "*" {
        return Err(err("resource", format!("{r:?}: nothing before `:*`")));
    }
    Ok(())
}

/// Checks an action: a lower-case word (`a-z`, `0-9`, `_`, `-`), or `*`.
pub fn check_action(a: &str) -> Result<(), GrantError> {
    let word = !a.is_empty()
        && a.len() <= MAX_LEN
        && a.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if word || a == "*" {
        Ok(())
    } else {
        Err(err(
            "action",
            format!("{a:?} is not a lower-case word or `*`"),
        ))
    }
}

/// Checks a holder's name (the field is `tenant` or `subject`).
pub fn check_holder(holder: &Holder) -> Result<(), GrantError> {
    match holder {
        Holder::Tenant(t) => check_name("tenant", t),
        Holder::Subject(s) => check_name("subject", s),
    }
}

impl Grant {
    pub fn new(holder: Holder, resource: &str, action: &str) -> Result<Grant, GrantError> {
        check_holder(&holder)?;
        check_resource(resource)?;
        check_action(action)?;
        Ok(Grant {
            holder,
            resource: resource.to_string(),
            action: action.to_string(),
        })
    }
}

/// Whether a grant's resource covers a (literal) resource.
pub fn resource_covers(granted: &str, resource: &str) -> bool {
    if granted == "*" {
        return true;
    }
    match granted.strip_suffix('*') {
        // `<prefix>:*`: the prefix with its colon, and something after it.
        Some(prefix) => resource.len() > prefix.len() && resource.starts_with(prefix),
        None => granted == resource,
    }
}

/// Whether a grant's action covers an action.
pub fn action_covers(granted: &str, action: &str) -> bool {
    granted == "*" || granted == action
}

/// The caller a grant condition asks about.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub tenant: Option<&'a str>,
    pub subject: Option<&'a str>,
}

/// What the policy asks of the grants in force.
pub trait Grants {
    /// Whether the caller's tenant or the caller holds a grant covering
    /// (`resource`, `action`).
    fn holds(&self, caller: Caller<'_>, resource: &str, action: &str) -> bool;
}

/// No grants: every grant condition is false.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGrants;

impl Grants for NoGrants {
    fn holds(&self, _: Caller<'_>, _: &str, _: &str) -> bool {
        false
    }
}

/// One holder's grants, indexed: exact ones by resource then action (a
/// lookup borrows, never allocates), the wildcard ones (few) scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderGrants {
    exact: HashMap<String, HashSet<String>>,
    /// (resource, action) with a wildcard in either.
    wild: Vec<(String, String)>,
}

impl HolderGrants {
    /// Whether exactly this (resource, action) is held (no wildcard
    /// reasoning: `*` is the grant `*`).
    pub fn has(&self, resource: &str, action: &str) -> bool {
        if resource.ends_with('*') || action == "*" {
            self.wild.iter().any(|(r, a)| r == resource && a == action)
        } else {
            self.exact
                .get(resource)
                .is_some_and(|actions| actions.contains(action))
        }
    }

    /// Every (resource, action) held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let exact = self
            .exact
            .iter()
            .flat_map(|(r, acts)| acts.iter().map(move |a| (r.as_str(), a.as_str())));
        exact.chain(self.wild.iter().map(|(r, a)| (r.as_str(), a.as_str())))
    }

    /// Adds a (resource, action) the caller checked
    /// ([`check_resource`], [`check_action`]); false if it was there.
    pub fn insert(&mut self, resource: &str, action: &str) -> bool {
        if resource.ends_with('*') || action == "*" {
            if self.wild.iter().any(|(r, a)| r == resource && a == action) {
                return false;
            }
            self.wild.push((resource.to_string(), action.to_string()));
            true
        } else {
            self.exact
                .entry(resource.to_string())
                .or_default()
                .insert(action.to_string())
        }
    }

    /// Removes a (resource, action); false if it was not there.
    pub fn remove(&mut self, resource: &str, action: &str) -> bool {
        let before = self.wild.len();
        self.wild.retain(|(r, a)| !(r == resource && a == action));
        if self.wild.len() != before {
            return true;
        }
        let Some(actions) = self.exact.get_mut(resource) else {
            return false;
        };
        let removed = actions.remove(action);
        if actions.is_empty() {
            self.exact.remove(resource);
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.exact.values().map(HashSet::len).sum::<usize>() + self.wild.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wild.is_empty()
    }

    /// Whether these grants cover (`resource`, `action`).
    pub fn covers(&self, resource: &str, action: &str) -> bool {
        self.exact
            .get(resource)
            .is_some_and(|actions| actions.contains(action))
            || self
                .wild
                .iter()
                .any(|(r, a)| resource_covers(r, resource) && action_covers(a, action))
    }
}

/// Grants in memory, by holder (tenants and subjects apart, so a lookup
/// borrows the caller's names). Each holder's grants sit behind an `Arc`
/// and are copied on write, so a clone costs a pointer per holder: a
/// reader keeps a snapshot while a writer changes one holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantSet {
    tenants: HashMap<Arc<str>, Arc<HolderGrants>>,
    subjects: HashMap<Arc<str>, Arc<HolderGrants>>,
    len: usize,
}

type Side = HashMap<Arc<str>, Arc<HolderGrants>>;

impl GrantSet {
    pub fn new() -> GrantSet {
        GrantSet::default()
    }

    fn side<'a>(&'a mut self, h: &'a Holder) -> (&'a mut Side, &'a str) {
        match h {
            Holder::Tenant(t) => (&mut self.tenants, t),
            Holder::Subject(s) => (&mut self.subjects, s),
        }
    }

    /// Adds a grant; false if it was there (idempotent).
    pub fn insert(&mut self, g: &Grant) -> bool {
        let (map, name) = self.side(&g.holder);
        let added = match map.get_mut(name) {
            Some(h) if h.has(&g.resource, &g.action) => false,
            Some(h) => Arc::make_mut(h).insert(&g.resource, &g.action),
            None => {
                let mut h = HolderGrants::default();
                h.insert(&g.resource, &g.action);
                map.insert(Arc::from(name), Arc::new(h));
                true
            }
        };
        self.len += usize::from(added);
        added
    }

    /// Removes a grant; false if it was not there (idempotent).
    pub fn remove(&mut self, g: &Grant) -> bool {
        let (map, name) = self.side(&g.holder);
        let Some(h) = map.get_mut(name) else {
            return false;
        };
        if !h.has(&g.resource, &g.action) {
            return false;
        }
        let h = Arc::make_mut(h);
        h.remove(&g.resource, &g.action);
        if h.is_empty() {
            map.remove(name);
        }
        self.len -= 1;
        true
    }

    /// Puts one holder's grants in place of what it held (none: it holds
    /// nothing). The grants must be this holder's.
    pub fn replace_holder(&mut self, holder: &Holder, grants: HolderGrants) {
        let (map, name) = self.side(holder);
        let old = if grants.is_empty() {
            map.remove(name)
        } else {
            map.insert(Arc::from(name), Arc::new(grants.clone()))
        };
        self.len = self.len - old.map_or(0, |o| o.len()) + grants.len();
    }

    /// Every holder with its grants, tenants first, in no particular order.
    pub fn holders(&self) -> impl Iterator<Item = (Holder, &HolderGrants)> {
        let t = self
            .tenants
            .iter()
            .map(|(n, g)| (Holder::Tenant(n.to_string()), &**g));
        let s = self
            .subjects
            .iter()
            .map(|(n, g)| (Holder::Subject(n.to_string()), &**g));
        t.chain(s)
    }

    /// Grants in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One holder's grants.
    pub fn holder(&self, h: &Holder) -> Option<&HolderGrants> {
        match h {
            Holder::Tenant(t) => self.tenants.get(t.as_str()).map(|g| &**g),
            Holder::Subject(s) => self.subjects.get(s.as_str()).map(|g| &**g),
        }
    }
}

impl FromIterator<Grant> for GrantSet {
    fn from_iter<I: IntoIterator<Item = Grant>>(iter: I) -> GrantSet {
        let mut s = GrantSet::new();
        for g in iter {
            s.insert(&g);
        }
        s
    }
}

impl Grants for GrantSet {
    fn holds(&self, caller: Caller<'_>, resource: &str, action: &str) -> bool {
        let covers = |map: &Side, name: Option<&str>| {
            name.and_then(|n| map.get(n))
                .is_some_and(|g| g.covers(resource, action))
        };
        covers(&self.tenants, caller.tenant) || covers(&self.subjects, caller.subject)
    }
}

#[cfg(test)]
#[path = "grants/tests.rs"]
mod tests;
