//! Usage batches posted to the sidecar (`POST /v1/usage`): a batch or a
//! reason, never a panic. Invariant: a valid batch written out again
//! reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usage_core::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(b) = wire::parse(data) else { return };
    let again = serde_json::to_vec(&b).expect("a batch serialises");
    let b2 = wire::parse(&again).expect("a batch written out parses");
    assert_eq!(b, b2);
});
