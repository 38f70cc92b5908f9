//! Plugin configuration and loading: the module compiled once per process,
//! a canary VM, then one VM per worker.

use crate::host::{Host, LogRecord};
use crate::vm::{self, Vm};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use wasmtime::{Engine, Module};

/// What Envoy does when a VM of this plugin has failed (Envoy's
/// `PluginConfig.failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Streams on a failed VM get a 503 local reply (Envoy's default).
    #[default]
    FailClosed,
    /// The filter is skipped on a failed VM (`FAIL_OPEN`, or the deprecated `fail_open: true`).
    FailOpen,
}

/// A plugin as Envoy's `envoy.extensions.wasm.v3.PluginConfig` describes it.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) root_id: String,
    pub(crate) vm_id: String,
    pub(crate) configuration: Vec<u8>,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) failure_policy: FailurePolicy,
}

impl PluginConfig {
    /// A plugin from a `.wasm` file; its name defaults to the file stem.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        PluginConfig {
            path,
            name,
            root_id: String::new(),
            vm_id: String::new(),
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            env: Vec::new(),
            failure_policy: FailurePolicy::FailClosed,
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn root_id(mut self, id: &str) -> Self {
        self.root_id = id.to_string();
        self
    }

    /// The VM id: plugins with the same VM id share shared data and queues.
    pub fn vm_id(mut self, id: &str) -> Self {
        self.vm_id = id.to_string();
        self
    }

    /// The plugin configuration as the filter reads it (a `StringValue`'s bytes).
    pub fn config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.configuration = bytes.into();
        self
    }

    /// The plugin configuration as JSON (what Envoy hands over for a `Struct`).
    pub fn config_json(mut self, value: &serde_json::Value) -> Self {
        self.configuration = value.to_string().into_bytes();
        self
    }

    pub fn vm_config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = bytes.into();
        self
    }

    /// An environment variable of the VM (`VmConfig.environment_variables`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.failure_policy = p;
        self
    }
}

/// Why a plugin did not load. Carries the filter's log lines.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The `.wasm` could not be read or compiled.
    #[error("cannot load {path}: {reason}")]
    Module { path: String, reason: String },
    /// The module lacks an export Envoy requires, or instantiation failed.
    #[error("cannot instantiate {path}: {reason}")]
    Instantiate { path: String, reason: String },
    /// `proxy_on_vm_start` returned false.
    #[error("plugin {plugin}: on_vm_start returned false{}", show_logs(.logs))]
    VmStart { plugin: String, logs: Vec<String> },
    /// `proxy_on_configure` returned false.
    #[error("plugin {plugin}: on_configure returned false{}", show_logs(.logs))]
    Configure { plugin: String, logs: Vec<String> },
    /// The guest trapped while loading.
    #[error("plugin {plugin}: {reason}{}", show_logs(.logs))]
    Trap {
        plugin: String,
        reason: String,
        logs: Vec<String>,
    },
}

impl LoadError {
    /// The filter's log lines printed while loading.
    pub fn logs(&self) -> &[String] {
        match self {
            LoadError::VmStart { logs, .. }
            | LoadError::Configure { logs, .. }
            | LoadError::Trap { logs, .. } => logs,
            _ => &[],
        }
    }
}

fn show_logs(logs: &[String]) -> String {
    if logs.is_empty() {
        String::new()
    } else {
        format!("; filter logs:\n  {}", logs.join("\n  "))
    }
}

/// Static facts about a plugin, shared by its VMs.
pub(crate) struct PluginMeta {
    pub(crate) name: String,
    pub(crate) root_id: String,
    pub(crate) vm_id: String,
    pub(crate) configuration: Vec<u8>,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) failure_policy: FailurePolicy,
}

pub(crate) struct PluginInner {
    pub(crate) meta: Arc<PluginMeta>,
    pub(crate) vms: Vec<Mutex<Vm>>,
}

