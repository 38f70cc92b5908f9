//! Entitlement grants (issue 17): kept in PostgreSQL ([`store`], the
//! source of truth, changed through the admin API) or, without it, in a
//! file ([`file`]); held in memory as the grants in force ([`live`]: what
//! decisions read, with an epoch, a version and a change log), kept up to
//! date from PostgreSQL by LISTEN/NOTIFY and a periodic resync ([`sync`]),
//! and served to the entitlements filters as a paged feed of snapshots and
//! deltas ([`feed`]).

pub mod feed;
pub mod file;
pub mod live;
pub mod store;
pub mod sync;

pub use live::{Live, LiveConfig, Snapshot, SourceKind};
pub use store::{grant_json, notice_version, AuditRow, GrantStore, CHANNEL};
