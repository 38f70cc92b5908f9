//! The host as the filters see it: one trait in front of every proxy-wasm
//! call (header maps, properties, shared data with CAS, queues, HTTP and
//! gRPC callouts, local replies, metrics, time, logs). The proxy-wasm
//! implementation is `filter-shell`'s; [`crate::double::FakeHost`] is the
//! test double the cores are tested with natively.
//!
//! The required methods are the raw calls, host statuses as [`HostError`].
//! The provided ones are how the filters use them: tolerant (a failed
//! metric or log is skipped, never fatal) and portable across proxy-wasm
//! hosts (an unconditional shared-data write reads first and then CASes,
//! integer properties are read in Envoy's 8-byte little-endian form and as
//! a decimal string).

use std::time::Duration;

/// A log level, as proxy-wasm numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// A host status other than Ok, typed once for every filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The key, queue, header or metric does not exist.
    #[error("not found")]
    NotFound,
    /// The host refused an argument (an unknown cluster, a missing
    /// pseudo-header, a stream that is gone).
    #[error("bad argument")]
    BadArgument,
    #[error("serialization failure")]
    SerializationFailure,
    #[error("parse failure")]
    ParseFailure,
    /// A shared-data write whose CAS was not the current one.
    #[error("CAS mismatch")]
    CasMismatch,
    #[error("internal failure")]
    InternalFailure,
    #[error("unimplemented")]
    Unimplemented,
    /// A queue with nothing in it.
    #[error("empty")]
    Empty,
    /// A status this list does not name.
    #[error("host status {0}")]
    Other(u32),
}

/// The header maps a filter reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
    /// The headers of the HTTP call response being delivered.
    CallResponseHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// A defined metric; `None` when the host refused it (then it is skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metric(pub Option<u32>);

/// One door to the host. Every method acts on the current (or effective)
/// context, as proxy-wasm does.
pub trait Host {
    /// Wall-clock time since the Unix epoch.
    fn now(&self) -> Duration;
    fn log(&self, level: Level, message: &str);
    fn set_tick_period(&self, period: Duration) -> Result<(), HostError>;
    /// The plugin configuration (during `on_configure`).
    fn plugin_configuration(&self) -> Option<Vec<u8>>;

    /// The request headers in one call ([`HeaderPairs`]).
    fn request_headers(&self) -> HeaderPairs;
    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError>;
    /// Sets `name` to exactly this value (replacing every other value).
    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError>;
    fn remove_header(&self, map: Map, name: &str) -> Result<(), HostError>;
    /// Replaces the whole request header map with these pairs.
    fn set_request_headers(&self, pairs: &[(&str, &[u8])]) -> Result<(), HostError>;
    /// A property by path (`["source", "address"]`): raw bytes.
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;

    /// A local reply to the current stream.
    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError>;
    /// Resumes the current (or effective) paused request.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Acts on stream `context_id` until the callback returns.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError>;

    /// A shared-data value and its CAS.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// Writes if `cas` is the current one (an absent key accepts any). Use
    /// [`Host::shared_put`] for an unconditional write.
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), HostError>;

    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError>;
    /// The oldest item, `None` when the queue is empty.
    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError>;

    /// An HTTP callout; the answer comes to the calling context's
    /// `on_http_call_response` with this token.
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError>;
    /// The body of the HTTP call response being delivered.
    fn call_response_body(&self, size: usize) -> Vec<u8>;
    /// A unary gRPC callout, answered at `on_grpc_call_response`.
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError>;
    /// The message of the gRPC response being delivered.
    fn grpc_response(&self, size: usize) -> Vec<u8>;

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    fn increment_metric(&self, id: u32, by: i64) -> Result<(), HostError>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError>;

    // What the filters use.

    /// Nanoseconds since the epoch.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.now().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A metric, logged and skipped if the host refuses it.
    fn metric(&self, kind: MetricKind, name: &str) -> Metric {
        match self.define_metric(kind, name) {
            Ok(id) => Metric(Some(id)),
            Err(e) => {
                self.log(Level::Warn, &format!("metric {name}: {e}"));
                Metric(None)
            }
        }
    }

    fn counter(&self, name: &str) -> Metric {
        self.metric(MetricKind::Counter, name)
    }

    fn increment(&self, m: Metric, by: u64) {
        if let (Metric(Some(id)), true) = (m, by > 0) {
            let _ = self.increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn record(&self, m: Metric, value: u64) {
        if let Metric(Some(id)) = m {
            let _ = self.record_metric(id, value);
        }
    }

    /// A shared-data value and its CAS, `None` if absent or unreadable.
    fn shared(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared_get(key).ok().flatten()
    }

    /// Writes with this CAS; `false` on a mismatch or another failure.
    fn shared_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        self.shared_set(key, value, cas).is_ok()
    }

    /// Writes whatever is there. Portable: it reads the current CAS and
    /// writes with it (some hosts treat a CAS of 0 as "must be absent", not
    /// "unconditional"), trying again if another worker wrote in between.
    fn shared_put(&self, key: &str, value: &[u8]) -> bool {
        for _ in 0..8 {
            let cas = self.shared(key).map_or(0, |(_, c)| c);
            match self.shared_set(key, value, cas) {
                Ok(()) => return true,
                Err(HostError::CasMismatch) => continue,
                Err(e) => {
                    self.log(Level::Warn, &format!("shared data {key}: {e}"));
                    return false;
                }
            }
        }
        false
    }

    /// A header of the HTTP call response being delivered, as UTF-8.
    fn call_response_header(&self, name: &str) -> Option<String> {
        let b = self.header(Map::CallResponseHeaders, name).ok()??;
        String::from_utf8(b).ok()
    }

    /// The `:status` of the HTTP call response being delivered; `None`
    /// when there was no response (reset).
    fn call_status(&self) -> Option<u16> {
        self.call_response_header(":status")?.parse().ok()
    }

    /// Sets a header, logging a failure.
    fn set_header(&self, map: Map, name: &str, value: &str) {
        if let Err(e) = self.replace_header(map, name, value) {
            self.log(Level::Warn, &format!("cannot set header {name}: {e}"));
        }
    }

    /// Removes a header, logging a failure (absent is fine).
    fn drop_header(&self, map: Map, name: &str) {
        if let Err(e) = self.remove_header(map, name) {
            self.log(Level::Warn, &format!("cannot remove header {name}: {e}"));
        }
    }

    /// Removes request headers so that no copy is left: each is removed,
    /// and if one is still there (a host whose removal does nothing) the
    /// map is written again without them. On Envoy that costs one lookup
    /// per name.
    fn strip_request_headers(&self, names: &[&str]) {
        if names.is_empty() {
            return;
        }
        for name in names {
            self.drop_header(Map::RequestHeaders, name);
        }
        let left = |n: &&str| matches!(self.header(Map::RequestHeaders, n), Ok(Some(_)));
        if !names.iter().any(left) {
            return;
        }
        let all = self.request_headers();
        let keep: Vec<(&str, &[u8])> = all
            .pairs()
            .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, v)))
            .filter(|(k, _)| !names.contains(k))
            .collect();
        if let Err(e) = self.set_request_headers(&keep) {
            self.log(
                Level::Error,
                &format!("cannot rewrite the request headers: {e}"),
            );
        }
    }

    /// A local reply, logged if it fails.
    fn reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if let Err(e) = self.send_reply(status, headers, body) {
            self.log(Level::Error, &format!("local reply {status} failed: {e}"));
        }
    }

    /// A local reply with a JSON body and these extra headers.
    fn reply_json(&self, status: u32, extra: &[(&str, &str)], body: &str) {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(extra);
        self.reply(status, &headers, body.as_bytes());
    }

    /// A property as UTF-8, `None` if absent or not text.
    fn text_property(&self, path: &[&str]) -> Option<String> {
        String::from_utf8(self.property(path).ok()??).ok()
    }

    /// An integer property: Envoy's 8-byte little-endian form, or a
    /// decimal string (another host's); negative and unreadable as `None`.
    fn int_property(&self, path: &[&str]) -> Option<u64> {
        decode_int(&self.property(path).ok()??)
    }
}

