//! The native access sidecar, as a library with a thin binary
//! (`src/main.rs`): WebSocket fan-out of live channels with the embedded
//! bus ([`server`], [`session`], [`fanout`], [`bus`]), Prometheus metrics
//! ([`metrics`], [`expo`]), usage metering ([`usage`]), entitlement grants
//! and their feed to the filters ([`grants`], [`admin`], [`internal`]), and
//! the Envoy Rate Limit Service backed by Redis ([`rls`]). [`run`]
//! wires them from a [`config::Config`].

pub mod access;
pub mod admin;
pub mod bus;
pub mod config;
pub mod expo;
pub mod fanout;
pub mod fetch;
pub mod grants;
pub mod internal;
pub mod logging;
pub mod metrics;
pub mod pg;
pub mod proof;
pub mod protocol;
pub mod reload;
pub mod rls;
pub mod server;
pub mod session;
pub mod usage;
pub mod verifier;
pub mod ws;

use entitlements_core::policy::Policy;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("policy {path}: {reason}")]
    Policy { path: String, reason: String },
    #[error("rate limit service on {addr}: {reason}")]
    Rls { addr: String, reason: String },
    #[error("bus: {0}")]
    Bus(#[from] bus::BusError),
    #[error("usage: {0}")]
    Usage(String),
    #[error("auth configuration {path}: {reason}")]
    Auth { path: String, reason: String },
    /// The grants source (`--grants-file`) could not be put in force.
    #[error("grants {path}: {reason}")]
    Grants { path: String, reason: String },
}

/// The verifier of `--auth-config`, if set (not started).
pub fn load_verifier(
    config: &config::Config,
    clock: access::Clock,
) -> Result<Option<Arc<verifier::Verifier>>, StartError> {
    let Some(path) = &config.auth_config else {
        return Ok(None);
    };
    let err = |reason: String| StartError::Auth {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let clusters = config.clusters.iter().cloned().collect();
    verifier::Verifier::from_json(&bytes, clusters, clock)
        .map(|v| Some(Arc::new(v)))
        .map_err(err)
}

/// Loads and compiles the entitlements policy file.
pub fn load_policy(path: &std::path::Path) -> Result<Policy, StartError> {
    let err = |reason: String| StartError::Policy {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    Policy::from_json(&bytes).map_err(|e| err(e.to_string()))
}

/// The hub and the metrics registry it reports into.
pub fn hub(config: &config::Config) -> (Arc<fanout::Hub>, prometheus_client::registry::Registry) {
    let metrics = metrics::Metrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    (Arc::new(fanout::Hub::new(config.hub(), metrics)), registry)
}

/// Builds the application a [`server::serve`] serves, on the embedded bus.
pub fn app(config: &config::Config, policy: Policy) -> Arc<server::App> {
    let (hub, registry) = hub(config);
    let bus: Arc<dyn bus::Bus> = Arc::new(bus::MemoryBus::new(hub.clone()));
    let usage = Arc::new(usage::Usage::in_memory(config.usage()));
    assemble(config, policy, hub, registry, bus, usage, None)
}

/// Builds the application on the bus the configuration names.
pub async fn app_with_bus(
    config: &config::Config,
    policy: Policy,
    shutdown: CancellationToken,
) -> Result<Arc<server::App>, StartError> {
    if config.bus != config::BusKind::Kafka && !config.kafka_topics.is_empty() {
        return Err(StartError::Bus(bus::BusError::Config(
            "--kafka-topic needs --bus kafka".into(),
        )));
    }
    let (hub, mut registry) = hub(config);
    let bus: Arc<dyn bus::Bus> = match config.bus {
        config::BusKind::Memory => Arc::new(bus::MemoryBus::new(hub.clone())),
        config::BusKind::Nats => {
            bus::nats::NatsBus::connect(
                &config.nats_url,
                &config.nats_prefix,
                hub.clone(),
                Duration::from_secs(5),
                shutdown.clone(),
            )
            .await?
        }
        config::BusKind::Kafka => {
            let settings = config.kafka().map_err(bus::BusError::Config)?;
            let k = bus::kafka::KafkaBus::start(settings, hub.clone(), shutdown.clone())?;
            k.metrics.register(&mut registry);
            k
        }
    };
    let clock = access::Clock::new();
    let verifier = load_verifier(config, clock)?;
    if let Some(v) = &verifier {
        v.start(shutdown.clone());
    }
    if let Some(c) = &config.usage_postgres {
        pg::check(c).map_err(|e| StartError::Usage(format!("--usage-postgres: {e}")))?;
    }
    let usage = usage::Usage::start(config.usage(), shutdown)
        .await
        .map_err(StartError::Usage)?;
    Ok(assemble(
        config,
        policy,
        hub,
        registry,
        bus,
        Arc::new(usage),
        verifier.map(|v| (v, clock)),
    ))
}

fn assemble(
    config: &config::Config,
    policy: Policy,
    hub: Arc<fanout::Hub>,
    registry: prometheus_client::registry::Registry,
    bus: Arc<dyn bus::Bus>,
    usage: Arc<usage::Usage>,
    verifier: Option<(Arc<verifier::Verifier>, access::Clock)>,
) -> Arc<server::App> {
    let mut registry = registry;
    let mut ctx = session::Context::new(hub, policy, config.session());
    if let Some((v, clock)) = verifier {
        v.metrics.register(&mut registry);
        ctx.clock = clock;
        ctx.verifier = Some(v);
    }
    let ctx = Arc::new(ctx);
    let live = Arc::new(grants::Live::new(config.grants(), config.grants_source()));
    live.metrics.register(&mut registry);
    let mut app = server::App::new(ctx, bus, registry, config.front(), usage);
    app.grants = live;
    if config.rls_listen.is_some() {
        let m = rls::Metrics::new();
        m.register(&mut app.registry);
        app.rls_metrics = Some(m);
    }
    app.feed_token = config.grants_feed_token.clone().filter(|t| !t.is_empty());
    app.admin = config
        .grants_postgres
        .clone()
        .map(|c| Arc::new(admin::Admin::new(c, config.admin_secret.clone())));
    Arc::new(app)
}

/// Starts the grants source of the configuration into `app.grants`: the
/// file is read at once (an invalid one is a start error) and watched;
/// PostgreSQL is followed by a task (not waited for: `/readyz` says
/// `grants: not loaded` until the first load). Both set: a start error.
pub fn start_grants(
    app: &server::App,
    config: &config::Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let live = app.grants.clone();
    // The sessions decide with every version put in force.
    let ctx = app.ctx.clone();
    let mut versions = live.watch();
    ctx.set_grants(versions.borrow_and_update().grants.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = versions.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let grants = versions.borrow_and_update().grants.clone();
                    ctx.set_grants(grants);
                }
            }
        }
    });
    match (&config.grants_postgres, &config.grants_file) {
        (Some(_), Some(path)) => Err(StartError::Grants {
            path: path.display().to_string(),
            reason: "--grants-file and --grants-postgres are exclusive".into(),
        }),
        (Some(conninfo), None) => {
            pg::check(conninfo).map_err(|reason| StartError::Grants {
                path: "--grants-postgres".into(),
                reason,
            })?;
            let cfg = grants::sync::PgSync::new(
                conninfo,
                Duration::from_secs(config.grants_resync.max(1)),
            );
            tokio::spawn(grants::sync::run(cfg, live, shutdown));
            Ok(())
        }
        (None, Some(path)) => {
            let source = grants::file::FileGrants::start(path, &live).map_err(|reason| {
                StartError::Grants {
                    path: path.display().to_string(),
                    reason,
                }
            })?;
            tokio::spawn(grants::file::watch(
                source,
                live,
                Duration::from_secs(config.policy_poll),
                shutdown,
            ));
            Ok(())
        }
        (None, None) => Ok(()),
    }
}

