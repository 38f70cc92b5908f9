//! A bounded cache keyed by bytes, one per VM (per Envoy worker) or per
//! sidecar: entitlements keeps decisions and decoded identities in it,
//! auth verified tokens.
//!
//! Two generations of at most `capacity / 2` entries each: inserts go to
//! the young one; when it is full, the old one is dropped (those entries
//! count as evictions) and the young one becomes old. A hit in the old
//! generation moves the entry back to the young one. Every operation is
//! O(1), memory is bounded by `capacity` entries of at most `max_key_bytes`
//! each, and frequently used keys survive like in an LRU. The cache belongs
//! to one policy version (versions only grow): a lookup or insert with a
//! newer version empties it; one with an older version is ignored.

use crate::host::{Host, Metric};
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};

/// An entry: the key's hash (computed once per lookup, with a per-cache
/// random key, so clients cannot aim collisions), the key, the verdict.
type Entry<V> = (u64, Box<[u8]>, V);

/// Key equality 8 bytes at a time: slice `==` becomes `memcmp`, which on
/// wasm32-wasip1 (wasi-libc) compares byte by byte, and keys here are long
/// (a whole token, a caller's claims).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    ca.zip(cb).all(|(x, y)| {
        let x = u64::from_ne_bytes(x.try_into().unwrap_or([0; 8]));
        let y = u64::from_ne_bytes(y.try_into().unwrap_or([0; 8]));
        x == y
    }) && ra.iter().zip(rb).all(|(x, y)| x == y)
}

/// A lookup that missed: the key's hash, for [`BoundedCache::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    hash: u64,
    version: u64,
}

/// Counters a filter exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries dropped because the cache was full.
    pub evictions: u64,
    /// Keys longer than `max_key_bytes`: decided without the cache.
    pub oversized: u64,
}

/// See [`fast_hasher`].
pub type FastHasher = foldhash::fast::FixedState;

/// The hasher for keys that clients cannot choose freely (auth caches only
/// tokens whose signature verified): foldhash, about three times faster
/// than SipHash on a long key in wasm, with a per-cache seed from the
/// host's randomness. foldhash does not claim HashDoS resistance, so caches
/// whose keys come straight from requests keep the default SipHash.
pub fn fast_hasher() -> FastHasher {
    foldhash::fast::FixedState::with_seed(RandomState::new().hash_one(0x254c_u64))
}

pub struct BoundedCache<V, S = RandomState> {
    half: usize,
    max_key_bytes: usize,
    version: u64,
    hasher: S,
    young: HashTable<Entry<V>>,
    old: HashTable<Entry<V>>,
    stats: CacheStats,
}

impl<V: Clone> BoundedCache<V> {
    /// A cache of at most `capacity` entries (0 disables it) whose keys
    /// are at most `max_key_bytes` long, hashed with a random SipHash key.
    pub fn new(capacity: usize, max_key_bytes: usize) -> BoundedCache<V> {
        BoundedCache::with_hasher(capacity, max_key_bytes, RandomState::new())
    }
}

impl<V: Clone, S: BuildHasher> BoundedCache<V, S> {
    /// Like [`new`](BoundedCache::new), with another hasher (see [`fast_hasher`]).
    pub fn with_hasher(capacity: usize, max_key_bytes: usize, hasher: S) -> BoundedCache<V, S> {
        BoundedCache {
            half: capacity.div_ceil(2),
            max_key_bytes,
            version: 0,
            hasher,
            young: HashTable::new(),
            old: HashTable::new(),
            stats: CacheStats::default(),
        }
    }

    /// The value cached for `key` under policy `version`. Counts a hit,
    /// a miss, or an oversized key.
    pub fn get(&mut self, version: u64, key: &[u8]) -> Option<V> {
        self.lookup(version, key).ok()
    }

    /// Like [`get`](Self::get), but a miss returns what
    /// [`insert`](Self::insert) needs to store the value without hashing
    /// the key again (`Err(None)`: the cache is off, the key too long, or
    /// the version old).
    pub fn lookup(&mut self, version: u64, key: &[u8]) -> Result<V, Option<Miss>> {
        if self.half == 0 {
            return Err(None);
        }
        if key.len() > self.max_key_bytes {
            self.stats.oversized += 1;
            return Err(None);
        }
        if !self.at_version(version) {
            self.stats.misses += 1;
            return Err(None);
        }
        let hash = self.hasher.hash_one(key);
        let eq = |e: &Entry<V>| e.0 == hash && same(&e.1, key);
        if let Some(e) = self.young.find(hash, eq) {
            self.stats.hits += 1;
            return Ok(e.2.clone());
        }
        match self.old.find_entry(hash, eq) {
            Ok(e) => {
                let (entry, _) = e.remove();
                self.stats.hits += 1;
                let v = entry.2.clone();
                self.insert_young(entry);
                Ok(v)
            }
            Err(_) => {
                self.stats.misses += 1;
                Err(Some(Miss { hash, version }))
            }
        }
    }

