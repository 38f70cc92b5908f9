//! One remote document (a JWKS, a policy, grants) fetched by one worker at
//! a time through a cluster and shared with every worker of the VM id
//! through shared data. Used by auth's key sets and the entitlements
//! policy.
//!
//! Shared data, per document (`<key>` is [`Source::key`]):
//! - `<key>`: the last good document: `u64` LE fetch time (ns since the
//!   epoch), `u32` LE length of its ETag, the ETag, the document.
//! - `<key>.next`: the lease: `u64` LE time the next fetch is due, `u32`
//!   LE failures in a row. A worker that finds a fetch due moves it to the
//!   end of the fetch's timeout (and a second) with a CAS and fetches; the
//!   others see the CAS fail. Only a worker that died mid-fetch leaves it
//!   there, and then only that long.
//! - `<key>.uri`: where a first document pointed ([`Check::Follow`], OIDC
//!   discovery's `jwks_uri`): authority, newline, path.
//!
//! Every worker compiles what it finds under `<key>` when its CAS changes
//! ([`Remote::sync`]); only documents the owner's [`Check`] accepted are
//! stored, so the last good one stays when a fetch fails or is refused.
//! The schedule is [`Timings`]': after a success the refresh period (or
//! 90 % of `Cache-Control: max-age`, if sooner), after failures the retry
//! delay doubling to its maximum. A known ETag is sent as `If-None-Match`;
//! 304 counts as a success that changes nothing.

use crate::host::Host;
use crate::refresh::{max_age, Timings};
use std::time::Duration;

const NS_PER_MS: u64 = 1_000_000;

/// Where a document comes from and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The cluster the callout goes to.
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout: Duration,
    pub timings: Timings,
    /// Largest body accepted.
    pub max_bytes: usize,
    /// The configuration field of `max_bytes`, for the refusal's message.
    pub max_bytes_field: String,
    /// The shared-data key of the document.
    pub key: String,
    /// The first fetch is of a document that points at the real one
    /// ([`Check::Follow`]).
    pub follow: bool,
}

/// What the owner makes of a fetched body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Store and share it.
    Keep,
    /// It points at the document (only for [`Source::follow`]'s first
    /// fetch): fetch that, now and from now on.
    Follow { authority: String, path: String },
    /// Keep the last good one; the reason is logged by the owner.
    Refuse(String),
}

/// What happened, for the owner's metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new document is in shared data; [`Remote::sync`] picks it up.
    Stored,
    /// 304: the document in force is current.
    NotModified,
    /// The first document pointed elsewhere; that fetch is on its way.
    Followed,
    /// No document: no answer, a status other than 200/304, or the call
    /// could not be made. Retried after `retry_in_ms`.
    Failed { why: String, retry_in_ms: u64 },
    /// A document the check (or `max_bytes`) refused; retried likewise.
    Refused { why: String, retry_in_ms: u64 },
}

/// A document shared by another worker (or this one), to compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// Fetch time, ns since the epoch.
    pub fetched_at: u64,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    token: u32,
    /// The pointer document ([`Source::follow`]).
    first: bool,
    /// Given up after this (ns): a response that never comes (its stream
    /// was gone, the host lost it) does not stop this worker for good.
    until: u64,
}

/// One worker's view of one document.
#[derive(Debug, Clone)]
pub struct Remote {
    pub source: Source,
    pending: Option<Pending>,
    /// CAS of the shared document this worker last took.
    seen_cas: Option<u32>,
    /// Its ETag and fetch time.
    etag: Option<String>,
    fetched_at: u64,
    /// When this worker last asked for an early fetch (ns).
    early_at: Option<u64>,
}

/// A fetch lease in shared data: `u64` LE time the next fetch is due (ns),
/// `u32` LE failures in a row. One worker of all takes it by CAS and
/// fetches; it is also the schedule (refresh after a success, doubling
/// retries after failures). Shared by [`Remote`] and every other fetcher
/// (the entitlements grants feed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
}

