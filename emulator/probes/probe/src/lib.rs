//! Conformance probe for the host emulator.
//!
//! A proxy-wasm filter with no behaviour of its own: its plugin configuration
//! is a script of actions per callback, and it reports what the host answered
//! through log lines starting with `probe:`. The emulator's conformance tests
//! load it to check one ABI behaviour at a time. It deliberately uses the SDK
//! the way a real filter does (so a status the SDK does not tolerate traps,
//! as it would in Envoy), plus a few raw imports to observe exact statuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use serde::Deserialize;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|id| Box::new(Root { id, script: Rc::new(Script::default()) }));
}}

/// The plugin configuration: actions to run in each callback.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Script {
    /// `false` makes `on_configure` fail.
    configure_ok: Option<bool>,
    configure: Vec<Op>,
    tick: Vec<Op>,
    queue_ready: Vec<Op>,
    request_headers: Vec<Op>,
    request_body: Vec<Op>,
    request_trailers: Vec<Op>,
    response_headers: Vec<Op>,
    response_body: Vec<Op>,
    response_trailers: Vec<Op>,
    log: Vec<Op>,
    done: Vec<Op>,
    /// Run in the context that made an HTTP or gRPC call, when its answer comes.
    call_response: Vec<Op>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Op {
    Log(String),
    LogAt {
        level: u32,
        msg: String,
    },
    LogLevel,
    /// Return Pause from this callback.
    Pause,
    AddHeader(MapRef, String, String),
    SetHeader(MapRef, String, String),
    RemoveHeader(MapRef, String),
    GetHeader(MapRef, String),
    /// `proxy_get_header_map_value` without the SDK: logs the raw status.
    RawGetHeader(MapRef, String),
    /// `proxy_replace_header_map_value` without the SDK: logs the raw status.
    RawSetHeader(MapRef, String, String),
    /// `proxy_remove_header_map_value` without the SDK: logs the raw status.
    RawRemoveHeader(MapRef, String),
    GetHeaders(MapRef),
    SetHeaders(MapRef, Vec<(String, String)>),
    GetBody(BufRef),
    SetBody {
        buf: BufRef,
        start: usize,
        size: usize,
        data: String,
    },
    Property(Vec<String>),
    SetProperty(Vec<String>, String),
    SendLocalResponse {
        status: u32,
        body: String,
        headers: Vec<(String, String)>,
        grpc_status: Option<i32>,
        details: Option<String>,
    },
    HttpCall {
        cluster: String,
        headers: Vec<(String, String)>,
        body: Option<String>,
        timeout_ms: u64,
    },
    GrpcCall {
        cluster: String,
        service: String,
        method: String,
        message: String,
        timeout_ms: u64,
    },
    /// Continue the request (resume) or response.
    Resume(StreamRef),
    Close(StreamRef),
    SharedGet(String),
    SharedSet {
        key: String,
        value: String,
        cas: Option<u32>,
    },
    RegisterQueue(String),
    ResolveQueue {
        vm_id: String,
        name: String,
    },
    Enqueue {
        name: String,
        vm_id: String,
        value: String,
    },
    Dequeue(String),
    TickMs(u64),
    Counter(String, i64),
    Gauge(String, u64),
    Histogram(String, u64),
    GetMetric(String),
    Time,
    Random(usize),
    Env(String),
    Stdout(String),
    Stderr(String),
    Panic(String),
    Spin,
    Alloc(usize),
    Done,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum MapRef {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    CallHeaders,
    CallTrailers,
}

impl MapRef {
    fn map(self) -> MapType {
        match self {
            MapRef::RequestHeaders => MapType::HttpRequestHeaders,
            MapRef::RequestTrailers => MapType::HttpRequestTrailers,
            MapRef::ResponseHeaders => MapType::HttpResponseHeaders,
            MapRef::ResponseTrailers => MapType::HttpResponseTrailers,
            MapRef::CallHeaders => MapType::HttpCallResponseHeaders,
            MapRef::CallTrailers => MapType::HttpCallResponseTrailers,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum BufRef {
    RequestBody,
    ResponseBody,
    CallBody,
    GrpcMessage,
    VmConfig,
    PluginConfig,
}

impl BufRef {
    fn buf(self) -> BufferType {
        match self {
            BufRef::RequestBody => BufferType::HttpRequestBody,
            BufRef::ResponseBody => BufferType::HttpResponseBody,
            BufRef::CallBody => BufferType::HttpCallResponseBody,
            BufRef::GrpcMessage => BufferType::GrpcReceiveBuffer,
            BufRef::VmConfig => BufferType::VmConfiguration,
            BufRef::PluginConfig => BufferType::PluginConfiguration,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum StreamRef {
    Request,
    Response,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *mut *mut u8,
        value_len: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
}

fn log(msg: String) {
    hostcalls::log(LogLevel::Info, &format!("probe: {msg}")).unwrap();
}

fn show(bytes: &Option<Vec<u8>>) -> String {
    match bytes {
        None => "None".to_string(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
            _ => format!(
                "hex:{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
        },
    }
}

thread_local! {
    static METRICS: std::cell::RefCell<HashMap<String, u32>> = std::cell::RefCell::new(HashMap::new());
    static QUEUES: std::cell::RefCell<HashMap<String, u32>> = std::cell::RefCell::new(HashMap::new());
}

fn metric(name: &str, ty: MetricType) -> u32 {
    METRICS.with(|m| {
        *m.borrow_mut().entry(name.to_string()).or_insert_with(|| {
            let id = hostcalls::define_metric(ty, name).unwrap();
            log(format!("define {name}={id}"));
            id
        })
    })
}

/// Runs `ops`, returning the action the callback should return.
fn run(ops: &[Op]) -> Action {
    let mut action = Action::Continue;
    for op in ops {
        match op {
            Op::Log(m) => log(m.clone()),
            Op::LogAt { level, msg } => {
                let level = match level {
                    0 => LogLevel::Trace,
                    1 => LogLevel::Debug,
                    2 => LogLevel::Info,
                    3 => LogLevel::Warn,
                    4 => LogLevel::Error,
                    _ => LogLevel::Critical,
                };
                hostcalls::log(level, msg).unwrap();
            }
            Op::LogLevel => log(format!(
                "log_level={:?}",
                hostcalls::get_log_level().unwrap()
            )),
            Op::Pause => action = Action::Pause,
            Op::AddHeader(m, k, v) => hostcalls::add_map_value(m.map(), k, v).unwrap(),
            Op::SetHeader(m, k, v) => hostcalls::set_map_value(m.map(), k, Some(v)).unwrap(),
            Op::RemoveHeader(m, k) => hostcalls::remove_map_value(m.map(), k).unwrap(),
            Op::GetHeader(m, k) => log(format!(
                "header {k}={:?}",
                hostcalls::get_map_value(m.map(), k).unwrap()
            )),
            Op::RawGetHeader(m, k) => {
                let mut p: *mut u8 = std::ptr::null_mut();
                let mut n: usize = 0;
                let st = unsafe {
                    proxy_get_header_map_value(m.map() as u32, k.as_ptr(), k.len(), &mut p, &mut n)
                };
                let v = if st == 0 && !p.is_null() {
                    Some(unsafe { Vec::from_raw_parts(p, n, n) })
                } else {
                    None
                };
                log(format!("raw_get {k} status={st} value={}", show(&v)));
            }
            Op::RawSetHeader(m, k, v) => {
                let st = unsafe {
                    proxy_replace_header_map_value(
                        m.map() as u32,
                        k.as_ptr(),
                        k.len(),
                        v.as_ptr(),
                        v.len(),
                    )
                };
                log(format!("raw_set {k} status={st}"));
            }
            Op::RawRemoveHeader(m, k) => {
                let st =
                    unsafe { proxy_remove_header_map_value(m.map() as u32, k.as_ptr(), k.len()) };
                log(format!("raw_remove {k} status={st}"));
            }
            Op::GetHeaders(m) => log(format!(
                "headers={:?}",
                hostcalls::get_map(m.map()).unwrap()
            )),
            Op::SetHeaders(m, pairs) => hostcalls::set_map(
                m.map(),
                pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            )
            .unwrap(),
            Op::GetBody(b) => {
                let v = hostcalls::get_buffer(b.buf(), 0, usize::MAX).unwrap();
                log(format!("body={}", show(&v)));
            }
            Op::SetBody {
                buf,
                start,
                size,
                data,
            } => {
                let r = hostcalls::set_buffer(buf.buf(), *start, *size, data.as_bytes());
                log(format!("set_body={r:?}"));
            }
            Op::Property(path) => {
                let v = hostcalls::get_property(path.iter().map(String::as_str).collect());
                match v {
                    Ok(v) => log(format!("property {}={}", path.join("."), show(&v))),
                    Err(e) => log(format!("property {} error={e:?}", path.join("."))),
                }
            }
            Op::SetProperty(path, value) => {
                let r = hostcalls::set_property(
                    path.iter().map(String::as_str).collect(),
                    Some(value.as_bytes()),
                );
                log(format!("set_property={r:?}"));
            }
            Op::SendLocalResponse {
                status,
                body,
                headers,
                grpc_status,
                details,
            } => {
                let _ = details;
                let r = hostcalls::send_http_response(
                    *status,
                    headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    Some(body.as_bytes()),
                );
                if let Some(g) = grpc_status {
                    log(format!("grpc_status_requested={g}"));
                }
                log(format!("local_response={r:?}"));
            }
            Op::HttpCall {
                cluster,
                headers,
                body,
                timeout_ms,
            } => {
                let r = hostcalls::dispatch_http_call(
                    cluster,
                    headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    body.as_deref().map(str::as_bytes),
                    vec![],
                    Duration::from_millis(*timeout_ms),
                );
                log(format!("http_call={r:?}"));
            }
            Op::GrpcCall {
                cluster,
                service,
                method,
                message,
                timeout_ms,
            } => {
                let r = hostcalls::dispatch_grpc_call(
                    cluster,
                    service,
                    method,
                    vec![("x-probe", b"1".as_slice())],
                    Some(message.as_bytes()),
                    Duration::from_millis(*timeout_ms),
                );
                log(format!("grpc_call={r:?}"));
            }
            Op::Resume(StreamRef::Request) => hostcalls::resume_http_request().unwrap(),
            Op::Resume(StreamRef::Response) => hostcalls::resume_http_response().unwrap(),
            Op::Close(StreamRef::Request) => hostcalls::reset_http_request().unwrap(),
            Op::Close(StreamRef::Response) => hostcalls::reset_http_response().unwrap(),
            Op::SharedGet(k) => {
                let (v, cas) = hostcalls::get_shared_data(k).unwrap();
                log(format!("shared {k}={} cas={cas:?}", show(&v)));
            }
            Op::SharedSet { key, value, cas } => {
                let r = hostcalls::set_shared_data(key, Some(value.as_bytes()), *cas);
                log(format!("shared_set {key}={r:?}"));
            }
            Op::RegisterQueue(name) => {
                let id = hostcalls::register_shared_queue(name).unwrap();
                QUEUES.with(|q| q.borrow_mut().insert(name.clone(), id));
                log(format!("queue {name}={id}"));
            }
            Op::ResolveQueue { vm_id, name } => {
                let id = hostcalls::resolve_shared_queue(vm_id, name).unwrap();
                if let Some(id) = id {
                    QUEUES.with(|q| q.borrow_mut().insert(name.clone(), id));
                }
                log(format!("resolve {name}={id:?}"));
            }
            Op::Enqueue { name, vm_id, value } => {
                let id = QUEUES.with(|q| q.borrow().get(name).copied());
                let id = match id {
                    Some(id) => id,
                    None => hostcalls::resolve_shared_queue(vm_id, name)
                        .unwrap()
                        .unwrap_or(0),
                };
                let r = hostcalls::enqueue_shared_queue(id, Some(value.as_bytes()));
                log(format!("enqueue {name}={r:?}"));
            }
            Op::Dequeue(name) => {
                let id = QUEUES.with(|q| q.borrow().get(name).copied()).unwrap_or(0);
                let r = hostcalls::dequeue_shared_queue(id);
                match r {
                    Ok(v) => log(format!("dequeue {name}={}", show(&v))),
                    Err(e) => log(format!("dequeue {name} error={e:?}")),
                }
            }
            Op::TickMs(ms) => hostcalls::set_tick_period(Duration::from_millis(*ms)).unwrap(),
            Op::Counter(name, by) => {
                let r = hostcalls::increment_metric(metric(name, MetricType::Counter), *by);
                log(format!("counter {name}={r:?}"));
            }
            Op::Gauge(name, v) => {
                hostcalls::record_metric(metric(name, MetricType::Gauge), *v).unwrap()
            }
            Op::Histogram(name, v) => {
                hostcalls::record_metric(metric(name, MetricType::Histogram), *v).unwrap()
            }
            Op::GetMetric(name) => {
                let id = METRICS.with(|m| m.borrow().get(name).copied()).unwrap_or(0);
                log(format!("metric {name}={:?}", hostcalls::get_metric(id)));
            }
            Op::Time => {
                let t = hostcalls::get_current_time().unwrap();
                let ns = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
                let sys = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                log(format!("time={ns} wasi_time={sys}"));
            }
            Op::Random(n) => {
                let mut m = HashMap::new();
                for i in 0..*n {
                    m.insert(i, i);
                }
                log(format!("random_ok={}", m.len()));
            }
            Op::Env(k) => log(format!("env {k}={:?}", std::env::var(k).ok())),
            Op::Stdout(s) => println!("{s}"),
            Op::Stderr(s) => eprintln!("{s}"),
            Op::Panic(s) => panic!("{s}"),
            Op::Spin => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Op::Alloc(n) => {
                let v = vec![1u8; *n];
                log(format!("alloc={}", std::hint::black_box(v).len()));
            }
            Op::Done => hostcalls::done().unwrap(),
        }
    }
    action
}

struct Root {
    id: u32,
    script: Rc<Script>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, nh: usize, body: usize, nt: usize) {
        log(format!(
            "root {} call_response token={token} headers={nh} body={body} trailers={nt}",
            self.id
        ));
        run(&self.script.call_response);
    }
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        log(format!(
            "root {} grpc_response token={token} status={status} size={size}",
            self.id
        ));
        run(&self.script.call_response);
    }
    fn on_done(&mut self) -> bool {
        log(format!("root {} on_done", self.id));
        true
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, size: usize) -> bool {
        let cfg = self.get_vm_configuration();
        log(format!(
            "vm_start root={} size={size} config={}",
            self.id,
            show(&cfg)
        ));
        cfg.as_deref() != Some(b"fail")
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        log(format!("configure root={} size={size}", self.id));
        let script: Script = if raw.is_empty() {
            Script::default()
        } else {
            match serde_json::from_slice(&raw) {
                Ok(s) => s,
                Err(e) => {
                    hostcalls::log(LogLevel::Error, &format!("probe: bad config: {e}")).unwrap();
                    return false;
                }
            }
        };
        run(&script.configure);
        let ok = script.configure_ok.unwrap_or(true);
        self.script = Rc::new(script);
        ok
    }

    fn on_tick(&mut self) {
        log(format!("tick root={}", self.id));
        run(&self.script.tick);
    }

    fn on_queue_ready(&mut self, queue: u32) {
        log(format!("queue_ready root={} queue={queue}", self.id));
        run(&self.script.queue_ready);
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id,
            script: self.script.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    script: Rc<Script>,
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, nh: usize, body: usize, nt: usize) {
        log(format!(
            "ctx {} call_response token={token} headers={nh} body={body} trailers={nt}",
            self.id
        ));
        run(&self.script.call_response);
    }
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let (code, msg) = hostcalls::get_grpc_status().unwrap();
        log(format!(
            "ctx {} grpc_response token={token} status={status} size={size} get_status=({code},{msg:?})",
            self.id
        ));
        run(&self.script.call_response);
    }
    fn on_done(&mut self) -> bool {
        run(&self.script.done);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, n: usize, eos: bool) -> Action {
        log(format!("ctx {} request_headers n={n} eos={eos}", self.id));
        run(&self.script.request_headers)
    }
    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        log(format!(
            "ctx {} request_body size={size} eos={eos}",
            self.id
        ));
        run(&self.script.request_body)
    }
    fn on_http_request_trailers(&mut self, n: usize) -> Action {
        log(format!("ctx {} request_trailers n={n}", self.id));
        run(&self.script.request_trailers)
    }
    fn on_http_response_headers(&mut self, n: usize, eos: bool) -> Action {
        log(format!("ctx {} response_headers n={n} eos={eos}", self.id));
        run(&self.script.response_headers)
    }
    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        log(format!(
            "ctx {} response_body size={size} eos={eos}",
            self.id
        ));
        run(&self.script.response_body)
    }
    fn on_http_response_trailers(&mut self, n: usize) -> Action {
        log(format!("ctx {} response_trailers n={n}", self.id));
        run(&self.script.response_trailers)
    }
    fn on_log(&mut self) {
        log(format!("ctx {} log", self.id));
        run(&self.script.log);
    }
}
