//! The entitlements policy engine, without proxy-wasm: what the
//! entitlements filter evaluates per HTTP request and the sidecar per
//! channel subscription.
//!
//! This first part holds the two inputs every rule matches on: request
//! paths, normalised before any rule sees them ([`path`]), and channel
//! subjects and patterns in the NATS syntax of DESIGN.md ([`channel`]).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod channel;
pub mod path;
