//! The feed consumer against a small model of the sidecar's feed (the
//! real one is tested in the emulator and the dev stack).

use super::*;
use filter_common::double::FakeHost;
use filter_common::form::query_value;
use std::collections::{BTreeMap, BTreeSet};
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

type Key = (u8, String);

/// The feed of the contract: snapshots and deltas, paged by `limit`.
struct Sidecar {
    epoch: String,
    version: u64,
    grants: BTreeMap<Key, BTreeSet<(String, String)>>,
    /// (version, holder) of every change; deltas reach back to `floor`.
    log: Vec<(u64, Key)>,
    floor: u64,
}

fn key(h: &str) -> Key {
    let (k, n) = h.split_once('/').unwrap();
    (u8::from(k == "s"), n.to_string())
}

impl Sidecar {
    fn new(epoch: &str) -> Sidecar {
        Sidecar {
            epoch: epoch.into(),
            version: 0,
            grants: BTreeMap::new(),
            log: Vec::new(),
            floor: 0,
        }
    }

    fn put(&mut self, holder: &str, r: &str, a: &str) {
        self.version += 1;
        let k = key(holder);
        self.grants
            .entry(k.clone())
            .or_default()
            .insert((r.into(), a.into()));
        self.log.push((self.version, k));
    }

    fn delete(&mut self, holder: &str, r: &str, a: &str) {
        self.version += 1;
        let k = key(holder);
        let set = self.grants.get_mut(&k).unwrap();
        set.remove(&(r.to_string(), a.to_string()));
        if set.is_empty() {
            self.grants.remove(&k);
        }
        self.log.push((self.version, k));
    }

    /// (status, body) for a request path.
    fn answer(&self, path: &str) -> (u16, String) {
        let q = path.split_once('?').map_or("", |(_, q)| q);
        let limit: usize = query_value(q, "limit").unwrap().parse().unwrap();
        // A cursor: "s|d:<version>:<after>:<index>".
        let (snapshot, version, after, from) = match query_value(q, "cursor") {
            Some(c) => {
                let p: Vec<&str> = c.split(':').collect();
                (
                    p[0] == "s",
                    p[1].parse().unwrap(),
                    p[2].parse().unwrap(),
                    p[3].parse().unwrap(),
                )
            }
            None => {
                let after = query_value(q, "after").map(|a| a.parse::<u64>().unwrap());
                match (query_value(q, "epoch"), after) {
                    (Some(e), Some(a)) if e == self.epoch && a >= self.version => {
                        return (304, String::new())
                    }
                    (Some(e), Some(a)) if e == self.epoch && a >= self.floor => {
                        (false, self.version, a, 0)
                    }
                    _ => (true, self.version, 0, 0),
                }
            }
        };
        let holders: Vec<Key> = if snapshot {
            self.grants.keys().cloned().collect()
        } else {
            let changed: BTreeSet<Key> = self
                .log
                .iter()
                .filter(|(v, _)| *v > after && *v <= version)
                .map(|(_, k)| k.clone())
                .collect();
            changed.into_iter().collect()
        };
        let mut out = Vec::new();
        let mut n = 0;
        let mut i = from;
        while let Some(k) = holders.get(i) {
            if n >= limit && !out.is_empty() {
                break;
            }
            let gs: Vec<(String, String)> = self
                .grants
                .get(k)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect();
            n += gs.len();
            let kind = if k.0 == 0 { "tenant" } else { "subject" };
            out.push(serde_json::json!({kind: k.1, "grants": gs}));
            i += 1;
        }
        let next = (i < holders.len())
            .then(|| format!("{}:{version}:{after}:{i}", if snapshot { "s" } else { "d" }));
        let body = serde_json::json!({
            "epoch": self.epoch, "version": version, "snapshot": snapshot,
            "holders": out, "next": next,
        });
        (200, body.to_string())
    }
}

fn source() -> FeedSource {
    FeedSource {
        cluster: "sidecar".into(),
        authority: "sidecar".into(),
        path: "/internal/v1/grants".into(),
        token: Some("s3cret".into()),
        timeout: Duration::from_secs(5),
        timings: Timings {
            refresh_ms: 1000,
            retry_initial_ms: 500,
            retry_max_ms: 8000,
            min_refetch_ms: 1000,
        },
        page_grants: 2,
        max_page_bytes: 64 * 1024,
        max_grants: 100,
        max_holder_grants: 10,
        log_entries: 8,
        holder_cache_entries: 64,
        key: "g".into(),
    }
}

