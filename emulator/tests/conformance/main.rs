//! Conformance of the host emulator with Envoy's proxy-wasm host, checked
//! with the probe filter (emulator/probes/probe). Build it first:
//! scripts/build-filters.sh

mod attributes;
mod callouts;
mod common;
mod faults;
mod lifecycle;
mod profile;
mod state;
mod streams;
