//! The usage proxy-wasm filter: [`usage_core::filter::Usage`] in
//! `filter-shell`'s contexts.

filter_shell::export!(usage_core::filter::Usage);
