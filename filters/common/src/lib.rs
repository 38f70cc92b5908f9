//! Pieces the filters (and the sidecar) share, without proxy-wasm.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cache;
pub mod claims;
pub mod form;
pub mod refresh;
