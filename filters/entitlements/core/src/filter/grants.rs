//! The grants feed in the filter (issue 17): one worker of an Envoy at a
//! time (the lease) fetches pages of the sidecar's feed and writes them to
//! shared data in the layout of [`crate::feed`]; every worker reads the
//! grants of the callers it decides for from there, one holder at a time,
//! through a bounded cache of its own. So an Envoy holds one copy of the
//! grants, whatever its number of workers, and a changed grant moves one
//! holder's entry, not the whole set.
//!
//! The fetcher asks for a delta after the version in force (a 304 when
//! nothing changed: one small answer per refresh interval per Envoy), or
//! for a snapshot when there is none; the sidecar answers a snapshot when
//! it cannot answer the delta. The pages of one answer follow each other
//! without waiting; a failed or refused page keeps what is in force and is
//! tried again after the retry delay (doubling), from the page it failed.

use crate::feed::{entry, entry_size, holder_key, parse_page, read_entry, Log, Mark, Page, State};
use crate::grants::{Caller, Grants, HolderGrants};
use filter_common::cache::BoundedCache;
use filter_common::form::encode;
use filter_common::host::Host;
use filter_common::refresh::Timings;
use filter_common::remote::Lease;
use std::rc::Rc;
use std::time::Duration;

const NS_PER_MS: u64 = 1_000_000;

/// Where the grants come from, and the bounds on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedSource {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    pub timeout: Duration,
    pub timings: Timings,
    /// Grants asked for per page (`limit`).
    pub page_grants: usize,
    /// Largest page accepted, bytes.
    pub max_page_bytes: usize,
    /// Most grants in force at one Envoy.
    pub max_grants: u64,
    /// Most grants of one holder.
    pub max_holder_grants: usize,
    /// Changed holders remembered for the workers' caches.
    pub log_entries: usize,
    /// Holders each worker keeps decoded.
    pub holder_cache_entries: usize,
    /// The shared-data prefix.
    pub key: String,
}

/// What a fetch did, for the owner's metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A page is in shared data. `done`: it was the answer's last (a
    /// snapshot is now in force, or a delta's version); otherwise the next
    /// page is on its way.
    Applied {
        snapshot: bool,
        holders: usize,
        done: bool,
        version: u64,
        grants: u64,
    },
    /// 304: the version in force is current.
    NotModified,
    /// No page: no answer, another status, or the call could not be made.
    Failed { why: String, retry_in_ms: u64 },
    /// A page refused (malformed, over a bound, out of turn).
    Refused { why: String, retry_in_ms: u64 },
}

/// What a worker drops from its decision caches after [`Feed::sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// Everything: a new generation is in force, or (`overflow`) the log
    /// no longer reaches back to this worker's version.
    All {
        overflow: bool,
    },
    /// Decisions about these holders (`t/<tenant>`, `s/<subject>`).
    Holders(Vec<String>),
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    token: u32,
    /// The request carried a cursor (continues an answer).
    continued: bool,
    until: u64,
    /// When the poll it belongs to started (ns): the next one is due a
    /// refresh interval after that, so a worker's tick of the same period
    /// finds it due (counting from the answer would skip a tick).
    started: u64,
}

/// One worker's view of the grants feed.
pub struct Feed {
    pub source: FeedSource,
    lease: Lease,
    state_key: String,
    log_key: String,
    pending: Option<Pending>,
    /// The state last read, and its CAS as [`Feed::sync`] last saw it.
    state: State,
    state_cas: Option<u32>,
    /// (generation, version) this worker's caches belong to.
    seen: Option<(u64, u64)>,
    cache: BoundedCache<Rc<HolderGrants>>,
    cache_version: u64,
    empty: Rc<HolderGrants>,
    key: String,
}

/// The grants of one caller: its tenant's and its own.
pub struct CallerGrants {
    pub tenant: Rc<HolderGrants>,
    pub subject: Rc<HolderGrants>,
}

impl Grants for CallerGrants {
    fn holds(&self, _: Caller<'_>, resource: &str, action: &str) -> bool {
        self.tenant.covers(resource, action) || self.subject.covers(resource, action)
    }
}