fn lease(next_at: u64, failures: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&next_at.to_le_bytes());
    v[8..].copy_from_slice(&failures.to_le_bytes());
    v
}

fn read_lease(b: &[u8]) -> (u64, u32) {
    let next = b
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let failures = b
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes);
    (next, failures)
}

impl Lease {
    pub fn new(key: impl Into<String>) -> Lease {
        Lease { key: key.into() }
    }

    /// Takes the lease if a fetch is due (`now` ≥ its time) and no other
    /// worker took it first, holding it until `until` (ns).
    pub fn take<H: Host>(&self, h: &H, now: u64, until: u64) -> bool {
        let (value, cas) = match h.shared(&self.key) {
            Some(v) => v,
            None => {
                // Create it (an absent key accepts any CAS), then race on
                // the CAS it got.
                h.shared_cas(&self.key, &lease(0, 0), 0);
                match h.shared(&self.key) {
                    Some(v) => v,
                    None => return false,
                }
            }
        };
        let (next_at, failures) = read_lease(&value);
        now >= next_at && h.shared_cas(&self.key, &lease(until, failures), cas)
    }

    /// Holds the lease until `until` (ns), keeping the failure count: the
    /// holder goes on fetching (the next page of an answer).
    pub fn extend<H: Host>(&self, h: &H, until: u64) {
        h.shared_put(&self.key, &lease(until, self.failures(h)));
    }

    /// Failures in a row so far.
    pub fn failures<H: Host>(&self, h: &H) -> u32 {
        h.shared(&self.key).map_or(0, |(v, _)| read_lease(&v).1)
    }

    /// Schedules the next fetch at `at` (ns) with this failure count.
    pub fn schedule<H: Host>(&self, h: &H, at: u64, failures: u32) -> bool {
        h.shared_put(&self.key, &lease(at, failures))
    }

    /// Makes a fetch due now (a fetch is wanted early).
    pub fn due_now<H: Host>(&self, h: &H) -> bool {
        h.shared_put(&self.key, &lease(0, 0))
    }

    /// After a success: the next fetch after `delay_ms`, no failures.
    pub fn succeeded<H: Host>(&self, h: &H, delay_ms: u64) {
        let at = h
            .now_ns()
            .saturating_add(delay_ms.saturating_mul(NS_PER_MS));
        self.schedule(h, at, 0);
    }

    /// After a failure: the next attempt after the doubling retry delay of
    /// `timings`; the delay in ms.
    pub fn failed<H: Host>(&self, h: &H, timings: &Timings) -> u64 {
        let failures = self.failures(h).saturating_add(1);
        let retry_in_ms = timings.failure_delay(failures);
        let at = h
            .now_ns()
            .saturating_add(retry_in_ms.saturating_mul(NS_PER_MS));
        self.schedule(h, at, failures);
        retry_in_ms
    }
}

fn encode(fetched_at: u64, etag: Option<&str>, body: &[u8]) -> Vec<u8> {
    let etag = etag.unwrap_or("").as_bytes();
    let etag = if u32::try_from(etag.len()).is_ok() {
        etag
    } else {
        &[]
    };
    let mut v = Vec::with_capacity(12 + etag.len() + body.len());
    v.extend_from_slice(&fetched_at.to_le_bytes());
    v.extend_from_slice(&(etag.len() as u32).to_le_bytes());
    v.extend_from_slice(etag);
    v.extend_from_slice(body);
    v
}

/// Fetch time, ETag and document of a shared entry.
fn decode(v: &[u8]) -> Option<(u64, Option<String>, &[u8])> {
    let fetched_at = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?) as usize;
    let etag = v.get(12..12usize.checked_add(len)?)?;
    let body = v.get(12 + len..)?;
    let etag = (!etag.is_empty()).then(|| String::from_utf8_lossy(etag).into_owned());
    Some((fetched_at, etag, body))
}

impl Remote {
    pub fn new(source: Source) -> Remote {
        Remote {
            source,
            pending: None,
            seen_cas: None,
            etag: None,
            fetched_at: 0,
            early_at: None,
        }
    }

