//! The live state kept from PostgreSQL (`--grants-postgres`): a dedicated
//! connection that `LISTEN`s on `grants_changed`; at connect a catch-up
//! (or, with nothing loaded or another epoch, a full load seeding the
//! change log from `grants_audit`); on every notice newer than the version
//! in force, and every `--grants-resync` seconds (a lost notice healed), a
//! catch-up: the holders the audit names after the version in force and
//! their grants now, read in one snapshot and applied per holder, or a
//! full load when that is very many.
//!
//! The sidecar's own admin writes reach the state the same way, through
//! their NOTIFY (sent at commit), so every replica learns of a change by
//! one path. PostgreSQL away: the last good grants stay,
//! `sidecar_grants_source_up` is 0, `/readyz` says since when, and the
//! connection is made again after 0.5 s doubling up to 10 s; the first
//! sync after it catches up on what changed meanwhile.

use super::file::shown;
use super::live::{Live, Reload};
use super::store::{Caught, GrantStore, ReadError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where and how often.
#[derive(Debug, Clone)]
pub struct PgSync {
    pub conninfo: String,
    /// Between two catch-ups without a notice.
    pub resync: Duration,
    /// The first reconnect delay, doubling up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Longest a connect, a catch-up or a full load may take before the
    /// connection is given up as lost.
    pub timeout: Duration,
}

impl PgSync {
    pub fn new(conninfo: &str, resync: Duration) -> PgSync {
        PgSync {
            conninfo: conninfo.to_string(),
            resync,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
        }
    }
}

/// More changes than this behind: a full load rather than a catch-up.
pub const CATCH_UP_MAX: usize = 50_000;

/// Keeps `live` from PostgreSQL until `shutdown`.
pub async fn run(cfg: PgSync, live: Arc<Live>, shutdown: CancellationToken) {
    let mut backoff = cfg.backoff;
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            why = connected(&cfg, &live, &mut backoff) => why,
        };
        live.metrics.reload(Reload::Failed);
        live.source_failed(&format!("postgres: {why}"), true);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// One connection's life: connects, syncs, then follows notices and the
/// resync period. Returns why the connection was lost.
async fn connected(cfg: &PgSync, live: &Live, backoff: &mut Duration) -> String {
    let limit = |d| tokio::time::timeout(cfg.timeout, d);
    let (mut store, mut notices) = match limit(GrantStore::connect_listening(&cfg.conninfo)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return format!("no connection within {} s", cfg.timeout.as_secs()),
    };
    // Listening before the first read: no change falls between the two.
    if let Err(why) = sync(cfg, &mut store, live).await {
        return why;
    }
    *backoff = cfg.backoff;
    let mut every = tokio::time::interval(cfg.resync.max(Duration::from_millis(100)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.reset();
    loop {
        tokio::select! {
            n = notices.recv() => match n {
                None => return "the listening connection was lost".into(),
                Some(v) if u64::try_from(v).is_ok_and(|v| v <= live.snapshot().version) => continue,
                Some(_) => {}
            },
            _ = every.tick() => {}
        }
        if let Err(why) = sync(cfg, &mut store, live).await {
            return why;
        }
    }
}

/// Brings `live` up to what PostgreSQL holds now. `Err`: the connection
/// is lost (unavailable or too slow); a refused version is logged and
/// counted, and the connection kept.
async fn sync(cfg: &PgSync, store: &mut GrantStore, live: &Live) -> Result<(), String> {
    let snap = live.snapshot();
    let version = i64::try_from(snap.version).unwrap_or(i64::MAX);
    let caught = if snap.loaded {
        match tokio::time::timeout(cfg.timeout, store.catch_up(version, CATCH_UP_MAX)).await {
            Ok(r) => r,
            Err(_) => return Err(format!("no catch-up within {} s", cfg.timeout.as_secs())),
        }
    } else {
        Ok(Caught::Gap {
            epoch: String::new(),
            version: 0,
        })
    };
    let outcome = match caught {
        Ok(Caught::Current { epoch, .. }) if *epoch == *snap.epoch => Ok(None),
        Ok(Caught::Changes {
            epoch,
            version,
            log,
            holders,
        }) if *epoch == *snap.epoch => {
            let v = u64::try_from(version).unwrap_or(0);
            let names: Vec<String> = holders.iter().take(10).map(|(h, _)| shown(h)).collect();
            let more = holders.len().saturating_sub(names.len());
            let log = log
                .into_iter()
                .map(|(v, h)| (u64::try_from(v).unwrap_or(0), h))
                .collect();
            live.apply(v, holders, log)
                .map(|()| {
                    tracing::info!(
                        "grants postgres: version {v}; changed: {}{}",
                        names.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    );
                    Some(v)
                })
                .map_err(|e| ReadError::Invalid(e.to_string()))
        }
        Ok(_) => full(cfg, store, live).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(applied) => {
            if applied.is_some() {
                live.metrics.reload(Reload::Ok);
            }
            live.source_ok();
            Ok(())
        }
        Err(ReadError::Invalid(why)) => {
            live.metrics.reload(Reload::Invalid);
            live.source_failed(&format!("postgres: refused ({why})"), false);
            Ok(())
        }
        Err(ReadError::Unavailable(why)) => Err(why),
    }
}

/// A full load put in force; the change log seeded from the audit.
async fn full(cfg: &PgSync, store: &mut GrantStore, live: &Live) -> Result<Option<u64>, ReadError> {
    let c = live.config();
    let f = match tokio::time::timeout(cfg.timeout, store.load_full(c.log, c.max)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ReadError::Unavailable(format!(
                "no full load within {} s",
                cfg.timeout.as_secs()
            )))
        }
    };
    let version = u64::try_from(f.version).unwrap_or(0);
    let log: Vec<(u64, _)> = f
        .log
        .into_iter()
        .map(|(v, h)| (u64::try_from(v).unwrap_or(0), h))
        .collect();
    let floor = seeded_floor(&log, c.log, version);
    let n = f.set.len();
    live.install(&f.epoch, version, f.set, log, floor)
        .map_err(|e| ReadError::Invalid(e.to_string()))?;
    tracing::info!(
        "grants postgres: epoch {}, version {version}, {n} grants (full load; deltas after {floor})",
        f.epoch
    );
    Ok(Some(version))
}

/// The version a seeded log answers deltas after: every version after it
/// up to `version` must be in the log (`log`: the last `cap` audit rows,
/// oldest first).
fn seeded_floor(log: &[(u64, entitlements_core::grants::Holder)], cap: usize, version: u64) -> u64 {
    let Some(&(first, _)) = log.first() else {
        return version;
    };
    // A full log may have cut a version's rows short.
    let floor = if log.len() >= cap {
        first
    } else {
        first.saturating_sub(1)
    };
    let mut distinct: Vec<u64> = log.iter().map(|(v, _)| *v).filter(|v| *v > floor).collect();
    distinct.dedup();
    if distinct.len() as u64 == version.saturating_sub(floor) {
        floor
    } else {
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entitlements_core::grants::Holder;

    #[test]
    fn a_seeded_log_answers_deltas_only_where_it_is_whole() {
        let h = || Holder::Tenant("a".into());
        let log: Vec<_> = (1..=5).map(|v| (v, h())).collect();
        assert_eq!(seeded_floor(&log, 10, 5), 0, "the whole history");
        assert_eq!(seeded_floor(&log[2..], 3, 5), 3, "a full log");
        assert_eq!(seeded_floor(&[], 10, 7), 7, "no audit");
        let gap = vec![(1, h()), (3, h())];
        assert_eq!(seeded_floor(&gap, 10, 3), 3, "a version missing");
    }
}
