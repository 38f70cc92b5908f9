//! The embedded dev proxy: a stand-in for Envoy where Envoy is not
//! installed, **not a production proxy**. It listens where
//! `envoy/envoy.yaml`'s listener does, runs that file's wasm filters in
//! order through the host emulator (`wasm-host`, on wasmtime, two worker
//! VMs per filter, the wall clock), routes what they let through by the
//! file's routes to its clusters, and serves the filters' HTTP and gRPC
//! callouts to those clusters.
//!
//! One thread owns the emulator (as a worker thread owns its VMs in
//! Envoy); connections talk to it over a channel. Requests are buffered
//! whole (up to 8 MiB) before the filters see them; responses likewise.
//! WebSocket upgrades go through the filters as a request whose response
//! is the upstream's `101`, then bytes are spliced both ways.

use crate::gateway::Gateway;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use wasm_host::{Direction, Host, LogLevel, Message, PluginConfig, Stream, StreamOptions};

const MAX_BODY: usize = 8 << 20;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(15);

type Pairs = Vec<(String, Vec<u8>)>;

enum Cmd {
    Request {
        pairs: Pairs,
        body: Vec<u8>,
        peer: SocketAddr,
        reply: oneshot::Sender<Step>,
    },
    Upstream {
        id: u64,
        headers: Pairs,
        body: Vec<u8>,
        reply: oneshot::Sender<Step>,
    },
    Abort {
        id: u64,
    },
}

enum Step {
    /// Send this to the client: a local reply, or the response after the
    /// filters.
    Respond(Message),
    /// Send this to the upstream, then `Cmd::Upstream` with the answer.
    Forward(u64, Message),
}

struct Pending {
    stream: Stream,
    reply: Option<oneshot::Sender<Step>>,
    /// The request went out; waiting for (or passing) the response.
    upstream: bool,
}

/// The emulator's side: owns the host, the chain and the open streams.
fn driver(host: Host, chain: wasm_host::Chain, rx: mpsc::Receiver<Cmd>, min_level: LogLevel) {
    let mut streams: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let waiting = streams.values().any(|p| p.reply.is_some());
        let wait = if waiting {
            Duration::from_millis(1)
        } else {
            host.next_event_in()
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50))
        };
        let mut cmds = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(c) => cmds.push(c),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        cmds.extend(rx.try_iter());
        for cmd in cmds {
            match cmd {
                Cmd::Request {
                    pairs,
                    body,
                    peer,
                    reply,
                } => {
                    next_id += 1;
                    let stream = host.stream_with(
                        &chain,
                        StreamOptions {
                            source: peer.to_string(),
                            ..StreamOptions::default()
                        },
                    );
                    let refs: Vec<(&str, &str)> = pairs
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str(), std::str::from_utf8(v).ok()?)))
                        .collect();
                    stream.request_headers(&refs, body.is_empty());
                    if !body.is_empty() {
                        stream.request_body(&body, true);
                    }
                    streams.insert(
                        next_id,
                        Pending {
                            stream,
                            reply: Some(reply),
                            upstream: false,
                        },
                    );
                }
                Cmd::Upstream {
                    id,
                    headers,
                    body,
                    reply,
                } => {
                    if let Some(p) = streams.get_mut(&id) {
                        let status: u16 = headers
                            .iter()
                            .find(|(k, _)| k == ":status")
                            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                            .unwrap_or(502);
                        let rest: Vec<(&str, &str)> = headers
                            .iter()
                            .filter(|(k, _)| !k.starts_with(':'))
                            .filter_map(|(k, v)| Some((k.as_str(), std::str::from_utf8(v).ok()?)))
                            .collect();
                        p.stream.respond(status, &rest, &body);
                        p.reply = Some(reply);
                    }
                }
                Cmd::Abort { id } => {
                    if let Some(p) = streams.remove(&id) {
                        if !p.stream.is_complete() {
                            p.stream.reset();
                        }
                    }
                }
            }
        }
        host.run_until_idle();
        let mut done = Vec::new();
        for (id, p) in streams.iter_mut() {
            if p.reply.is_none() {
                continue;
            }
            let step = if p.stream.is_complete() {
                p.stream.response().map(Step::Respond)
            } else if !p.upstream && p.stream.paused_at(Direction::Request).is_none() {
                p.stream.upstream_request().map(|m| Step::Forward(*id, m))
            } else {
                None
            };
            let Some(step) = step else { continue };
            if matches!(step, Step::Forward(..)) {
                p.upstream = true;
            } else {
                done.push(*id);
            }
            if let Some(r) = p.reply.take() {
                if r.send(step).is_err() {
                    done.push(*id);
                }
            }
        }
        for id in done {
            if let Some(p) = streams.remove(&id) {
                if !p.stream.is_complete() {
                    p.stream.reset();
                }
            }
        }
        let logs = host.logs();
        if !logs.is_empty() {
            host.clear_logs();
            for l in logs.iter().filter(|l| l.level >= min_level) {
                filter_log(l);
            }
        }
    }
}

