//! Buckets in a fixed table of shared-data slots, updated with
//! compare-and-swap so that every worker VM sees one bucket per key.
//!
//! ABI 0.2.1 shared data has no delete, so keys are not used as
//! shared-data keys (a million distinct clients would leave a million
//! entries). Instead a key hashes (keyed SipHash, the seed shared by the
//! workers) to two candidate slots of a table of `slots` entries; a slot
//! records its key, so a collision is seen, and a slot whose bucket is full
//! again (idle) is taken over by the next key that needs it. Memory is
//! bounded by `slots × (record size)`, whatever arrives.
//!
//! Record: version byte `1`, key length (u16 LE), key, TAT (u64 LE).

use crate::gcra::{Outcome, Rate};

/// The shared-data operations the table needs (Envoy's semantics: a
/// missing key reads as `(None, None)`; setting with a CAS that is not
/// current fails; an absent key accepts any CAS).
pub trait Store {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// `false` on a CAS mismatch (or another failure).
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// The table's shape.
#[derive(Debug, Clone)]
pub struct Table {
    /// Shared-data key prefix.
    pub prefix: String,
    pub slots: u32,
    /// Attempts per slot before giving up (CAS mismatches).
    pub max_cas_retries: u32,
    pub seed: (u64, u64),
}

/// How an admission attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The bucket was updated (or, refused, left as it was).
    Done(Outcome),
    /// Both candidate slots hold other keys' busy buckets.
    Collision,
    /// Too many CAS mismatches in a row (contention).
    Contention,
    /// The key is longer than a record can hold.
    KeyTooLong,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStats {
    pub cas_retries: u64,
    /// Slots taken over from an idle bucket of another key.
    pub recycled: u64,
}

pub const MAX_KEY_BYTES: usize = 512;

fn encode(key: &str, tat: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(11 + key.len());
    v.push(1);
    v.extend_from_slice(&(key.len() as u16).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(&tat.to_le_bytes());
    v
}

/// (key, TAT) of a record; `None` if it is not one.
fn decode(v: &[u8]) -> Option<(&[u8], u64)> {
    if v.first() != Some(&1) {
        return None;
    }
    let len = u16::from_le_bytes(v.get(1..3)?.try_into().ok()?) as usize;
    let key = v.get(3..3 + len)?;
    let tat = u64::from_le_bytes(v.get(3 + len..11 + len)?.try_into().ok()?);
    Some((key, tat))
}

impl Table {
    /// The two candidate slots of a key.
    pub fn candidates(&self, key: &str) -> [u32; 2] {
        #[allow(deprecated)] // SipHash-2-4 with keys: std has no other keyed hasher
        let mut h = std::hash::SipHasher::new_with_keys(self.seed.0, self.seed.1);
        std::hash::Hasher::write(&mut h, key.as_bytes());
        let x = std::hash::Hasher::finish(&h);
        let n = u64::from(self.slots.max(1));
        let a = (x % n) as u32;
        let mut b = (x.rotate_left(32).wrapping_mul(0x9e37_79b9_7f4a_7c15) % n) as u32;
        if b == a && n > 1 {
            b = (a + 1) % n as u32;
        }
        [a, b]
    }

    fn slot_key(&self, slot: u32) -> String {
        format!("{}{slot}", self.prefix)
    }

    /// Counts one request for `key` at `now` (ns) against `rate`.
    pub fn admit(
        &self,
        store: &mut dyn Store,
        key: &str,
        rate: &Rate,
        now: u64,
        stats: &mut SlotStats,
    ) -> Admission {
        if key.len() > MAX_KEY_BYTES {
            return Admission::KeyTooLong;
        }
        let mut contention = false;
        for slot in self.candidates(key) {
            let name = self.slot_key(slot);
            let (mut mismatches, mut creates) = (0, 0);
            loop {
                let (value, cas) = store.get(&name);
                let (value, cas) = match (value, cas) {
                    (Some(v), Some(c)) if !v.is_empty() => (v, c),
                    _ => {
                        // Absent: an absent key takes any CAS, so create an
                        // empty record first, then race on a real CAS.
                        if creates == 2 {
                            contention = true;
                            break;
                        }
                        creates += 1;
                        store.set(&name, &[0], None);
                        continue;
                    }
                };
                let tat = match decode(&value) {
                    Some((k, tat)) if k == key.as_bytes() => tat,
                    Some((_, tat)) if !Rate::idle(tat, now) => break, // busy: next slot
                    Some(_) => {
                        stats.recycled += 1;
                        0
                    }
                    None => 0, // the empty record
                };
                let (outcome, new_tat) = rate.apply(tat, now);
                if !outcome.allowed && tat != 0 {
                    return Admission::Done(outcome); // nothing to write
                }
                if store.set(&name, &encode(key, new_tat), Some(cas)) {
                    return Admission::Done(outcome);
                }
                if mismatches == self.max_cas_retries {
                    contention = true;
                    break;
                }
                mismatches += 1;
                stats.cas_retries += 1;
            }
            if contention {
                return Admission::Contention;
            }
        }
        Admission::Collision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Envoy's shared data semantics, in memory.
    #[derive(Default)]
    struct Mem {
        map: HashMap<String, (Vec<u8>, u32)>,
        next: u32,
        /// Fail this many sets with a CAS mismatch (simulated contention).
        fail_sets: u32,
    }

    impl Store for Mem {
        fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.map.get(key) {
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            }
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            if self.fail_sets > 0 && cas.is_some() {
                self.fail_sets -= 1;
                return false;
            }
            if let (Some(c), Some((_, cur))) = (cas, self.map.get(key)) {
                if c != 0 && c != *cur {
                    return false;
                }
            }
            self.next += 1;
            self.map
                .insert(key.to_string(), (value.to_vec(), self.next));
            true
        }
    }

    const S: u64 = 1_000_000_000;

    fn table(slots: u32) -> Table {
        Table {
            prefix: "rl|".into(),
            slots,
            max_cas_retries: 4,
            seed: (1, 2),
        }
    }

    fn admitted(t: &Table, m: &mut Mem, key: &str, rate: &Rate, now: u64, n: usize) -> usize {
        let mut st = SlotStats::default();
        (0..n)
            .filter(
                |_| matches!(t.admit(m, key, rate, now, &mut st), Admission::Done(o) if o.allowed),
            )
            .count()
    }

    #[test]
    fn a_key_gets_exactly_its_burst() {
        let t = table(1024);
        let mut m = Mem::default();
        let r = Rate {
            requests: 5,
            period_ns: S,
            burst: 5,
        };
        assert_eq!(admitted(&t, &mut m, "tenant:acme", &r, 10 * S, 20), 5);
        assert_eq!(admitted(&t, &mut m, "tenant:other", &r, 10 * S, 20), 5);
        assert_eq!(
            admitted(&t, &mut m, "tenant:acme", &r, 10 * S + S / 5, 20),
            1
        );
    }

    #[test]
    fn memory_stays_bounded_with_many_keys_and_idle_slots_are_recycled() {
        let t = table(64);
        let mut m = Mem::default();
        let r = Rate {
            requests: 1,
            period_ns: S,
            burst: 1,
        };
        let mut st = SlotStats::default();
        let mut collisions = 0;
        for i in 0..10_000u64 {
            // Each key sends once; a second later its bucket is idle again.
            match t.admit(&mut m, &format!("ip:{i}"), &r, i * S / 10, &mut st) {
                Admission::Done(o) => assert!(o.allowed),
                Admission::Collision => collisions += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(m.map.len() <= 64, "{} slots", m.map.len());
        assert!(st.recycled > 9_000, "{st:?}");
        // 10 new keys per second, each busy for a second: about 10 of 64
        // slots busy, so both choices busy for about (10/64)² = 2.4 % of keys.
        assert!(collisions < 500, "{collisions}");
    }

    #[test]
    fn busy_slots_of_other_keys_are_a_collision_not_a_shared_bucket() {
        let t = table(2);
        let mut m = Mem::default();
        let r = Rate {
            requests: 1,
            period_ns: 3600 * S,
            burst: 1,
        };
        let mut st = SlotStats::default();
        assert!(matches!(t.admit(&mut m, "a", &r, S, &mut st), Admission::Done(o) if o.allowed));
        assert!(matches!(t.admit(&mut m, "b", &r, S, &mut st), Admission::Done(o) if o.allowed));
        assert_eq!(t.admit(&mut m, "c", &r, S, &mut st), Admission::Collision);
        assert!(matches!(t.admit(&mut m, "a", &r, S, &mut st), Admission::Done(o) if !o.allowed));
    }

    #[test]
    fn cas_mismatches_are_retried_then_reported() {
        let t = table(16);
        let r = Rate {
            requests: 10,
            period_ns: S,
            burst: 10,
        };
        let mut m = Mem::default();
        let mut st = SlotStats::default();
        assert!(matches!(
            t.admit(&mut m, "k", &r, S, &mut st),
            Admission::Done(_)
        ));
        m.fail_sets = 3;
        assert!(matches!(t.admit(&mut m, "k", &r, S, &mut st), Admission::Done(o) if o.allowed));
        assert_eq!(st.cas_retries, 3);
        m.fail_sets = 1000;
        assert_eq!(t.admit(&mut m, "k", &r, S, &mut st), Admission::Contention);
        assert_eq!(
            t.admit(&mut m, &"x".repeat(MAX_KEY_BYTES + 1), &r, S, &mut st),
            Admission::KeyTooLong
        );
    }

    #[test]
    fn records_round_trip_and_garbage_is_not_a_record() {
        let v = encode("tenant:acme", 42);
        assert_eq!(decode(&v), Some((&b"tenant:acme"[..], 42)));
        assert_eq!(decode(&[0]), None);
        assert_eq!(decode(&v[..v.len() - 1]), None);
        assert_eq!(decode(&[1, 200, 0]), None);
    }
}
