//! The entitlements policy engine, without proxy-wasm: what the
//! entitlements filter evaluates per HTTP request and the sidecar per
//! channel subscription.
//!
//! Request paths are normalised before any rule sees them ([`path`]);
//! channels follow the NATS syntax of DESIGN.md ([`channel`]); rules match
//! with templates that capture values ([`template`]) and test the verified
//! identity ([`identity`]) or the grants the caller holds ([`grants`]);
//! [`policy`] compiles and evaluates them;
//! [`filter::Entitlements`] is the filter itself, written against the
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

pub mod cache;
pub mod channel;
pub mod feed;
pub mod filter;
pub mod grants;
pub mod identity;
mod index;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod template;