impl Feed {
    pub fn new(source: FeedSource) -> Feed {
        Feed {
            lease: Lease::new(format!("{}.next", source.key)),
            state_key: format!("{}.state", source.key),
            log_key: format!("{}.log", source.key),
            pending: None,
            state: State::default(),
            state_cas: None,
            seen: None,
            cache: BoundedCache::new(source.holder_cache_entries, 2 + crate::grants::MAX_LEN),
            cache_version: 1,
            empty: Rc::new(HolderGrants::default()),
            key: String::with_capacity(64),
            source,
        }
    }

    /// Whether a version of the grants is in force (the first snapshot is
    /// in), as this worker last looked.
    pub fn ready(&self) -> bool {
        self.seen.is_some()
    }

    /// The version in force, as this worker last looked.
    pub fn version(&self) -> Option<&Mark> {
        self.state.current.as_ref()
    }

    /// The holder cache's counters.
    pub fn cache_stats(&self) -> filter_common::cache::CacheStats {
        self.cache.stats()
    }

    fn read_state<H: Host>(&self, h: &H) -> (State, Option<u32>) {
        match h.shared(&self.state_key) {
            Some((v, cas)) => (State::parse(&v).unwrap_or_default(), Some(cas)),
            None => (State::default(), None),
        }
    }

    /// Takes a new version in force from shared data, dropping from this
    /// worker's holder cache what it changed; the caller drops the same
    /// from its decision caches.
    pub fn sync<H: Host>(&mut self, h: &H) -> Change {
        let (state, cas) = self.read_state(h);
        if cas.is_none() || cas == self.state_cas {
            return Change::Nothing;
        }
        self.state_cas = cas;
        self.state = state;
        let Some(cur) = &self.state.current else {
            return Change::Nothing;
        };
        let now = (cur.generation, cur.version);
        let change = match self.seen {
            Some(seen) if seen == now => Change::Nothing,
            Some((generation, version)) if generation == now.0 => {
                let log = h
                    .shared(&self.log_key)
                    .and_then(|(v, _)| Log::parse(&v))
                    .unwrap_or_default();
                let changed = log
                    .since(generation, version)
                    .map(|holders| holders.map(str::to_string).collect());
                match changed {
                    Some(holders) => Change::Holders(holders),
                    None => Change::All { overflow: true },
                }
            }
            _ => Change::All { overflow: false },
        };
        self.seen = Some(now);
        match &change {
            Change::Nothing => {}
            Change::All { .. } => self.cache_version += 1,
            Change::Holders(keys) => {
                for k in keys {
                    self.cache.remove(k.as_bytes());
                }
            }
        }
        change
    }

    /// Whether an entry of `generation` is to be read. One newer than the
    /// state this worker knows is a snapshot that started loading since:
    /// look at the state again.
    fn accepts<H: Host>(&mut self, h: &H, generation: u64) -> bool {
        if self.state.accepts(generation) {
            return true;
        }
        let known = self.state.next_generation();
        if generation < known {
            return false;
        }
        let (state, _) = self.read_state(h);
        self.state = state;
        self.state.accepts(generation)
    }

    /// One holder's grants (`key`: `t/<tenant>` or `s/<subject>`).
    fn holder<H: Host>(&mut self, h: &H, key: &str) -> Rc<HolderGrants> {
        match self.cache.lookup(self.cache_version, key.as_bytes()) {
            Ok(g) => g,
            Err(miss) => {
                let full = format!("{}/{key}", self.source.key);
                let g = match h.shared(&full).and_then(|(v, _)| read_entry(&v)) {
                    Some((generation, g)) if !g.is_empty() && self.accepts(h, generation) => {
                        Rc::new(g)
                    }
                    _ => self.empty.clone(),
                };
                if let Some(miss) = miss {
                    self.cache.insert(miss, key.as_bytes(), g.clone());
                }
                g
            }
        }
    }

    /// The grants of a caller.
    pub fn caller<H: Host>(
        &mut self,
        h: &H,
        tenant: Option<&str>,
        subject: Option<&str>,
    ) -> CallerGrants {
        let mut key = std::mem::take(&mut self.key);
        let mut get = |f: &mut Feed, kind: &str, name: Option<&str>| match name {
            Some(n) => {
                key.clear();
                key.push_str(kind);
                key.push_str(n);
                f.holder(h, &key)
            }
            None => f.empty.clone(),
        };
        let g = CallerGrants {
            tenant: get(self, "t/", tenant),
            subject: get(self, "s/", subject),
        };
        self.key = key;
        g
    }