    /// Stores the value for the key a [`lookup`](Self::lookup) missed
    /// (pass the same key: another one would be filed where no lookup
    /// finds it, wasting a slot but never answering wrongly).
    pub fn insert(&mut self, miss: Miss, key: &[u8], value: V) {
        if !self.at_version(miss.version) {
            return;
        }
        let hash = miss.hash;
        if self
            .young
            .find(hash, |e| e.0 == hash && same(&e.1, key))
            .is_none()
        {
            self.insert_young((hash, key.into(), value));
        }
    }

    /// Remembers the value for `key` under policy `version` (after a
    /// [`get`](Self::get) miss; ignored for oversized keys or an older version).
    pub fn put(&mut self, version: u64, key: &[u8], value: V) {
        if self.half == 0 || key.len() > self.max_key_bytes {
            return;
        }
        let hash = self.hasher.hash_one(key);
        self.insert(Miss { hash, version }, key, value);
    }

    /// Moves to a newer policy version (emptying the cache); false for an
    /// older one, whose verdicts are neither served nor kept.
    fn at_version(&mut self, version: u64) -> bool {
        if version > self.version {
            self.young.clear();
            self.old.clear();
            self.version = version;
        }
        version == self.version
    }

    /// Inserts an entry known not to be in the young generation.
    fn insert_young(&mut self, entry: Entry<V>) {
        if self.young.len() >= self.half {
            self.stats.evictions += self.old.len() as u64;
            self.old = std::mem::take(&mut self.young);
            let (hash, key) = (entry.0, &entry.1);
            if let Ok(dup) = self
                .old
                .find_entry(hash, |e| e.0 == hash && same(&e.1, key))
            {
                dup.remove();
            }
        }
        self.young.insert_unique(entry.0, entry, |e| e.0);
    }

    /// Forgets `key`'s entry (under any version); true if there was one.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        if self.half == 0 {
            return false;
        }
        let hash = self.hasher.hash_one(key);
        let eq = |e: &Entry<V>| e.0 == hash && same(&e.1, key);
        let young = self.young.find_entry(hash, eq).map(|e| e.remove()).is_ok();
        young || self.old.find_entry(hash, eq).map(|e| e.remove()).is_ok()
    }

    /// Keeps only the entries whose value `keep` accepts (one pass over
    /// all of them); the number dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = self.len();
        self.young.retain(|e| keep(&e.2));
        self.old.retain(|e| keep(&e.2));
        before - self.len()
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

/// The counters of a [`BoundedCache`](BoundedCache):
/// the cache counts per VM, the metrics are shared by all workers, so what
/// changed since the last flush is added.
pub struct CacheCounters {
    hits: Metric,
    misses: Metric,
    evictions: Metric,
    oversized: Metric,
    flushed: CacheStats,
}

impl CacheCounters {
    /// Defines the counters (full metric names; `oversized` optional).
    pub fn define<H: Host>(
        h: &H,
        hits: &str,
        misses: &str,
        evictions: &str,
        oversized: Option<&str>,
    ) -> CacheCounters {
        CacheCounters {
            hits: h.counter(hits),
            misses: h.counter(misses),
            evictions: h.counter(evictions),
            oversized: oversized.map_or(Metric(None), |n| h.counter(n)),
            flushed: CacheStats::default(),
        }
    }

