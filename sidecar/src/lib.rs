//! The native access sidecar, as a library (binaries stay thin). So far:
//! the Envoy Rate Limit Service ([`rls`]) backed by Redis ([`resp`]).

pub mod fanout;
pub mod metrics;
pub mod protocol;
pub mod resp;
pub mod rls;
pub mod ws;