    fn query(&self, state: &State) -> (String, bool) {
        let s = &self.source;
        let sep = if s.path.contains('?') { '&' } else { '?' };
        let mut q = format!("{}{sep}limit={}", s.path, s.page_grants);
        let continued = match (&state.cursor, &state.current, &state.loading) {
            (Some(c), _, _) => {
                q.push_str("&cursor=");
                q.push_str(&encode(c));
                true
            }
            (None, Some(m), None) => {
                q.push_str(&format!("&epoch={}&after={}", encode(&m.epoch), m.version));
                false
            }
            _ => false,
        };
        (q, continued)
    }

    /// Starts a fetch if one is due and no other worker holds the lease.
    /// `Some` only when the call could not be made.
    pub fn poll<H: Host>(&mut self, h: &H) -> Option<FeedEvent> {
        let now = h.now_ns();
        match self.pending {
            Some(p) if now < p.until => return None,
            Some(_) => self.pending = None, // its answer is not coming
            None => {}
        }
        let until = self.until(now);
        if !self.lease.take(h, now, until) {
            return None;
        }
        let (state, _) = self.read_state(h);
        self.dispatch(h, &state, until, now)
    }

    fn until(&self, now: u64) -> u64 {
        let timeout_ns = u64::try_from(self.source.timeout.as_nanos()).unwrap_or(u64::MAX);
        now.saturating_add(timeout_ns)
            .saturating_add(1000 * NS_PER_MS)
    }

