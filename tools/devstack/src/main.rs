//! `devstack`: the local stack in the foreground (see `scripts/dev.sh`).

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "devstack",
    about = "The local stack: embedded dev proxy (not a production proxy), dev identity provider, demo upstream and publisher, sidecar"
)]
struct Args {
    /// Repository root.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// The gateway configuration (Envoy bootstrap) the stack follows.
    #[arg(long, default_value = "envoy/envoy.yaml")]
    gateway: PathBuf,
    /// Do not run the embedded proxy (Envoy serves the gateway).
    #[arg(long)]
    no_proxy: bool,
    /// Milliseconds between the demo publisher's updates.
    #[arg(long, default_value_t = 1000)]
    publish_interval_ms: u64,
    /// Filter log lines shown: trace, debug, info, warn, error.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// What else is logged (the sidecar, the proxy, the publisher): an
    /// env-filter directive, `RUST_LOG` syntax. Unset: `RUST_LOG`, else `info`.
    #[arg(long, env = "DEVSTACK_LOG")]
    log: Option<String>,
    /// `text` or `json` lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: sidecar::logging::LogFormat,
    /// Print the entitlements policy of the gateway file and exit.
    #[arg(long)]
    print_policy: bool,
    /// Kafka brokers, e.g. `127.0.0.1:9092`: the sidecar on the Kafka bus
    /// (the curve topic into `pricing.curves.*`), the publisher producing
    /// to Kafka. The topics are made when missing.
    #[arg(long, env = "DEVSTACK_KAFKA")]
    kafka: Option<String>,
    /// Extra sidecar flags, e.g. `--sidecar-arg=--usage-postgres=host=127.0.0.1`.
    #[arg(long = "sidecar-arg", allow_hyphen_values = true)]
    sidecar_args: Vec<String>,
}

fn level(s: &str) -> Result<wasm_host::LogLevel, String> {
    use wasm_host::LogLevel::*;
    Ok(match s {
        "trace" => Trace,
        "debug" => Debug,
        "info" => Info,
        "warn" => Warn,
        "error" => Error,
        _ => {
            return Err(format!(
                "--log-level: {s:?} is not trace, debug, info, warn or error"
            ))
        }
    })
}

fn main() {
    let a = Args::parse();
    let fail = |e: String| -> ! {
        eprintln!("devstack: {e}");
        std::process::exit(1)
    };
    let directive = sidecar::logging::directive(a.log.as_deref());
    sidecar::logging::init("--log", &directive, a.log_format).unwrap_or_else(|e| fail(e));
    let gateway = if a.gateway.is_absolute() {
        a.gateway.clone()
    } else {
        a.root.join(&a.gateway)
    };
    if a.print_policy {
        let g = devstack::gateway::Gateway::load(&gateway, &a.root).unwrap_or_else(|e| fail(e));
        let p = g.entitlements_policy().unwrap_or_else(|e| fail(e));
        println!("{p:#}");
        return;
    }
    let cfg = devstack::StackConfig {
        root: a.root.clone(),
        gateway,
        proxy: !a.no_proxy,
        publish_every: Duration::from_millis(a.publish_interval_ms.max(10)),
        sidecar_args: a.sidecar_args.clone(),
        log_level: level(&a.log_level).unwrap_or_else(|e| fail(e)),
        kafka: a.kafka.clone().filter(|k| !k.is_empty()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e.to_string()));
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let addrs = devstack::start(&cfg, shutdown.clone())
            .await
            .unwrap_or_else(|e| fail(e));
        tracing::info!(
            "devstack: identity provider http://{}, demo upstream http://{}, sidecar http://{}{}{}",
            addrs.idp,
            addrs.upstream,
            addrs.sidecar,
            addrs
                .rls
                .map(|r| format!(", rate limit service {r}"))
                .unwrap_or_default(),
            if cfg.proxy {
                format!(", gateway (embedded dev proxy) http://{}", addrs.gateway)
            } else {
                String::new()
            }
        );
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("devstack: stopping");
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
}
