//! Where log lines go: `tracing` events (the sidecar's own, and those of
//! the libraries that use `tracing`, async-nats among them) and `log`
//! records (bridged: filter-common, tokio-postgres) to stderr, filtered by
//! an env-filter directive (`RUST_LOG` syntax: `info`,
//! `sidecar=debug,async_nats=warn`), as human-readable lines or as JSON
//! lines with the event's fields at the top level:
//!
//! ```json
//! {"timestamp":"2026-12-03T06:40:01.123456Z","level":"WARN","target":"sidecar::bus::nats","message":"nats: disconnected, reconnecting","url":"nats://nats:4222"}
//! ```
//!
//! Context goes in fields (`channel`, `peer`, `batches`, `error`, …) and,
//! for a WebSocket connection, in its span (`"span":{"name":"ws","peer":…,
//! "subject":…,"tenant":…}` in JSON, `ws{peer=… tenant=…}:` in text), never
//! secrets: tokens, the usage secret, the admin secret and
//! passwords in connection strings stay out of every line
//! ([`crate::config::Config::redacted`] is what startup logs).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-03T06:40:01.123Z  WARN sidecar::bus::nats: nats: disconnected url=…`
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `message` and the event's fields.
    Json,
}

/// The directive in force: `flag` (`--log` / `SIDECAR_LOG`) if given, else
/// `RUST_LOG`, else `info`.
pub fn directive(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".to_string())
}

/// Installs the process's subscriber (once; a second call is an error)
/// writing to stderr. An invalid directive is an error naming `field`.
pub fn init(field: &str, directive: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(directive)
        .map_err(|e| format!("{field}: {directive:?} is not a log directive: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| format!("logging: {e}"))
}

/// At most one line every `period` seconds for an event that can repeat
/// fast (refused connections, dropped bus messages): [`Throttle::allow`]
/// says whether to write one now, and how many were left out since the
/// last.
pub struct Throttle {
    period: u64,
    next: AtomicU64,
    left_out: AtomicU64,
}

impl Throttle {
    pub const fn new(period_secs: u64) -> Throttle {
        Throttle {
            period: period_secs,
            next: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last line)` when a line is due now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(monotonic_secs())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now + self.period,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Seconds since the first call (a monotonic clock; 0 is "never").
fn monotonic_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_directive_names_the_field() {
        let e = init("--log", "sidecar=loud", LogFormat::Text).unwrap_err();
        assert!(e.starts_with("--log: \"sidecar=loud\""), "{e}");
    }

    #[test]
    fn a_throttle_writes_one_line_a_period_and_counts_the_rest() {
        let t = Throttle::new(10);
        assert_eq!(t.allow_at(1), Some(0));
        assert_eq!(t.allow_at(2), None);
        assert_eq!(t.allow_at(10), None);
        assert_eq!(t.allow_at(11), Some(2));
        assert_eq!(t.allow_at(12), None);
    }

    #[test]
    fn the_flag_wins_and_info_is_the_default() {
        assert_eq!(directive(Some("debug")), "debug");
        if std::env::var("RUST_LOG").is_err() {
            assert_eq!(directive(None), "info");
        }
        // An empty flag is no flag.
        assert_eq!(directive(Some(" ")), directive(None));
    }
}
