//! HTTP streams through a filter chain, iterated as Envoy's filter manager
//! does: decoder callbacks in chain order, encoder callbacks in reverse
//! order; Pause stops iteration (headers: nothing more reaches that filter
//! until it resumes, the body is buffered; body: later chunks arrive with the
//! cumulative size); `proxy_continue_stream` resumes after the callback
//! returns; local replies still pass through the encoder callbacks.
//!
//! Here: the public types and what hostcalls reach of a stream
//! (`StreamData`); the stream's handle (`handle`), its iteration through
//! the chain (`engine`), one callback into a filter (`deliver`), operations
//! queued by callbacks (`ops`), local replies (`local_reply`), the end of a
//! stream (`finish`) and its attributes (`properties`).

mod deliver;
mod engine;
mod finish;
mod handle;
mod local_reply;
mod ops;
mod properties;

pub(crate) use engine::StreamCell;
pub use handle::Stream;
pub(crate) use handle::{apply_async_op, open};
pub(crate) use properties::property;

use crate::abi::Pairs;
use crate::plugin::Plugin;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Request (decoding) or response (encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Request => 0,
            Direction::Response => 1,
        }
    }
}

/// A request or response as it left the chain: what reached the upstream,
/// or what the client received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Shared with the stream's map until either changes (copy on write),
    /// so handing headers on costs no copy.
    pub headers: Arc<Pairs>,
    pub body: Vec<u8>,
    pub trailers: Option<Pairs>,
}

impl Message {
    /// First value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// `:status` as a number.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The callbacks the host made, for a stream's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    ContextCreate,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Done,
}

/// One callback the host made on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// Position of the filter in the chain.
    pub filter: usize,
    pub callback: Callback,
    /// For action-returning callbacks: `Some(true)` for Continue, `Some(false)` for Pause.
    pub continued: Option<bool>,
}

/// Where and how a stream is opened.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Worker (VM) index; default round robin.
    pub worker: Option<usize>,
    /// Downstream peer, `ip:port` (`source.address`).
    pub source: String,
    /// Local address, `ip:port` (`destination.address`).
    pub destination: String,
    /// Whether the connection is TLS with a peer certificate (`connection.mtls`).
    pub mtls: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            worker: None,
            source: "127.0.0.1:50000".into(),
            destination: "127.0.0.1:10000".into(),
            mtls: false,
        }
    }
}

type Responder = Arc<dyn Fn(&Message) -> Message + Send + Sync>;

/// Plugins in the order of Envoy's `http_filters`.
#[derive(Clone)]
pub struct Chain {
    pub(crate) plugins: Vec<Plugin>,
    pub(crate) upstream: Option<Responder>,
}

impl Chain {
    pub(crate) fn new(plugins: Vec<Plugin>) -> Chain {
        Chain {
            plugins,
            upstream: None,
        }
    }

    /// An upstream that answers every request once it has fully arrived
    /// (the router's cluster); without one, tests answer with [`Stream::respond`].
    pub fn with_upstream<F>(mut self, f: F) -> Chain
    where
        F: Fn(&Message) -> Message + Send + Sync + 'static,
    {
        self.upstream = Some(Arc::new(f));
        self
    }
}

/// A stream operation queued by a callback, applied after it returns.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Continue(Direction, usize),
    /// `proxy_close_stream`: Envoy resets the whole stream.
    Close,
    LocalReply {
        filter: usize,
        status: u32,
        details: String,
        body: Vec<u8>,
        headers: Pairs,
        grpc_status: Option<u32>,
    },
}

/// Which header maps a filter may read, write or create right now.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Access {
    read: [bool; 4],
    write: [bool; 4],
    create: [bool; 4],
    body: [bool; 2],
}

impl Access {
    pub(crate) fn can_read(&self, i: usize) -> bool {
        self.read[i]
    }
    pub(crate) fn can_write(&self, i: usize) -> bool {
        self.write[i] || self.create[i]
    }
    pub(crate) fn can_create(&self, i: usize) -> bool {
        self.create[i]
    }
}

/// What hostcalls reach of a stream: header maps, bodies, properties.
pub(crate) struct StreamData {
    /// Request headers, request trailers, response headers, response trailers.
    maps: [Option<Arc<Pairs>>; 4],
    pub(crate) access: Vec<Access>,
    bodies: Vec<[Vec<u8>; 2]>,
    pub(crate) properties: HashMap<String, Vec<u8>>,
    source: String,
    destination: String,
    mtls: bool,
    start_ns: u64,
    /// Host clock when the stream finished (Envoy's `requestComplete`);
    /// `request.duration` is NotFound until then.
    end_ns: Option<u64>,
    /// Request body bytes received from the client (`bytesReceived`).
    bytes_received: u64,
    /// Response body bytes sent to the client (`bytesSent`).
    bytes_sent: u64,
    connection_id: u64,
    in_log: bool,
}

impl StreamData {
    pub(crate) fn map(&self, i: usize) -> Option<&Pairs> {
        self.maps[i].as_deref()
    }
    pub(crate) fn map_mut(&mut self, i: usize) -> Option<&mut Pairs> {
        self.maps[i].as_mut().map(Arc::make_mut)
    }
    pub(crate) fn create_map(&mut self, i: usize) {
        self.maps[i] = Some(Arc::new(Vec::new()));
    }
    pub(crate) fn body(&self, filter: usize, dir: Direction) -> Option<&Vec<u8>> {
        let a = self.access.get(filter)?;
        a.body[dir.index()].then(|| &self.bodies[filter][dir.index()])
    }
    pub(crate) fn body_mut(&mut self, filter: usize, dir: Direction) -> Option<&mut Vec<u8>> {
        let a = self.access.get(filter)?;
        if a.body[dir.index()] {
            Some(&mut self.bodies[filter][dir.index()])
        } else {
            None
        }
    }
}

pub(crate) struct StreamShared {
    pub(crate) id: u64,
    data: Mutex<StreamData>,
}

impl StreamShared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, StreamData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Details of a local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// Position of the filter that sent it.
    pub filter: usize,
    pub status: u32,
    /// Response code details (spaces replaced by `_`, as Envoy does).
    pub details: String,
}