/// Runs the sidecar on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: config::Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = ?config.redacted(),
        "sidecar: starting"
    );
    if config.identity_proof == proof::IdentityProof::Token && config.auth_config.is_none() {
        tracing::warn!(
            "identity headers will be refused: --identity-proof token needs --auth-config to \
             verify the tokens they come with (--identity-proof none trusts them as they come)"
        );
    }
    let policy = load_policy(&config.policy)?;
    let seen = std::fs::read(&config.policy).ok();
    let app = app_with_bus(&config, policy, shutdown.clone()).await?;
    if let Some(bytes) = &seen {
        app.ctx
            .set_policy_document(session::PolicyDocument::new(bytes.clone()));
    }
    start_grants(&app, &config, shutdown.clone())?;
    match &config.policy_url {
        // The file serves until the first fetch; the remote source rules.
        Some(url) => {
            let mut r = reload::Remote::parse(url).map_err(|reason| StartError::Policy {
                path: url.clone(),
                reason,
            })?;
            r.refresh = Duration::from_secs(config.policy_refresh.max(1));
            r.retry = Duration::from_secs(config.policy_retry.max(1));
            tokio::spawn(reload::watch_remote(r, app.ctx.clone(), shutdown.clone()));
        }
        None => {
            tokio::spawn(reload::watch_file(
                reload::FileSource::new(&config.policy, seen),
                app.ctx.clone(),
                Duration::from_secs(config.policy_poll),
                shutdown.clone(),
            ));
        }
    }
    if let Some(addr) = config.rls_listen {
        let rls_err = |reason: String| StartError::Rls {
            addr: addr.to_string(),
            reason,
        };
        // Taken before reading, so that a change while reading is seen.
        let seen = config.rls_config.as_deref().map(rls::fingerprint);
        let limits = match &config.rls_config {
            Some(p) => {
                rls::limits::Limits::load(p).map_err(|e| rls_err(format!("--rls-config: {e}")))?
            }
            None => rls::limits::Limits::empty(),
        };
        let store = rls::store::Store::new(&config.redis()).map_err(rls_err)?;
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| rls_err(e.to_string()))?;
        tracing::info!(
            %addr,
            redis = store.describe(),
            domains = limits.domains().count(),
            descriptors = limits.descriptor_count(),
            "rls: serving"
        );
        let metrics = app.rls_metrics.clone().unwrap_or_default();
        let service = Arc::new(rls::Service::new(store, limits, config.rls(), metrics));
        if let (Some(p), Some(seen)) = (&config.rls_config, seen) {
            tokio::spawn(rls::watch_config(
                service.clone(),
                p.clone(),
                seen,
                Duration::from_secs(config.rls_config_poll),
                shutdown.clone(),
            ));
        }
        let stop = shutdown.clone();
        tokio::spawn(async move { rls::serve(l, service, stop.cancelled_owned()).await });
    }
    let hub = app.ctx.hub.clone();
    let usage = app.usage.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {
                    hub.expire_history();
                    usage.expire();
                }
            }
        }
    });
    server::serve(listener, app, shutdown).await;
    Ok(())
}
