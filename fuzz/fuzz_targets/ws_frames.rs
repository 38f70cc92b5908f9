//! WebSocket frames from a client, as the socket delivers them: in any
//! chunks. Invariants: the messages and the violation do not depend on
//! how the bytes were split; text is UTF-8; what the parser holds stays
//! within its bound.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sidecar::ws::{Incoming, Parser, Violation};

const MAX: usize = 1024;

#[derive(Arbitrary, Debug)]
struct Input {
    bytes: Vec<u8>,
    /// Chunk lengths (each 1..=256), cycled.
    splits: Vec<u8>,
}

fn run(chunks: &mut dyn Iterator<Item = &[u8]>) -> (Vec<Incoming>, Option<Violation>) {
    let mut p = Parser::new(MAX);
    let mut got = Vec::new();
    for c in chunks {
        let r = p.feed(c, |m| {
            if let Incoming::Text(t) = &m {
                assert!(std::str::from_utf8(t).is_ok(), "text that is not UTF-8");
            }
            got.push(m);
            Ok(())
        });
        assert!(p.buffered() <= 2 * MAX + 14, "{} bytes held", p.buffered());
        if let Err(v) = r {
            return (got, Some(v));
        }
    }
    (got, None)
}

fuzz_target!(|i: Input| {
    let whole = run(&mut std::iter::once(i.bytes.as_slice()));
    let mut rest = i.bytes.as_slice();
    let mut sizes = i.splits.iter().cycle();
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .map_or(rest.len(), |&s| usize::from(s).max(1))
            .min(rest.len());
        let (a, b) = rest.split_at(n);
        chunks.push(a);
        rest = b;
    }
    let split = run(&mut chunks.into_iter());
    assert_eq!(whole, split);
});
