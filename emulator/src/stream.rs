//! HTTP streams through a filter chain, iterated as Envoy's filter manager
//! does: decoder callbacks in chain order, encoder callbacks in reverse
//! order; Pause stops iteration (headers: nothing more reaches that filter
//! until it resumes, the body is buffered; body: later chunks arrive with the
//! cumulative size); `proxy_continue_stream` resumes after the callback
//! returns; local replies still pass through the encoder callbacks.

use crate::abi::Pairs;
use crate::host::Host;
use crate::plugin::{FailurePolicy, Plugin, PluginInner};
use crate::vm::{HttpCallback, StreamLink, VmState};
use std::collections::{HashMap, VecDeque};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stop {
    #[default]
    None,
    Headers,
    Body,
    Trailers,
}

#[derive(Debug)]
enum Frame {
    Headers { eos: bool },
    Data { bytes: Vec<u8>, eos: bool },
    Trailers,
}

#[derive(Default)]
struct Slot {
    queue: VecDeque<Frame>,
    stop: Stop,
    headers_eos: bool,
    body_eos: bool,
}

#[derive(Default)]
struct DirState {
    slots: Vec<Slot>,
    halted: bool,
    ended: bool,
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

struct Engine {
    host: Host,
    shared: Arc<StreamShared>,
    plugins: Vec<Arc<PluginInner>>,
    upstream_responder: Option<Responder>,
    worker: usize,
    ctx: Vec<Option<u32>>,
    skipped: Vec<bool>,
    dirs: [DirState; 2],
    upstream: Option<Message>,
    downstream: Option<Message>,
    local_reply: Option<LocalReply>,
    /// Upstream response headers entered the encoder chain.
    response_started: bool,
    reset: bool,
    finished: bool,
    trace: Vec<TraceEntry>,
}

pub(crate) struct StreamCell {
    engine: Mutex<Engine>,
}

impl StreamCell {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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

impl Engine {
    fn n(&self) -> usize {
        self.plugins.len()
    }

    fn filter_of(&self, dir: Direction, pos: usize, n: usize) -> usize {
        match dir {
            Direction::Request => pos,
            Direction::Response => n - 1 - pos,
        }
    }

    fn pos_of(&self, dir: Direction, filter: usize) -> usize {
        self.filter_of(dir, filter, self.n())
    }

    fn headers_in(&mut self, dir: Direction, headers: Arc<Pairs>, eos: bool) {
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        let i = if dir == Direction::Request { 0 } else { 2 };
        self.response_started |= dir == Direction::Response;
        self.shared.lock().maps[i] = Some(headers);
        self.input(dir, Frame::Headers { eos });
    }

    fn data_in(&mut self, dir: Direction, bytes: Vec<u8>, eos: bool) {
        if dir == Direction::Request {
            // Envoy counts what the client sent as it arrives, before the
            // filter chain (and whether the request is still processed).
            self.shared.lock().bytes_received += bytes.len() as u64;
        }
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        self.input(dir, Frame::Data { bytes, eos });
    }

    fn trailers_in(&mut self, dir: Direction, trailers: Pairs) {
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        let i = if dir == Direction::Request { 1 } else { 3 };
        self.shared.lock().maps[i] = Some(Arc::new(trailers));
        self.input(dir, Frame::Trailers);
    }

    fn input(&mut self, dir: Direction, frame: Frame) {
        if self.n() == 0 {
            self.output(dir, frame);
        } else {
            push(&mut self.dirs[dir.index()].slots[0].queue, frame);
            self.pump(dir);
        }
    }

    fn pump(&mut self, dir: Direction) {
        self.pump_from(dir, 0);
    }