fn at_start() -> FakeHost {
    FakeHost::at(Duration::from_secs(1_800_000_000))
}

/// Answers every call of `h` from `s` until none is left; the events.
fn pump(h: &FakeHost, f: &mut Feed, s: &Sidecar) -> Vec<FeedEvent> {
    let mut events = Vec::new();
    if let Some(e) = f.poll(h) {
        events.push(e);
    }
    while let Some(c) = h.take_calls().pop() {
        assert_eq!(c.header("authorization"), Some("Bearer s3cret"));
        let (status, body) = s.answer(c.header(":path").unwrap());
        let n = h.answer(Some(status), &[], body.as_bytes());
        events.extend(f.on_response(h, c.token, n));
    }
    events
}

fn holds(f: &mut Feed, h: &FakeHost, tenant: &str, subject: &str, r: &str, a: &str) -> bool {
    let c = Caller {
        tenant: Some(tenant),
        subject: Some(subject),
    };
    f.caller(h, Some(tenant), Some(subject)).holds(c, r, a)
}

fn acme_and_friends() -> Sidecar {
    let mut s = Sidecar::new("pg-1");
    s.put("t/acme", "curves:CAISO", "read");
    s.put("t/acme", "curves:PJM", "read");
    s.put("t/beta", "instruments:*", "read");
    s.put("s/u1", "*", "subscribe");
    s
}

#[test]
fn a_snapshot_in_pages_is_in_force_only_once_complete() {
    let s = acme_and_friends();
    let a = at_start();
    let b = a.sibling();
    let (mut fa, mut fb) = (Feed::new(source()), Feed::new(source()));
    // One page at a time: the first only.
    assert_eq!(fa.poll(&a), None);
    assert_eq!(fb.poll(&b), None);
    assert!(b.take_calls().is_empty(), "one worker fetches");
    let c = a.take_calls().pop().unwrap();
    assert_eq!(c.header(":path"), Some("/internal/v1/grants?limit=2"));
    let (_, body) = s.answer(c.header(":path").unwrap());
    let n = a.answer(Some(200), &[], body.as_bytes());
    let e = fa.on_response(&a, c.token, n).unwrap();
    assert!(
        matches!(
            e,
            FeedEvent::Applied {
                snapshot: true,
                done: false,
                holders: 1,
                ..
            }
        ),
        "{e:?}"
    );
    // Half loaded: not in force.
    assert_eq!(fb.sync(&b), Change::Nothing);
    assert!(!fb.ready());
    // The rest (the next page went out at once).
    let c = a.take_calls().pop().expect("the next page");
    assert!(
        c.header(":path").unwrap().contains("&cursor=s%3A4%3A0%3A1"),
        "{c:?}"
    );
    let (_, body) = s.answer(c.header(":path").unwrap());
    let n = a.answer(Some(200), &[], body.as_bytes());
    assert_eq!(
        fa.on_response(&a, c.token, n),
        Some(FeedEvent::Applied {
            snapshot: true,
            holders: 2,
            done: true,
            version: 4,
            grants: 4
        })
    );
    assert!(a.take_calls().is_empty());
    assert_eq!(fb.sync(&b), Change::All { overflow: false });
    assert!(fb.ready());
    assert_eq!(fb.version().map(|m| (m.version, m.grants)), Some((4, 4)));
    assert!(holds(&mut fb, &b, "acme", "x", "curves:CAISO", "read"));
    assert!(!holds(
        &mut fb,
        &b,
        "acme",
        "x",
        "curves:CAISO",
        "subscribe"
    ));
    assert!(holds(&mut fb, &b, "beta", "x", "instruments:ICE", "read"));
    assert!(holds(&mut fb, &b, "none", "u1", "curves:X", "subscribe"));
    assert!(!holds(&mut fb, &b, "none", "u2", "curves:X", "subscribe"));
    // The grants live once, in shared data.
    assert_eq!(
        a.shared_value("g/t/acme").unwrap(),
        b"1\ncurves:CAISO read\ncurves:PJM read\n"
    );
}

