//! The policy without a restart: the file is read again on SIGHUP and
//! whenever its content changes (looked at every `--policy-poll` seconds).
//! A new policy is compiled before it is put in force; one that does not
//! compile is refused, logged and counted, and the last good one stays.
//! Putting a policy in force makes every live session decide its
//! subscriptions again ([`crate::session::Context::set_policy`]).

use crate::session::Context;
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
    pub fn check(&mut self, ctx: &Context) -> Outcome {
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
                    log::warn!("policy {why}; the last good policy stays");
                }
                return Outcome::Refused(why);
            }
        };
        if self.seen.as_deref() == Some(&bytes[..]) {
            return Outcome::Unchanged;
        }
        let outcome = match Policy::from_json(&bytes) {
            Ok(p) => {
                ctx.set_policy(p);
                m.policy_reload("file", true);
                log::info!("policy {}: reloaded", self.path.display());
                Outcome::Applied
            }
            Err(e) => {
                m.policy_reload("file", false);
                log::warn!(
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
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("policy: SIGHUP cannot be handled ({e}); polling only");
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
                log::info!("policy: SIGHUP");
            }
            _ = async { match every.as_mut() { Some(i) => { i.tick().await; } None => std::future::pending().await } } => {}
        }
        source.check(&ctx);
    }
}
