//! The auth proxy-wasm filter: [`auth_core::filter::Auth`] in
//! `filter-shell`'s contexts.

filter_shell::export!(auth_core::filter::Auth);
