//! The policy without a restart: the file is read again on SIGHUP and
//! whenever its content changes (looked at every `--policy-poll` seconds);
//! or, with `--policy-url`, fetched like the entitlements filter's remote
//! policy (a conditional `GET` with `If-None-Match` every
//! `--policy-refresh` seconds, 304 keeping what is in force).
//! A new policy is compiled before it is put in force; one that does not
//! compile is refused, logged and counted, and the last good one stays.
//! Putting a policy in force makes every live session decide its
//! subscriptions again ([`crate::session::Context::set_policy`]).

use crate::session::{Context, PolicyDocument};
use entitlements_core::policy::Policy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What one look at the file found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The same bytes as the last policy seen: nothing to do.
    Unchanged,
    /// A new policy is in force.
    Applied,
    /// The new content was refused (the reason is logged); the last good
    /// policy stays.
    Refused(String),
}

/// Reloads the policy file into `ctx`.
pub struct FileSource {
    path: PathBuf,
    /// The content last looked at (good or refused), so a refused file is
    /// reported once, not at every poll.
    seen: Option<Vec<u8>>,
}

impl FileSource {
    /// `seen`: the bytes of the policy in force at start.
    pub fn new(path: &Path, seen: Option<Vec<u8>>) -> FileSource {
        FileSource {
            path: path.to_path_buf(),
            seen,
        }
    }

    /// Reads the file and puts its policy in force if it changed.
    pub fn check(&mut self, ctx: &Arc<Context>) -> Outcome {
        let m = &ctx.hub.metrics;
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                // A file being replaced may be missing for a moment: keep
                // the last good policy and report it once per state.
                let why = format!("{}: {e}", self.path.display());
                if self.seen.as_deref() != Some(&[]) {
                    self.seen = Some(Vec::new());
                    m.policy_reload("file", false);
                    tracing::warn!("policy {why}; the last good policy stays");
                }
                return Outcome::Refused(why);
            }
        };
        if self.seen.as_deref() == Some(&bytes[..]) {
            return Outcome::Unchanged;
        }
        let outcome = match Policy::from_json(&bytes) {
            Ok(p) => {
                ctx.set_policy_from(p, PolicyDocument::new(bytes.clone()));
                m.policy_reload("file", true);
                tracing::info!("policy {}: reloaded", self.path.display());
                Outcome::Applied
            }
            Err(e) => {
                m.policy_reload("file", false);
                tracing::warn!(
                    "policy {}: refused ({e}); the last good policy stays",
                    self.path.display()
                );
                Outcome::Refused(e.to_string())
            }
        };
        self.seen = Some(bytes);
        outcome
    }
}

/// Watches the file until `shutdown`: on SIGHUP, and every `poll` (zero:
/// only on SIGHUP).
pub async fn watch_file(
    mut source: FileSource,
    ctx: Arc<Context>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    on_hup_or_every("policy", poll, shutdown, || {
        source.check(&ctx);
    })
    .await;
}

/// Calls `check` on every SIGHUP and every `poll` (zero: only on SIGHUP)
/// until `shutdown`; `what` names the file in the lines it logs. What the
/// policy file and the grants file are watched with.
pub async fn on_hup_or_every(
    what: &'static str,
    poll: Duration,
    shutdown: CancellationToken,
    mut check: impl FnMut(),
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "{what}: SIGHUP cannot be handled; polling only");
            None
        }
    };
    let mut every = (!poll.is_zero()).then(|| {
        let mut i = tokio::time::interval(poll);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("{what}: SIGHUP");
            }
            _ = async { match every.as_mut() { Some(i) => { i.tick().await; } None => std::future::pending().await } } => {}
        }
        check();
    }
}

/// The remote policy: where and how often.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `host:port` to connect to.
    pub addr: String,
    /// `Host` of the request.
    pub authority: String,
    pub path: String,
    pub refresh: Duration,
    /// First retry after a failure, doubling up to `refresh`.
    pub retry: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl Remote {
    /// `http://host[:port]/path` (port 80 by default).
    pub fn parse(url: &str) -> Result<Remote, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--policy-url {url:?}: only http:// (a mesh proxy originates TLS)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("--policy-url {url:?}: no host"));
        }
        let addr = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Remote {
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
            refresh: Duration::from_secs(30),
            retry: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_bytes: 1 << 20,
        })
    }
}

/// Fetches the remote policy until `shutdown`: the first fetch at once,
/// then every `refresh`; after a failure (unreachable, a status other
/// than 200/304, a body that does not compile) the last good policy stays
/// and the next attempt comes after `retry`, doubling up to `refresh`.
pub async fn watch_remote(r: Remote, ctx: Arc<Context>, shutdown: CancellationToken) {
    use filter_common::refresh::{Schedule, Timings};
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut schedule = Schedule::new(Timings {
        refresh_ms: ms(r.refresh),
        retry_initial_ms: ms(r.retry),
        retry_max_ms: ms(r.refresh),
        min_refetch_ms: ms(r.refresh),
    });
    let start = tokio::time::Instant::now();
    let now = || ms(start.elapsed());
    let mut etag: Option<String> = None;
    let m = &ctx.hub.metrics;
    loop {
        let wait = Duration::from_millis(schedule.next_at().saturating_sub(now()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let got = crate::fetch::get(
            &r.addr,
            &r.authority,
            &r.path,
            etag.as_deref(),
            r.timeout,
            r.max_bytes,
        )
        .await;
        let failed = match got {
            Ok(f) if f.status == 304 => None,
            Ok(f) if f.status == 200 => match Policy::from_json(&f.body) {
                Ok(p) => {
                    ctx.set_policy_from(p, PolicyDocument::new(f.body.clone()));
                    m.policy_reload("remote", true);
                    tracing::info!(
                        "policy {}{}: in force (etag {:?})",
                        r.authority,
                        r.path,
                        f.etag
                    );
                    etag = f.etag;
                    None
                }
                Err(e) => {
                    m.policy_reload("remote", false);
                    Some(format!("refused ({e})"))
                }
            },
            Ok(f) => Some(format!("status {}", f.status)),
            Err(e) => Some(e),
        };
        match failed {
            None => {
                schedule.succeeded(now(), None);
            }
            Some(why) => {
                let delay = schedule.failed(now());
                tracing::warn!(
                    "policy {}{}: {why}; the last good policy stays, retry in {delay} ms",
                    r.authority,
                    r.path
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_urls() {
        let r = Remote::parse("http://policy.carbon.svc/v1/policy").unwrap();
        assert_eq!(
            (r.addr.as_str(), r.authority.as_str(), r.path.as_str()),
            ("policy.carbon.svc:80", "policy.carbon.svc", "/v1/policy")
        );
        let r = Remote::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((r.addr.as_str(), r.path.as_str()), ("127.0.0.1:9000", "/"));
        assert!(Remote::parse("https://x/p")
            .unwrap_err()
            .contains("only http://"));
        assert!(Remote::parse("http:///p").unwrap_err().contains("no host"));
    }
}
