//! A sidecar in-process on 127.0.0.1:0 with a test policy, and clients:
//! a WebSocket one (tokio-tungstenite) and a raw one for bad frames.
#![allow(dead_code)]

pub mod kafka;
pub mod pg;
pub mod pg_tls;
pub mod proxy;
pub mod redis;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sidecar::config::Config;
use sidecar::server::App;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use tokio_util::sync::CancellationToken;

pub const POLICY: &str = r#"{
  "rules": [
    {"id": "curves-subscribe", "effect": "allow",
     "match": {"channel": "pricing.curves.{market}.>"},
     "when": [{"attr": "claims.entitlements.markets", "op": "contains", "capture": "market"}]},
    {"id": "publishers", "effect": "allow",
     "match": {"channel": ">", "actions": ["publish"]},
     "when": [{"attr": "roles", "op": "contains", "value": "publisher"}]},
    {"id": "open", "effect": "allow", "match": {"channel": "open.>"}}
  ]
}"#;

/// Runs `f` on a runtime of its own (2 workers), for a `#[test]` that
/// also calls blocking helpers (the PostgreSQL schema's).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A configuration of these flags; the identity headers of the tests are
/// trusted (`--identity-proof none`) unless the flags say otherwise.
pub fn config(args: &[&str]) -> Config {
    use clap::Parser;
    let mut all = vec!["sidecar", "--policy", "unused.json"];
    if !args.iter().any(|a| a.starts_with("--identity-proof")) {
        all.push("--identity-proof=none");
    }
    all.extend_from_slice(args);
    Config::parse_from(all)
}

pub struct Sidecar {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
}

/// Starts a sidecar with `config`; `tweak` may change the session limits.
pub async fn start_with(
    config: Config,
    tweak: impl FnOnce(&mut sidecar::session::SessionConfig),
) -> Sidecar {
    let policy = entitlements_core::policy::Policy::from_json(POLICY.as_bytes()).unwrap();
    let mut app = sidecar::app(&config, policy);
    let shutdown = CancellationToken::new();
    {
        let a = Arc::get_mut(&mut app).unwrap();
        let ctx = Arc::get_mut(&mut a.ctx).unwrap();
        tweak(&mut ctx.cfg);
        if let Some(v) = sidecar::load_verifier(&config, ctx.clock).unwrap() {
            v.metrics.register(&mut a.registry);
            v.start(shutdown.clone());
            ctx.verifier = Some(v);
        }
    }
    app.ctx
        .set_policy_document(sidecar::session::PolicyDocument::new(POLICY));
    sidecar::start_grants(&app, &config, shutdown.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let done = tokio::spawn(sidecar::server::serve(
        listener,
        app.clone(),
        shutdown.clone(),
    ));
    Sidecar {
        addr,
        app,
        shutdown,
        done,
    }
}

pub async fn start(args: &[&str]) -> Sidecar {
    start_with(config(args), |_| {}).await
}

/// The identity headers Envoy's auth filter would set.
pub fn identity(sub: &str, roles: &str, markets: &[&str]) -> Vec<(String, String)> {
    let claims = json!({"sub": sub, "entitlements": {"markets": markets}});
    vec![
        ("x-auth-subject".into(), sub.into()),
        (
            "x-auth-issuer".into(),
            "https://id.254carbon.test/realms/carbon".into(),
        ),
        ("x-auth-tenant".into(), "acme".into()),
        ("x-auth-roles".into(), roles.into()),
        (
            "x-auth-claims".into(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
        ),
    ]
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket, or the upgrade's refusal: its status and body.
pub async fn try_connect(
    addr: SocketAddr,
    headers: &[(String, String)],
) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("upgrade: {e}"),
    }
}

pub async fn connect(addr: SocketAddr, headers: &[(String, String)]) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text message as JSON (pings are answered by tungstenite),
/// waiting at most 5 s.
pub async fn recv(ws: &mut Ws) -> Value {
    tokio::time::timeout(Duration::from_secs(5), recv_any(ws))
        .await
        .expect("a message within 5 s")
}

/// The next text message as JSON, however long it takes (the caller
/// bounds the wait).
pub async fn recv_any(ws: &mut Ws) -> Value {
    loop {
        let m = ws
            .next()
            .await
            .expect("the connection open")
            .expect("a valid frame");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame (at most 10 s); its code and reason.
pub async fn closed(ws: &mut Ws) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), closed_any(ws))
        .await
        .expect("a close within 10 s")
}

/// Reads until the server's close frame, however long it takes (for
/// tokio's paused clock; the caller bounds the wait).
pub async fn closed_any(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

pub fn close_code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

/// One HTTP/1.1 request; status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, headers, body).await;
    (status, body)
}

/// One HTTP/1.1 request; status, the response head (lower-cased) and body.
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: sidecar\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_ascii_lowercase(), b.to_string()))
        .unwrap_or_default();
    (status, head, body)
}

pub async fn publish(addr: SocketAddr, channel: &str, data: Value) -> (u16, Value) {
    let (status, body) = http(
        addr,
        "POST",
        &format!("/publish/{channel}"),
        &identity("feed", "publisher", &[]),
        data.to_string().as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Reads an HTTP request head (through the blank line), for the small
/// document servers the tests run; `None` if the peer went away first.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut b = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&b[..n]),
        }
    }
    Some(req)
}

/// Publishes and checks the sidecar accepted it (202).
pub async fn publish_ok(addr: SocketAddr, channel: &str, data: Value) -> Value {
    let (status, body) = publish(addr, channel, data.clone()).await;
    assert_eq!(status, 202, "publish {data} to {channel}: {body}");
    body
}

/// Waits (up to 10 s, polling every 20 ms) until `f` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw connection after a successful upgrade, for hand-made frames.
pub async fn raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: sidecar\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        got.push(b[0]);
    }
    let head = String::from_utf8(got).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    s
}

#[allow(unused_imports)]
pub use sidecar::ws::client_frame as frame;

/// Reads server frames until a close; returns (texts before it, close code, reason).
pub async fn raw_until_close(s: &mut TcpStream) -> (Vec<Value>, u16, String) {
    let mut texts = Vec::new();
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
            .await
            .expect("a frame within 10 s")
            .expect("a frame, not EOF");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        match h[0] & 0x0f {
            1 => texts.push(serde_json::from_slice(&p).unwrap()),
            8 => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                return (texts, code, String::from_utf8(p[2..].to_vec()).unwrap());
            }
            _ => {}
        }
    }
}

/// Waits (up to 10 s, polling every 20 ms) until what `f` returns resolves
/// to true.
pub async fn eventually_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
