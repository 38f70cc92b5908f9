//! The rate limit service's protobuf messages (Envoy's
//! `RateLimitRequest`/`RateLimitResponse`, the filter's own codec, which
//! the sidecar's service decodes too). Invariant: what decodes encodes
//! and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::rls::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).as_ref(), Ok(&r));
    }
    if let Ok(r) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode()).as_ref(), Ok(&r));
    }
});