/// A filter's log line as a tracing event (target `wasm`), with Envoy's
/// fields: the plugin, its root id and VM id.
fn filter_log(l: &wasm_host::LogRecord) {
    use wasm_host::LogLevel::*;
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "wasm",
                plugin = l.plugin.as_str(),
                root_id = l.root_id.as_str(),
                vm_id = l.vm_id.as_str(),
                "{}",
                l.message
            )
        };
    }
    match l.level {
        Trace => line!(trace),
        Debug => line!(debug),
        Info => line!(info),
        Warn => line!(warn),
        Error | Critical => line!(error),
    }
}

/// The proxy's handle: the gateway configuration and the driver.
pub struct Proxy {
    gateway: Gateway,
    tx: std::sync::Mutex<mpsc::Sender<Cmd>>,
}

impl Proxy {
    /// Loads the gateway's filters into a fresh emulator (the `.wasm`
    /// files must be built) and starts the driver thread.
    pub fn start(gateway: Gateway, log_level: LogLevel) -> Result<Arc<Proxy>, String> {
        let host = Host::builder()
            .workers(2)
            .real_clock(true)
            .log_level(LogLevel::Info)
            .build();
        for c in &gateway.clusters {
            if c.http2 {
                host.add_grpc_server(&c.name, c.addr);
            } else {
                host.add_http_cluster(&c.name, c.addr);
            }
        }
        let mut plugins = Vec::new();
        for f in &gateway.filters {
            if !f.file.is_file() {
                return Err(format!(
                    "filter {}: {} is missing (scripts/build-filters.sh builds it)",
                    f.name,
                    f.file.display()
                ));
            }
            let p = host
                .load(
                    PluginConfig::new(&f.file)
                        .name(&f.name)
                        .root_id(&f.root_id)
                        .vm_id(&f.vm_id)
                        .config(f.configuration.as_bytes().to_vec()),
                )
                .map_err(|e| format!("filter {}: {e}", f.name))?;
            plugins.push(p);
        }
        let refs: Vec<&wasm_host::Plugin> = plugins.iter().collect();
        let chain = host.chain(&refs);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("devproxy-emulator".into())
            .spawn(move || driver(host, chain, rx, log_level))
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Proxy {
            gateway,
            tx: std::sync::Mutex::new(tx),
        }))
    }

    fn send(&self, cmd: Cmd) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(cmd);
        }
    }

    async fn call(&self, make: impl FnOnce(oneshot::Sender<Step>) -> Cmd) -> Option<Step> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx));
        rx.await.ok()
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
}

/// Serves the proxy on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let proxy = proxy.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, peer, proxy).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

fn is_upgrade(h: &http::HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// Hop-by-hop headers Envoy does not pass on (the upgrade pair is kept
/// for WebSocket requests and 101 responses).
fn hop_by_hop(name: &str, upgrade: bool) -> bool {
    matches!(
        name,
        "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "host"
    ) || (!upgrade && (name == "connection" || name == "upgrade"))
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
) -> Response<Full<Bytes>> {
    let upgrade = is_upgrade(req.headers());
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n"),
    };
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost")
        .to_string();
    let mut pairs: Pairs = vec![
        (":method".into(), parts.method.as_str().as_bytes().to_vec()),
        (
            ":path".into(),
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes()
                .to_vec(),
        ),
        (":authority".into(), authority.into_bytes()),
        (":scheme".into(), b"http".to_vec()),
    ];
    for (k, v) in &parts.headers {
        if !hop_by_hop(k.as_str(), upgrade) {
            pairs.push((k.as_str().to_string(), v.as_bytes().to_vec()));
        }
    }
    let Some(step) = proxy
        .call(|reply| Cmd::Request {
            pairs,
            body,
            peer,
            reply,
        })
        .await
    else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "proxy stopped\n");
    };
    let (id, up) = match step {
        Step::Respond(m) => return to_response(&m, false),
        Step::Forward(id, m) => (id, m),
    };
    let path = up.header(":path").unwrap_or_else(|| "/".into());
    let cluster = proxy.gateway.route(&path).map(|c| c.addr);
    let answer = match (cluster, on_upgrade) {
        (None, _) => Ok((status_pairs(404, "text/plain"), Vec::new(), None)),
        (Some(addr), Some(on_upgrade)) => websocket(addr, &up, on_upgrade).await,
        (Some(addr), None) => forward(addr, &up).await.map(|(h, b)| (h, b, None)),
    };
    let (headers, body, splice) = match answer {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(path = %path, error = %e, "devproxy: upstream failed; 503");
            (
                status_pairs(503, "text/plain"),
                b"upstream connect error or disconnect/reset before headers\n".to_vec(),
                None,
            )
        }
    };
    let step = proxy
        .call(|reply| Cmd::Upstream {
            id,
            headers,
            body,
            reply,
        })
        .await;
    let Some(Step::Respond(m)) = step else {
        proxy.send(Cmd::Abort { id });
        return plain(StatusCode::BAD_GATEWAY, "no response\n");
    };
    let switching = m.status() == Some(101);
    if let (true, Some(s)) = (switching, splice) {
        tokio::spawn(s);
    }
    to_response(&m, switching)
}

