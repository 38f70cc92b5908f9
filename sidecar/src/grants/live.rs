//! The grants in force, in memory: what decisions read (an
//! `Arc<GrantSet>` snapshot, also on a [`watch`] for the sessions) and what
//! the feed pages through (the holders sorted, and a bounded change log of
//! (version, holder)), under one epoch and version.
//!
//! One writer at a time (the source's task) builds the next state beside
//! the one in force, then swaps it in: readers always see a whole version,
//! never a part of one, and a version that is refused (over
//! `--grants-max`, not newer) is never put in force. A change costs a
//! clone of the holder map (a pointer per holder, the grants themselves
//! shared) plus O(log n) per changed holder in the sorted index.

use entitlements_core::grants::{GrantSet, Holder, HolderGrants};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;
use tokio::sync::watch;

/// The epoch of "no grants": no source, or nothing loaded yet.
pub const NO_EPOCH: &str = "none";

/// The bounds of the live state.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Most (version, holder) entries in the change log (`--grants-log`);
    /// beyond, the oldest go and deltas from before them answer snapshots.
    pub log: usize,
    /// Most grants held (`--grants-max`); a load or catch-up beyond is
    /// refused and the last good grants stay.
    pub max: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            log: 100_000,
            max: 2_000_000,
        }
    }
}

/// Where the grants come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Neither `--grants-postgres` nor `--grants-file`: no grants.
    None,
    File,
    Postgres,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::None => "none",
            SourceKind::File => "file",
            SourceKind::Postgres => "postgres",
        }
    }
}

/// The grants in force, for decisions.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    pub version: u64,
    pub grants: Arc<GrantSet>,
    /// False until a source was read once (a configured source).
    pub loaded: bool,
}

/// Why a new version was not put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// More grants than `--grants-max`.
    #[error("{grants} grants exceed --grants-max ({max})")]
    TooMany { grants: usize, max: usize },
    /// A change on top of a version that is not the one in force.
    #[error("version {version} is not after {current} (epoch {epoch})")]
    NotNewer {
        version: u64,
        current: u64,
        epoch: String,
    },
}

/// The state the feed reads (under [`Live::read`]).
pub(crate) struct State {
    pub loaded: bool,
    pub epoch: Arc<str>,
    pub version: u64,
    pub set: Arc<GrantSet>,
    /// Every holder that holds a grant, in the feed's order (tenants
    /// before subjects, then by name, bytewise: `Holder`'s `Ord`).
    pub sorted: BTreeSet<Holder>,
    /// (version, holder) of each change, oldest first.
    pub log: VecDeque<(u64, Holder)>,
    /// The log answers deltas after any version ≥ this one.
    pub floor: u64,
}

struct Health {
    up: bool,
    /// Since when the source has been failing, and why.
    failing: Option<(Instant, String)>,
}

/// The metrics of the grants in force and their feed.
#[derive(Clone, Debug, Default)]
pub struct GrantsMetrics {
    pub version: Gauge,
    pub grants: Gauge,
    pub holders: Gauge,
    pub source_up: Gauge,
    reloads: Family<Vec<(String, String)>, Counter>,
    pub log_evicted: Counter,
    feed: Family<Vec<(String, String)>, Counter>,
}

/// How a load or catch-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Put in force.
    Ok,
    /// Refused: invalid content or over a bound; the last good stays.
    Invalid,
    /// The source could not be read; the last good stays.
    Failed,
}

/// What the feed answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedAnswer {
    Snapshot,
    Delta,
    NotModified,
    /// A bad parameter or token.
    Invalid,
    /// Nothing loaded yet.
    Unavailable,
}

impl GrantsMetrics {
    pub fn reload(&self, r: Reload) {
        let v = match r {
            Reload::Ok => "ok",
            Reload::Invalid => "invalid",
            Reload::Failed => "failed",
        };
        self.reloads
            .get_or_create(&vec![("result".to_string(), v.to_string())])
            .inc();
    }

    pub fn feed(&self, a: FeedAnswer) {
        let v = match a {
            FeedAnswer::Snapshot => "snapshot",
            FeedAnswer::Delta => "delta",
            FeedAnswer::NotModified => "not_modified",
            FeedAnswer::Invalid => "invalid",
            FeedAnswer::Unavailable => "unavailable",
        };
        self.feed
            .get_or_create(&vec![("answer".to_string(), v.to_string())])
            .inc();
    }