#[test]
fn deltas_move_only_the_holders_they_change() {
    let mut s = acme_and_friends();
    let a = at_start();
    let b = a.sibling();
    let (mut fa, mut fb) = (Feed::new(source()), Feed::new(source()));
    pump(&a, &mut fa, &s);
    fb.sync(&b);
    assert!(holds(&mut fb, &b, "acme", "u1", "curves:CAISO", "read"));
    assert!(holds(&mut fb, &b, "beta", "u9", "instruments:ICE", "read"));
    // Nothing new: a 304, one per refresh interval.
    a.advance(Duration::from_millis(1000));
    assert_eq!(pump(&a, &mut fa, &s), vec![FeedEvent::NotModified]);
    a.advance(Duration::from_millis(999));
    assert!(pump(&a, &mut fa, &s).is_empty(), "not due yet");
    // A revoke and a grant.
    s.delete("t/acme", "curves:CAISO", "read");
    s.put("s/u2", "curves:CAISO", "read");
    a.advance(Duration::from_millis(1));
    let events = pump(&a, &mut fa, &s);
    assert!(
        events.iter().all(|e| matches!(
            e,
            FeedEvent::Applied {
                snapshot: false,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(matches!(
        events.last(),
        Some(FeedEvent::Applied {
            done: true,
            version: 6,
            grants: 4,
            ..
        })
    ));
    // The other worker still has its cached acme until it syncs.
    assert!(holds(&mut fb, &b, "acme", "u1", "curves:CAISO", "read"));
    assert_eq!(
        fb.sync(&b),
        Change::Holders(vec!["t/acme".into(), "s/u2".into()])
    );
    assert!(!holds(&mut fb, &b, "acme", "u1", "curves:CAISO", "read"));
    assert!(holds(&mut fb, &b, "acme", "u1", "curves:PJM", "read"));
    assert!(holds(&mut fb, &b, "x", "u2", "curves:CAISO", "read"));
    assert!(holds(&mut fb, &b, "beta", "u9", "instruments:ICE", "read"));
    let hits = fb.cache_stats().hits;
    assert!(hits >= 4, "beta came from the cache: {hits}");
    // A holder that now holds nothing is an empty entry.
    s.delete("t/acme", "curves:PJM", "read");
    a.advance(Duration::from_millis(1000));
    pump(&a, &mut fa, &s);
    assert_eq!(a.shared_value("g/t/acme").unwrap(), b"1\n");
    fb.sync(&b);
    assert!(!holds(&mut fb, &b, "acme", "u1", "curves:PJM", "read"));
    assert_eq!(fb.version().map(|m| m.grants), Some(3));
}

#[test]
fn a_new_epoch_reloads_under_a_new_generation_and_forgets_the_old() {
    let s = acme_and_friends();
    let a = at_start();
    let b = a.sibling();
    let (mut fa, mut fb) = (Feed::new(source()), Feed::new(source()));
    pump(&a, &mut fa, &s);
    fb.sync(&b);
    // The sidecar lost its history (a file store restarted): beta is gone.
    let mut s2 = Sidecar::new("file-2");
    s2.put("t/acme", "curves:CAISO", "read");
    s2.put("s/u1", "*", "subscribe");
    s2.put("s/u3", "curves:PJM", "read");
    a.advance(Duration::from_millis(1000));
    // The first page only.
    fa.poll(&a);
    let c = a.take_calls().pop().unwrap();
    assert!(c.header(":path").unwrap().contains("epoch=pg-1&after=4"));
    let (_, body) = s2.answer(c.header(":path").unwrap());
    let n = a.answer(Some(200), &[], body.as_bytes());
    assert!(matches!(
        fa.on_response(&a, c.token, n),
        Some(FeedEvent::Applied { done: false, .. })
    ));
    // Mid-load the old version is in force, beta included.
    assert_eq!(fb.sync(&b), Change::Nothing);
    assert!(holds(&mut fb, &b, "beta", "-", "instruments:ICE", "read"));
    // acme's entry is of generation 2 already; a worker that has not seen
    // the state naming it reads it all the same.
    assert!(a.shared_value("g/t/acme").unwrap().starts_with(b"2\n"));
    let mut fc = Feed::new(source());
    fc.state = State {
        current: fb.state.current.clone(),
        ..State::default()
    };
    assert!(holds(&mut fc, &b, "acme", "-", "curves:CAISO", "read"));
    // The rest.
    while let Some(c) = a.take_calls().pop() {
        let (_, body) = s2.answer(c.header(":path").unwrap());
        let n = a.answer(Some(200), &[], body.as_bytes());
        fa.on_response(&a, c.token, n);
    }
    assert_eq!(fb.sync(&b), Change::All { overflow: false });
    assert_eq!(
        fb.version()
            .map(|m| (m.epoch.as_str(), m.generation, m.version)),
        Some(("file-2", 2, 3))
    );
    // beta's entry is of generation 1: read as nothing.
    assert!(a.shared_value("g/t/beta").unwrap().starts_with(b"1\n"));
    assert!(!holds(&mut fb, &b, "beta", "-", "instruments:ICE", "read"));
    assert!(holds(&mut fb, &b, "-", "u3", "curves:PJM", "read"));
}

#[test]
fn a_bad_page_keeps_what_is_in_force_and_is_retried_later() {
    let mut s = acme_and_friends();
    let a = at_start();
    let mut f = Feed::new(source());
    pump(&a, &mut f, &s);
    f.sync(&a);
    let before = a.shared_value("g.state");
    s.put("t/acme", "curves:ERCOT", "read");
    a.advance(Duration::from_millis(1000));
    f.poll(&a);
    let c = a.take_calls().pop().unwrap();
    let bad = br#"{"epoch":"pg-1","version":5,"snapshot":false,"holders":[{"tenant":"acme","grants":[["curves:ER COT","read"]]}],"next":null}"#;
    let n = a.answer(Some(200), &[], bad);
    match f.on_response(&a, c.token, n) {
        Some(FeedEvent::Refused {
            why,
            retry_in_ms: 500,
        }) => {
            assert!(why.starts_with("holders[0].grants[0].resource"), "{why}")
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(a.shared_value("g.state"), before);
    assert!(holds(&mut f, &a, "acme", "-", "curves:CAISO", "read"));
    // Too big, then a failure: the delay doubles.
    a.advance(Duration::from_millis(500));
    f.poll(&a);
    let c = a.take_calls().pop().unwrap();
    let n = a.answer(Some(200), &[], &vec![b' '; 64 * 1024 + 1]);
    assert!(matches!(
        f.on_response(&a, c.token, n),
        Some(FeedEvent::Refused {
            retry_in_ms: 1000,
            ..
        })
    ));
    a.advance(Duration::from_millis(1000));
    f.poll(&a);
    let c = a.take_calls().pop().unwrap();
    a.answer(Some(503), &[], b"");
    // (Doubling stops at the refresh interval.)
    let e = f.on_response(&a, c.token, 0);
    assert!(
        matches!(
            e,
            Some(FeedEvent::Failed {
                retry_in_ms: 1000,
                ..
            })
        ),
        "{e:?}"
    );
    // Then it goes through.
    a.advance(Duration::from_millis(1000));
    let events = pump(&a, &mut f, &s);
    assert!(
        matches!(
            events.last(),
            Some(FeedEvent::Applied {
                done: true,
                version: 5,
                ..
            })
        ),
        "{events:?}"
    );
    f.sync(&a);
    assert!(holds(&mut f, &a, "acme", "-", "curves:ERCOT", "read"));
}

#[test]
fn the_bounds_refuse_what_exceeds_them() {
    let mut s = acme_and_friends();
    let a = at_start();
    let mut f = Feed::new(FeedSource {
        max_grants: 5,
        ..source()
    });
    pump(&a, &mut f, &s);
    f.sync(&a);
    s.put("t/gamma", "curves:A", "read");
    s.put("t/gamma", "curves:B", "read");
    a.advance(Duration::from_millis(1000));
    let events = pump(&a, &mut f, &s);
    match &events[..] {
        [FeedEvent::Refused { why, .. }] => assert!(why.contains("grants.max_grants 5"), "{why}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(f.version().map(|m| m.grants), Some(4));
    assert!(!holds(&mut f, &a, "gamma", "-", "curves:A", "read"));
    // A snapshot over the bound is refused too, and nothing changes.
    let b = at_start();
    let mut g = Feed::new(FeedSource {
        max_grants: 3,
        ..source()
    });
    let events = pump(&b, &mut g, &s);
    assert!(
        matches!(events.last(), Some(FeedEvent::Refused { .. })),
        "{events:?}"
    );
    g.sync(&b);
    assert!(!g.ready());
}

#[test]
fn a_worker_behind_the_log_empties_its_cache() {
    let mut s = acme_and_friends();
    let a = at_start();
    let b = a.sibling();
    let mut fa = Feed::new(source());
    let mut fb = Feed::new(FeedSource {
        log_entries: 2,
        ..source()
    });
    // fb's bound on the log is what the fetcher uses: let it fetch.
    pump(&a, &mut fa, &s);
    fa.sync(&a);
    fb.sync(&b);
    for i in 0..3 {
        s.put(&format!("t/n{i}"), "curves:A", "read");
        b.advance(Duration::from_millis(1000));
        pump(&b, &mut fb, &s);
    }
    assert_eq!(fa.sync(&a), Change::All { overflow: true });
    assert!(holds(&mut fa, &a, "n0", "-", "curves:A", "read"));
}
