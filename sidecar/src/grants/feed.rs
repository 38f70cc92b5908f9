//! The grants feed's answers (`GET /internal/v1/grants`, the contract in
//! the README's "Grants feed"): the parameters read and checked, the page
//! cut from the live state, the body written. HTTP is the caller's
//! ([`crate::internal`]).
//!
//! A snapshot page walks the sorted holders from the cursor's holder on
//! (O(log n + page)); a delta's holders are the change log's entries in
//! (after, version], sorted once per (epoch, after, version) and kept for
//! the pages that follow. Later pages read the grants in force then, which
//! may be newer than the answer's version (the contract allows it: the
//! caller asks for a delta after that version once the last page is in).

use super::live::{Live, State};
use base64::Engine as _;
use entitlements_core::grants::{GrantSet, Holder};
use serde_json::Value;
use std::ops::Bound;
use std::sync::Arc;

/// Most grants a page may be asked to hold.
pub const MAX_LIMIT: usize = 100_000;
/// Grants per page when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 10_000;

/// A parameter refused, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BadParam {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> BadParam {
    BadParam {
        field,
        message: message.into(),
    }
}

/// Where a paged answer goes on: its kind, epoch and version, and the
/// last holder given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    Snapshot {
        epoch: String,
        version: u64,
        last: Holder,
    },
    Delta {
        epoch: String,
        after: u64,
        version: u64,
        last: Holder,
    },
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn holder_json(h: &Holder) -> (&'static str, &str) {
    match h {
        Holder::Tenant(t) => ("t", t),
        Holder::Subject(s) => ("s", s),
    }
}

impl Cursor {
    /// The opaque text: base64url of a JSON array.
    pub fn encode(&self) -> String {
        let v = match self {
            Cursor::Snapshot {
                epoch,
                version,
                last,
            } => {
                let (k, n) = holder_json(last);
                serde_json::json!(["s", epoch, version, k, n])
            }
            Cursor::Delta {
                epoch,
                after,
                version,
                last,
            } => {
                let (k, n) = holder_json(last);
                serde_json::json!(["d", epoch, after, version, k, n])
            }
        };
        B64.encode(v.to_string())
    }

    /// Reads a cursor [`Cursor::encode`] wrote; anything else is refused.
    pub fn decode(text: &str) -> Result<Cursor, BadParam> {
        let invalid = || bad("cursor", "not a cursor of this feed (pass `next` as it is)");
        let raw = B64.decode(text.as_bytes()).map_err(|_| invalid())?;
        let v: Vec<Value> = serde_json::from_slice(&raw).map_err(|_| invalid())?;
        let s = |i: usize| v.get(i).and_then(Value::as_str).ok_or_else(invalid);
        let n = |i: usize| v.get(i).and_then(Value::as_u64).ok_or_else(invalid);
        let holder = |k: &str, name: &str| match (k, name.is_empty()) {
            ("t", false) => Ok(Holder::Tenant(name.to_string())),
            ("s", false) => Ok(Holder::Subject(name.to_string())),
            _ => Err(invalid()),
        };
        match (s(0)?, v.len()) {
            ("s", 5) => Ok(Cursor::Snapshot {
                epoch: s(1)?.to_string(),
                version: n(2)?,
                last: holder(s(3)?, s(4)?)?,
            }),
            ("d", 6) => {
                let (after, version) = (n(2)?, n(3)?);
                if after >= version {
                    return Err(invalid());
                }
                Ok(Cursor::Delta {
                    epoch: s(1)?.to_string(),
                    after,
                    version,
                    last: holder(s(4)?, s(5)?)?,
                })
            }
            _ => Err(invalid()),
        }
    }
}

/// A feed request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRequest {
    /// What the caller has in force: (epoch, after).
    pub have: Option<(String, u64)>,
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

/// The decoded value of the first parameter named `name`; `Err` if its
/// value is not UTF-8.
fn param(query: &str, name: &'static str) -> Result<Option<String>, BadParam> {
    use filter_common::form::decode;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(k).as_deref() == Some(name) {
            return decode(v)
                .map(Some)
                .ok_or_else(|| bad(name, "not UTF-8 once percent-decoded"));
        }
    }
    Ok(None)
}

/// A whole number in decimal digits, nothing else.
fn number(field: &'static str, v: &str) -> Result<u64, BadParam> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(field, format!("{v:?} is not a whole number")));
    }
    v.parse()
        .map_err(|_| bad(field, format!("{v:?} is out of range")))
}