/// An integer property value: 8 bytes little-endian (Envoy), or ASCII
/// decimal digits (hosts that serialise every attribute as text).
pub fn decode_int(b: &[u8]) -> Option<u64> {
    if let Ok(raw) = <[u8; 8]>::try_from(b) {
        // Eight ASCII digits are read as text: no 8-byte integer Envoy
        // sends for a status, size or duration has every byte in 0x30..=0x39
        // (that would be above 3.4 * 10^18).
        if !raw.iter().all(u8::is_ascii_digit) {
            return u64::try_from(i64::from_le_bytes(raw)).ok();
        }
    }
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Request headers read in one host call into one buffer, names and values
/// slices of it (two allocations per header through the SDK's map getter
/// cost more than the call on the hot path). Values stay bytes until
/// [`HeaderPairs::get`] checks them.
#[derive(Debug, Default)]
pub struct HeaderPairs {
    buf: Vec<u8>,
    /// Byte ranges of (name, value) in `buf`.
    pairs: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// A header value that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8;

fn le32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
}

impl HeaderPairs {
    /// Indexes a serialized map (proxy-wasm's: a count, the sizes of each
    /// name and value, then the bytes, each followed by a NUL). A
    /// malformed one gives no headers.
    pub fn parse(buf: Vec<u8>) -> HeaderPairs {
        let pairs = Self::index(&buf).unwrap_or_default();
        HeaderPairs { buf, pairs }
    }

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

    /// Serializes pairs the way hosts do (for doubles and tests).
    pub fn serialize<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
        let mut b = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            b.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
            b.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            b.extend_from_slice(k.as_ref());
            b.push(0);
            b.extend_from_slice(v.as_ref());
            b.push(0);
        }
        b
    }

    /// Every (name, value), as bytes, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries()
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

    /// The first value of `name` if present and UTF-8.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).ok().flatten()
    }

    /// Every header name (names are tokens, so UTF-8; others are skipped).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderPairs {
        HeaderPairs::parse(HeaderPairs::serialize(pairs))
    }

    #[test]
    fn pairs_are_read_in_place() {
        let h = headers(&[
            (":path", b"/a"),
            ("x", b""),
            ("bin", &[0xff, 0xfe]),
            ("x", b"second"),
        ]);
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
        let good = HeaderPairs::serialize(&[("a", b"1"), ("b", b"2")]);
        for cut in 1..good.len() {
            assert!(HeaderPairs::index(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderPairs::index(&huge).is_none());
        assert_eq!(HeaderPairs::index(&[]), Some(vec![]));
    }

    #[test]
    fn integers_are_read_in_both_forms() {
        assert_eq!(decode_int(&200i64.to_le_bytes()), Some(200));
        assert_eq!(decode_int(&0i64.to_le_bytes()), Some(0));
        assert_eq!(decode_int(&(-1i64).to_le_bytes()), None, "negative");
        assert_eq!(decode_int(b"200"), Some(200));
        assert_eq!(decode_int(b"12345678"), Some(12_345_678), "eight digits");
        assert_eq!(decode_int(b"0"), Some(0));
        assert_eq!(decode_int(b""), None);
        assert_eq!(decode_int(b"-3"), None);
        assert_eq!(decode_int(b"2 0"), None);
        assert_eq!(decode_int(b"99999999999999999999999"), None);
    }
}