fn status_pairs(status: u16, content_type: &str) -> Pairs {
    vec![
        (":status".into(), status.to_string().into_bytes()),
        ("content-type".into(), content_type.as_bytes().to_vec()),
    ]
}

fn to_response(m: &Message, upgrade: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(m.body.clone())));
    *r.status_mut() =
        StatusCode::from_u16(m.status().unwrap_or(502)).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in m.headers.iter() {
        if k.starts_with(':') || k == "content-length" || hop_by_hop(k, upgrade) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            r.headers_mut().append(n, v);
        }
    }
    r
}

/// The request head as HTTP/1.1 text, from the filtered message.
fn head(up: &Message, close: bool) -> Vec<u8> {
    let method = up.header(":method").unwrap_or_else(|| "GET".into());
    let path = up.header(":path").unwrap_or_else(|| "/".into());
    let authority = up.header(":authority").unwrap_or_default();
    let mut h = format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\n").into_bytes();
    for (k, v) in up.headers.iter() {
        if k.starts_with(':') || k == "content-length" || (close && k == "connection") {
            continue;
        }
        h.extend_from_slice(k.as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(v);
        h.extend_from_slice(b"\r\n");
    }
    if close {
        h.extend_from_slice(
            format!("content-length: {}\r\nconnection: close\r\n", up.body.len()).as_bytes(),
        );
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Reads a response head; returns (pairs with `:status`, bytes after it).
async fn read_head(s: &mut TcpStream) -> Result<(Pairs, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(buf.get(..end).unwrap_or(&[])).into_owned();
            let rest = buf.get(end + 4..).unwrap_or(&[]).to_vec();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .ok_or("no status line")?
                .to_string();
            let mut pairs: Pairs = vec![(":status".into(), status.into_bytes())];
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    pairs.push((k.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()));
                }
            }
            return Ok((pairs, rest));
        }
        if buf.len() > 64 * 1024 {
            return Err("response head too large".into());
        }
    }
}

/// One request to an HTTP/1.1 upstream, `connection: close`; the whole
/// response.
async fn forward(addr: SocketAddr, up: &Message) -> Result<(Pairs, Vec<u8>), String> {
    let go = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        s.write_all(&head(up, true))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(&up.body).await.map_err(|e| e.to_string())?;
        let (pairs, mut body) = read_head(&mut s).await?;
        let chunked = pairs
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
        let len: Option<usize> = pairs
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if len.is_some_and(|l| body.len() >= l) || body.len() > MAX_BODY {
                break;
            }
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
        if chunked {
            body = dechunk(&body);
        }
        if let Some(l) = len {
            body.truncate(l);
        }
        let pairs = pairs
            .into_iter()
            .filter(|(k, _)| k != "transfer-encoding" && k != "connection")
            .collect();
        Ok((pairs, body))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, go)
        .await
        .map_err(|_| "upstream timeout".to_string())?
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(b.get(..i).unwrap_or(&[]))
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(b.get(i + 2..i + 2 + size).unwrap_or(&[]));
        b = b.get(i + 4 + size..).unwrap_or(&[]);
    }
    out
}

type Splice = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Sends the upgrade request to the upstream and reads its answer; on
/// `101`, the splice to run once the client's side is upgraded.
async fn websocket(
    addr: SocketAddr,
    up: &Message,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Result<(Pairs, Vec<u8>, Option<Splice>), String> {
    let mut s = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    s.write_all(&head(up, false))
        .await
        .map_err(|e| e.to_string())?;
    let (pairs, rest) = read_head(&mut s).await?;
    let switching = pairs.first().is_some_and(|(_, v)| v.as_slice() == b"101");
    if !switching {
        // A refusal: its body is small; take what came with the head.
        return Ok((pairs, rest, None));
    }
    let splice: Splice = Box::pin(async move {
        let Ok(client) = on_upgrade.await else { return };
        let mut client = TokioIo::new(client);
        if !rest.is_empty() && client.write_all(&rest).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut s).await;
    });
    Ok((pairs, Vec::new(), Some(splice)))
}