    /// Delivers queued frames, filters from position `start` on, until none can move.
    fn pump_from(&mut self, dir: Direction, start: usize) {
        loop {
            let mut progressed = false;
            for pos in start..self.n() {
                loop {
                    if self.finished || self.dirs[dir.index()].halted {
                        return;
                    }
                    let slot = &mut self.dirs[dir.index()].slots[pos];
                    if matches!(slot.stop, Stop::Headers | Stop::Trailers) {
                        break;
                    }
                    let Some(frame) = slot.queue.pop_front() else {
                        break;
                    };
                    progressed = true;
                    self.deliver(dir, pos, frame);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn forward(&mut self, dir: Direction, pos: usize, frame: Frame) {
        if pos + 1 >= self.n() {
            self.output(dir, frame);
        } else {
            push(&mut self.dirs[dir.index()].slots[pos + 1].queue, frame);
        }
    }

    /// A frame passed the last filter: to the upstream, or to the client.
    fn output(&mut self, dir: Direction, frame: Frame) {
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let snapshot = |s: &Arc<StreamShared>, i: usize| s.lock().maps[i].clone();
        let copy = |s: &Arc<StreamShared>, i: usize| s.lock().maps[i].as_deref().cloned();
        let msg = match dir {
            Direction::Request => &mut self.upstream,
            Direction::Response => &mut self.downstream,
        };
        let eos = match frame {
            Frame::Headers { eos } => {
                *msg = Some(Message {
                    headers: snapshot(&self.shared, hi).unwrap_or_default(),
                    ..Message::default()
                });
                eos
            }
            Frame::Data { bytes, eos } => {
                if let Some(m) = msg.as_mut() {
                    m.body.extend_from_slice(&bytes);
                    if dir == Direction::Response {
                        // Body bytes the client received (`bytesSent`),
                        // a local reply's body sent through the encoders included.
                        self.shared.lock().bytes_sent += bytes.len() as u64;
                    }
                }
                eos
            }
            Frame::Trailers => {
                if let Some(m) = msg.as_mut() {
                    m.trailers = copy(&self.shared, ti);
                }
                true
            }
        };
        if !eos {
            return;
        }
        self.dirs[dir.index()].ended = true;
        match dir {
            Direction::Request => {
                if let (Some(up), Some(req)) =
                    (self.upstream_responder.clone(), self.upstream.clone())
                {
                    if self.downstream.is_none() && !self.dirs[1].halted {
                        let resp = up(&req);
                        self.headers_in(
                            Direction::Response,
                            resp.headers,
                            resp.body.is_empty() && resp.trailers.is_none(),
                        );
                        if !resp.body.is_empty() {
                            self.data_in(Direction::Response, resp.body, resp.trailers.is_none());
                        }
                        if let Some(t) = resp.trailers {
                            self.trailers_in(Direction::Response, t);
                        }
                    }
                }
            }
            Direction::Response => self.finish(),
        }
    }

    fn set_access(&self, filter: usize, f: impl FnOnce(&mut Access)) {
        let mut d = self.shared.lock();
        f(&mut d.access[filter]);
    }

    /// Makes sure the filter has a context on this stream. `false` when its
    /// VM has failed (the failure is handled here).
    fn ensure_context(&mut self, filter: usize, dir: Direction) -> bool {
        if self.ctx[filter].is_some() {
            return true;
        }
        let link = StreamLink {
            stream: self.shared.clone(),
            filter,
        };
        let r = {
            let mut vm = self.plugins[filter].lock_vm(self.worker);
            vm.create_context(link)
        };
        self.trace.push(TraceEntry {
            filter,
            callback: Callback::ContextCreate,
            continued: None,
        });
        match r {
            Ok(id) => {
                self.ctx[filter] = Some(id);
                true
            }
            Err(()) => {
                self.vm_failed(filter, dir);
                false
            }
        }
    }

    /// Envoy's answer to a failed VM: a 503 local reply (fail closed) or the
    /// filter skipped (fail open).
    fn vm_failed(&mut self, filter: usize, _dir: Direction) {
        self.skipped[filter] = true;
        let policy = self.plugins[filter].lock_vm(self.worker).policy();
        if policy == FailurePolicy::FailClosed {
            self.local_reply(
                filter,
                503,
                "wasm_fail_stream".into(),
                Vec::new(),
                Vec::new(),
                Some(14),
            );
        }
    }

    fn deliver(&mut self, dir: Direction, pos: usize, frame: Frame) {
        let filter = self.pos_of(dir, pos);
        if self.skipped[filter] {
            self.forward(dir, pos, frame);
            return;
        }
        // Filters first reached on the response path (a local reply from an
        // earlier filter) have their context created there too.
        if !self.ensure_context(filter, dir) {
            if self.skipped[filter] && !self.dirs[dir.index()].halted {
                self.forward(dir, pos, frame);
            }
            return;
        }
        let ctx = self.ctx[filter].unwrap_or(0);
        let d = dir.index();
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let (cb, tcb, arg, eos) = match &frame {
            Frame::Headers { eos } => {
                self.dirs[d].slots[pos].headers_eos = *eos;
                self.set_access(filter, |a| {
                    a.read[hi] = true;
                    a.write[hi] = true;
                });
                let n = self.shared.lock().maps[hi].as_ref().map_or(0, |m| m.len());
                let cb = if d == 0 {
                    HttpCallback::RequestHeaders
                } else {
                    HttpCallback::ResponseHeaders
                };
                let t = if d == 0 {
                    Callback::RequestHeaders
                } else {
                    Callback::ResponseHeaders
                };
                (cb, t, n as i32, Some(*eos))
            }
            Frame::Data { bytes, eos } => {
                let len = {
                    let mut s = self.shared.lock();
                    s.bodies[filter][d].extend_from_slice(bytes);
                    let no_trailers = s.maps[ti].is_none();
                    let a = &mut s.access[filter];
                    a.body[d] = true;
                    // Trailers may be added from the last chunk when there are none.
                    a.create[ti] = *eos && no_trailers;
                    s.bodies[filter][d].len()
                };
                if *eos {
                    self.dirs[d].slots[pos].body_eos = true;
                }
                let cb = if d == 0 {
                    HttpCallback::RequestBody
                } else {
                    HttpCallback::ResponseBody
                };
                let t = if d == 0 {
                    Callback::RequestBody
                } else {
                    Callback::ResponseBody
                };
                (cb, t, len as i32, Some(*eos))
            }
            Frame::Trailers => {
                self.set_access(filter, |a| {
                    a.read[ti] = true;
                    a.write[ti] = true;
                });
                let n = self.shared.lock().maps[ti].as_ref().map_or(0, |m| m.len());
                let cb = if d == 0 {
                    HttpCallback::RequestTrailers
                } else {
                    HttpCallback::ResponseTrailers
                };
                let t = if d == 0 {
                    Callback::RequestTrailers
                } else {
                    Callback::ResponseTrailers
                };
                (cb, t, n as i32, None)
            }
        };
        let (result, ops) = {
            let mut vm = self.plugins[filter].lock_vm(self.worker);
            let r = vm.http(cb, ctx, arg, eos);
            (r, vm.take_ops())
        };
        let Ok(continued) = result else {
            self.trace.push(TraceEntry {
                filter,
                callback: tcb,
                continued: None,
            });
            self.set_access(filter, |a| *a = Access::default());
            self.vm_failed(filter, dir);
            if self.skipped[filter] && !self.dirs[d].halted && !self.finished {
                // Fail open: the frame goes on as if the filter were not there.
                let frame = match frame {
                    Frame::Data { eos, .. } => {
                        let bytes = std::mem::take(&mut self.shared.lock().bodies[filter][d]);
                        Frame::Data { bytes, eos }
                    }
                    f => f,
                };
                self.forward(dir, pos, frame);
            }
            return;
        };
        self.trace.push(TraceEntry {
            filter,
            callback: tcb,
            continued: Some(continued),
        });
        // A local reply forces this callback's result to Stop.
        // Once a reply is under way, later ones are ignored.
        let replying = self.local_reply.is_some();
        let (replies, rest): (Vec<_>, Vec<_>) = ops.into_iter().partition(|(id, op)| {
            *id == self.shared.id && matches!(op, Op::LocalReply { .. }) && !replying
        });
        if let Some((_, op)) = replies.into_iter().next() {
            self.set_access(filter, |a| *a = Access::default());
            self.apply(op, Some(dir));
            self.route_ops(rest);
            return;
        }
        let slot_stop;
        match frame {
            Frame::Headers { eos } => {
                if continued {
                    self.set_access(filter, |a| {
                        a.read[hi] = false;
                        a.write[hi] = false;
                    });
                    self.forward(dir, pos, Frame::Headers { eos });
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Headers;
                }
            }
            Frame::Data { eos, .. } => {
                if continued {
                    let (bytes, added_trailers) = {
                        let mut s = self.shared.lock();
                        let added = s.access[filter].create[ti] && s.maps[ti].is_some();
                        s.access[filter].body[d] = false;
                        s.access[filter].create[ti] = false;
                        (std::mem::take(&mut s.bodies[filter][d]), added)
                    };
                    if added_trailers {
                        // Trailers added from the last chunk follow the data.
                        self.forward(dir, pos, Frame::Data { bytes, eos: false });
                        self.forward(dir, pos, Frame::Trailers);
                    } else {
                        self.forward(dir, pos, Frame::Data { bytes, eos });
                    }
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Body;
                }
            }
            Frame::Trailers => {
                if continued {
                    self.set_access(filter, |a| {
                        a.read[ti] = false;
                        a.write[ti] = false;
                    });
                    self.flush_body(dir, pos, filter, false);
                    self.forward(dir, pos, Frame::Trailers);
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Trailers;
                }
            }
        }
        self.dirs[d].slots[pos].stop = slot_stop;
        self.route_ops(rest);
    }

    /// Sends on the body buffered at a filter (after a body Pause).
    fn flush_body(&mut self, dir: Direction, pos: usize, filter: usize, eos: bool) {
        let d = dir.index();
        let bytes = {
            let mut s = self.shared.lock();
            s.access[filter].body[d] = false;
            std::mem::take(&mut s.bodies[filter][d])
        };
        if !bytes.is_empty() || eos {
            self.forward(dir, pos, Frame::Data { bytes, eos });
        }
    }

    fn route_ops(&mut self, ops: Vec<(u64, Op)>) {
        for (id, op) in ops {
            if id == self.shared.id {
                self.apply(op, None);
            } else {
                self.host
                    .inner
                    .core
                    .lock()
                    .schedule(0, crate::host::EventKind::StreamOp { stream: id, op });
            }
        }
    }

    fn apply(&mut self, op: Op, during: Option<Direction>) {
        if self.finished {
            return;
        }
        match op {
            Op::Continue(dir, filter) => self.resume(dir, filter),
            Op::Close => {
                self.reset = true;
                self.finish();
            }
            Op::LocalReply {
                filter,
                status,
                details,
                body,
                headers,
                grpc_status,
            } => {
                let _ = during;
                self.local_reply(filter, status, details, body, headers, grpc_status);
            }
        }
    }

    fn resume(&mut self, dir: Direction, filter: usize) {
        let d = dir.index();
        if self.dirs[d].halted || filter >= self.n() {
            return;
        }
        let pos = self.pos_of(dir, filter);
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let stop = std::mem::take(&mut self.dirs[d].slots[pos].stop);
        match stop {
            Stop::None => return,
            Stop::Headers => {
                self.set_access(filter, |a| {
                    a.read[hi] = false;
                    a.write[hi] = false;
                });
                let eos = self.dirs[d].slots[pos].headers_eos;
                self.forward(dir, pos, Frame::Headers { eos });
            }
            Stop::Body => {
                let eos = self.dirs[d].slots[pos].body_eos
                    && !self.dirs[d].slots[pos]
                        .queue
                        .iter()
                        .any(|f| matches!(f, Frame::Trailers));
                self.set_access(filter, |a| a.create[ti] = false);
                self.flush_body(dir, pos, filter, eos);
            }
            Stop::Trailers => {
                self.set_access(filter, |a| {
                    a.read[ti] = false;
                    a.write[ti] = false;
                });
                self.flush_body(dir, pos, filter, false);
                self.forward(dir, pos, Frame::Trailers);
            }
        }
        // As Envoy's iterate_from_current_filter: what was released goes on
        // through the later filters first, then the resumed filter gets the
        // data that was buffered for it while it was stopped.
        self.pump_from(dir, pos + 1);
        self.pump(dir);
    }

    /// Sends a local reply: before the upstream response, through the encoder
    /// chain (Envoy's sendLocalReplyViaFilterChain); while encoding, directly
    /// to the client; after response headers went out, a reset.
    fn local_reply(
        &mut self,
        filter: usize,
        status: u32,
        details: String,
        body: Vec<u8>,
        headers: Pairs,
        grpc_status: Option<u32>,
    ) {
        if self.local_reply.is_some() || self.finished {
            return;
        }
        self.local_reply = Some(LocalReply {
            filter,
            status,
            details,
        });
        // No more request processing.
        self.dirs[0].halted = true;
        for s in &mut self.dirs[0].slots {
            s.queue.clear();
            s.stop = Stop::None;
        }
        if self.downstream.is_some() {
            self.reset = true;
            self.finish();
            return;
        }
        let is_grpc = self.shared.lock().maps[0]
            .as_ref()
            .and_then(|m| {
                m.iter()
                    .find(|(k, _)| k == "content-type")
                    .map(|(_, v)| v.starts_with(b"application/grpc"))
            })
            .unwrap_or(false);
        let (h, body) = local_reply_message(status, headers, body, grpc_status, is_grpc);
        let h = Arc::new(h);
        if self.response_started {
            // Sent while encoding, before the client got headers: Envoy
            // replaces the response directly, without the encoder filters.
            for s in &mut self.dirs[1].slots {
                s.queue.clear();
                s.stop = Stop::None;
            }
            {
                // The reply's body goes to the client here, not through
                // `output`, so it is counted here (once).
                let mut s = self.shared.lock();
                s.maps[2] = Some(h.clone());
                s.bytes_sent += body.len() as u64;
            }
            self.downstream = Some(Message {
                headers: h,
                body,
                trailers: None,
            });
            self.finish();
            return;
        }
        let n = self.n();
        for s in &mut self.dirs[1].slots {
            s.queue.clear();
            s.stop = Stop::None;
        }
        {
            let mut s = self.shared.lock();
            s.maps[2] = Some(h);
            s.maps[3] = None;
            for f in 0..n {
                s.bodies[f][1].clear();
                s.access[f] = Access::default();
            }
        }
        // Envoy encodes a local reply through every encoder filter, from the
        // first (encodeHeaders(nullptr, …)), but a wasm filter whose context
        // was never created (the request did not reach it) returns Continue
        // without calling into its VM.
        for f in 0..n {
            if self.ctx[f].is_none() {
                self.skipped[f] = true;
            }
        }
        let eos = body.is_empty();
        self.input(Direction::Response, Frame::Headers { eos });
        if !eos && !self.finished {
            self.input(
                Direction::Response,
                Frame::Data {
                    bytes: body,
                    eos: true,
                },
            );
        }
    }

    /// `on_log` for every filter with a context (in chain order, with the
    /// headers readable again), then `on_done` and `on_delete` for each.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        // Envoy's `onRequestComplete`: the end time `request.duration` reads.
        let end_ns = self.host.inner.core.lock().now();
        self.shared.lock().end_ns = Some(end_ns);
        self.finished = true;
        self.dirs[0].halted = true;
        self.dirs[1].halted = true;
        let n = self.n();
        {
            let mut s = self.shared.lock();
            s.in_log = true;
            for a in s.access.iter_mut() {
                *a = Access {
                    read: [true; 4],
                    ..Access::default()
                };
            }
        }
        for f in 0..n {
            // Envoy's Context::log creates the context of a filter the
            // request never reached, so every filter logs.
            if self.ctx[f].is_none() && self.plugins[f].lock_vm(self.worker).failed().is_none() {
                let link = StreamLink {
                    stream: self.shared.clone(),
                    filter: f,
                };
                let r = self.plugins[f].lock_vm(self.worker).create_context(link);
                self.trace.push(TraceEntry {
                    filter: f,
                    callback: Callback::ContextCreate,
                    continued: None,
                });
                if let Ok(id) = r {
                    self.ctx[f] = Some(id);
                }
            }
            let Some(ctx) = self.ctx[f] else { continue };
            let r = self.plugins[f].lock_vm(self.worker).on_log(ctx);
            if r.is_ok() {
                self.trace.push(TraceEntry {
                    filter: f,
                    callback: Callback::Log,
                    continued: None,
                });
            }
        }
        {
            let mut s = self.shared.lock();
            for a in s.access.iter_mut() {
                *a = Access::default();
            }
        }
        for f in 0..n {
            let Some(ctx) = self.ctx[f] else { continue };
            let ops = {
                let mut vm = self.plugins[f].lock_vm(self.worker);
                vm.finish(ctx);
                vm.take_ops()
            };
            drop(ops);
            self.trace.push(TraceEntry {
                filter: f,
                callback: Callback::Done,
                continued: None,
            });
        }
    }
}

fn push(q: &mut VecDeque<Frame>, frame: Frame) {
    // Data arriving while a filter is stopped is buffered as one chunk.
    if let (Some(Frame::Data { bytes: b, eos: e }), Frame::Data { bytes, eos }) =
        (q.back_mut(), &frame)
    {
        b.extend_from_slice(bytes);
        *e |= *eos;
        return;
    }
    q.push_back(frame);
}

/// Serves `proxy_get_property`: stream attributes from the stream the
/// effective context belongs to, plugin attributes from the plugin.
pub(crate) fn property(
    vm: &VmState,
    link: Option<&StreamLink>,
    path: &[String],
) -> Option<Vec<u8>> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["plugin_name"] => return Some(vm.meta.name.clone().into_bytes()),
        ["plugin_root_id"] => return Some(vm.meta.root_id.clone().into_bytes()),
        ["plugin_vm_id"] => return Some(vm.meta.vm_id.clone().into_bytes()),
        _ => {}
    }
    let l = link?;
    let d = l.stream.lock();
    if let Some(v) = d.properties.get(&path.join(".")) {
        return Some(v.clone());
    }
    let req_live = d.access[l.filter].read[0] || d.in_log;
    let header = |name: &str| -> Option<Vec<u8>> {
        if !req_live {
            return None;
        }
        d.maps[0]
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<i64>().ok())
    };
    match p.as_slice() {
        ["request", "path"] => header(":path"),
        ["request", "url_path"] => header(":path").map(|v| {
            let end = v.iter().position(|b| *b == b'?').unwrap_or(v.len());
            v[..end].to_vec()
        }),
        ["request", "query"] => header(":path").map(|v| match v.iter().position(|b| *b == b'?') {
            Some(i) => v[i + 1..].to_vec(),
            None => Vec::new(),
        }),
        ["request", "method"] => header(":method"),
        ["request", "host"] => header(":authority"),
        ["request", "scheme"] => header(":scheme"),
        ["request", "id"] => header("x-request-id"),
        ["request", "referer"] => header("referer"),
        ["request", "useragent"] => header("user-agent"),
        ["request", "protocol"] => Some(b"HTTP/1.1".to_vec()),
        ["request", "time"] => Some((d.start_ns as i64).to_le_bytes().to_vec()),
        ["request", "headers"] => {
            if !req_live {
                return None;
            }
            let mut merged: Vec<(String, Vec<u8>)> = Vec::new();
            for (k, v) in d.maps[0].as_deref()? {
                match merged.iter_mut().find(|(mk, _)| mk == k) {
                    Some((_, mv)) => {
                        mv.push(b',');
                        mv.extend_from_slice(v);
                    }
                    None => merged.push((k.clone(), v.clone())),
                }
            }
            Some(crate::abi::serialize_pairs(&merged))
        }
        ["request", "headers", name] => {
            if !req_live {
                return None;
            }
            let name = name.to_ascii_lowercase();
            let vals: Vec<&Vec<u8>> = d.maps[0]
                .as_ref()?
                .iter()
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .collect();
            if vals.is_empty() {
                None
            } else {
                Some(
                    vals.iter()
                        .map(|v| v.as_slice())
                        .collect::<Vec<_>>()
                        .join(&b','),
                )
            }
        }
        // Envoy's RequestWrapper: a valid `content-length` when the headers
        // are reachable (an invalid one: NotFound), otherwise bytesReceived.
        ["request", "size"] => match header("content-length") {
            Some(v) => {
                let n: i64 = std::str::from_utf8(&v).ok()?.trim().parse().ok()?;
                Some(n.to_le_bytes().to_vec())
            }
            None => Some((d.bytes_received as i64).to_le_bytes().to_vec()),
        },
        ["request", "total_size"] => {
            let headers = if req_live {
                byte_size(d.maps[0].as_deref())
            } else {
                0
            };
            Some(((d.bytes_received + headers) as i64).to_le_bytes().to_vec())
        }
        // Set once the stream is complete (Envoy's `requestComplete`).
        ["request", "duration"] => {
            let ns = d.end_ns?.saturating_sub(d.start_ns);
            Some((ns as i64).to_le_bytes().to_vec())
        }
        ["response", "size"] => Some((d.bytes_sent as i64).to_le_bytes().to_vec()),
        // bytesSent plus the headers and trailers while reachable (as the
        // request's: in their callback or in `on_log`).
        ["response", "total_size"] => {
            let a = &d.access[l.filter];
            let mut n = d.bytes_sent;
            if a.read[2] || d.in_log {
                n += byte_size(d.maps[2].as_deref());
            }
            if a.read[3] || d.in_log {
                n += byte_size(d.maps[3].as_deref());
            }
            Some((n as i64).to_le_bytes().to_vec())
        }
        ["response", "code"] => {
            let h = d.maps[2].as_ref()?;
            let s = h.iter().find(|(k, _)| k == ":status")?;
            let code: i64 = std::str::from_utf8(&s.1).ok()?.parse().ok()?;
            Some(code.to_le_bytes().to_vec())
        }
        ["source", "address"] => Some(d.source.clone().into_bytes()),
        ["source", "port"] => port(&d.source).map(|p| p.to_le_bytes().to_vec()),
        ["destination", "address"] => Some(d.destination.clone().into_bytes()),
        ["destination", "port"] => port(&d.destination).map(|p| p.to_le_bytes().to_vec()),
        ["connection", "mtls"] => Some(vec![u8::from(d.mtls)]),
        ["connection", "id"] => Some(d.connection_id.to_le_bytes().to_vec()),
        _ => None,
    }
}

/// Envoy's `HeaderMap::byteSize`: every name and value, pseudo-headers included.
fn byte_size(map: Option<&Pairs>) -> u64 {
    map.map_or(0, |m| {
        m.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
    })
}

/// gRPC status for an HTTP status, as Envoy's `Grpc::Utility::httpToGrpcStatus`.
fn http_to_grpc_status(code: u32) -> u32 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Builds a local reply as Envoy's `Utility::prepareLocalReply` /
/// `encodeLocalReply` do: `:status`, the filter's headers, then
/// `content-length` and a default `content-type: text/plain` for a body; an
/// empty body drops both. To a gRPC request the reply is trailers-only:
/// `:status 200`, `application/grpc`, `grpc-status` and the body as a
/// percent-encoded `grpc-message`.
pub(crate) fn local_reply_message(
    status: u32,
    headers: Pairs,
    body: Vec<u8>,
    grpc_status: Option<u32>,
    is_grpc: bool,
) -> (Pairs, Vec<u8>) {
    let mut h: Pairs = vec![(":status".into(), status.to_string().into_bytes())];
    h.extend(
        headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v)),
    );
    let set = |h: &mut Pairs, k: &str, v: Vec<u8>| {
        h.retain(|(n, _)| n != k);
        h.push((k.to_string(), v));
    };
    if is_grpc {
        h[0].1 = b"200".to_vec();
        set(&mut h, "content-type", b"application/grpc".to_vec());
        if !h.iter().any(|(k, _)| k == "grpc-status") {
            let g = grpc_status.unwrap_or_else(|| http_to_grpc_status(status));
            h.push(("grpc-status".into(), g.to_string().into_bytes()));
        }
        if !body.is_empty() {
            let mut msg = Vec::with_capacity(body.len());
            for &b in &body {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    msg.push(b);
                } else {
                    msg.extend_from_slice(format!("%{b:02X}").as_bytes());
                }
            }
            set(&mut h, "grpc-message", msg);
        }
        h.retain(|(k, _)| k != "content-length");
        return (h, Vec::new());
    }
    if body.is_empty() {
        h.retain(|(k, _)| k != "content-length" && k != "content-type");
    } else {
        set(
            &mut h,
            "content-length",
            body.len().to_string().into_bytes(),
        );
        if !h.iter().any(|(k, _)| k == "content-type") {
            h.push(("content-type".into(), b"text/plain".to_vec()));
        }
    }
    (h, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Pairs {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn local_reply_headers_follow_envoy() {
        let (h, b) = local_reply_message(
            403,
            p(&[("content-type", "application/json")]),
            b"{}".to_vec(),
            None,
            false,
        );
        assert_eq!(
            h,
            p(&[
                (":status", "403"),
                ("content-type", "application/json"),
                ("content-length", "2")
            ])
        );
        assert_eq!(b, b"{}");
        let (h, _) = local_reply_message(500, vec![], b"oops".to_vec(), None, false);
        assert_eq!(
            h,
            p(&[
                (":status", "500"),
                ("content-length", "4"),
                ("content-type", "text/plain")
            ])
        );
        let (h, b) = local_reply_message(
            204,
            p(&[("content-type", "x/y"), ("content-length", "9")]),
            vec![],
            None,
            false,
        );
        assert_eq!(h, p(&[(":status", "204")]));
        assert!(b.is_empty());
    }

    #[test]
    fn local_reply_to_grpc_is_trailers_only() {
        let (h, b) = local_reply_message(429, vec![], b"slow down 100%".to_vec(), None, true);
        assert_eq!(
            h,
            p(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "14"),
                ("grpc-message", "slow down 100%25")
            ])
        );
        assert!(b.is_empty());
        let (h, _) = local_reply_message(503, vec![], vec![], Some(14), true);
        assert!(h.contains(&("grpc-status".to_string(), b"14".to_vec())));
    }
}
