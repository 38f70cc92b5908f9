//! The filters' one door to the proxy-wasm host: [`ProxyWasm`], the
//! [`Host`] over `proxy_wasm::hostcalls` (host statuses typed once, request
//! data read as checked bytes, nothing unwrapped: the SDK's helpers panic
//! on errors and invalid UTF-8, and a panic traps the VM for every request
//! on the worker), and [`Shell`], the root and stream contexts that run any
//! [`Filter`] and map its [`Flow`] to an `Action` in one place.
//!
//! A filter crate is `filter_shell::export!(its_core::Worker);`.

pub use filter_common;
pub use proxy_wasm;

use filter_common::filter::{configure, Filter, Flow};
use filter_common::host::{HeaderPairs, Host, HostError, Level, Map, MetricKind};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// The proxy-wasm host.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyWasm;

fn typed(s: Status) -> HostError {
    match s {
        Status::NotFound => HostError::NotFound,
        Status::BadArgument => HostError::BadArgument,
        Status::SerializationFailure => HostError::SerializationFailure,
        Status::ParseFailure => HostError::ParseFailure,
        Status::Empty => HostError::Empty,
        Status::CasMismatch => HostError::CasMismatch,
        Status::InternalFailure => HostError::InternalFailure,
        Status::Ok => HostError::Other(0),
        _ => HostError::Unimplemented,
    }
}

fn map_type(m: Map) -> MapType {
    match m {
        Map::RequestHeaders => MapType::HttpRequestHeaders,
        Map::ResponseHeaders => MapType::HttpResponseHeaders,
        Map::CallResponseHeaders => MapType::HttpCallResponseHeaders,
    }
}

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

impl Host for ProxyWasm {
    fn now(&self) -> Duration {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default()
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
            Level::Critical => LogLevel::Critical,
        };
        let _ = hostcalls::log(level, message);
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        hostcalls::set_tick_period(period).map_err(typed)
    }

    fn plugin_configuration(&self) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
    }

    fn request_headers(&self) -> HeaderPairs {
        HeaderPairs::parse(raw::request_header_pairs())
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_map_value_bytes(map_type(map), name).map_err(typed)
    }

    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::set_map_value(map_type(map), name, Some(value)).map_err(typed)
    }

    fn remove_header(&self, map: Map, name: &str) -> Result<(), HostError> {
        hostcalls::set_map_value(map_type(map), name, None).map_err(typed)
    }

    fn set_request_headers(&self, pairs: &[(&str, &[u8])]) -> Result<(), HostError> {
        hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs.to_vec()).map_err(typed)
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(typed)
    }

    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        hostcalls::send_http_response(status, headers.to_vec(), Some(body)).map_err(typed)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(typed)
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context_id).map_err(typed)
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        match hostcalls::get_shared_data(key).map_err(typed)? {
            (Some(v), Some(cas)) => Ok(Some((v, cas))),
            _ => Ok(None),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), Some(cas)).map_err(typed)
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(typed)
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(queue, Some(value)).map_err(typed)
    }

    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError> {
        match hostcalls::dequeue_shared_queue(queue) {
            Ok(v) => Ok(v),
            Err(Status::Empty) => Ok(None),
            Err(s) => Err(typed(s)),
        }
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout)
            .map_err(typed)
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        hostcalls::dispatch_grpc_call(cluster, service, method, vec![], Some(message), timeout)
            .map_err(typed)
    }

    fn grpc_response(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).map_err(typed)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), HostError> {
        hostcalls::increment_metric(id, by).map_err(typed)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        hostcalls::record_metric(id, value).map_err(typed)
    }
}

fn action(f: Flow) -> Action {
    match f {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

/// The root context of filter `F`: configures it, owns the worker the
/// streams share, and forwards timers, callouts and queue events.
pub struct Shell<F: Filter> {
    worker: Option<Rc<RefCell<F>>>,
}

impl<F: Filter> Default for Shell<F> {
    fn default() -> Self {
        Shell { worker: None }
    }
}

impl<F: Filter> Shell<F> {
    fn with(&self, f: impl FnOnce(&mut F)) {
        if let Some(w) = &self.worker {
            if let Ok(mut w) = w.try_borrow_mut() {
                f(&mut w);
            }
        }
    }
}

impl<F: Filter> Context for Shell<F> {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        self.with(|w| w.on_http_call_response(&ProxyWasm, token, body));
    }
}

impl<F: Filter> RootContext for Shell<F> {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure::<F, _>(&ProxyWasm) {
            Some(f) => {
                self.worker = Some(Rc::new(RefCell::new(f)));
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        self.with(|w| w.on_tick(&ProxyWasm));
    }

    fn on_queue_ready(&mut self, queue: u32) {
        self.with(|w| w.on_queue_ready(&ProxyWasm, queue));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::<F> {
            id: context_id,
            worker: self.worker.clone(),
            state: F::Stream::default(),
            _f: PhantomData,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A stream of filter `F`.
struct Stream<F: Filter> {
    id: u32,
    worker: Option<Rc<RefCell<F>>>,
    state: F::Stream,
    _f: PhantomData<F>,
}

impl<F: Filter> Stream<F> {
    /// Runs `f` on the worker, or [`Filter::unconfigured`] without one.
    fn flow(&mut self, f: impl FnOnce(&mut F, &mut F::Stream, u32) -> Flow) -> Action {
        let flow = match self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            Some(Ok(mut w)) => f(&mut w, &mut self.state, self.id),
            _ => F::unconfigured(&ProxyWasm),
        };
        action(flow)
    }
}

impl<F: Filter> Context for Stream<F> {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        if let Some(Ok(mut w)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            w.on_http_call_response(&ProxyWasm, token, body);
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        if let Some(Ok(mut w)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            w.on_grpc_call_response(&ProxyWasm, &mut self.state, token, status, size);
        }
    }
}

impl<F: Filter> HttpContext for Stream<F> {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.flow(|w, s, id| w.on_request_headers(&ProxyWasm, s, id))
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.flow(|w, s, _| w.on_response_headers(&ProxyWasm, s))
    }

    fn on_log(&mut self) {
        if let Some(Ok(mut w)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            w.on_log(&ProxyWasm, &mut self.state, self.id);
        }
    }
}

/// Logs a panic at critical level before the abort (a trap says nothing).
pub fn panic_hook(name: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        ProxyWasm.log(Level::Critical, &format!("{name}: panic: {info}"));
    }));
}

/// The proxy-wasm entry point of a filter: `export!(auth_core::Auth);`.
#[macro_export]
macro_rules! export {
    ($filter:ty) => {
        $crate::proxy_wasm::main! {{
            $crate::panic_hook(<$filter as $crate::filter_common::filter::Filter>::NAME);
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Trace);
            $crate::proxy_wasm::set_root_context(|_| {
                Box::new($crate::Shell::<$filter>::default())
            });
        }}
    };
}
