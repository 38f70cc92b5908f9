//! The bounded caches of the engine's users (see
//! [`filter_common::cache`]): decisions keyed by what a decision depends
//! on ([`Policy::http_key`](crate::policy::Policy::http_key)).

pub use filter_common::cache::{BoundedCache, CacheStats};

use crate::policy::Verdict;

/// The cache of decisions.
pub type DecisionCache = BoundedCache<Verdict>;