impl PluginInner {
    pub(crate) fn lock_vm(&self, worker: usize) -> MutexGuard<'_, Vm> {
        let w = worker % self.vms.len();
        self.vms[w].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A loaded plugin. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.meta.name
    }

    /// Whether the VM of `worker` has failed (trapped).
    pub fn failed(&self, worker: usize) -> bool {
        self.inner.lock_vm(worker).failed().is_some()
    }

    /// Why the VM of `worker` failed, if it did.
    pub fn failure(&self, worker: usize) -> Option<String> {
        self.inner.lock_vm(worker).failed().map(str::to_string)
    }

    /// Bytes of linear memory the VM of `worker` has.
    pub fn memory_size(&self, worker: usize) -> usize {
        self.inner.lock_vm(worker).memory_size()
    }
}

/// The process-wide engine: epoch interruption on, one ticker thread.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // `WASM_HOST_PERFMAP=1`: write /tmp/perf-<pid>.map so that `perf
        // report` names the guest's functions (profiling filters in benches).
        if std::env::var_os("WASM_HOST_PERFMAP").is_some_and(|v| v == "1") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = match Engine::new(&cfg) {
            Ok(e) => e,
            Err(e) => panic!("cannot create the wasmtime engine: {e}"),
        };
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-host-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(vm::EPOCH_TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            })
            .ok();
        engine
    })
}

/// Compiles a module once per process and path.
fn module(path: &Path) -> Result<Module, LoadError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, (std::time::SystemTime, Module)>>> =
        OnceLock::new();
    let err = |reason: String| LoadError::Module {
        path: path.display().to_string(),
        reason,
    };
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| err(e.to_string()))?;
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some((t, m)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
        if *t == mtime {
            return Ok(m.clone());
        }
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let m = Module::new(engine(), &bytes).map_err(|e| err(format!("{e:#}")))?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.to_path_buf(), (mtime, m.clone()));
    Ok(m)
}

pub(crate) fn load(host: &Host, config: PluginConfig) -> Result<Plugin, LoadError> {
    let module = module(&config.path)?;
    let pre = vm::instance_pre(&module).map_err(|e| LoadError::Instantiate {
        path: config.path.display().to_string(),
        reason: format!("{e:#}"),
    })?;
    let meta = Arc::new(PluginMeta {
        name: config.name.clone(),
        root_id: config.root_id.clone(),
        vm_id: config.vm_id.clone(),
        configuration: config.configuration.clone(),
        vm_configuration: config.vm_configuration.clone(),
        env: config.env.clone(),
        failure_policy: config.failure_policy,
    });
    let core = host.inner.core.clone();
    let index = host
        .inner
        .plugins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    let log_mark = core.lock().logs.len();
    let logs_since = |mark: usize| -> Vec<String> {
        core.lock().logs[mark..]
            .iter()
            .filter(|r: &&LogRecord| r.plugin == meta.name)
            .map(|r| format!("[{:?}] {}", r.level, r.message))
            .collect()
    };
    let start = |worker: Option<usize>| -> Result<Vm, LoadError> {
        let mut vm = Vm::new(&pre, core.clone(), meta.clone(), index, worker).map_err(|e| {
            LoadError::Instantiate {
                path: config.path.display().to_string(),
                reason: e,
            }
        })?;
        vm.start().map_err(|e| match e {
            vm::StartError::VmStart => LoadError::VmStart {
                plugin: meta.name.clone(),
                logs: logs_since(log_mark),
            },
            vm::StartError::Configure => LoadError::Configure {
                plugin: meta.name.clone(),
                logs: logs_since(log_mark),
            },
            vm::StartError::Trap(reason) => LoadError::Trap {
                plugin: meta.name.clone(),
                reason,
                logs: logs_since(log_mark),
            },
        })?;
        Ok(vm)
    };
    if core.settings.canary {
        let mut canary = start(None)?;
        canary.discard();
    }
    let mut vms = Vec::with_capacity(core.settings.workers);
    for w in 0..core.settings.workers {
        vms.push(Mutex::new(start(Some(w))?));
    }
    let inner = Arc::new(PluginInner { meta, vms });
    let idx = host.register_plugin(inner.clone());
    debug_assert_eq!(idx, index);
    Ok(Plugin { inner })
}
