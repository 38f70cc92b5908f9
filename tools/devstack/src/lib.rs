//! The local stack in one process (`scripts/dev.sh` runs it): the embedded
//! dev proxy ([`proxy`], a stand-in for Envoy, not a production proxy), the
//! dev identity provider ([`idp`]), the demo upstream ([`upstream`]), the
//! sidecar (the `sidecar` library) and the demo publisher ([`publisher`]).
//! Addresses come from the clusters of `envoy/envoy.yaml` ([`gateway`]), so
//! Envoy and the embedded proxy see the same stack.

pub mod gateway;
pub mod idp;
pub mod proxy;
pub mod publisher;
pub mod upstream;
pub mod web;

use gateway::Gateway;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct StackConfig {
    /// The repository root (wasm paths in the gateway file are relative to
    /// it, `target/` meaning cargo's target directory: [`gateway::wasm_file`]).
    pub root: PathBuf,
    /// `envoy/envoy.yaml`.
    pub gateway: PathBuf,
    /// Run the embedded proxy (false when Envoy serves the gateway).
    pub proxy: bool,
    pub publish_every: Duration,
    /// Extra sidecar flags.
    pub sidecar_args: Vec<String>,
    pub log_level: wasm_host::LogLevel,
    /// Kafka brokers (`host:port,…`): the sidecar on the Kafka bus, reading
    /// the curve topic, and the publisher producing to it.
    pub kafka: Option<String>,
}

/// Where the parts listen.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub gateway: SocketAddr,
    pub idp: SocketAddr,
    pub upstream: SocketAddr,
    pub sidecar: SocketAddr,
    pub rls: Option<SocketAddr>,
}

fn cluster(g: &Gateway, name: &str) -> Result<SocketAddr, String> {
    g.cluster(name)
        .map(|c| c.addr)
        .ok_or_else(|| format!("{}: no cluster {name:?}", "gateway"))
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{what} on {addr}: {e}"))
}

/// Starts every part; returns once all listen. Everything stops with
/// `shutdown`.
pub async fn start(cfg: &StackConfig, shutdown: CancellationToken) -> Result<Addresses, String> {
    let g = Gateway::load(&cfg.gateway, &cfg.root)?;
    let addrs = Addresses {
        gateway: g.listen,
        idp: cluster(&g, "idp")?,
        upstream: cluster(&g, "demo_upstream")?,
        sidecar: cluster(&g, "sidecar")?,
        rls: g.cluster("ratelimit").map(|c| c.addr),
    };

    // Identity provider.
    let l = bind("identity provider", addrs.idp).await?;
    let idp = Arc::new(idp::Idp::new(&format!("http://{}", addrs.idp))?);
    let served = idp.clone();
    tokio::spawn(web::serve(
        l,
        move |req| {
            let idp = served.clone();
            async move { idp.handle(&req) }
        },
        shutdown.clone(),
    ));

    // Demo upstream.
    let l = bind("demo upstream", addrs.upstream).await?;
    tokio::spawn(web::serve(
        l,
        |req| async move { upstream::handle(&req) },
        shutdown.clone(),
    ));

    // Sidecar, with the entitlements policy of the gateway file.
    let dir = wasm_host::target_dir().join("dev");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let policy_file = dir.join("policy.json");
    let policy = g.entitlements_policy()?;
    std::fs::write(&policy_file, policy.to_string())
        .map_err(|e| format!("{}: {e}", policy_file.display()))?;
    // In-band auth and refresh: the sidecar verifies tokens with the auth
    // filter's configuration, reaching the `idp` cluster directly.
    let auth_file = dir.join("auth.json");
    std::fs::write(&auth_file, g.auth_config()?.to_string())
        .map_err(|e| format!("{}: {e}", auth_file.display()))?;
    let mut args: Vec<String> = vec![
        "sidecar".into(),
        "--listen".into(),
        addrs.sidecar.to_string(),
        "--policy".into(),
        policy_file.display().to_string(),
        "--auth-config".into(),
        auth_file.display().to_string(),
        "--cluster".into(),
        format!("idp={}", addrs.idp),
    ];
    if let Some(r) = addrs.rls {
        args.push("--rls-listen".into());
        args.push(r.to_string());
    }
    // Grants: PostgreSQL if the extra flags name it, else the example
    // grants file (the quick start needs nothing installed).
    let pg = cfg
        .sidecar_args
        .iter()
        .any(|a| a.starts_with("--grants-postgres") || a.starts_with("--grants-file"));
    if !pg {
        args.push("--grants-file".into());
        args.push(cfg.root.join("envoy/grants.json").display().to_string());
    }
    if let Some(brokers) = &cfg.kafka {
        publisher::kafka_topics(brokers).await?;
        args.extend([
            "--bus".to_string(),
            "kafka".into(),
            "--kafka-brokers".into(),
            brokers.clone(),
            "--kafka-topic".into(),
            format!("{}={}", publisher::CURVES_TOPIC, publisher::CURVES_TEMPLATE),
            "--kafka-bus-topic".into(),
            publisher::BUS_TOPIC.into(),
        ]);
    }
    args.extend(cfg.sidecar_args.iter().cloned());
    let sc: sidecar::config::Config =
        clap::Parser::try_parse_from(&args).map_err(|e| e.to_string())?;
    let l = bind("sidecar", addrs.sidecar).await?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = sidecar::run(l, sc, stop).await {
            tracing::error!(error = %e, "sidecar: stopped");
        }
    });

    // Demo publisher.
    if let Some(brokers) = &cfg.kafka {
        tokio::spawn(publisher::run_kafka(
            brokers.clone(),
            cfg.publish_every,
            shutdown.clone(),
        ));
    } else {
        tokio::spawn(publisher::run(
            addrs.sidecar,
            idp.clone(),
            cfg.publish_every,
            shutdown.clone(),
        ));
    }

    // The embedded proxy.
    if cfg.proxy {
        let l = bind("gateway (embedded proxy)", addrs.gateway).await?;
        let p = proxy::Proxy::start(g, cfg.log_level)?;
        tokio::spawn(proxy::serve(l, p, shutdown.clone()));
    }
    Ok(addrs)
}