    /// Registers every metric under `sidecar_grants`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sidecar");
        r.register(
            "grants_version",
            "Version of the grants in force",
            self.version.clone(),
        );
        r.register("grants", "Grants in force", self.grants.clone());
        r.register(
            "grants_holders",
            "Holders (tenants, subjects) with a grant in force",
            self.holders.clone(),
        );
        r.register(
            "grants_source_up",
            "1 while the grants source answers (no source: 1)",
            self.source_up.clone(),
        );
        r.register(
            "grants_reloads",
            "Loads and catch-ups of the grants: ok, invalid (refused), failed (source away)",
            self.reloads.clone(),
        );
        r.register(
            "grants_log_evicted",
            "Change log entries evicted at --grants-log (deltas from before answer snapshots)",
            self.log_evicted.clone(),
        );
        r.register(
            "grants_feed",
            "Grants feed answers, by kind",
            self.feed.clone(),
        );
    }
}

/// A delta's holders, sorted, for (epoch, after, version).
type DeltaKey = (Arc<str>, u64, u64);

/// How many delta holder lists are kept for paging (callers at the same
/// version ask the same question).
const DELTA_CACHE: usize = 8;

/// The grants in force.
pub struct Live {
    cfg: LiveConfig,
    source: SourceKind,
    state: RwLock<State>,
    tx: watch::Sender<Arc<Snapshot>>,
    health: Mutex<Health>,
    /// One writer at a time.
    writer: Mutex<()>,
    deltas: Mutex<VecDeque<(DeltaKey, Arc<[Holder]>)>>,
    pub metrics: GrantsMetrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whether two holders' grants are the same (order aside).
pub fn same_grants(a: &HolderGrants, b: &HolderGrants) -> bool {
    a.len() == b.len() && a.iter().all(|(r, act)| b.has(r, act))
}

impl Live {
    /// Nothing loaded yet; without a source, the empty set in force
    /// (epoch `none`, version 0).
    pub fn new(cfg: LiveConfig, source: SourceKind) -> Live {
        let loaded = source == SourceKind::None;
        let epoch: Arc<str> = Arc::from(NO_EPOCH);
        let set = Arc::new(GrantSet::new());
        let metrics = GrantsMetrics::default();
        metrics.source_up.set(i64::from(loaded));
        Live {
            cfg,
            source,
            state: RwLock::new(State {
                loaded,
                epoch: epoch.clone(),
                version: 0,
                set: set.clone(),
                sorted: BTreeSet::new(),
                log: VecDeque::new(),
                floor: 0,
            }),
            tx: watch::Sender::new(Arc::new(Snapshot {
                epoch,
                version: 0,
                grants: set,
                loaded,
            })),
            health: Mutex::new(Health {
                up: loaded,
                failing: None,
            }),
            writer: Mutex::new(()),
            deltas: Mutex::new(VecDeque::new()),
            metrics,
        }
    }

    pub fn config(&self) -> &LiveConfig {
        &self.cfg
    }

    pub fn source(&self) -> SourceKind {
        self.source
    }

    /// The grants in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every version put in force.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a whole new state in force (a full load): `log` is the change
    /// log's seed (oldest first) and `floor` the version it answers deltas
    /// after.
    pub fn install(
        &self,
        epoch: &str,
        version: u64,
        set: GrantSet,
        log: Vec<(u64, Holder)>,
        floor: u64,
    ) -> Result<(), Refused> {
        if set.len() > self.cfg.max {
            return Err(Refused::TooMany {
                grants: set.len(),
                max: self.cfg.max,
            });
        }
        let _w = lock(&self.writer);
        let sorted: BTreeSet<Holder> = set.holders().map(|(h, _)| h).collect();
        let mut log: VecDeque<(u64, Holder)> = log.into();
        let mut floor = floor;
        while log.len() > self.cfg.log {
            if let Some((v, _)) = log.pop_front() {
                floor = floor.max(v);
            }
        }
        let set = Arc::new(set);
        let epoch: Arc<str> = Arc::from(epoch);
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            *s = State {
                loaded: true,
                epoch: epoch.clone(),
                version,
                set: set.clone(),
                sorted,
                log,
                floor,
            };
            self.publish(&s);
        }
        lock(&self.deltas).clear();
        Ok(())
    }