    fn lease(&self) -> Lease {
        Lease::new(format!("{}.next", self.source.key))
    }

    fn uri_key(&self) -> String {
        format!("{}.uri", self.source.key)
    }

    /// Whether a fetch of this worker's is on its way.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The shared document, if it changed since this worker last took it.
    /// A malformed entry is skipped (and `Some` with an empty body is never
    /// returned for one).
    pub fn sync<H: Host>(&mut self, h: &H) -> Option<Shared> {
        let (value, cas) = h.shared(&self.source.key)?;
        if self.seen_cas == Some(cas) {
            return None;
        }
        self.seen_cas = Some(cas);
        let (fetched_at, etag, body) = decode(&value)?;
        self.etag = etag;
        self.fetched_at = fetched_at;
        Some(Shared {
            fetched_at,
            body: body.to_vec(),
        })
    }

    /// Starts a fetch if one is due and no other worker holds the lease.
    /// `Some` only when the call could not be made.
    pub fn poll<H: Host>(&mut self, h: &H) -> Option<Event> {
        let now = h.now_ns();
        match self.pending {
            Some(p) if now < p.until => return None,
            Some(_) => self.pending = None, // its answer is not coming
            None => {}
        }
        let timeout_ns = u64::try_from(self.source.timeout.as_nanos()).unwrap_or(u64::MAX);
        let until = now
            .saturating_add(timeout_ns)
            .saturating_add(1000 * NS_PER_MS);
        if !self.lease().take(h, now, until) {
            return None; // not due, or another worker took it
        }
        let pointed = self
            .source
            .follow
            .then(|| h.shared(&self.uri_key()))
            .flatten()
            .and_then(|(b, _)| String::from_utf8(b).ok())
            .and_then(|s| {
                s.split_once('\n')
                    .map(|(a, p)| (a.to_string(), p.to_string()))
            });
        let (authority, path, first) = match (self.source.follow, pointed) {
            (true, Some((a, p))) => (a, p, false),
            (true, None) => (
                self.source.authority.clone(),
                self.source.path.clone(),
                true,
            ),
            (false, _) => (
                self.source.authority.clone(),
                self.source.path.clone(),
                false,
            ),
        };
        self.dispatch(h, &authority, &path, first, until)
    }

