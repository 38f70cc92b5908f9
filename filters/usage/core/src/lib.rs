//! Usage metering without proxy-wasm: the batch format the usage filter
//! posts and the sidecar ingests ([`wire`]), the filter's configuration
//! ([`config`]) and the filter itself ([`filter::Usage`]: records, the
//! batcher, its retries and bounds), written against the
//! [`Host`](filter_common::host::Host) trait.
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
pub mod filter;
pub mod metrics;
pub mod wire;