    /// Exports what the cache counted since the last call.
    pub fn flush<H: Host>(&mut self, h: &H, now: CacheStats) {
        let was = self.flushed;
        h.increment(self.hits, now.hits - was.hits);
        h.increment(self.misses, now.misses - was.misses);
        h.increment(self.evictions, now.evictions - was.evictions);
        h.increment(self.oversized, now.oversized - was.oversized);
        self.flushed = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Decider {
        Rule(usize),
    }
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Verdict {
        allowed: bool,
        rule: Decider,
        shadow_denied: Option<Decider>,
    }
    type DecisionCache = BoundedCache<Verdict>;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn v(i: usize) -> Verdict {
        Verdict {
            allowed: i.is_multiple_of(2),
            rule: Decider::Rule(i),
            shadow_denied: None,
        }
    }

    #[test]
    fn keys_compare_exactly() {
        for (a, b) in [
            (&b""[..], &b""[..]),
            (b"abcdefgh", b"abcdefgh"),
            (b"abcdefghij", b"abcdefghij"),
        ] {
            assert!(same(a, b));
        }
        for (a, b) in [
            (&b"abcdefghij"[..], &b"abcdefghiX"[..]),
            (b"abcdefgh", b"abcdefgX"),
            (b"Xbcdefghij", b"abcdefghij"),
            (b"abc", b"abcd"),
        ] {
            assert!(!same(a, b));
        }
    }

    #[test]
    fn hit_after_put_and_miss_before() {
        let mut c = DecisionCache::new(8, 64);
        assert_eq!(c.get(1, b"a"), None);
        c.put(1, b"a", v(3));
        assert_eq!(c.get(1, b"a"), Some(v(3)));
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 1,
                misses: 1,
                ..CacheStats::default()
            }
        );
    }

    #[test]
    fn never_holds_more_than_capacity_and_counts_evictions() {
        let mut c = DecisionCache::new(10, 64);
        for i in 0..1000usize {
            let k = i.to_le_bytes();
            assert_eq!(c.get(1, &k), None);
            c.put(1, &k, v(i));
            assert!(c.len() <= 10, "{} entries", c.len());
        }
        // 1000 distinct keys, at most 10 held: the rest were evicted.
        assert_eq!(c.stats().evictions as usize + c.len(), 1000);
        assert_eq!(c.get(1, &999usize.to_le_bytes()), Some(v(999)));
        assert_eq!(c.get(1, &0usize.to_le_bytes()), None);
    }

    #[test]
    fn a_key_in_use_survives_generations() {
        let mut c = DecisionCache::new(4, 64);
        c.put(1, b"hot", v(0));
        for i in 0..100usize {
            let k = i.to_le_bytes();
            c.get(1, &k);
            c.put(1, &k, v(i));
            assert_eq!(c.get(1, b"hot"), Some(v(0)), "lost after {i} inserts");
        }
    }

    #[test]
    fn lookup_then_insert_hashes_once_and_is_found_after() {
        let mut c = DecisionCache::new(8, 64);
        let miss = c.lookup(1, b"k").unwrap_err().unwrap();
        c.insert(miss, b"k", v(2));
        assert_eq!(c.lookup(1, b"k").ok(), Some(v(2)));
        // A miss from an older version stores nothing.
        let old = c.lookup(1, b"j").unwrap_err().unwrap();
        assert!(c.lookup(2, b"x").is_err());
        c.insert(old, b"j", v(1));
        assert_eq!(c.get(2, b"j"), None);
        assert!(matches!(
            DecisionCache::new(0, 8).lookup(1, b"k"),
            Err(None)
        ));
    }

    #[test]
    fn a_new_policy_version_empties_it() {
        let mut c = DecisionCache::new(8, 64);
        c.get(1, b"a");
        c.put(1, b"a", v(0));
        assert_eq!(c.get(2, b"a"), None);
        assert!(c.is_empty());
        // A late put for the previous version is ignored.
        c.put(1, b"a", v(0));
        assert_eq!(c.get(2, b"a"), None);
    }

    #[test]
    fn entries_are_removed_by_key_or_by_value_in_both_generations() {
        let mut c = DecisionCache::new(4, 64);
        for (i, k) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            c.put(1, *k, v(i));
        }
        // "a" and "b" are in the old generation now.
        assert!(c.remove(b"a"));
        assert!(!c.remove(b"a"));
        assert!(c.remove(b"d"));
        assert_eq!(c.get(1, b"a"), None);
        assert_eq!(c.retain(|x| *x != v(1)), 1);
        assert_eq!((c.get(1, b"b"), c.get(1, b"c")), (None, Some(v(2))));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn oversized_keys_and_capacity_zero_bypass_it() {
        let mut c = DecisionCache::new(8, 4);
        c.put(1, b"toolong", v(0));
        assert_eq!(c.get(1, b"toolong"), None);
        assert_eq!(c.stats().oversized, 1);
        assert!(c.is_empty());
        let mut off = DecisionCache::new(0, 64);
        off.put(0, b"a", v(0));
        assert_eq!(off.get(0, b"a"), None);
        assert_eq!(off.stats(), CacheStats::default());
    }
}
