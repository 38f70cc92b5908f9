//! The sidecar's HTTP front on one listener: `/ws` (the WebSocket upgrade),
//! `POST /publish/{channel}`, `POST /v1/usage`, `GET /v1/usage/rollups`,
//! `/healthz`, `/readyz`, `/metrics` (Prometheus or OpenMetrics text), the
//! admin API (`/admin/`, [`crate::admin`]) and the internal endpoints the
//! filters read (`/internal/`, [`crate::internal`]).
//!
//! It trusts the `x-auth-*` identity headers because only Envoy, whose auth
//! filter strips client copies and sets them, can reach it (bind it to
//! loopback or a pod-local address).

use crate::access::Access;
use crate::bus::{Bus, BusError};
use crate::expo::{Format, Writer};
use crate::fanout::PublishError;
use crate::metrics;
use crate::session::{self, Context};
use crate::usage::{IngestError, Usage};
use crate::ws;
use base64::Engine as _;
use bytes::Bytes;
use entitlements_core::channel::{Pattern, Subject};
use entitlements_core::identity::{decode_claims, Identity};
use entitlements_core::policy::{ChannelAction, Request as PolicyRequest};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

pub use filter_common::identity::IdentityHeaders;

/// Front settings.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Most open WebSocket connections; beyond, the upgrade completes and
    /// the connection is closed at once with 1013 "try again later".
    pub max_connections: usize,
    /// Largest publish body, in bytes (413 beyond).
    pub max_publish_bytes: usize,
    /// How long shutdown waits for connections to close.
    pub drain_timeout: Duration,
    pub identity: IdentityHeaders,
    /// What proves the identity headers of `/ws` and `/publish/`.
    pub identity_proof: crate::proof::IdentityProof,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            max_connections: 100_000,
            max_publish_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(10),
            identity: IdentityHeaders::default(),
            identity_proof: crate::proof::IdentityProof::default(),
        }
    }
}

/// Everything the front serves.
pub struct App {
    pub ctx: Arc<Context>,
    pub bus: Arc<dyn Bus>,
    pub registry: Registry,
    pub cfg: FrontConfig,
    pub usage: Arc<Usage>,
    /// The admin API's grants store (`--grants-postgres`).
    pub admin: Option<Arc<crate::admin::Admin>>,
    /// The grants in force (none until a source is started:
    /// [`crate::start_grants`]).
    pub grants: Arc<crate::grants::Live>,
    /// The bearer token of `/internal/` (`--grants-feed-token`).
    pub feed_token: Option<String>,
    /// The rate limit service's metrics (with `--rls-listen`).
    pub rls_metrics: Option<crate::rls::Metrics>,
    connections: AtomicUsize,
    shutdown: CancellationToken,
}

