//! Rate limiting without proxy-wasm: GCRA buckets ([`gcra`]) kept in a
//! bounded table of shared-data slots updated with compare-and-swap
//! ([`slots`]), so a limit is exact across Envoy's worker VMs, or asked of
//! an Envoy Rate Limit Service ([`rls`]); the filter itself
//! ([`filter::RateLimit`]) written against the
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
pub mod fields;
pub mod filter;
pub mod gcra;
pub mod metrics;
pub mod rls;
pub mod slots;
