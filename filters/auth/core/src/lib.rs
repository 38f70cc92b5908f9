//! JWT verification for the auth filter and the sidecar, without
//! proxy-wasm: one token end to end ([`authenticate`]), parsing
//! ([`jwt`]), key sets ([`jwk`]), signatures ([`verify`], RSA in [`rsa`]),
//! claim rules ([`claims`]), and the reasons a token is refused
//! ([`error`]); [`filter::Auth`] is the filter itself, written against
//! the [`Host`](filter_common::host::Host) trait. Time is always passed
//! in.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod authenticate;
pub mod claims;
pub mod config;
pub mod error;
pub mod filter;
pub mod jwk;
pub mod jwt;
pub mod metrics;
pub mod rsa;
pub mod source;
pub mod verify;
