//! The emulated Envoy process: clock, event loop, shared data, queues,
//! metrics, logs, clusters, and the plugins and streams that live in it.

use crate::callout::{Cluster, Outcome, PendingCall, Reply};
use crate::plugin::{self, LoadError, Plugin, PluginConfig, PluginInner};
use crate::profile::Profile;
use crate::stream::{self, Chain, Stream, StreamOptions};
use crate::vm::Vm;
use crate::CallRequest;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Log levels of the ABI (`proxy_log`), `Trace` = 0 … `Critical` = 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub(crate) fn from_i32(v: i32) -> Option<LogLevel> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// One captured log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub level: LogLevel,
    /// The plugin's name (Envoy's `name` of the plugin config).
    pub plugin: String,
    pub root_id: String,
    pub vm_id: String,
    /// Worker index, or `None` for the canary VM.
    pub worker: Option<usize>,
    pub message: String,
}

impl fmt::Display for LogRecord {
    /// Envoy's format: `wasm log <plugin> <root_id> <vm_id>: <message>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:?}] wasm log {} {} {}: {}",
            self.level, self.plugin, self.root_id, self.vm_id, self.message
        )
    }
}

/// Kind of a metric a filter defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    Counter(u64),
    Gauge(u64),
    /// Every recorded sample, in order.
    Histogram(Vec<u64>),
}

pub(crate) struct Metric {
    pub(crate) kind: MetricKind,
    pub(crate) value: u64,
    pub(crate) samples: Vec<u64>,
}

pub(crate) struct SharedEntry {
    pub(crate) value: Vec<u8>,
    pub(crate) cas: u32,
}

pub(crate) struct Queue {
    pub(crate) items: VecDeque<Vec<u8>>,
    /// Who is notified: (plugin index, worker, root context id).
    pub(crate) owner: Option<(usize, usize, u32)>,
}

/// Something the event loop delivers later, in time order.
pub(crate) enum EventKind {
    Tick {
        plugin: usize,
        worker: usize,
        root: u32,
        generation: u64,
    },
    QueueReady {
        plugin: usize,
        worker: usize,
        root: u32,
        queue: u32,
    },
    CallDone {
        plugin: usize,
        worker: usize,
        token: u32,
        outcome: Outcome,
    },
    CallTimeout {
        plugin: usize,
        worker: usize,
        token: u32,
    },
    /// A stream operation a root-context callback asked for (resume, local reply).
    StreamOp { stream: u64, op: stream::Op },
}

pub(crate) struct Event {
    pub(crate) due: u64,
    pub(crate) seq: u64,
    pub(crate) kind: EventKind,
}

/// Process-wide state, behind one mutex, locked briefly by hostcalls.
pub(crate) struct Shared {
    pub(crate) now_ns: u64,
    pub(crate) real_clock: bool,
    pub(crate) shared_data: HashMap<(String, String), SharedEntry>,
    pub(crate) next_cas: u32,
    pub(crate) queues: HashMap<u32, Queue>,
    pub(crate) queue_names: HashMap<(String, String), u32>,
    pub(crate) next_queue: u32,
    pub(crate) metrics: BTreeMap<String, Metric>,
    pub(crate) logs: Vec<LogRecord>,
    pub(crate) clusters: HashMap<String, Cluster>,
    pub(crate) events: Vec<Event>,
    pub(crate) seq: u64,
    pub(crate) pending_calls: HashMap<(usize, usize, u32), PendingCall>,
    pub(crate) rng: u64,
}

impl Shared {
    pub(crate) fn now(&self) -> u64 {
        if self.real_clock {
            real_now_ns()
        } else {
            self.now_ns
        }
    }

    pub(crate) fn schedule(&mut self, delay_ns: u64, kind: EventKind) {
        let due = self.now().saturating_add(delay_ns);
        self.seq += 1;
        self.events.push(Event {
            due,
            seq: self.seq,
            kind,
        });
    }

    pub(crate) fn next_cas(&mut self) -> u32 {
        // A global counter starting at 1; 0 means "no CAS" and is skipped.
        let c = self.next_cas;
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        c
    }

    pub(crate) fn random_u64(&mut self) -> u64 {
        // splitmix64: deterministic for a given seed, good enough for guests.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pop_due(&mut self, now: u64) -> Option<Event> {
        let (idx, _) = self
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.due <= now)
            .min_by_key(|(_, e)| (e.due, e.seq))?;
        Some(self.events.swap_remove(idx))
    }
}

