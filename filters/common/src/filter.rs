//! What a filter is to its shell: a per-VM worker built from the plugin
//! configuration, called at each proxy-wasm callback with the [`Host`].
//! `filter-shell` turns any [`Filter`] into a proxy-wasm root and stream
//! contexts, and maps [`Flow`] to the SDK's `Action` in one place; the
//! cores implement it and are tested natively with the test double.

use crate::config::ConfigError;
use crate::host::Host;
use std::time::Duration;

/// What the stream does after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop here: a local reply was sent, or the request waits (it is
    /// resumed or answered later).
    Pause,
}

/// A filter's per-VM state and its callbacks. Every method has the host
/// it acts through; the stream methods act on the current stream.
pub trait Filter: Sized + 'static {
    /// The name in logs (`auth: ...`).
    const NAME: &'static str;
    /// Per-stream state.
    type Stream: Default;

    /// The worker for this configuration, or the error naming the field.
    fn configure<H: Host>(host: &H, config: &[u8]) -> Result<Self, ConfigError>;

    /// The tick period, asked once after `configure` (the host's tick is
    /// set once per root context: some hosts refuse a second call; a
    /// filter schedules finer work itself).
    fn tick_period(&self) -> Option<Duration> {
        None
    }

    /// A line for the log when configured.
    fn describe(&self) -> String {
        "configured".into()
    }

    fn on_tick<H: Host>(&mut self, _host: &H) {}

    fn on_http_call_response<H: Host>(&mut self, _host: &H, _token: u32, _body_size: usize) {}

    fn on_queue_ready<H: Host>(&mut self, _host: &H, _queue: u32) {}

    /// What a stream does when there is no worker (configuration refused;
    /// Envoy never gets here, as it refuses the plugin).
    fn unconfigured<H: Host>(_host: &H) -> Flow {
        Flow::Pause
    }

    fn on_request_headers<H: Host>(
        &mut self,
        _host: &H,
        _stream: &mut Self::Stream,
        _context_id: u32,
    ) -> Flow {
        Flow::Continue
    }

    fn on_response_headers<H: Host>(&mut self, _host: &H, _stream: &mut Self::Stream) -> Flow {
        Flow::Continue
    }

    /// The answer to a gRPC call the stream made.
    fn on_grpc_call_response<H: Host>(
        &mut self,
        _host: &H,
        _stream: &mut Self::Stream,
        _token: u32,
        _status: u32,
        _size: usize,
    ) {
    }

    /// The stream is over (its headers are readable again).
    fn on_log<H: Host>(&mut self, _host: &H, _stream: &mut Self::Stream, _context_id: u32) {}
}

/// The `on_configure` sequence every filter runs: the configuration read,
/// parsed and compiled; a refusal logged with the field and `None`
/// returned (the shell's `on_configure` then returns false).
pub fn configure<F: Filter, H: Host>(host: &H) -> Option<F> {
    use crate::host::Level;
    let Some(bytes) = host.plugin_configuration() else {
        host.log(
            Level::Error,
            &format!("{}: configuration: missing", F::NAME),
        );
        return None;
    };
    match F::configure(host, &bytes) {
        Ok(f) => {
            if let Some(period) = f.tick_period() {
                if let Err(e) = host.set_tick_period(period) {
                    host.log(
                        Level::Error,
                        &format!("{}: cannot set the tick period: {e}", F::NAME),
                    );
                }
            }
            host.log(Level::Info, &format!("{}: {}", F::NAME, f.describe()));
            Some(f)
        }
        Err(e) => {
            host.log(Level::Error, &format!("{}: {e}", F::NAME));
            None
        }
    }
}
