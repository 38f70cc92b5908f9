//! The entitlements proxy-wasm filter:
//! [`entitlements_core::filter::Entitlements`] in `filter-shell`'s contexts.

filter_shell::export!(entitlements_core::filter::Entitlements);