impl FeedRequest {
    /// Reads the query string (without `?`; none: a first snapshot).
    pub fn parse(query: Option<&str>) -> Result<FeedRequest, BadParam> {
        let q = query.unwrap_or("");
        let limit = match param(q, "limit")? {
            None => DEFAULT_LIMIT,
            Some(v) => {
                let n = number("limit", &v)?;
                if n == 0 || n > MAX_LIMIT as u64 {
                    return Err(bad("limit", format!("{n} is not in 1..={MAX_LIMIT}")));
                }
                n as usize
            }
        };
        let cursor = param(q, "cursor")?
            .map(|c| Cursor::decode(&c))
            .transpose()?;
        let epoch = param(q, "epoch")?;
        let after = param(q, "after")?
            .map(|a| number("after", &a))
            .transpose()?;
        let have = match (epoch, after) {
            (Some(e), Some(a)) => Some((e, a)),
            (None, None) => None,
            // A cursor makes them moot.
            _ if cursor.is_some() => None,
            (Some(_), None) => return Err(bad("after", "epoch and after go together")),
            (None, Some(_)) => return Err(bad("epoch", "epoch and after go together")),
        };
        Ok(FeedRequest {
            have,
            limit,
            cursor,
        })
    }
}

/// One page of an answer.
#[derive(Debug, Clone)]
pub struct Page {
    pub epoch: Arc<str>,
    pub version: u64,
    pub snapshot: bool,
    pub holders: Vec<Holder>,
    /// The grants the holders' lists are read from.
    pub set: Arc<GrantSet>,
    pub next: Option<Cursor>,
}

/// What the feed answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Nothing newer than what the caller has (304).
    NotModified,
    /// Nothing was ever loaded (503).
    Unavailable,
    Page(Page),
}

/// Takes holders from `from` while the page holds fewer than `limit`
/// grants (the first always); the cursor's holder if more are left.
fn take<'a>(
    set: &GrantSet,
    from: impl Iterator<Item = &'a Holder>,
    limit: usize,
) -> (Vec<Holder>, Option<Holder>) {
    let mut page = Vec::new();
    let mut count = 0usize;
    for h in from {
        if !page.is_empty() && count >= limit {
            let last = page.last().cloned();
            return (page, last);
        }
        count += set.holder(h).map_or(0, |g| g.len());
        page.push(h.clone());
    }
    (page, None)
}

fn snapshot_page(s: &State, version: u64, after: Option<&Holder>, limit: usize) -> Page {
    let range = match after {
        Some(h) => s.sorted.range((Bound::Excluded(h), Bound::Unbounded)),
        None => s.sorted.range::<Holder, _>(..),
    };
    let (holders, last) = take(&s.set, range, limit);
    Page {
        epoch: s.epoch.clone(),
        version,
        snapshot: true,
        holders,
        set: s.set.clone(),
        next: last.map(|last| Cursor::Snapshot {
            epoch: s.epoch.to_string(),
            version,
            last,
        }),
    }
}

fn delta_page(
    s: &State,
    changed: &[Holder],
    after: u64,
    version: u64,
    from: Option<&Holder>,
    limit: usize,
) -> Page {
    let start = from.map_or(0, |h| changed.partition_point(|x| x <= h));
    let rest = changed.get(start..).unwrap_or(&[]);
    let (holders, last) = take(&s.set, rest.iter(), limit);
    Page {
        epoch: s.epoch.clone(),
        version,
        snapshot: false,
        holders,
        set: s.set.clone(),
        next: last.map(|last| Cursor::Delta {
            epoch: s.epoch.to_string(),
            after,
            version,
            last,
        }),
    }
}