pub(crate) fn real_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Settings of the emulated Envoy process.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) workers: usize,
    pub(crate) log_level: LogLevel,
    pub(crate) callback_timeout: Duration,
    pub(crate) memory_limit: usize,
    pub(crate) canary: bool,
    pub(crate) echo_logs: bool,
    pub(crate) profile: Profile,
}

/// What hostcalls reach: settings and the shared state. No plugins here, so
/// that VMs can hold it without a reference cycle.
pub(crate) struct Core {
    pub(crate) settings: Settings,
    pub(crate) shared: Mutex<Shared>,
    /// Answers of callouts to real servers, sent by their threads.
    pub(crate) completions: Mutex<mpsc::Receiver<(usize, usize, u32, Outcome)>>,
    pub(crate) completion_tx: Mutex<mpsc::Sender<(usize, usize, u32, Outcome)>>,
    pub(crate) in_flight: AtomicU64,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn log(&self, rec: LogRecord) {
        if rec.level < self.settings.log_level {
            return;
        }
        if self.settings.echo_logs {
            eprintln!("{rec}");
        }
        self.lock().logs.push(rec);
    }
}

pub(crate) struct HostInner {
    pub(crate) core: Arc<Core>,
    pub(crate) plugins: Mutex<Vec<Arc<PluginInner>>>,
    pub(crate) streams: Mutex<HashMap<u64, Weak<stream::StreamCell>>>,
    pub(crate) next_stream: AtomicU64,
    pub(crate) next_worker: AtomicU64,
}

/// Builder for a [`Host`]. Defaults mirror Envoy's: 2 workers, `info` log
/// level, [`Profile::Envoy`].
pub struct HostBuilder {
    settings: Settings,
    start: SystemTime,
    real_clock: bool,
    seed: u64,
}

impl HostBuilder {
    /// Number of worker threads (Envoy's `--concurrency`): each plugin gets one VM per worker.
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = n.max(1);
        self
    }

    /// Level of Envoy's `wasm` logger: lines below it are dropped, and
    /// `proxy_get_log_level` returns it. Default `Info`.
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.settings.log_level = level;
        self
    }

    /// Wall-clock time at which the manual clock starts. Default 2026-01-01T00:00:00Z.
    pub fn start_time(mut self, t: SystemTime) -> Self {
        self.start = t;
        self
    }

    /// Use the machine's real clock instead of the manual one (the dev proxy
    /// does; tests should not). [`Host::advance`] is then an error.
    pub fn real_clock(mut self, yes: bool) -> Self {
        self.real_clock = yes;
        self
    }

    /// Longest a single guest callback may run before it is interrupted
    /// (a trap that fails the VM). Default 2 s.
    pub fn callback_timeout(mut self, d: Duration) -> Self {
        self.settings.callback_timeout = d;
        self
    }

    /// Cap on each VM's linear memory. Default 256 MiB.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.settings.memory_limit = bytes;
        self
    }

    /// Whether to run the canary VM (Envoy validates each plugin config on a
    /// throw-away VM before creating the workers' VMs). Default true.
    pub fn canary(mut self, yes: bool) -> Self {
        self.settings.canary = yes;
        self
    }

    /// Which host to behave like: Envoy's (the default) or the stricter
    /// hosts' rules of [`Profile::Strict`], to test that a filter is portable.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.settings.profile = profile;
        self
    }

    /// Seed of the randomness guests get (`random_get`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn build(self) -> Host {
        let (tx, rx) = mpsc::channel();
        let start = self
            .start
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let shared = Shared {
            now_ns: start,
            real_clock: self.real_clock,
            shared_data: HashMap::new(),
            next_cas: 1,
            queues: HashMap::new(),
            queue_names: HashMap::new(),
            next_queue: 1,
            metrics: BTreeMap::new(),
            logs: Vec::new(),
            clusters: HashMap::new(),
            events: Vec::new(),
            seq: 0,
            pending_calls: HashMap::new(),
            rng: self.seed,
        };
        Host {
            inner: Arc::new(HostInner {
                core: Arc::new(Core {
                    settings: self.settings,
                    shared: Mutex::new(shared),
                    completions: Mutex::new(rx),
                    completion_tx: Mutex::new(tx),
                    in_flight: AtomicU64::new(0),
                }),
                plugins: Mutex::new(Vec::new()),
                streams: Mutex::new(HashMap::new()),
                next_stream: AtomicU64::new(1),
                next_worker: AtomicU64::new(0),
            }),
        }
    }
}

