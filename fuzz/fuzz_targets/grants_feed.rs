//! The grants feed's pages as the entitlements filter reads them, and the
//! per-holder shared-data entries it writes and reads back. Invariants: a
//! page that is accepted counts its grants right and names each holder
//! once; an entry reads back with its generation and every grant.
#![no_main]

use arbitrary::Arbitrary;
use entitlements_core::feed::{entry, entry_size, holder_key, parse_page, read_entry};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    page: &'a [u8],
    generation: u64,
    grants: Vec<(&'a str, &'a str)>,
}

fuzz_target!(|i: Input<'_>| {
    if let Ok(p) = parse_page(i.page, 1000, "max_holder_grants") {
        assert_eq!(
            p.grants,
            p.holders.iter().map(|(_, g)| g.len()).sum::<usize>()
        );
        let mut keys: Vec<String> = p.holders.iter().map(|(h, _)| holder_key(h)).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "a holder twice");
    }
    let _ = read_entry(i.page);
    // An entry made of grants the feed accepts reads back whole.
    let ok: Vec<(&str, &str)> = i
        .grants
        .iter()
        .copied()
        .filter(|(r, a)| {
            entitlements_core::grants::Grant::new(
                entitlements_core::grants::Holder::Tenant("t".into()),
                r,
                a,
            )
            .is_ok()
        })
        .collect();
    let e = entry(i.generation, ok.iter().copied());
    let (generation, held) = read_entry(&e).expect("an entry reads back");
    assert_eq!(generation, i.generation);
    assert_eq!(entry_size(&e), Some((i.generation, ok.len())));
    for (r, a) in &ok {
        assert!(held.covers(r, a), "{r} {a} lost");
    }
});
