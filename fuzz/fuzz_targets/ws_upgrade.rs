//! The sidecar's WebSocket upgrade request (`sidecar::ws::handshake`):
//! header maps as hyper hands them over (any names and values `http`
//! accepts, duplicates), optionally on top of a valid handshake.
//! Invariants: an accepted request has exactly one version, `13`, and one
//! key that is base64 of 16 bytes, and the accept value is that key's;
//! a valid handshake with nothing else of the handshake's headers added is
//! accepted; a refusal is 400 or 426 with a message.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    valid_base: bool,
    key: [u8; 16],
    headers: Vec<(&'a [u8], &'a [u8])>,
}

const HANDSHAKE: [&str; 4] = [
    "upgrade",
    "connection",
    "sec-websocket-version",
    "sec-websocket-key",
];

fuzz_target!(|i: Input<'_>| {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(i.key);
    let mut h = HeaderMap::new();
    if i.valid_base {
        h.append("upgrade", HeaderValue::from_static("websocket"));
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.append("sec-websocket-version", HeaderValue::from_static("13"));
        h.append("sec-websocket-key", HeaderValue::from_str(&key).unwrap());
    }
    let mut touched = false;
    for (n, v) in &i.headers {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) else {
            continue;
        };
        touched |= HANDSHAKE.contains(&n.as_str());
        h.append(n, v);
    }
    let got = sidecar::ws::handshake(&h);
    assert_eq!(got, sidecar::ws::handshake(&h), "not repeatable");
    match got {
        Ok(accept) => {
            let versions: Vec<_> = h.get_all("sec-websocket-version").iter().collect();
            assert_eq!(versions.len(), 1);
            assert_eq!(versions[0].as_bytes(), b"13");
            let keys: Vec<_> = h.get_all("sec-websocket-key").iter().collect();
            assert_eq!(keys.len(), 1, "accepted with {} keys", keys.len());
            let k = keys[0].to_str().expect("a key accepted is text");
            assert_eq!(b64.decode(k.trim()).map(|d| d.len()).ok(), Some(16));
            assert_eq!(accept, sidecar::ws::accept_key(k));
            assert_eq!(b64.decode(&accept).map(|d| d.len()).ok(), Some(20));
        }
        Err(r) => {
            assert!(r.status == 400 || r.status == 426, "{r:?}");
            assert!(!r.message.is_empty());
            assert!(
                !(i.valid_base && !touched),
                "a valid handshake refused: {r:?}"
            );
        }
    }
});