/// The emulated Envoy process. Cheap to clone; every clone is the same host.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<HostInner>,
}

impl Default for Host {
    fn default() -> Self {
        Host::builder().build()
    }
}

/// 2026-01-01T00:00:00Z.
const DEFAULT_START: u64 = 1_767_225_600;

impl Host {
    pub fn builder() -> HostBuilder {
        HostBuilder {
            settings: Settings {
                workers: 2,
                log_level: LogLevel::Info,
                callback_timeout: Duration::from_secs(2),
                memory_limit: 256 << 20,
                canary: true,
                echo_logs: std::env::var_os("WASM_HOST_ECHO_LOGS").is_some(),
                profile: Profile::Envoy,
            },
            start: UNIX_EPOCH + Duration::from_secs(DEFAULT_START),
            real_clock: false,
            seed: 0x254C_A4B0,
        }
    }

    pub fn workers(&self) -> usize {
        self.inner.core.settings.workers
    }

    /// The host profile this host was built with.
    pub fn profile(&self) -> Profile {
        self.inner.core.settings.profile
    }

    /// Loads a plugin: compiles the module (once per process and path), runs
    /// the canary VM, then one VM per worker, each through `_initialize`,
    /// `proxy_on_context_create`, `proxy_on_vm_start` and `proxy_on_configure`.
    /// A `false` from either callback, or a trap, is a [`LoadError`] carrying
    /// the filter's log lines.
    pub fn load(&self, config: PluginConfig) -> Result<Plugin, LoadError> {
        let p = plugin::load(self, config)?;
        self.run_until_idle();
        Ok(p)
    }

    /// A filter chain: plugins in Envoy's configured order.
    pub fn chain(&self, plugins: &[&Plugin]) -> Chain {
        Chain::new(plugins.iter().map(|p| (*p).clone()).collect())
    }

    /// Opens an HTTP stream on the next worker (round robin).
    pub fn stream(&self, chain: &Chain) -> Stream {
        self.stream_with(chain, StreamOptions::default())
    }

    /// Opens an HTTP stream with explicit options (worker, peer address, mTLS).
    pub fn stream_with(&self, chain: &Chain, options: StreamOptions) -> Stream {
        stream::open(self, chain, options)
    }

    /// Answers `dispatch_http_call`s to `name` with a handler (called at
    /// dispatch time; its [`Reply`] is delivered later by the event loop).
    pub fn add_cluster<F>(&self, name: &str, handler: F)
    where
        F: Fn(&CallRequest) -> Reply + Send + Sync + 'static,
    {
        self.inner
            .core
            .lock()
            .clusters
            .insert(name.to_string(), Cluster::Handler(Arc::new(handler)));
    }

    /// Sends `dispatch_http_call`s to `name` to a real HTTP/1.1 server.
    pub fn add_http_cluster(&self, name: &str, addr: std::net::SocketAddr) {
        self.inner
            .core
            .lock()
            .clusters
            .insert(name.to_string(), Cluster::Http(addr));
    }

    /// Sends `dispatch_grpc_call`s to `name` to a real gRPC server (HTTP/2
    /// without TLS), e.g. a rate limit service on loopback.
    pub fn add_grpc_server(&self, name: &str, addr: std::net::SocketAddr) {
        self.inner
            .core
            .lock()
            .clusters
            .insert(name.to_string(), Cluster::GrpcServer(addr));
    }

    /// Answers `dispatch_grpc_call`s to `name` with a handler.
    pub fn add_grpc_cluster<F>(&self, name: &str, handler: F)
    where
        F: Fn(&crate::GrpcRequest) -> Reply + Send + Sync + 'static,
    {
        self.inner
            .core
            .lock()
            .clusters
            .insert(name.to_string(), Cluster::Grpc(Arc::new(handler)));
    }