impl App {
    pub fn new(
        ctx: Arc<Context>,
        bus: Arc<dyn Bus>,
        registry: Registry,
        cfg: FrontConfig,
        usage: Arc<Usage>,
    ) -> App {
        App {
            ctx,
            bus,
            registry,
            cfg,
            usage,
            admin: None,
            grants: Arc::new(crate::grants::Live::new(
                Default::default(),
                crate::grants::SourceKind::None,
            )),
            feed_token: None,
            rls_metrics: None,
            connections: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
        }
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

pub(crate) type Body = Full<Bytes>;

pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": code, "message": message.into()}),
    )
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// The caller as Envoy's auth filter described it, with its token's
/// expiry; `Err` when a header is malformed (fail closed).
fn access(h: &HeaderMap, app: &App) -> Result<Access, String> {
    let names = &app.cfg.identity;
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let payload = match h.get(&names.claims) {
        Some(v) => {
            use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
            const B64URL: GeneralPurpose = GeneralPurpose::new(
                &base64::alphabet::URL_SAFE,
                general_purpose::NO_PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            let raw = B64URL
                .decode(v.as_bytes())
                .map_err(|e| format!("{}: not base64url: {e}", names.claims))?;
            Some(Bytes::from(raw))
        }
        None => None,
    };
    let policy = app.ctx.policy();
    let claims = match (&payload, policy.uses_claims()) {
        (Some(raw), true) => decode_claims(raw, policy.claim_roots())
            .map_err(|e| format!("{}: {e}", names.claims))?,
        _ => serde_json::Value::Null,
    };
    let expires = match h.get(&names.expires) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| format!("{}: not whole seconds since the epoch", names.expires))?,
        ),
        None => None,
    };
    let identity = Identity {
        subject: get(&names.subject),
        issuer: get(&names.issuer),
        tenant: get(&names.tenant),
        roles: get(&names.roles)
            .map(|r| Identity::parse_roles(&r))
            .unwrap_or_default(),
        claims,
    };
    let cfg = &app.ctx.cfg;
    // The skew the auth filter allowed this issuer, when the sidecar has
    // the same configuration; else --clock-skew.
    let skew = app
        .ctx
        .verifier
        .as_ref()
        .zip(identity.issuer.as_deref())
        .and_then(|(v, iss)| v.skew_for(iss))
        .map_or(cfg.clock_skew, Duration::from_secs);
    Ok(Access::new(
        identity,
        payload,
        expires,
        skew,
        cfg.max_lifetime,
        app.ctx.clock.now_secs(),
    ))
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting, closes every WebSocket with 1001 and waits up to the drain
/// timeout for connections to finish.
/// Refusals at `--max-connections`: a line at most every 10 s.
static MAX_CONNECTIONS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);

pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    app.ctx.hub.start_writers(shutdown.clone());
    let tracker = TaskTracker::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, most likely: back off a
                        // little; logged when it starts and when it ends.
                        if !std::mem::replace(&mut failing, true) {
                            tracing::error!(error = %e, "http: accept failed; backing off");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if std::mem::take(&mut failing) {
                    tracing::info!("http: accepting again");
                }
                let _ = socket.set_nodelay(true);
                let app = app.clone();
                let tracker2 = tracker.clone();
                tracker.spawn(connection(socket, peer, app, tracker2));
            }
        }
    }
    drop(listener);
    app.shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(app.cfg.drain_timeout, tracker.wait()).await;
}

