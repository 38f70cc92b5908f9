//! Every call the filters make into the host, in one place. Request data
//! is read as bytes and checked here (the SDK's string getters panic on
//! invalid UTF-8, and a panic traps the VM for every request on the
//! worker); host errors are returned or logged, never unwrapped. Calls that
//! touch a stream act on the current (or effective) context.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::time::{Duration, UNIX_EPOCH};

/// The request headers, read in one host call into one buffer: names and
/// values are slices of it (the SDK's `get_map_bytes` makes two
/// allocations per header, which on the hot path cost more than the call).
/// Values stay bytes until [`RequestHeaders::get`] checks them.
pub struct RequestHeaders {
    buf: Vec<u8>,
    /// Byte ranges of (name, value) in `buf`.
    pairs: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// A header value that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8;

mod raw {
    //! The one raw host call: `proxy_get_header_map_pairs`, as the SDK
    //! makes it, but keeping the host's buffer whole.
    #![allow(unsafe_code)]

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    }

    /// The serialized request header map (empty if unavailable).
    pub fn request_header_pairs() -> Vec<u8> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer it obtained from the SDK's
        // `proxy_on_memory_allocate` (a boxed slice of exactly `size`
        // bytes, i.e. a Vec with capacity `size`) and its length; we take
        // ownership once, exactly as `proxy_wasm::hostcalls::get_map_bytes`
        // does. Status 0 is Ok; on anything else nothing was allocated.
        unsafe {
            let status = proxy_get_header_map_pairs(0, &mut data, &mut size);
            if status != 0 || data.is_null() {
                return Vec::new();
            }
            Vec::from_raw_parts(data, size, size)
        }
    }
}

fn le32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

impl RequestHeaders {
    pub fn read() -> RequestHeaders {
        let buf = raw::request_header_pairs();
        let pairs = Self::index(&buf).unwrap_or_default();
        RequestHeaders { buf, pairs }
    }

    /// Ranges of the pairs in a serialized map: a count, then the sizes
    /// of each name and value, then the bytes, each followed by a NUL.
    #[allow(clippy::type_complexity)]
    fn index(b: &[u8]) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
        if b.is_empty() {
            return Some(Vec::new());
        }
        let n = le32(b, 0)?;
        let mut at = 4usize.checked_add(n.checked_mul(8)?)?;
        if at > b.len() {
            return None; // more sizes announced than bytes given
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (k, v) = (le32(b, 4 + 8 * i)?, le32(b, 8 + 8 * i)?);
            let key = at..at.checked_add(k)?;
            at = key.end.checked_add(1)?;
            let value = at..at.checked_add(v)?;
            at = value.end.checked_add(1)?;
            if at > b.len() {
                return None;
            }
            out.push((key, value));
        }
        Some(out)
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs.iter().map(|(k, v)| {
            (
                self.buf.get(k.clone()).unwrap_or(&[]),
                self.buf.get(v.clone()).unwrap_or(&[]),
            )
        })
    }

    /// The first value of `name` as UTF-8: `Ok(None)` if absent.
    pub fn get(&self, name: &str) -> Result<Option<&str>, NotUtf8> {
        match self.entries().find(|(k, _)| *k == name.as_bytes()) {
            None => Ok(None),
            Some((_, v)) => std::str::from_utf8(v).map(Some).map_err(|_| NotUtf8),
        }
    }

    /// Every header name (names are tokens, so UTF-8; others are skipped).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
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

/// Adds a request header (another value if the name is there already:
/// for names the filter removed first, cheaper than a replace).
pub fn add_request_header(name: &str, value: &str) {
    if let Err(s) = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value) {
        log(
            LogLevel::Warn,
            &format!("cannot add request header {name}: {s:?}"),
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

/// The counters of a [`BoundedCache`](filter_common::cache::BoundedCache):
/// the cache counts per VM, the metrics are shared by all workers, so what
/// changed since the last flush is added.
pub struct CacheCounters {
    hits: Option<u32>,
    misses: Option<u32>,
    evictions: Option<u32>,
    oversized: Option<u32>,
    flushed: filter_common::cache::CacheStats,
}

impl CacheCounters {
    /// Defines the counters (full metric names; `oversized` optional).
    pub fn define(
        hits: &str,
        misses: &str,
        evictions: &str,
        oversized: Option<&str>,
    ) -> CacheCounters {
        CacheCounters {
            hits: define(MetricType::Counter, hits),
            misses: define(MetricType::Counter, misses),
            evictions: define(MetricType::Counter, evictions),
            oversized: oversized.and_then(|n| define(MetricType::Counter, n)),
            flushed: filter_common::cache::CacheStats::default(),
        }
    }

    /// Exports what the cache counted since the last call.
    pub fn flush(&mut self, now: filter_common::cache::CacheStats) {
        let was = self.flushed;
        increment(self.hits, now.hits - was.hits);
        increment(self.misses, now.misses - was.misses);
        increment(self.evictions, now.evictions - was.evictions);
        increment(self.oversized, now.oversized - was.oversized);
        self.flushed = now;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            b.extend_from_slice(&(k.len() as u32).to_le_bytes());
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v);
            b.push(0);
        }
        b
    }

    fn headers(buf: Vec<u8>) -> RequestHeaders {
        let pairs = RequestHeaders::index(&buf).unwrap_or_default();
        RequestHeaders { buf, pairs }
    }

    #[test]
    fn pairs_are_read_in_place() {
        let h = headers(serialize(&[
            (":path", b"/a"),
            ("x", b""),
            ("bin", &[0xff, 0xfe]),
            ("x", b"second"),
        ]));
        assert_eq!(h.get(":path"), Ok(Some("/a")));
        assert_eq!(h.get("x"), Ok(Some("")), "the first value counts");
        assert_eq!(h.get("bin"), Err(NotUtf8));
        assert_eq!(h.get("nope"), Ok(None));
        assert_eq!(
            h.names().collect::<Vec<_>>(),
            vec![":path", "x", "bin", "x"]
        );
    }

    #[test]
    fn malformed_buffers_give_no_headers() {
        let good = serialize(&[("a", b"1"), ("b", b"2")]);
        for cut in 1..good.len() {
            assert!(
                RequestHeaders::index(&good[..cut]).is_none(),
                "cut at {cut}"
            );
        }
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RequestHeaders::index(&huge).is_none());
        assert_eq!(RequestHeaders::index(&[]), Some(vec![]));
    }
}
