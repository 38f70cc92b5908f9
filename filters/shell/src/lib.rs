//! Every call the filters make into the host, in one place. Request data
//! is read as bytes and checked here (the SDK's string getters panic on
//! invalid UTF-8, and a panic traps the VM for every request on the
//! worker); host errors are returned or logged, never unwrapped. Calls that
//! touch a stream act on the current (or effective) context.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::time::{Duration, UNIX_EPOCH};

/// The request headers, read in one host call (one copy of the map
/// instead of a call per header). Names come from Envoy's codecs, which
/// only accept token characters, so the SDK's UTF-8 conversion of names
/// cannot fail; values stay bytes until [`RequestHeaders::get`] checks them.
pub struct RequestHeaders(Vec<(String, Vec<u8>)>);

/// A header value that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8;

impl RequestHeaders {
    pub fn read() -> RequestHeaders {
        RequestHeaders(hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default())
    }

    /// The first value of `name` as UTF-8: `Ok(None)` if absent.
    pub fn get(&self, name: &str) -> Result<Option<&str>, NotUtf8> {
        match self.0.iter().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => std::str::from_utf8(v).map(Some).map_err(|_| NotUtf8),
        }
    }
}

pub fn set_request_header(name: &str, value: &str) {
    if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
        log(
            LogLevel::Warn,
            &format!("cannot set request header {name}: {s:?}"),
        );
    }
}

/// A header of the HTTP call response being delivered.
pub fn call_response_header(name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name) {
        Ok(Some(b)) => String::from_utf8(b).ok(),
        _ => None,
    }
}

/// The body of the HTTP call response being delivered.
pub fn call_response_body(size: usize) -> Vec<u8> {
    match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size) {
        Ok(Some(b)) => b,
        _ => Vec::new(),
    }
}

/// The plugin configuration (only during `on_configure`).
pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}

/// Sends a local reply with a JSON body.
pub fn send_json(status: u32, extra: &[(&str, &str)], body: &str) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    if let Err(s) = hostcalls::send_http_response(status, headers, Some(body.as_bytes())) {
        log(
            LogLevel::Error,
            &format!("local reply {status} failed: {s:?}"),
        );
    }
}

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

pub fn now() -> Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
}

pub fn set_tick_period(d: Duration) {
    if let Err(s) = hostcalls::set_tick_period(d) {
        log(
            LogLevel::Error,
            &format!("cannot set the tick period: {s:?}"),
        );
    }
}

/// Shared data: value and CAS, `(None, None)` if absent.
pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Sets shared data; `false` on a CAS mismatch or another failure.
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    hostcalls::set_shared_data(key, Some(value), cas).is_ok()
}

pub fn http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout)
}

/// A counter or gauge id; `None` if the host refused it (metrics are then
/// skipped, never fatal).
pub fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(s) => {
            log(LogLevel::Warn, &format!("metric {name}: {s:?}"));
            None
        }
    }
}

pub fn increment(id: Option<u32>, by: u64) {
    if let (Some(id), true) = (id, by > 0) {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

pub fn record(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Removes a request header (no-op if absent).
pub fn remove_request_header(name: &str) {
    if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None) {
        log(
            LogLevel::Warn,
            &format!("cannot remove request header {name}: {s:?}"),
        );
    }
}

/// Acts on stream `context_id` from now until the callback returns (the
/// root resuming or answering a request it made wait); false if the stream
/// is gone.
pub fn set_effective_context(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

/// Resumes the (effective) paused request.
pub fn resume_request() {
    let _ = hostcalls::resume_http_request();
}

/// Sends a local reply with arbitrary headers and body.
pub fn send_reply(status: u32, headers: &[(&str, &str)], body: &[u8]) {
    if let Err(s) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
        log(
            LogLevel::Error,
            &format!("local reply {status} failed: {s:?}"),
        );
    }
}

impl RequestHeaders {
    /// Every header name, for removing a family of them.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}
