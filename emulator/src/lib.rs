//! A proxy-wasm ABI 0.2.1 host on wasmtime that behaves like Envoy's.
//!
//! Envoy cannot be installed on the build machines, so the filters' integration
//! tests, the benchmarks and the local dev proxy run the real `.wasm` files in
//! this host. It reproduces the Envoy behaviour that filters can observe (see
//! `shared/PROXY_WASM_HOST.md`): a canary VM then one VM per worker, each with
//! its own root context; the HTTP filter chain with Envoy's callback order,
//! Pause/resume and buffering; local replies that still pass through the
//! encoder callbacks; header maps that are only reachable when Envoy allows
//! it; callouts owned by the root context and answered asynchronously;
//! shared data with CAS, shared queues, per-root ticks; metrics named as
//! Envoy names them; captured logs; traps that fail the VM.
//!
//! Time is a clock the test controls: tests [`Host::advance`] it and never
//! sleep. Callout answers, queue notifications and ticks are events delivered
//! by [`Host::run_until_idle`] (called after every stream operation), never
//! from inside a guest callback.
//!
//! # Profiles
//!
//! By default the host is Envoy's, in every detail above. Other proxy-wasm
//! hosts are stricter in places, and a filter meant to run on them too is
//! tested with [`HostBuilder::profile`]`(`[`Profile::Strict`]`)`: a second
//! tick period (or one set from a stream context) traps, a shared-data CAS
//! of 0 only creates a key, removing a request header does nothing, and
//! integer attributes (`response.code`, `request.size`, `request.duration`,
//! ...) are decimal strings. [`Profile::Strict`] says where each rule comes
//! from.
//!
//! ```no_run
//! use wasm_host::{Host, PluginConfig, Reply};
//! let host = Host::builder().workers(2).build();
//! host.add_cluster("jwks", |req: &wasm_host::CallRequest| {
//!     Reply::ok(200, br#"{"keys":[]}"#.to_vec())
//! });
//! let auth = host.load(PluginConfig::new(wasm_host::wasm_path("auth")).config_json(&serde_json::json!({}))).unwrap();
//! let chain = host.chain(&[&auth]);
//! let stream = host.stream(&chain);
//! stream.request_headers(&[(":method", "GET"), (":path", "/"), (":authority", "api")], true);
//! stream.respond(200, &[], b"ok");
//! assert_eq!(stream.response().unwrap().status(), Some(200));
//! ```

mod abi;
mod callout;
mod host;
mod hostcalls;
mod plugin;
mod profile;
mod stream;
mod vm;
mod wasi;

pub use abi::{parse_pairs, serialize_pairs, Pairs, Status};
pub use callout::{CallRequest, CallResponse, GrpcRequest, GrpcResponse, Reply};
pub use host::{Host, HostBuilder, LogLevel, LogRecord, MetricKind, MetricValue};
pub use plugin::{FailurePolicy, LoadError, Plugin, PluginConfig};
pub use profile::Profile;
pub use stream::{
    Callback, Chain, Direction, LocalReply, Message, Stream, StreamOptions, TraceEntry,
};

use std::path::PathBuf;
use std::sync::OnceLock;

/// The command that builds every `.wasm` the tests load.
pub const BUILD_COMMAND: &str = "scripts/build-filters.sh";

/// Path of a filter built for `wasm32-wasip1` in release mode, e.g.
/// `wasm_path("probe")` → `<target>/wasm32-wasip1/release/probe.wasm`.
///
/// Panics with the command that builds it when the file is missing: a test
/// that needs a `.wasm` must fail loudly, never pass silently.
pub fn wasm_path(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip1")
        .join("release")
        .join(format!("{name}.wasm"));
    if !path.is_file() {
        panic!(
            "{} not found: build the filters first: {BUILD_COMMAND}",
            path.display()
        );
    }
    path
}

/// Cargo's target directory for this workspace, where `wasm_path` looks.
///
/// An absolute `CARGO_TARGET_DIR` is taken as it is. Otherwise cargo is asked
/// (`cargo metadata --format-version 1 --no-deps` in the workspace root, so a
/// relative `CARGO_TARGET_DIR` or a `build.target-dir` in a cargo config is
/// read the way the build read it); without cargo, a relative
/// `CARGO_TARGET_DIR` under the workspace root, else `<workspace>/target`.
/// Asked once per process.
pub fn target_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        benchkit::target_dir(&root.to_string_lossy()).unwrap_or_else(|| root.join("target"))
    })
    .clone()
}

fn workspace_root() -> PathBuf {
    // emulator → workspace root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|p| p.join("Cargo.lock").is_file() || p.join("rust-toolchain.toml").is_file())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}