    /// Puts `version` in force on top of the one in force: each changed
    /// holder's grants now (empty: it holds nothing), and the (version,
    /// holder) of each change for the log. Refused unless `version` is
    /// newer, or beyond `--grants-max`.
    pub fn apply(
        &self,
        version: u64,
        changes: Vec<(Holder, HolderGrants)>,
        log: Vec<(u64, Holder)>,
    ) -> Result<(), Refused> {
        let _w = lock(&self.writer);
        let (current, epoch, old) = {
            let s = self.read();
            (s.version, s.epoch.clone(), s.set.clone())
        };
        if version <= current {
            return Err(Refused::NotNewer {
                version,
                current,
                epoch: epoch.to_string(),
            });
        }
        let mut set = GrantSet::clone(&old);
        for (h, g) in changes.iter() {
            set.replace_holder(h, g.clone());
        }
        if set.len() > self.cfg.max {
            return Err(Refused::TooMany {
                grants: set.len(),
                max: self.cfg.max,
            });
        }
        let set = Arc::new(set);
        let mut evicted = 0u64;
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            for (h, g) in changes {
                if g.is_empty() {
                    s.sorted.remove(&h);
                } else if !s.sorted.contains(&h) {
                    s.sorted.insert(h);
                }
            }
            s.log.extend(log);
            while s.log.len() > self.cfg.log {
                if let Some((v, _)) = s.log.pop_front() {
                    s.floor = s.floor.max(v);
                    evicted += 1;
                }
            }
            s.version = version;
            s.set = set;
            s.loaded = true;
            self.publish(&s);
        }
        self.metrics.log_evicted.inc_by(evicted);
        Ok(())
    }

    /// The changes from the grants in force to `new`, by holder: each
    /// holder whose grants differ, with its grants in `new`.
    pub fn diff(&self, new: &GrantSet) -> Vec<(Holder, HolderGrants)> {
        let old = self.read().set.clone();
        let mut out: Vec<(Holder, HolderGrants)> = new
            .holders()
            .filter(|(h, g)| !old.holder(h).is_some_and(|o| same_grants(o, g)))
            .map(|(h, g)| (h, g.clone()))
            .collect();
        out.extend(
            old.holders()
                .filter(|(h, _)| new.holder(h).is_none())
                .map(|(h, _)| (h, HolderGrants::default())),
        );
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Hands the state to the watchers and the gauges (under the write lock,
    /// so they see versions in order).
    fn publish(&self, s: &State) {
        self.tx.send_replace(Arc::new(Snapshot {
            epoch: s.epoch.clone(),
            version: s.version,
            grants: s.set.clone(),
            loaded: s.loaded,
        }));
        let m = &self.metrics;
        m.version.set(i64::try_from(s.version).unwrap_or(i64::MAX));
        m.grants.set(gauge(s.set.len()));
        m.holders.set(gauge(s.sorted.len()));
    }

    /// The holders changed in (`after`, `version`], sorted and
    /// deduplicated; `None` if the log no longer reaches back to `after`
    /// or `version` is not (yet) this state's.
    pub(crate) fn delta_holders(
        &self,
        s: &State,
        after: u64,
        version: u64,
    ) -> Option<Arc<[Holder]>> {
        if after < s.floor || version > s.version || after > version {
            return None;
        }
        let key: DeltaKey = (s.epoch.clone(), after, version);
        if let Some((_, hs)) = lock(&self.deltas).iter().find(|(k, _)| *k == key) {
            return Some(hs.clone());
        }
        let from = s.log.partition_point(|(v, _)| *v <= after);
        let mut hs: Vec<Holder> = s
            .log
            .range(from..)
            .take_while(|(v, _)| *v <= version)
            .map(|(_, h)| h.clone())
            .collect();
        hs.sort();
        hs.dedup();
        let hs: Arc<[Holder]> = hs.into();
        let mut cache = lock(&self.deltas);
        if cache.len() >= DELTA_CACHE {
            cache.pop_front();
        }
        cache.push_back((key, hs.clone()));
        Some(hs)
    }

    /// The source answered (and what it gave is in force, or unchanged).
    pub fn source_ok(&self) {
        let mut h = lock(&self.health);
        if let Some((since, why)) = h.failing.take() {
            tracing::info!(
                "grants: {} is back after {} s ({why})",
                self.source.name(),
                since.elapsed().as_secs()
            );
        }
        h.up = true;
        self.metrics.source_up.set(1);
    }

    /// The source failed (`why`, logged once per outage; the last good
    /// grants stay). `down`: the source itself is away (not its content).
    pub fn source_failed(&self, why: &str, down: bool) {
        let mut h = lock(&self.health);
        match &mut h.failing {
            Some((_, w)) if w == why => {}
            Some((_, w)) => {
                tracing::warn!("grants: {why}; the last good grants stay");
                *w = why.to_string();
            }
            None => {
                tracing::warn!("grants: {why}; the last good grants stay");
                h.failing = Some((Instant::now(), why.to_string()));
            }
        }
        if down {
            h.up = false;
            self.metrics.source_up.set(0);
        }
    }

    /// The `/readyz` line and whether it lets the sidecar be ready: 503
    /// only while a configured source has never been loaded.
    pub fn readiness(&self) -> (bool, String) {
        let (loaded, version, grants) = {
            let s = self.read();
            (s.loaded, s.version, s.set.len())
        };
        let failing = lock(&self.health)
            .failing
            .as_ref()
            .map(|(since, why)| (since.elapsed().as_secs(), why.clone()));
        if self.source == SourceKind::None {
            return (true, "grants: ok, no source, version 0, 0 grants".into());
        }
        match (loaded, failing) {
            (false, Some((_, why))) => (false, format!("grants: not loaded ({why})")),
            (false, None) => (false, "grants: not loaded".into()),
            (true, None) => (
                true,
                format!("grants: ok, version {version}, {grants} grants"),
            ),
            (true, Some((secs, why))) => (
                true,
                format!("grants: stale for {secs} s ({why}), serving version {version}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entitlements_core::grants::Grant;

    fn set(gs: &[(&str, &str, &str)]) -> GrantSet {
        gs.iter()
            .map(|(t, r, a)| Grant::new(Holder::Tenant(t.to_string()), r, a).unwrap())
            .collect()
    }

    #[test]
    fn changes_are_logged_bounded_and_the_floor_follows() {
        let live = Live::new(LiveConfig { log: 3, max: 10 }, SourceKind::File);
        assert!(!live.snapshot().loaded);
        live.install("e", 1, set(&[("a", "r", "read")]), vec![], 0)
            .unwrap();
        for v in 2..=5u64 {
            let name = format!("t{v}");
            let new = {
                let mut s = GrantSet::clone(&live.snapshot().grants);
                s.insert(&Grant::new(Holder::Tenant(name.clone()), "r", "read").unwrap());
                s
            };
            let changes = live.diff(&new);
            assert_eq!(changes.len(), 1);
            live.apply(v, changes, vec![(v, Holder::Tenant(name))])
                .unwrap();
        }
        assert_eq!(live.metrics.log_evicted.get(), 1);
        let s = live.read();
        assert_eq!(
            (s.version, s.floor, s.log.len(), s.sorted.len()),
            (5, 2, 3, 5)
        );
        assert!(live.delta_holders(&s, 1, 5).is_none(), "below the floor");
        let hs = live.delta_holders(&s, 3, 5).unwrap();
        assert_eq!(
            &hs[..],
            [Holder::Tenant("t4".into()), Holder::Tenant("t5".into())]
        );
        drop(s);
        assert!(matches!(
            live.apply(5, vec![], vec![]),
            Err(Refused::NotNewer { .. })
        ));
        let too_many: Vec<_> = (0..20)
            .map(|i| {
                let mut g = HolderGrants::default();
                g.insert("r", "read");
                (Holder::Subject(format!("s{i}")), g)
            })
            .collect();
        assert!(matches!(
            live.apply(6, too_many, vec![]),
            Err(Refused::TooMany { .. })
        ));
        assert_eq!(live.snapshot().version, 5, "the last good stays");
    }
}
