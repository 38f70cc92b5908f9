//! One VM: a wasmtime store and instance of a plugin's module, its context
//! table, and the guest callbacks, each bounded in time and memory. A trap
//! fails the VM for good, as in Envoy.

use crate::callout::{Outcome, PendingCall};
use crate::host::{Core, EventKind, LogLevel, LogRecord};
use crate::plugin::{engine, PluginMeta};
use crate::stream::{Op, StreamShared};
use crate::{hostcalls, wasi, CallResponse};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wasmtime::{
    InstancePre, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc,
};

/// Granularity of the callback time bound.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A stream context's link to its stream: the shared data and the filter's position.
#[derive(Clone)]
pub(crate) struct StreamLink {
    pub(crate) stream: Arc<StreamShared>,
    pub(crate) filter: usize,
}

/// What `on_http_call_response` / `on_grpc_*` can read while it runs.
#[derive(Default)]
pub(crate) struct CallData {
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) trailers: Vec<(String, Vec<u8>)>,
    pub(crate) grpc_message: Option<Vec<u8>>,
}

/// Per-VM state that hostcalls see through `Caller::data`.
pub(crate) struct VmState {
    pub(crate) core: Arc<Core>,
    pub(crate) meta: Arc<PluginMeta>,
    pub(crate) plugin: usize,
    /// `None` for the canary.
    pub(crate) worker: Option<usize>,
    pub(crate) limits: StoreLimits,
    pub(crate) memory: Option<Memory>,
    pub(crate) alloc: Option<Arc<TypedFunc<i32, i32>>>,
    pub(crate) root_id: u32,
    pub(crate) next_context: u32,
    /// The context hostcalls act on (`proxy_set_effective_context` changes it).
    pub(crate) effective: u32,
    pub(crate) in_configure: bool,
    /// Live streams by context id (a handful at a time: a list beats hashing).
    pub(crate) streams: Vec<(u32, StreamLink)>,
    pub(crate) call: Option<CallData>,
    pub(crate) status: (u32, Vec<u8>),
    pub(crate) metric_by_id: HashMap<u32, (String, u32)>,
    /// Last metric id per type (counter, gauge, histogram), as Envoy numbers them.
    pub(crate) next_metric: [u32; 3],
    /// Last HTTP call and gRPC call token.
    pub(crate) next_http_token: u32,
    pub(crate) next_grpc_token: u32,
    /// Stream operations queued by the running callback, applied after it returns.
    pub(crate) ops: Vec<(u64, Op)>,
    pub(crate) tick_generation: u64,
    pub(crate) tick_period_ns: u64,
}

impl VmState {
    /// Worker index used to key events and calls (the canary gets one no worker has).
    pub(crate) fn worker_key(&self) -> usize {
        self.worker.unwrap_or(usize::MAX)
    }

    pub(crate) fn log(&self, level: LogLevel, message: String) {
        self.core.log(LogRecord {
            level,
            plugin: self.meta.name.clone(),
            root_id: self.meta.root_id.clone(),
            vm_id: self.meta.vm_id.clone(),
            worker: self.worker,
            message,
        });
    }
}

macro_rules! exports {
    ($($field:ident : $name:literal => ($($p:ty),*) -> $r:ty;)*) => {
        #[derive(Default)]
        struct Exports { $($field: Option<TypedFunc<($($p,)*), $r>>,)* }
        fn exports(store: &mut Store<VmState>, inst: &wasmtime::Instance) -> Result<Exports, String> {
            let mut e = Exports::default();
            $(
                if let Some(f) = inst.get_func(&mut *store, $name) {
                    e.$field = Some(f.typed::<($($p,)*), $r>(&*store).map_err(|err| format!("export {}: {err}", $name))?);
                }
            )*
            Ok(e)
        }
    };
}

exports! {
    initialize: "_initialize" => () -> ();
    start: "_start" => () -> ();
    context_create: "proxy_on_context_create" => (i32, i32) -> ();
    vm_start: "proxy_on_vm_start" => (i32, i32) -> i32;
    configure: "proxy_on_configure" => (i32, i32) -> i32;
    done: "proxy_on_done" => (i32) -> i32;
    log: "proxy_on_log" => (i32) -> ();
    delete: "proxy_on_delete" => (i32) -> ();
    tick: "proxy_on_tick" => (i32) -> ();
    queue_ready: "proxy_on_queue_ready" => (i32, i32) -> ();
    request_headers: "proxy_on_request_headers" => (i32, i32, i32) -> i32;
    request_body: "proxy_on_request_body" => (i32, i32, i32) -> i32;
    request_trailers: "proxy_on_request_trailers" => (i32, i32) -> i32;
    response_headers: "proxy_on_response_headers" => (i32, i32, i32) -> i32;
    response_body: "proxy_on_response_body" => (i32, i32, i32) -> i32;
    response_trailers: "proxy_on_response_trailers" => (i32, i32) -> i32;
    http_call_response: "proxy_on_http_call_response" => (i32, i32, i32, i32, i32) -> ();
    grpc_initial_metadata: "proxy_on_grpc_receive_initial_metadata" => (i32, i32, i32) -> ();
    grpc_receive: "proxy_on_grpc_receive" => (i32, i32, i32) -> ();
    grpc_trailing_metadata: "proxy_on_grpc_receive_trailing_metadata" => (i32, i32, i32) -> ();
    grpc_close: "proxy_on_grpc_close" => (i32, i32, i32) -> ();
}

