//! The handle on a stream (a test's, the dev proxy's): opening it on a
//! worker, feeding it the client's and the upstream's frames, reading what
//! came out; dropping it unfinished is a client going away.

use super::engine::{DirState, Engine, Slot, Stop, StreamCell};
use super::{
    Access, Chain, Direction, LocalReply, Message, Op, StreamData, StreamOptions, StreamShared,
    TraceEntry,
};
use crate::abi::Pairs;
use crate::host::Host;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An HTTP stream through a chain. Operations deliver what falls due
/// afterwards ([`Host::run_until_idle`]).
pub struct Stream {
    cell: Arc<StreamCell>,
    host: Host,
}

pub(crate) fn open(host: &Host, chain: &Chain, options: StreamOptions) -> Stream {
    let inner = &host.inner;
    let id = inner
        .next_stream
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let workers = host.workers();
    let worker = options.worker.unwrap_or_else(|| {
        inner
            .next_worker
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize
    }) % workers;
    let n = chain.plugins.len();
    let start_ns = inner.core.lock().now();
    let shared = Arc::new(StreamShared {
        id,
        data: Mutex::new(StreamData {
            maps: [None, None, None, None],
            access: vec![Access::default(); n],
            bodies: vec![[Vec::new(), Vec::new()]; n],
            properties: HashMap::new(),
            source: options.source,
            destination: options.destination,
            mtls: options.mtls,
            start_ns,
            end_ns: None,
            bytes_received: 0,
            bytes_sent: 0,
            connection_id: id,
            in_log: false,
        }),
    });
    let mk = || DirState {
        slots: (0..n).map(|_| Slot::default()).collect(),
        halted: false,
        ended: false,
    };
    let engine = Engine {
        host: host.clone(),
        shared,
        plugins: chain.plugins.iter().map(|p| p.inner.clone()).collect(),
        upstream_responder: chain.upstream.clone(),
        worker,
        ctx: vec![None; n],
        skipped: vec![false; n],
        dirs: [mk(), mk()],
        upstream: None,
        downstream: None,
        local_reply: None,
        response_started: false,
        reset: false,
        finished: false,
        trace: Vec::new(),
    };
    let cell = Arc::new(StreamCell {
        engine: Mutex::new(engine),
    });
    inner
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Arc::downgrade(&cell));
    Stream {
        cell,
        host: host.clone(),
    }
}

fn lower(headers: &[(&str, &str)]) -> Pairs {
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect()
}

impl Stream {
    fn with<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        let r = f(&mut self.cell.lock());
        self.host.run_until_idle();
        r
    }

    /// Request headers from the client. Envoy's connection manager adds an
    /// `x-request-id` first when there is none.
    pub fn request_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) {
        let mut h = lower(headers);
        if !h.iter().any(|(k, _)| k == "x-request-id") {
            let r = self.host.inner.core.lock().random_u64();
            let id = self.cell.lock().shared.id;
            h.push((
                "x-request-id".into(),
                format!("{r:016x}-{id:08x}").into_bytes(),
            ));
        }
        self.with(|e| e.headers_in(Direction::Request, Arc::new(h), end_of_stream));
    }

    pub fn request_body(&self, chunk: &[u8], end_of_stream: bool) {
        self.with(|e| e.data_in(Direction::Request, chunk.to_vec(), end_of_stream));
    }

    pub fn request_trailers(&self, trailers: &[(&str, &str)]) {
        self.with(|e| e.trailers_in(Direction::Request, lower(trailers)));
    }

    /// Response headers from the upstream.
    pub fn response_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) {
        self.with(|e| e.headers_in(Direction::Response, Arc::new(lower(headers)), end_of_stream));
    }

    pub fn response_body(&self, chunk: &[u8], end_of_stream: bool) {
        self.with(|e| e.data_in(Direction::Response, chunk.to_vec(), end_of_stream));
    }

    pub fn response_trailers(&self, trailers: &[(&str, &str)]) {
        self.with(|e| e.trailers_in(Direction::Response, lower(trailers)));
    }

    /// The upstream answers: `:status`, headers, then the body (if any) as one chunk.
    pub fn respond(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut h = vec![(":status".to_string(), status.to_string().into_bytes())];
        h.extend(lower(headers));
        self.with(|e| {
            e.headers_in(Direction::Response, Arc::new(h), body.is_empty());
            if !body.is_empty() {
                e.data_in(Direction::Response, body.to_vec(), true);
            }
        });
    }

    /// The client resets the stream: no more callbacks but `on_log`, `on_done`, `on_delete`.
    pub fn reset(&self) {
        self.with(|e| {
            e.reset = true;
            e.finish();
        });
    }

    /// What reached the upstream so far (`None` until the request headers did).
    pub fn upstream_request(&self) -> Option<Message> {
        self.cell.lock().upstream.clone()
    }

    /// What the client received so far (`None` until response headers did).
    pub fn response(&self) -> Option<Message> {
        self.cell.lock().downstream.clone()
    }

    /// The local reply a filter (or a VM failure) sent, if any.
    pub fn local_reply(&self) -> Option<LocalReply> {
        self.cell.lock().local_reply.clone()
    }

    /// Whether the stream has ended (`on_log`, `on_done`, `on_delete` ran).
    pub fn is_complete(&self) -> bool {
        self.cell.lock().finished
    }

    /// Whether the stream was reset (by the client or a filter's `close_stream`).
    pub fn was_reset(&self) -> bool {
        self.cell.lock().reset
    }

    /// The filter (chain position) at which the given direction is stopped, if any.
    pub fn paused_at(&self, dir: Direction) -> Option<usize> {
        let e = self.cell.lock();
        let n = e.plugins.len();
        e.dirs[dir.index()]
            .slots
            .iter()
            .position(|s| s.stop != Stop::None)
            .map(|pos| e.filter_of(dir, pos, n))
    }

    /// Every callback the host made on this stream, in order.
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.cell.lock().trace.clone()
    }

    /// The worker (VM index) this stream runs on.
    pub fn worker(&self) -> usize {
        self.cell.lock().worker
    }

    /// The stream's context id in the VM of the filter at `position`.
    pub fn context_id(&self, position: usize) -> Option<u32> {
        self.cell.lock().ctx.get(position).copied().flatten()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A stream dropped unfinished is a client that went away.
        let mut e = self.cell.lock();
        if !e.finished {
            e.reset = true;
            e.finish();
        }
        let id = e.shared.id;
        drop(e);
        self.host
            .inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

/// Applies an operation a root-context callback queued for a stream.
pub(crate) fn apply_async_op(_host: &Host, cell: &Arc<StreamCell>, op: Op) {
    let mut e = cell.lock();
    e.apply(op, None);
}