async fn connection(socket: TcpStream, peer: SocketAddr, app: Arc<App>, tracker: TaskTracker) {
    let service = {
        let app = app.clone();
        hyper::service::service_fn(move |req| {
            let app = app.clone();
            let tracker = tracker.clone();
            async move { Ok::<_, std::convert::Infallible>(route(req, peer, app, tracker).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(socket), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    app: Arc<App>,
    tracker: TaskTracker,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(&app),
        (&Method::GET, "/metrics") => {
            let format = Format::negotiate(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let mut r = Response::new(Full::new(Bytes::from(render_metrics(&app, format))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        (&Method::POST, "/v1/usage") => ingest(req, peer, app).await,
        (&Method::GET, "/v1/usage/rollups") => rollups(&req, peer, &app),
        (&Method::GET, "/ws") => upgrade(req, peer, app, tracker).await,
        (&Method::POST, p) if p.starts_with("/publish/") => publish(req, app).await,
        (_, p) if p.starts_with("/admin/") => crate::admin::route(req, &app).await,
        (_, p) if p.starts_with("/internal/") => crate::internal::route(req, &app),
        (_, "/ws" | "/healthz" | "/readyz" | "/metrics" | "/v1/usage" | "/v1/usage/rollups") => {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )
        }
        (_, p) if p.starts_with("/publish/") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// `/readyz`: the verdict, then each check on a line of its own. Not
/// ready while the bus is away, while shutting down, or while a configured
/// grants source has never been loaded (stale grants still serve).
fn readiness(app: &App) -> Response<Body> {
    let (bus, bus_line) = app.bus.readiness();
    let (grants, line) = app.grants.readiness();
    let stopping = app.shutdown.is_cancelled();
    let ready = bus && grants && !stopping;
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    body.push_str(&bus_line);
    body.push('\n');
    body.push_str(&line);
    body.push('\n');
    if stopping {
        body.push_str("server: shutting down\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    if !ready {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r
}

async fn upgrade(
    req: Request<Incoming>,
    peer: SocketAddr,
    app: Arc<App>,
    tracker: TaskTracker,
) -> Response<Body> {
    let h = req.headers();
    let accept = match ws::handshake(h) {
        Ok(a) => a,
        Err(refused) => {
            let status = StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut r = error(status, refused.code, refused.message);
            if let Some((name, value)) = refused.header {
                r.headers_mut()
                    .insert(name, header::HeaderValue::from_static(value));
            }
            return r;
        }
    };
    let proven = match crate::proof::check(&app, "ws", h, req.uri().query()).await {
        Ok(p) => p,
        Err(r) => {
            tracing::info!(peer = %peer, result = r.result, "ws: identity refused: {}", r.message);
            return unproven(r);
        }
    };
    let h = proven.as_ref().unwrap_or(h);
    let who = match access(h, &app) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "ws: identity headers refused");
            return error(StatusCode::FORBIDDEN, "invalid_identity", e);
        }
    };
    // Every line of the connection carries who and from where.
    let span = tracing::info_span!(
        "ws",
        peer = %peer,
        subject = who.identity.subject.as_deref().unwrap_or(""),
        tenant = who.identity.tenant.as_deref().unwrap_or(""),
    );
    // With a verifier, a connection that arrived without identity (the
    // auth filter let it through without a token) authenticates in-band.
    let needs_auth = app.ctx.verifier.is_some() && !h.contains_key(&app.cfg.identity.subject);
    let shutdown = app.shutdown.clone();
    tracker.spawn(
        async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "ws: the upgrade did not complete");
                    return;
                }
            };
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                tracing::error!("ws: the upgraded connection is not a TCP stream");
                return;
            };
            let stream = parts.io.into_inner();
            // Copy what hyper read past the request: its buffer (8 KiB or more)
            // must not stay pinned for the life of the connection.
            let leftover = parts.read_buf.to_vec();
            drop(parts.read_buf);
            let m = &app.ctx.hub.metrics;
            if app.connections.fetch_add(1, Ordering::AcqRel) >= app.cfg.max_connections {
                app.connections.fetch_sub(1, Ordering::AcqRel);
                m.closes.max_connections.inc();
                if let Some(more) = MAX_CONNECTIONS_LOG.allow() {
                    tracing::warn!(
                        max_connections = app.cfg.max_connections,
                        refused_since_last_line = more,
                        "ws: refused with 1013, --max-connections reached"
                    );
                }
                refuse(stream).await;
                return;
            }
            m.connections.inc();
            m.connections_opened.inc();
            let tenant = who
                .identity
                .tenant
                .clone()
                .unwrap_or_else(|| "anonymous".into());
            let usage = app.usage.stream_usage(&tenant);
            usage.connections.fetch_add(1, Ordering::Relaxed);
            usage.opened.fetch_add(1, Ordering::Relaxed);
            session::run(
                stream,
                leftover,
                who,
                needs_auth,
                app.ctx.clone(),
                shutdown,
                Some(usage.clone()),
            )
            .await;
            usage.connections.fetch_sub(1, Ordering::Relaxed);
            m.connections.dec();
            app.connections.fetch_sub(1, Ordering::AcqRel);
        }
        .instrument(span),
    );
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    hs.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Closes a connection over the limit: 1013, then hang up.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let frame = ws::close_frame(ws::close::TRY_AGAIN_LATER, "try again later");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn publish(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let name = req.uri().path().trim_start_matches("/publish/").to_string();
    let subject = match Subject::parse(&name) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()),
    };
    let proven = match crate::proof::check(&app, "publish", req.headers(), req.uri().query()).await
    {
        Ok(p) => p,
        Err(r) => return unproven(r),
    };
    let who = match access(proven.as_ref().unwrap_or(req.headers()), &app) {
        Ok(a) => a.identity,
        Err(e) => return error(StatusCode::FORBIDDEN, "invalid_identity", e),
    };
    let pattern = match Pattern::parse(&name) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()),
    };
    let rules = app.ctx.rules();
    let d = rules.evaluate(
        &who,
        &PolicyRequest::Channel {
            pattern: &pattern,
            action: ChannelAction::Publish,
        },
    );
    if !d.allowed {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "forbidden", "rule": d.rule}),
        );
    }
    let body = match read_body(req, app.cfg.max_publish_bytes, "a message").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let data = match serde_json::from_slice::<&serde_json::value::RawValue>(&body) {
        Ok(v) => Bytes::copy_from_slice(v.get().as_bytes()),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body must be one JSON value: {e}"),
            )
        }
    };
    match app.bus.publish(&subject, data).await {
        Ok(Some(seq)) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({"channel": name, "seq": seq}),
        ),
        Ok(None) => json(StatusCode::ACCEPTED, serde_json::json!({"channel": name})),
        Err(BusError::Hub(PublishError::ChannelLimit(n))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "channel_limit",
            format!("the channel limit ({n}) is reached"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        ),
    }
}