    fn dispatch<H: Host>(
        &mut self,
        h: &H,
        state: &State,
        until: u64,
        started: u64,
    ) -> Option<FeedEvent> {
        let (path, continued) = self.query(state);
        let bearer = self.source.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", self.source.authority.as_str()),
            ("accept", "application/json"),
        ];
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        match h.http_call(&self.source.cluster, &headers, None, self.source.timeout) {
            Ok(token) => {
                self.pending = Some(Pending {
                    token,
                    continued,
                    until,
                    started,
                });
                None
            }
            Err(e) => {
                let why = format!("cannot call cluster {:?}: {e}", self.source.cluster);
                Some(self.failed(h, why, false))
            }
        }
    }

    fn failed<H: Host>(&mut self, h: &H, why: String, refused: bool) -> FeedEvent {
        let retry_in_ms = self.lease.failed(h, &self.source.timings);
        if refused {
            FeedEvent::Refused { why, retry_in_ms }
        } else {
            FeedEvent::Failed { why, retry_in_ms }
        }
    }

    /// The answer to a callout: `None` if the token is not the feed's.
    pub fn on_response<H: Host>(
        &mut self,
        h: &H,
        token: u32,
        body_size: usize,
    ) -> Option<FeedEvent> {
        let p = self.pending.filter(|p| p.token == token)?;
        self.pending = None;
        let max = self.source.max_page_bytes;
        let event = match h.call_status() {
            Some(200) if body_size > max => self.failed(
                h,
                format!("page is {body_size} bytes, more than grants.max_page_bytes {max}"),
                true,
            ),
            Some(200) => {
                let body = h.call_response_body(body_size);
                match parse_page(
                    &body,
                    self.source.max_holder_grants,
                    "grants.max_holder_grants",
                ) {
                    Ok(page) => self.apply(h, page, p),
                    Err(why) => self.failed(h, why, true),
                }
            }
            Some(304) => {
                self.next_poll(h, p);
                FeedEvent::NotModified
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

    /// After a success: the next poll a refresh interval after this one
    /// started.
    fn next_poll<H: Host>(&self, h: &H, p: Pending) {
        let at = p
            .started
            .saturating_add(self.source.timings.refresh_ms.saturating_mul(NS_PER_MS));
        self.lease.schedule(h, at, 0);
    }

    fn write_state<H: Host>(&self, h: &H, state: &State) {
        h.shared_put(&self.state_key, &state.to_bytes());
    }

    fn write_holders<H: Host>(&self, h: &H, generation: u64, page: &Page) {
        for (holder, grants) in &page.holders {
            let key = format!("{}/{}", self.source.key, holder_key(holder));
            let value = entry(
                generation,
                grants.iter().map(|(r, a)| (r.as_str(), a.as_str())),
            );
            h.shared_put(&key, &value);
        }
    }

    /// Puts a checked page in shared data, then fetches the next one or
    /// schedules the next refresh.
    fn apply<H: Host>(&mut self, h: &H, page: Page, p: Pending) -> FeedEvent {
        let (mut state, _) = self.read_state(h);
        let max = self.source.max_grants;
        let done = page.next.is_none();
        let (version, grants) = if page.snapshot {
            let continuing = p.continued
                && state
                    .loading
                    .as_ref()
                    .is_some_and(|m| m.epoch == page.epoch && m.version == page.version);
            if !continuing {
                state.loading = Some(Mark {
                    epoch: page.epoch.clone(),
                    version: page.version,
                    generation: state.next_generation(),
                    grants: 0,
                });
            }
            let Some(mut load) = state.loading.take() else {
                return self.failed(h, "no snapshot loading".into(), true);
            };
            load.grants += page.grants as u64;
            if load.grants > max {
                state.cursor = None;
                self.write_state(h, &state);
                return self.failed(
                    h,
                    format!("the snapshot holds more than grants.max_grants {max} grants"),
                    true,
                );
            }
            // The state first: a worker that reads an entry of the new
            // generation then knows to accept it.
            let generation = load.generation;
            let (version, grants) = (load.version, load.grants);
            state.loading = Some(load);
            state.cursor = page.next.clone();
            self.write_state(h, &state);
            self.write_holders(h, generation, &page);
            if done {
                state.current = state.loading.take();
                let log = Log {
                    generation,
                    floor: version,
                    changes: Vec::new(),
                };
                h.shared_put(&self.log_key, &log.to_bytes());
                self.write_state(h, &state);
            }
            (version, grants)
        } else {
            let Some(mut cur) = state.current.clone() else {
                return self.failed(h, "a delta with no version in force".into(), true);
            };
            if state.loading.is_some() || cur.epoch != page.epoch {
                state.loading = None;
                state.cursor = None;
                self.write_state(h, &state);
                return self.failed(
                    h,
                    format!(
                        "a delta of epoch {:?} out of turn (in force: {:?})",
                        page.epoch, cur.epoch
                    ),
                    true,
                );
            }
            if page.version < cur.version {
                // A replica that lags: nothing newer.
                self.next_poll(h, p);
                return FeedEvent::NotModified;
            }
            let mut count = cur.grants;
            for (holder, grants) in &page.holders {
                let key = format!("{}/{}", self.source.key, holder_key(holder));
                let old = h
                    .shared(&key)
                    .and_then(|(v, _)| entry_size(&v))
                    .filter(|(g, _)| *g == cur.generation)
                    .map_or(0, |(_, n)| n as u64);
                count = count.saturating_sub(old) + grants.len() as u64;
            }
            if count > max {
                return self.failed(
                    h,
                    format!(
                        "the delta would put more than grants.max_grants {max} grants in force"
                    ),
                    true,
                );
            }
            self.write_holders(h, cur.generation, &page);
            let mut log = h
                .shared(&self.log_key)
                .and_then(|(v, _)| Log::parse(&v))
                .filter(|l| l.generation == cur.generation)
                .unwrap_or(Log {
                    generation: cur.generation,
                    floor: cur.version,
                    changes: Vec::new(),
                });
            log.push(
                page.version,
                page.holders.iter().map(|(holder, _)| holder_key(holder)),
                self.source.log_entries,
            );
            h.shared_put(&self.log_key, &log.to_bytes());
            cur.grants = count;
            if done {
                cur.version = page.version;
            }
            state.cursor = page.next.clone();
            let version = cur.version;
            state.current = Some(cur);
            self.write_state(h, &state);
            (version, count)
        };
        let event = FeedEvent::Applied {
            snapshot: page.snapshot,
            holders: page.holders.len(),
            done,
            version,
            grants,
        };
        if done {
            self.next_poll(h, p);
            return event;
        }
        let until = self.until(h.now_ns());
        self.lease.extend(h, until);
        match self.dispatch(h, &state, until, p.started) {
            None => event,
            Some(failed) => failed,
        }
    }
}

#[cfg(test)]
#[path = "grants/tests.rs"]
mod tests;
