//! Pieces the filters (and the sidecar) share, without proxy-wasm: the
//! [`host::Host`] trait the cores are written against (and its test
//! double), the [`filter::Filter`] a shell runs, the remote-document
//! mechanism, the configuration error, claim paths, the bounded cache and
//! the query-string decoder.
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
pub mod config;
#[cfg(any(test, feature = "double"))]
pub mod double;
pub mod filter;
pub mod form;
pub mod host;
pub mod identity;
pub mod refresh;
pub mod remote;