pub(crate) enum StartError {
    VmStart,
    Configure,
    Trap(String),
}

/// The callbacks of an HTTP stream that return an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpCallback {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

fn linker() -> &'static Linker<VmState> {
    static LINKER: OnceLock<Linker<VmState>> = OnceLock::new();
    LINKER.get_or_init(|| {
        let mut l = Linker::new(engine());
        if let Err(e) = hostcalls::add_to_linker(&mut l).and_then(|_| wasi::add_to_linker(&mut l)) {
            panic!("cannot define host functions: {e}");
        }
        l
    })
}

pub(crate) fn instance_pre(module: &Module) -> wasmtime::Result<InstancePre<VmState>> {
    let mut l = linker().clone();
    l.define_unknown_imports_as_traps(module)?;
    l.instantiate_pre(module)
}

pub(crate) struct Vm {
    store: Store<VmState>,
    /// Behind an `Arc`: a call borrows the function from a clone of the
    /// pointer (cloning a `TypedFunc` clones its registered type).
    exports: Arc<Exports>,
    failed: Option<String>,
    epoch_ticks: u64,
}

impl Vm {
    pub(crate) fn new(
        pre: &InstancePre<VmState>,
        core: Arc<Core>,
        meta: Arc<PluginMeta>,
        plugin: usize,
        worker: Option<usize>,
    ) -> Result<Vm, String> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(core.settings.memory_limit)
            .instances(1)
            .build();
        let epoch_ticks =
            (core.settings.callback_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1;
        let state = VmState {
            core,
            meta,
            plugin,
            worker,
            limits,
            memory: None,
            alloc: None,
            root_id: 1,
            next_context: 2,
            effective: 0,
            in_configure: false,
            streams: Vec::new(),
            call: None,
            status: (0, Vec::new()),
            metric_by_id: HashMap::new(),
            next_metric: [0, 1, 2],
            next_http_token: 0,
            next_grpc_token: 1,
            ops: Vec::new(),
            tick_generation: 0,
            tick_period_ns: 0,
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(epoch_ticks);
        let inst = pre.instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
        let memory = inst
            .get_memory(&mut store, "memory")
            .ok_or_else(|| "the module exports no memory".to_string())?;
        let alloc = match inst.get_func(&mut store, "malloc") {
            Some(f) => Some(f),
            None => inst.get_func(&mut store, "proxy_on_memory_allocate"),
        }
        .ok_or_else(|| {
            "the module exports neither malloc nor proxy_on_memory_allocate".to_string()
        })?
        .typed::<i32, i32>(&store)
        .map_err(|e| format!("allocator export: {e}"))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(Arc::new(alloc));
        let exports = exports(&mut store, &inst)?;
        Ok(Vm {
            store,
            exports: Arc::new(exports),
            failed: None,
            epoch_ticks,
        })
    }

    pub(crate) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub(crate) fn memory_size(&self) -> usize {
        self.store
            .data()
            .memory
            .map(|m| m.data_size(&self.store))
            .unwrap_or(0)
    }

    pub(crate) fn root_id(&self) -> u32 {
        self.store.data().root_id
    }

    pub(crate) fn take_ops(&mut self) -> Vec<(u64, Op)> {
        std::mem::take(&mut self.store.data_mut().ops)
    }

    pub(crate) fn policy(&self) -> crate::FailurePolicy {
        self.store.data().meta.failure_policy
    }

    /// Calls a guest function with the time bound; a trap fails the VM.
    fn call<P, R>(
        &mut self,
        f: Option<&TypedFunc<P, R>>,
        ctx: u32,
        name: &str,
        params: P,
    ) -> Result<Option<R>, ()>
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        if self.failed.is_some() {
            return Err(());
        }
        let Some(f) = f else { return Ok(None) };
        self.store.data_mut().effective = ctx;
        self.store.set_epoch_deadline(self.epoch_ticks);
        match f.call(&mut self.store, params) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let reason = match e.downcast_ref::<Trap>() {
                    Some(Trap::Interrupt) => format!(
                        "{name} ran longer than {:?} and was interrupted",
                        self.store.data().core.settings.callback_timeout
                    ),
                    Some(t) => format!("{name} trapped: {t}"),
                    None => format!("{name} failed: {e:#}"),
                };
                self.store
                    .data()
                    .log(LogLevel::Critical, format!("wasm VM failed: {reason}"));
                self.failed = Some(reason);
                // Nothing a failed VM queued takes effect.
                self.store.data_mut().ops.clear();
                Err(())
            }
        }
    }

    /// `_initialize`, root context creation, `on_vm_start`, `on_configure`.
    pub(crate) fn start(&mut self) -> Result<(), StartError> {
        let trap = |vm: &Vm| StartError::Trap(vm.failed.clone().unwrap_or_default());
        if self.exports.initialize.is_some() {
            self.call(
                Arc::clone(&self.exports).initialize.as_ref(),
                0,
                "_initialize",
                (),
            )
            .map_err(|_| trap(self))?;
        } else {
            self.call(Arc::clone(&self.exports).start.as_ref(), 0, "_start", ())
                .map_err(|_| trap(self))?;
        }
        let root = self.root_id() as i32;
        self.call(
            Arc::clone(&self.exports).context_create.as_ref(),
            root as u32,
            "proxy_on_context_create",
            (root, 0),
        )
        .map_err(|_| trap(self))?;
        let vm_len = self.store.data().meta.vm_configuration.len() as i32;
        let ok = self
            .call(
                Arc::clone(&self.exports).vm_start.as_ref(),
                root as u32,
                "proxy_on_vm_start",
                (root, vm_len),
            )
            .map_err(|_| trap(self))?;
        if ok == Some(0) {
            return Err(StartError::VmStart);
        }
        let len = self.store.data().meta.configuration.len() as i32;
        self.store.data_mut().in_configure = true;
        let ok = self.call(
            Arc::clone(&self.exports).configure.as_ref(),
            root as u32,
            "proxy_on_configure",
            (root, len),
        );
        self.store.data_mut().in_configure = false;
        let ok = ok.map_err(|_| trap(self))?;
        if ok == Some(0) {
            return Err(StartError::Configure);
        }
        Ok(())
    }

    /// Drops everything a (canary) VM left scheduled: its ticks and callouts.
    pub(crate) fn discard(&mut self) {
        let key = (self.store.data().plugin, self.store.data().worker_key());
        let mut s = self.store.data().core.lock();
        s.events.retain(|e| match &e.kind {
            EventKind::Tick { plugin, worker, .. }
            | EventKind::CallDone { plugin, worker, .. }
            | EventKind::CallTimeout { plugin, worker, .. } => (*plugin, *worker) != key,
            _ => true,
        });
        s.pending_calls.retain(|(p, w, _), _| (*p, *w) != key);
    }

    /// Creates a stream context (`proxy_on_context_create(id, root)`).
    pub(crate) fn create_context(&mut self, link: StreamLink) -> Result<u32, ()> {
        let st = self.store.data_mut();
        let id = st.next_context;
        st.next_context += 1;
        st.streams.retain(|(i, _)| *i != id);
        st.streams.push((id, link));
        let root = st.root_id as i32;
        self.call(
            Arc::clone(&self.exports).context_create.as_ref(),
            id,
            "proxy_on_context_create",
            (id as i32, root),
        )?;
        Ok(id)
    }

    /// Runs one of the action-returning HTTP callbacks. `true` = Continue.
    pub(crate) fn http(
        &mut self,
        cb: HttpCallback,
        ctx: u32,
        a: i32,
        b: Option<bool>,
    ) -> Result<bool, ()> {
        let id = ctx as i32;
        let r = match (cb, b) {
            (HttpCallback::RequestHeaders, Some(eos)) => self.call(
                Arc::clone(&self.exports).request_headers.as_ref(),
                ctx,
                "proxy_on_request_headers",
                (id, a, eos as i32),
            )?,
            (HttpCallback::RequestBody, Some(eos)) => self.call(
                Arc::clone(&self.exports).request_body.as_ref(),
                ctx,
                "proxy_on_request_body",
                (id, a, eos as i32),
            )?,
            (HttpCallback::RequestTrailers, _) => self.call(
                Arc::clone(&self.exports).request_trailers.as_ref(),
                ctx,
                "proxy_on_request_trailers",
                (id, a),
            )?,
            (HttpCallback::ResponseHeaders, Some(eos)) => self.call(
                Arc::clone(&self.exports).response_headers.as_ref(),
                ctx,
                "proxy_on_response_headers",
                (id, a, eos as i32),
            )?,
            (HttpCallback::ResponseBody, Some(eos)) => self.call(
                Arc::clone(&self.exports).response_body.as_ref(),
                ctx,
                "proxy_on_response_body",
                (id, a, eos as i32),
            )?,
            (HttpCallback::ResponseTrailers, _) => self.call(
                Arc::clone(&self.exports).response_trailers.as_ref(),
                ctx,
                "proxy_on_response_trailers",
                (id, a),
            )?,
            _ => None,
        };
        Ok(r.unwrap_or(0) == 0)
    }

    pub(crate) fn on_log(&mut self, ctx: u32) -> Result<(), ()> {
        self.call(
            Arc::clone(&self.exports).log.as_ref(),
            ctx,
            "proxy_on_log",
            (ctx as i32,),
        )
        .map(|_| ())
    }

    /// `on_done` then `on_delete`; the context is forgotten either way.
    pub(crate) fn finish(&mut self, ctx: u32) {
        let _ = self
            .call(
                Arc::clone(&self.exports).done.as_ref(),
                ctx,
                "proxy_on_done",
                (ctx as i32,),
            )
            .and_then(|_| {
                self.call(
                    Arc::clone(&self.exports).delete.as_ref(),
                    ctx,
                    "proxy_on_delete",
                    (ctx as i32,),
                )
            });
        self.store.data_mut().streams.retain(|(i, _)| *i != ctx);
        self.store.data_mut().effective = 0;
    }

    pub(crate) fn fire_tick(&mut self, root: u32, generation: u64) {
        let st = self.store.data();
        if st.tick_generation != generation || st.tick_period_ns == 0 || self.failed.is_some() {
            return;
        }
        let _ = self.call(
            Arc::clone(&self.exports).tick.as_ref(),
            root,
            "proxy_on_tick",
            (root as i32,),
        );
        // Re-armed after each tick, unless the callback changed the period.
        let st = self.store.data();
        if st.tick_generation == generation && st.tick_period_ns > 0 && self.failed.is_none() {
            let (plugin, worker, period) = (st.plugin, st.worker_key(), st.tick_period_ns);
            st.core.lock().schedule(
                period,
                EventKind::Tick {
                    plugin,
                    worker,
                    root,
                    generation,
                },
            );
        }
    }

    pub(crate) fn queue_ready(&mut self, root: u32, queue: u32) {
        let _ = self.call(
            Arc::clone(&self.exports).queue_ready.as_ref(),
            root,
            "proxy_on_queue_ready",
            (root as i32, queue as i32),
        );
    }

    /// Delivers a callout's answer to the root context (the SDK then sets the
    /// effective context to the stream that made the call).
    pub(crate) fn call_done(&mut self, pending: PendingCall, token: u32, outcome: Outcome) {
        let root = self.root_id();
        let r = root as i32;
        let t = token as i32;
        match outcome {
            Outcome::Response(CallResponse {
                headers,
                body,
                trailers,
            }) => {
                let (nh, nb, nt) = (
                    headers.len() as i32,
                    body.len() as i32,
                    trailers.len() as i32,
                );
                self.store.data_mut().call = Some(CallData {
                    headers,
                    body: Some(body),
                    trailers,
                    grpc_message: None,
                });
                let _ = self.call(
                    Arc::clone(&self.exports).http_call_response.as_ref(),
                    root,
                    "proxy_on_http_call_response",
                    (r, t, nh, nb, nt),
                );
            }
            Outcome::Reset if !pending.grpc => {
                self.store.data_mut().status = (11, b"reset".to_vec());
                self.store.data_mut().call = Some(CallData::default());
                let _ = self.call(
                    Arc::clone(&self.exports).http_call_response.as_ref(),
                    root,
                    "proxy_on_http_call_response",
                    (r, t, 0, 0, 0),
                );
            }
            Outcome::Grpc(msg) => {
                let n = msg.message.len() as i32;
                self.store.data_mut().status = (0, Vec::new());
                self.store.data_mut().call = Some(CallData {
                    grpc_message: Some(msg.message),
                    ..CallData::default()
                });
                let _ = self.call(
                    Arc::clone(&self.exports).grpc_receive.as_ref(),
                    root,
                    "proxy_on_grpc_receive",
                    (r, t, n),
                );
            }
            Outcome::Reset => {
                self.store.data_mut().status = (14, b"upstream reset".to_vec());
                self.store.data_mut().call = Some(CallData::default());
                let _ = self.call(
                    Arc::clone(&self.exports).grpc_close.as_ref(),
                    root,
                    "proxy_on_grpc_close",
                    (r, t, 14),
                );
            }
            Outcome::GrpcStatus(code, message) => {
                self.store.data_mut().status = (code, message.into_bytes());
                self.store.data_mut().call = Some(CallData::default());
                let _ = self.call(
                    Arc::clone(&self.exports).grpc_close.as_ref(),
                    root,
                    "proxy_on_grpc_close",
                    (r, t, code as i32),
                );
            }
        }
        self.store.data_mut().call = None;
        self.store.data_mut().effective = 0;
    }
}