    fn dispatch<H: Host>(
        &mut self,
        h: &H,
        authority: &str,
        path: &str,
        first: bool,
        until: u64,
    ) -> Option<Event> {
        let mut headers = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", authority),
            ("accept", "application/json"),
        ];
        if let (false, Some(etag)) = (first, &self.etag) {
            headers.push(("if-none-match", etag.as_str()));
        }
        match h.http_call(&self.source.cluster, &headers, None, self.source.timeout) {
            Ok(token) => {
                self.pending = Some(Pending {
                    token,
                    first,
                    until,
                });
                None
            }
            Err(e) => {
                let why = format!("cannot call cluster {:?}: {e}", self.source.cluster);
                Some(self.failed(h, why, false))
            }
        }
    }

    /// Moves the lease past a failure, doubling the delay.
    fn failed<H: Host>(&mut self, h: &H, why: String, refused: bool) -> Event {
        let retry_in_ms = self.lease().failed(h, &self.source.timings);
        if refused {
            Event::Refused { why, retry_in_ms }
        } else {
            Event::Failed { why, retry_in_ms }
        }
    }

    fn succeeded<H: Host>(&self, h: &H) {
        let max_age = h
            .call_response_header("cache-control")
            .and_then(|cc| max_age(&cc));
        self.lease()
            .succeeded(h, self.source.timings.success_delay(max_age));
    }

    /// The answer to a callout: `None` if the token is not this
    /// document's. `check` judges a 200 body (`first`: the pointer
    /// document of [`Source::follow`]).
    pub fn on_response<H: Host>(
        &mut self,
        h: &H,
        token: u32,
        body_size: usize,
        check: impl FnOnce(&[u8], bool) -> Check,
    ) -> Option<Event> {
        let p = self.pending.filter(|p| p.token == token)?;
        self.pending = None;
        let (max, field) = (self.source.max_bytes, self.source.max_bytes_field.clone());
        let event = match h.call_status() {
            Some(200) if body_size > max => self.failed(
                h,
                format!("document is {body_size} bytes, more than {field} {max}"),
                true,
            ),
            Some(200) => {
                let body = h.call_response_body(body_size);
                match (check(&body, p.first), p.first) {
                    (Check::Follow { authority, path }, true) => {
                        h.shared_put(&self.uri_key(), format!("{authority}\n{path}").as_bytes());
                        match self.dispatch(h, &authority, &path, false, p.until) {
                            None => Event::Followed,
                            Some(e) => e,
                        }
                    }
                    (Check::Follow { .. }, false) => {
                        self.failed(h, "the document points elsewhere".into(), true)
                    }
                    (Check::Refuse(why), _) => self.failed(h, why, true),
                    (Check::Keep, _) => {
                        let etag = h.call_response_header("etag");
                        let entry = encode(h.now_ns(), etag.as_deref(), &body);
                        h.shared_put(&self.source.key, &entry);
                        self.succeeded(h);
                        Event::Stored
                    }
                }
            }
            Some(304) if !p.first => {
                self.succeeded(h);
                Event::NotModified
            }
            Some(code) => self.failed(h, format!("status {code}"), false),
            None => self.failed(
                h,
                "no response (reset, timeout or connection failure)".into(),
                false,
            ),
        };
        Some(event)
    }

    /// The document lacks something (a token's `kid`): make a fetch due
    /// now, unless the newest document (of any worker) or this worker's
    /// last such request is younger than `min_refetch_ms`. True if a fetch
    /// is on its way or now due.
    pub fn refetch_now<H: Host>(&mut self, h: &H) -> bool {
        if self.pending.is_some() {
            return true;
        }
        let now = h.now_ns();
        let window = self.source.timings.min_refetch_ms.saturating_mul(NS_PER_MS);
        let shared = h
            .shared(&self.source.key)
            .and_then(|(v, _)| decode(&v).map(|d| d.0))
            .unwrap_or(0);
        let fetched = self.fetched_at.max(shared);
        let young = |t: u64| now.saturating_sub(t) < window;
        if young(fetched) || self.early_at.is_some_and(young) {
            return false;
        }
        self.early_at = Some(now);
        self.lease().due_now(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::double::FakeHost;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: Duration = Duration::from_secs(1);

    fn source(follow: bool) -> Source {
        Source {
            cluster: "idp".into(),
            authority: "idp.example".into(),
            path: "/doc".into(),
            timeout: Duration::from_secs(5),
            timings: Timings {
                refresh_ms: 600_000,
                retry_initial_ms: 1000,
                retry_max_ms: 600_000,
                min_refetch_ms: 30_000,
            },
            max_bytes: 100,
            max_bytes_field: "max_bytes".into(),
            key: "doc".into(),
            follow,
        }
    }

    fn keep(_: &[u8], _: bool) -> Check {
        Check::Keep
    }

    fn at_start() -> FakeHost {
        FakeHost::at(Duration::from_secs(1_800_000_000))
    }

    #[test]
    fn one_worker_fetches_every_worker_takes_it() {
        let a = at_start();
        let b = a.sibling();
        let (mut ra, mut rb) = (Remote::new(source(false)), Remote::new(source(false)));
        assert_eq!(ra.poll(&a), None);
        assert_eq!(rb.poll(&b), None);
        let calls = a.take_calls();
        assert_eq!(calls.len(), 1, "one lease, one fetch");
        assert!(b.take_calls().is_empty());
        assert_eq!(calls[0].header(":path"), Some("/doc"));
        assert_eq!(calls[0].header("if-none-match"), None);
        let n = a.answer(Some(200), &[("etag", "\"v1\"")], b"{}");
        assert_eq!(
            ra.on_response(&a, calls[0].token, n, keep),
            Some(Event::Stored)
        );
        assert_eq!(ra.on_response(&a, calls[0].token, n, keep), None, "once");
        let got = rb.sync(&b).unwrap();
        assert_eq!(got.body, b"{}");
        assert_eq!(got.fetched_at, a.now_ns());
        assert_eq!(rb.sync(&b), None, "nothing new");
        assert!(ra.sync(&a).is_some());
        // Not due again before the refresh period; then with the ETag.
        a.advance(Duration::from_secs(599));
        assert_eq!(ra.poll(&a), None);
        assert!(a.take_calls().is_empty());
        a.advance(SEC);
        ra.poll(&a);
        let c = a.take_calls().pop().unwrap();
        assert_eq!(c.header("if-none-match"), Some("\"v1\""));
        a.answer(Some(304), &[], b"");
        assert_eq!(
            ra.on_response(&a, c.token, 0, keep),
            Some(Event::NotModified)
        );
        assert_eq!(ra.sync(&a), None, "a 304 changes nothing");
        a.advance(Duration::from_secs(599));
        ra.poll(&a);
        assert!(a.take_calls().is_empty(), "the 304 counted as a success");
    }

    #[test]
    fn failures_back_off_and_keep_the_last_good() {
        let h = at_start();
        let mut r = Remote::new(source(false));
        let mut delays = Vec::new();
        for (status, body) in [
            (Some(500), &b"x"[..]),
            (None, b""),
            (Some(200), b"bad"),
            (Some(200), &[b'x'; 101][..]),
        ] {
            r.poll(&h);
            let c = h.take_calls().pop().expect("due");
            let n = h.answer(status, &[], body);
            let e = r.on_response(&h, c.token, n, |b, _| {
                if b == b"bad" {
                    Check::Refuse("bad document".into())
                } else {
                    Check::Keep
                }
            });
            let (why, ms) = match e.unwrap() {
                Event::Failed { why, retry_in_ms } => (why, retry_in_ms),
                Event::Refused { why, retry_in_ms } => (format!("refused: {why}"), retry_in_ms),
                other => panic!("{other:?}"),
            };
            delays.push(ms);
            // Not before the delay.
            h.advance(Duration::from_millis(ms - 1));
            r.poll(&h);
            assert!(h.take_calls().is_empty(), "{why}");
            h.advance(Duration::from_millis(1));
            if why.contains("101") {
                assert!(why.contains("more than max_bytes 100"), "{why}");
            }
        }
        assert_eq!(delays, [1000, 2000, 4000, 8000]);
        assert_eq!(r.sync(&h), None, "nothing was stored");
        // A success resets the doubling.
        r.poll(&h);
        let c = h.take_calls().pop().unwrap();
        let n = h.answer(Some(200), &[("cache-control", "max-age=100")], b"ok");
        assert_eq!(r.on_response(&h, c.token, n, keep), Some(Event::Stored));
        h.advance(Duration::from_secs(89));
        r.poll(&h);
        assert!(h.take_calls().is_empty());
        h.advance(SEC);
        r.poll(&h);
        let c = h.take_calls().pop().expect("at 90 % of max-age");
        h.answer(Some(503), &[], b"");
        match r.on_response(&h, c.token, 0, keep) {
            Some(Event::Failed { retry_in_ms, .. }) => assert_eq!(retry_in_ms, 1000),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.sync(&h).unwrap().body, b"ok", "the last good one stays");
    }

    #[test]
    fn a_lost_answer_frees_the_worker_after_the_timeout() {
        let a = at_start();
        let b = a.sibling();
        let (mut ra, mut rb) = (Remote::new(source(false)), Remote::new(source(false)));
        ra.poll(&a);
        assert_eq!(a.take_calls().len(), 1);
        a.advance(Duration::from_secs(5));
        ra.poll(&a);
        rb.poll(&b);
        assert!(a.take_calls().is_empty() && b.take_calls().is_empty());
        a.advance(SEC);
        ra.poll(&a);
        assert_eq!(a.take_calls().len(), 1, "given up, fetched again");
        assert!(ra.pending());
    }

    #[test]
    fn a_pointer_document_is_followed_once_and_remembered() {
        let a = at_start();
        let b = a.sibling();
        let mut ra = Remote::new(source(true));
        ra.poll(&a);
        let c = a.take_calls().pop().unwrap();
        assert_eq!(c.header(":path"), Some("/doc"));
        let n = a.answer(Some(200), &[], b"pointer");
        let follow = |_: &[u8], first: bool| {
            if first {
                Check::Follow {
                    authority: "keys.example".into(),
                    path: "/jwks".into(),
                }
            } else {
                Check::Keep
            }
        };
        assert_eq!(
            ra.on_response(&a, c.token, n, follow),
            Some(Event::Followed)
        );
        let c = a.take_calls().pop().unwrap();
        assert_eq!(
            (c.header(":authority"), c.header(":path")),
            (Some("keys.example"), Some("/jwks"))
        );
        let n = a.answer(Some(200), &[], b"keys");
        assert_eq!(ra.on_response(&a, c.token, n, follow), Some(Event::Stored));
        // Another worker, later, goes straight to the document.
        let mut rb = Remote::new(source(true));
        b.advance(Duration::from_secs(600));
        rb.poll(&b);
        let c = b.take_calls().pop().unwrap();
        assert_eq!(c.header(":path"), Some("/jwks"));
    }

    #[test]
    fn early_refetches_are_rate_limited_across_workers() {
        let a = at_start();
        let b = a.sibling();
        let (mut ra, mut rb) = (Remote::new(source(false)), Remote::new(source(false)));
        ra.poll(&a);
        let c = a.take_calls().pop().unwrap();
        let n = a.answer(Some(200), &[], b"v1");
        ra.on_response(&a, c.token, n, keep);
        a.advance(Duration::from_secs(10));
        assert!(!rb.refetch_now(&b), "b never took it, yet it is 10 s old");
        a.advance(Duration::from_secs(20));
        assert!(rb.refetch_now(&b));
        rb.poll(&b);
        let c = b.take_calls().pop().expect("due at once");
        assert!(rb.refetch_now(&b), "in flight counts as coming");
        b.answer(Some(500), &[], b"");
        rb.on_response(&b, c.token, 0, keep);
        a.advance(Duration::from_secs(2));
        assert!(
            !rb.refetch_now(&b),
            "asked 2 s ago, though the set is 32 s old"
        );
        a.advance(Duration::from_secs(28));
        assert!(rb.refetch_now(&b));
    }

    #[test]
    fn the_strict_hosts_rules_hold() {
        let h = at_start().strict();
        let mut r = Remote::new(source(false));
        for round in 0..3 {
            r.poll(&h);
            let c = h
                .take_calls()
                .pop()
                .unwrap_or_else(|| panic!("round {round}"));
            let n = h.answer(Some(200), &[], format!("v{round}").as_bytes());
            assert_eq!(r.on_response(&h, c.token, n, keep), Some(Event::Stored));
            assert_eq!(r.sync(&h).unwrap().body, format!("v{round}").as_bytes());
            h.advance(Duration::from_secs(600));
        }
    }

    #[test]
    fn a_call_that_cannot_be_made_is_a_failure() {
        let h = at_start();
        h.clusters.borrow_mut().push("other".into());
        let mut r = Remote::new(source(false));
        match r.poll(&h) {
            Some(Event::Failed { why, retry_in_ms }) => {
                assert!(why.contains("cannot call cluster \"idp\""), "{why}");
                assert_eq!(retry_in_ms, 1000);
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.pending());
    }

    #[test]
    fn malformed_entries_are_skipped() {
        let h = at_start();
        h.shared_put("doc", b"short");
        let mut r = Remote::new(source(false));
        assert_eq!(r.sync(&h), None);
        assert_eq!(
            decode(&encode(7, Some("e"), b"d")),
            Some((7, Some("e".into()), &b"d"[..]))
        );
        assert_eq!(decode(&encode(7, None, b"")), Some((7, None, &b""[..])));
    }
}
