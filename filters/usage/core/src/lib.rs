//! Usage metering without proxy-wasm: the batch format the usage filter
//! posts and the sidecar ingests ([`wire`]), and the filter's
//! configuration ([`config`]).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod wire;