    /// Current time of the host clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.inner.core.lock().now())
    }

    /// Moves the manual clock forward by `d`, delivering every event that
    /// falls due on the way (ticks, delayed callout answers, timeouts) at its
    /// own time and in order.
    ///
    /// # Panics
    /// On a host built with [`HostBuilder::real_clock`].
    pub fn advance(&self, d: Duration) {
        let target = {
            let s = self.inner.core.lock();
            assert!(!s.real_clock, "advance() needs the manual clock");
            s.now_ns.saturating_add(d.as_nanos() as u64)
        };
        loop {
            self.run_until_idle();
            let mut s = self.inner.core.lock();
            let next = s
                .events
                .iter()
                .map(|e| e.due)
                .filter(|&d| d <= target)
                .min();
            match next {
                Some(due) => s.now_ns = s.now_ns.max(due),
                None => {
                    s.now_ns = target;
                    break;
                }
            }
        }
        self.run_until_idle();
    }

    /// Delivers every event that is due now, including answers from real
    /// servers that have arrived, until none is left.
    pub fn run_until_idle(&self) {
        loop {
            self.collect_completions();
            let ev = {
                let mut s = self.inner.core.lock();
                let now = s.now();
                s.pop_due(now)
            };
            match ev {
                Some(ev) => self.dispatch(ev),
                None => break,
            }
        }
    }

    /// Waits (in real time, at most `limit`) until every callout sent to a
    /// real server has been answered, then delivers what is due. Returns
    /// false if some were still in flight at the limit.
    pub fn wait_for_callouts(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            self.run_until_idle();
            if self.inner.core.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Time until the next scheduled event, if any (for a real-clock driver).
    pub fn next_event_in(&self) -> Option<Duration> {
        let s = self.inner.core.lock();
        let now = s.now();
        s.events
            .iter()
            .map(|e| e.due)
            .min()
            .map(|d| Duration::from_nanos(d.saturating_sub(now)))
    }

    /// Callouts dispatched and not yet answered: (cluster, `:path`).
    pub fn pending_calls(&self) -> Vec<(String, String)> {
        let s = self.inner.core.lock();
        let mut v: Vec<_> = s
            .pending_calls
            .values()
            .map(|c| (c.cluster.clone(), c.path.clone()))
            .collect();
        v.sort();
        v
    }

    /// Every log line captured so far.
    pub fn logs(&self) -> Vec<LogRecord> {
        self.inner.core.lock().logs.clone()
    }

    /// Messages of the captured log lines that contain `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<String> {
        self.inner
            .core
            .lock()
            .logs
            .iter()
            .filter(|r| r.message.contains(needle))
            .map(|r| r.message.clone())
            .collect()
    }

    pub fn clear_logs(&self) {
        self.inner.core.lock().logs.clear();
    }

    /// A metric by its Envoy stat name: `wasmcustom.<name>` as in the stats
    /// sink, or `<name>` as shown by `/stats` and Prometheus.
    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        let name = name.strip_prefix("wasmcustom.").unwrap_or(name);
        let s = self.inner.core.lock();
        s.metrics.get(name).map(|m| match m.kind {
            MetricKind::Counter => MetricValue::Counter(m.value),
            MetricKind::Gauge => MetricValue::Gauge(m.value),
            MetricKind::Histogram => MetricValue::Histogram(m.samples.clone()),
        })
    }

    /// A counter's value, 0 if undefined.
    pub fn counter(&self, name: &str) -> u64 {
        match self.metric(name) {
            Some(MetricValue::Counter(v)) | Some(MetricValue::Gauge(v)) => v,
            _ => 0,
        }
    }

    /// The metrics as Envoy's stats sink names them (`wasmcustom.<name>: value`),
    /// one per line, sorted; histograms show their sample count and sum.
    pub fn stats_text(&self) -> String {
        let s = self.inner.core.lock();
        let mut out = String::new();
        for (name, m) in &s.metrics {
            match m.kind {
                MetricKind::Histogram => out.push_str(&format!(
                    "wasmcustom.{name}: count={} sum={}\n",
                    m.samples.len(),
                    m.samples.iter().sum::<u64>()
                )),
                _ => out.push_str(&format!("wasmcustom.{name}: {}\n", m.value)),
            }
        }
        out
    }

    /// A shared-data value (with its CAS) as a filter of `vm_id` would see it.
    pub fn shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        let s = self.inner.core.lock();
        s.shared_data
            .get(&(vm_id.to_string(), key.to_string()))
            .map(|e| (e.value.clone(), e.cas))
    }

    /// Number of shared-data keys across all VM ids.
    pub fn shared_data_len(&self) -> usize {
        self.inner.core.lock().shared_data.len()
    }

    /// Bytes held by shared data (keys and values).
    pub fn shared_data_bytes(&self) -> usize {
        let s = self.inner.core.lock();
        s.shared_data
            .iter()
            .map(|((vm, k), e)| vm.len() + k.len() + e.value.len())
            .sum()
    }

    pub(crate) fn register_plugin(&self, p: Arc<PluginInner>) -> usize {
        let mut ps = self.inner.plugins.lock().unwrap_or_else(|p| p.into_inner());
        ps.push(p);
        ps.len() - 1
    }

    pub(crate) fn plugin(&self, idx: usize) -> Option<Arc<PluginInner>> {
        let ps = self.inner.plugins.lock().unwrap_or_else(|p| p.into_inner());
        ps.get(idx).cloned()
    }

    fn collect_completions(&self) {
        let rx = self
            .inner
            .core
            .completions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while let Ok((plugin, worker, token, outcome)) = rx.try_recv() {
            self.inner.core.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.inner.core.lock().schedule(
                0,
                EventKind::CallDone {
                    plugin,
                    worker,
                    token,
                    outcome,
                },
            );
        }
    }

    fn dispatch(&self, ev: Event) {
        match ev.kind {
            EventKind::StreamOp { stream, op } => {
                let cell = {
                    let streams = self.inner.streams.lock().unwrap_or_else(|p| p.into_inner());
                    streams.get(&stream).and_then(Weak::upgrade)
                };
                if let Some(cell) = cell {
                    stream::apply_async_op(self, &cell, op);
                }
            }
            EventKind::Tick {
                plugin,
                worker,
                root,
                generation,
            } => {
                self.with_vm(plugin, worker, |vm| vm.fire_tick(root, generation));
            }
            EventKind::QueueReady {
                plugin,
                worker,
                root,
                queue,
            } => {
                self.with_vm(plugin, worker, |vm| vm.queue_ready(root, queue));
            }
            EventKind::CallDone {
                plugin,
                worker,
                token,
                outcome,
            } => {
                let pending = self
                    .inner
                    .core
                    .lock()
                    .pending_calls
                    .remove(&(plugin, worker, token));
                if let Some(pending) = pending {
                    self.with_vm(plugin, worker, |vm| vm.call_done(pending, token, outcome));
                }
            }
            EventKind::CallTimeout {
                plugin,
                worker,
                token,
            } => {
                let pending = self
                    .inner
                    .core
                    .lock()
                    .pending_calls
                    .remove(&(plugin, worker, token));
                if let Some(pending) = pending {
                    // A timed-out gRPC call comes back as the router's local
                    // reply: 504 mapped to UNAVAILABLE.
                    let outcome = if pending.grpc {
                        Outcome::GrpcStatus(14, "upstream request timeout".into())
                    } else {
                        Outcome::Response(crate::CallResponse::local(
                            504,
                            "upstream request timeout",
                        ))
                    };
                    self.with_vm(plugin, worker, |vm| vm.call_done(pending, token, outcome));
                }
            }
        }
    }

    /// Runs `f` on one worker VM of a plugin, then routes the stream
    /// operations its callback queued.
    fn with_vm(&self, plugin: usize, worker: usize, f: impl FnOnce(&mut Vm)) {
        let Some(p) = self.plugin(plugin) else { return };
        if worker >= p.vms.len() {
            // The canary VM is gone; what it left behind goes nowhere.
            return;
        }
        let ops = {
            let mut vm = p.lock_vm(worker);
            f(&mut vm);
            vm.take_ops()
        };
        let mut s = self.inner.core.lock();
        for (stream, op) in ops {
            s.schedule(0, EventKind::StreamOp { stream, op });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_counter_skips_zero() {
        let h = Host::default();
        let mut s = h.inner.core.lock();
        s.next_cas = u32::MAX;
        assert_eq!(s.next_cas(), u32::MAX);
        assert_eq!(s.next_cas(), 1);
    }

    #[test]
    fn events_come_out_in_time_then_sequence_order() {
        let h = Host::default();
        let mut s = h.inner.core.lock();
        s.schedule(
            10,
            EventKind::CallTimeout {
                plugin: 0,
                worker: 0,
                token: 1,
            },
        );
        s.schedule(
            5,
            EventKind::CallTimeout {
                plugin: 0,
                worker: 0,
                token: 2,
            },
        );
        s.schedule(
            5,
            EventKind::CallTimeout {
                plugin: 0,
                worker: 0,
                token: 3,
            },
        );
        let now = s.now_ns + 100;
        let order: Vec<u32> = std::iter::from_fn(|| s.pop_due(now))
            .map(|e| match e.kind {
                EventKind::CallTimeout { token, .. } => token,
                _ => 0,
            })
            .collect();
        assert_eq!(order, vec![2, 3, 1]);
    }
}