/// The registry and the usage families, in `format`.
pub fn render_metrics(app: &App, format: Format) -> String {
    let om = metrics::render(&app.registry);
    let mut out = match format {
        Format::OpenMetrics => om.strip_suffix("# EOF\n").unwrap_or(&om).to_string(),
        Format::Prometheus => crate::expo::to_prometheus(&om),
    };
    app.usage.render(&mut Writer {
        out: &mut out,
        format,
    });
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// The whole body, at most `limit` bytes: else 413 (or 400 if it could
/// not be read). `what` names it in the message.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    what: &str,
) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what} is at most {limit} bytes"),
            ))
        }
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body could not be read",
        )),
    }
}

/// 401 for identity without proof (`crate::proof`).
fn unproven(r: crate::proof::Refused) -> Response<Body> {
    let mut resp = error(StatusCode::UNAUTHORIZED, r.error, r.message);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"254carbon\""),
    );
    resp
}

const USAGE_SECRET_HEADER: &str = "x-usage-secret";

fn usage_forbidden() -> Response<Body> {
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        "usage endpoints take loopback peers, or the x-usage-secret header when a secret is set",
    )
}

/// `POST /v1/usage`: a batch in usage-core's format.
async fn ingest(req: Request<Incoming>, peer: SocketAddr, app: Arc<App>) -> Response<Body> {
    let u = &app.usage;
    let secret = req
        .headers()
        .get(USAGE_SECRET_HEADER)
        .map(|v| v.as_bytes().to_vec());
    if !u.authorized(Some(peer), secret.as_deref()) {
        tracing::warn!(peer = %peer, "usage: batch refused, not loopback and no valid x-usage-secret");
        return usage_forbidden();
    }
    let body = match read_body(req, u.max_batch_bytes(), "a batch").await {
        Ok(b) => b,
        Err(r) => {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                u.too_large();
            }
            return r;
        }
    };
    match u.ingest(&body).await {
        Ok(a) => json(
            StatusCode::OK,
            serde_json::json!({
                "batch": a.batch, "records": a.records, "metrics": a.metrics,
                "duplicate": a.duplicate,
            }),
        ),
        Err(IngestError::Bad(e)) => {
            tracing::warn!(peer = %peer, error = %e, "usage: batch refused");
            error(StatusCode::BAD_REQUEST, "invalid_batch", e)
        }
        Err(IngestError::Unavailable(e)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

/// `GET /v1/usage/rollups[?tenant=t]`: the per-minute rollups in memory.
fn rollups(req: &Request<Incoming>, peer: SocketAddr, app: &App) -> Response<Body> {
    let secret = req.headers().get(USAGE_SECRET_HEADER).map(|v| v.as_bytes());
    if !app.usage.authorized(Some(peer), secret) {
        return usage_forbidden();
    }
    let tenant = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("tenant="))
            .map(percent_decode)
    });
    json(StatusCode::OK, app.usage.rollups_json(tenant.as_deref()))
}

/// `%XX` and `+` decoded (query values) by the one decoder
/// (`filter_common::form`: bad escapes kept as they are), bytes that are
/// not UTF-8 replaced.
pub fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&filter_common::form::decode_bytes(s)).into_owned()
}
