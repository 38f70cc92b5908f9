use super::*;
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn page(holders: &str) -> String {
    format!(r#"{{"epoch":"pg-1","version":7,"snapshot":true,"holders":{holders},"next":"c1"}}"#)
}

#[test]
fn a_page_is_read_with_its_holders_in_order() {
    let p = parse_page(
        page(
            r#"[{"tenant":"acme","grants":[["curves:CAISO","read"],["instruments:*","*"]]},
                {"tenant":"beta","grants":[]},{"subject":"acme","grants":[["*","read"]]}]"#,
        )
        .as_bytes(),
        10,
        "grants.max_holder_grants",
    )
    .unwrap();
    assert_eq!((p.epoch.as_str(), p.version, p.snapshot), ("pg-1", 7, true));
    assert_eq!((p.grants, p.next.as_deref()), (3, Some("c1")));
    assert_eq!(p.holders[2].0, Holder::Subject("acme".into()));
}

#[test]
fn a_bad_page_is_refused_with_the_place() {
    let bad = |holders: &str, max: usize| {
        parse_page(page(holders).as_bytes(), max, "grants.max_holder_grants").unwrap_err()
    };
    let e = bad(
        r#"[{"tenant":"a","grants":[["curves:CA ISO","read"]]}]"#,
        10,
    );
    assert!(e.starts_with("holders[0].grants[0].resource:"), "{e}");
    let e = bad(r#"[{"tenant":"a","grants":[["x","READ"]]}]"#, 10);
    assert!(e.starts_with("holders[0].grants[0].action:"), "{e}");
    let e = bad(
        r#"[{"tenant":"b","grants":[]},{"tenant":"a","grants":[]}]"#,
        10,
    );
    assert!(e.contains("holders[1]: out of order"), "{e}");
    let e = bad(
        r#"[{"subject":"a","grants":[]},{"tenant":"a","grants":[]}]"#,
        10,
    );
    assert!(e.contains("holders[1]: out of order"), "{e}");
    let e = bad(r#"[{"tenant":"a","subject":"a","grants":[]}]"#, 10);
    assert!(e.contains("exactly one"), "{e}");
    let e = bad(r#"[{"tenant":"","grants":[]}]"#, 10);
    assert!(e.starts_with("holders[0].tenant:"), "{e}");
    let e = bad(
        r#"[{"tenant":"a","grants":[["x","read"],["y","read"]]}]"#,
        1,
    );
    assert!(e.contains("more than grants.max_holder_grants 1"), "{e}");
    for body in [
        "",
        "[]",
        r#"{"epoch":"","version":1,"snapshot":true,"holders":[],"next":null}"#,
        r#"{"epoch":"e","version":-1,"snapshot":true,"holders":[],"next":null}"#,
        r#"{"epoch":"e","version":1,"snapshot":true,"holders":[{"tenant":"a","grants":[["x"]]}],"next":null}"#,
    ] {
        assert!(parse_page(body.as_bytes(), 10, "m").is_err(), "{body}");
    }
}

#[test]
fn entries_carry_their_generation_and_read_back() {
    let v = entry(3, [("curves:CAISO", "read"), ("instruments:*", "*")]);
    assert_eq!(v, b"3\ncurves:CAISO read\ninstruments:* *\n");
    let (generation, g) = read_entry(&v).unwrap();
    assert_eq!((generation, g.len()), (3, 2));
    assert!(g.covers("instruments:ICE", "subscribe"));
    assert_eq!(entry_size(&v), Some((3, 2)));
    assert_eq!(read_entry(b"4\n").map(|(n, g)| (n, g.len())), Some((4, 0)));
    for bad in [&b""[..], b"x\n", b"1\nnospace\n", b"1\na b c\n", b"\xff\n"] {
        assert!(read_entry(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn the_state_accepts_the_generations_in_force_and_loading() {
    let mark = |generation| Mark {
        epoch: "e".into(),
        version: 1,
        generation,
        grants: 0,
    };
    let mut s = State::default();
    assert!(!s.accepts(1));
    assert_eq!(s.next_generation(), 1);
    s.current = Some(mark(1));
    s.loading = Some(mark(2));
    assert!(s.accepts(1) && s.accepts(2) && !s.accepts(3));
    assert_eq!(s.next_generation(), 3);
    assert_eq!(State::parse(&s.to_bytes()), Some(s));
}

fn since(log: &Log, v: u64) -> Option<Vec<String>> {
    log.since(1, v).map(|i| i.map(str::to_string).collect())
}

#[test]
fn the_log_keeps_whole_versions_and_raises_its_floor() {
    let mut log = Log {
        generation: 1,
        floor: 10,
        changes: vec![],
    };
    assert!(!log.push(11, ["t/a".to_string(), "t/b".to_string()], 4));
    assert!(!log.push(12, ["s/c".to_string()], 4));
    assert_eq!(since(&log, 11), Some(vec!["s/c".to_string()]));
    assert_eq!(since(&log, 9), None);
    assert!(log.since(2, 11).is_none());
    // Two more push one entry of version 11 out: all of 11 goes.
    assert!(log.push(13, ["t/d".to_string(), "t/e".to_string()], 4));
    assert_eq!(log.floor, 11);
    assert_eq!(since(&log, 10), None);
    assert_eq!(
        since(&log, 11),
        Some(vec!["s/c".to_string(), "t/d".into(), "t/e".into()])
    );
    // A version bigger than the log: the floor passes it.
    assert!(log.push(14, (0..5).map(|i| format!("t/{i}")), 4));
    assert_eq!((log.floor, log.changes.len()), (14, 0));
    assert_eq!(Log::parse(&log.to_bytes()), Some(log));
}