/// The answer to `req` from the grants in force.
pub fn answer(live: &Live, req: &FeedRequest) -> Answer {
    let s = live.read();
    if !s.loaded {
        return Answer::Unavailable;
    }
    let first = |s: &State| Answer::Page(snapshot_page(s, s.version, None, req.limit));
    match &req.cursor {
        Some(Cursor::Snapshot {
            epoch,
            version,
            last,
        }) if **epoch == *s.epoch && *version <= s.version => {
            Answer::Page(snapshot_page(&s, *version, Some(last), req.limit))
        }
        Some(Cursor::Delta {
            epoch,
            after,
            version,
            last,
        }) if **epoch == *s.epoch => match live.delta_holders(&s, *after, *version) {
            Some(hs) => Answer::Page(delta_page(&s, &hs, *after, *version, Some(last), req.limit)),
            None => first(&s),
        },
        // A cursor that cannot be continued: a snapshot from the start.
        Some(_) => first(&s),
        None => match &req.have {
            Some((epoch, after)) if **epoch == *s.epoch && *after >= s.version => {
                Answer::NotModified
            }
            Some((epoch, after)) if **epoch == *s.epoch => {
                match live.delta_holders(&s, *after, s.version) {
                    Some(hs) => {
                        Answer::Page(delta_page(&s, &hs, *after, s.version, None, req.limit))
                    }
                    None => first(&s),
                }
            }
            _ => first(&s),
        },
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

impl Page {
    /// The page as the contract's JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.holders.len() * 64);
        out.extend_from_slice(b"{\"epoch\":");
        push_str(&mut out, &self.epoch);
        out.extend_from_slice(
            format!(
                ",\"version\":{},\"snapshot\":{},\"holders\":[",
                self.version, self.snapshot
            )
            .as_bytes(),
        );
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for (i, h) in self.holders.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let (kind, name) = match h {
                Holder::Tenant(t) => ("{\"tenant\":", t),
                Holder::Subject(s) => ("{\"subject\":", s),
            };
            out.extend_from_slice(kind.as_bytes());
            push_str(&mut out, name);
            out.extend_from_slice(b",\"grants\":[");
            pairs.clear();
            if let Some(g) = self.set.holder(h) {
                pairs.extend(g.iter());
            }
            pairs.sort_unstable();
            for (j, (r, a)) in pairs.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.push(b'[');
                push_str(&mut out, r);
                out.push(b',');
                push_str(&mut out, a);
                out.push(b']');
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"],\"next\":");
        match &self.next {
            Some(c) => push_str(&mut out, &c.encode()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::live::{LiveConfig, SourceKind};
    use entitlements_core::grants::Grant;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let c = Cursor::Delta {
            epoch: "pg-1".into(),
            after: 3,
            version: 9,
            last: Holder::Subject("a b/é".into()),
        };
        assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        for bad in ["", "!!", "WyJ4Il0", &B64.encode(r#"["s","e",1,"x","n"]"#)] {
            assert_eq!(Cursor::decode(bad).unwrap_err().field, "cursor", "{bad}");
        }
    }

    #[test]
    fn parameters_are_checked_by_name() {
        let f = |q: &str| FeedRequest::parse(Some(q)).unwrap_err().field;
        assert_eq!(f("limit=0"), "limit");
        assert_eq!(f("limit=100001"), "limit");
        assert_eq!(f("limit=-1"), "limit");
        assert_eq!(f("after=x&epoch=e"), "after");
        assert_eq!(f("after=1"), "epoch");
        assert_eq!(f("epoch=e"), "after");
        assert_eq!(f("cursor=zz"), "cursor");
        let r = FeedRequest::parse(Some("epoch=pg%2D1&after=4&limit=7")).unwrap();
        assert_eq!((r.have, r.limit), (Some(("pg-1".into(), 4)), 7));
        assert_eq!(FeedRequest::parse(None).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn a_page_takes_whole_holders_until_the_limit() {
        let live = Live::new(LiveConfig::default(), SourceKind::File);
        let mut set = GrantSet::new();
        for (h, n) in [("a", 3), ("b", 1), ("c", 2)] {
            for i in 0..n {
                set.insert(
                    &Grant::new(Holder::Tenant(h.into()), &format!("r{i}"), "read").unwrap(),
                );
            }
        }
        set.insert(&Grant::new(Holder::Subject("a".into()), "r", "read").unwrap());
        live.install("e", 1, set, vec![], 1).unwrap();
        let req = |cursor| FeedRequest {
            have: None,
            limit: 2,
            cursor,
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let Answer::Page(p) = answer(&live, &req(cursor)) else {
                panic!("a page")
            };
            seen.push(p.holders.clone());
            match p.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let t = |n: &str| Holder::Tenant(n.into());
        assert_eq!(
            seen,
            [
                vec![t("a")],
                vec![t("b"), t("c")],
                vec![Holder::Subject("a".into())]
            ]
        );
    }
}
