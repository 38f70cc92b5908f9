//! The ratelimit proxy-wasm filter: [`ratelimit_core::filter::RateLimit`]
//! in `filter-shell`'s contexts.

filter_shell::export!(ratelimit_core::filter::RateLimit);
