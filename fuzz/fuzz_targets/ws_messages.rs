//! The client's protocol messages (text frames): a message or a refusal
//! with a code and a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(r) = sidecar::protocol::parse(data) {
        assert!(!r.message.is_empty());
    }
});
