//! End to end, against the running local stack: the gateway on
//! 127.0.0.1:10000 (Envoy or the embedded dev proxy) with the dev identity
//! provider, the demo upstream, the sidecar and the publisher behind it.
//!
//! If something already answers on the gateway's address (`scripts/dev.sh`
//! running, with Envoy or without), the tests run against it; otherwise
//! they start the stack in-process from `envoy/envoy.yaml` (the embedded
//! proxy), on the same addresses. `E2E_REQUIRE_RUNNING=1` refuses to start
//! one (to be sure a real Envoy is what is tested). `E2E_KAFKA=host:port`
//! runs the stack started here on the Kafka bus with that broker (as
//! `scripts/dev.sh --kafka` does).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

const GATEWAY: &str = "127.0.0.1:10000";
const IDP: &str = "127.0.0.1:8090";
/// The grants of a stack started here: a fresh schema on the loopback
/// PostgreSQL (`E2E_GRANTS_POSTGRES` names another server).
const GRANTS_SCHEMA: &str = "devstack_e2e";

fn grants_postgres() -> String {
    std::env::var("E2E_GRANTS_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// Drops and creates the grants schema; the sidecar's conninfo for it.
fn fresh_grants_schema(rt: &tokio::runtime::Runtime) -> String {
    let pg = grants_postgres();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("grants PostgreSQL ({pg}): {e}"));
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {GRANTS_SCHEMA} CASCADE; CREATE SCHEMA {GRANTS_SCHEMA}"
        ))
        .await
        .unwrap();
    });
    format!("{pg} options='-c search_path={GRANTS_SCHEMA}'")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The stack: found running, or started once for all tests of this binary.
fn stack() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let gw: SocketAddr = GATEWAY.parse().unwrap();
        if TcpStream::connect_timeout(&gw, Duration::from_millis(300)).is_ok() {
            eprintln!("e2e: testing the stack already running on {GATEWAY}");
            return;
        }
        assert!(
            std::env::var("E2E_REQUIRE_RUNNING").is_err(),
            "E2E_REQUIRE_RUNNING is set and nothing listens on {GATEWAY}"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let grants = fresh_grants_schema(&rt);
            rt.block_on(async {
                let cfg = devstack::StackConfig {
                    root: root(),
                    gateway: root().join("envoy/envoy.yaml"),
                    proxy: true,
                    publish_every: Duration::from_millis(200),
                    sidecar_args: vec![format!("--grants-postgres={grants}")],
                    log_level: wasm_host::LogLevel::Warn,
                    kafka: std::env::var("E2E_KAFKA").ok().filter(|k| !k.is_empty()),
                };
                let shutdown = tokio_util::sync::CancellationToken::new();
                let r = devstack::start(&cfg, shutdown.clone()).await;
                let ok = r.is_ok();
                tx.send(r).unwrap();
                if ok {
                    // Lives as long as the test process.
                    std::future::pending::<()>().await;
                }
            });
        });
        rx.recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("starting the stack: {e}"));
        // Until the filters' first poll of the grants feed (a second),
        // the gateway answers 503 `unavailable`: wait for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _, body) = http(GATEWAY, "GET", "/healthz", &[]);
            if status != 503 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway still 503 after 20 s: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("e2e: started the stack in-process (embedded dev proxy)");
    });
}

/// One HTTP/1.1 request: (status, lower-cased headers, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    http_body(addr, method, path, headers, "")
}

/// [`http`] with a request body.
fn http_body(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn token(sub: &str, markets: &str) -> String {
    token_ttl(sub, markets, 600)
}

/// A token of the dev identity provider for `sub`, valid `ttl` seconds.
fn token_ttl(sub: &str, markets: &str, ttl: u64) -> String {
    stack();
    let (status, _, body) = http(
        IDP,
        "GET",
        &format!(
            "/dev/token?sub={sub}&tenant=acme&roles=trader&markets={markets}&ttl={ttl}&format=raw"
        ),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    body.trim().to_string()
}

fn get(
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    stack();
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = extra.to_vec();
    if let Some(b) = &bearer {
        h.push(("authorization", b));
    }
    http(GATEWAY, "GET", path, &h)
}

#[test]
fn no_token_gets_401_with_a_challenge() {
    let (status, h, body) = get("/api/v1/curves/EU-ETS/latest", None, &[]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        header(&h, "www-authenticate"),
        Some(r#"Bearer realm="254carbon""#)
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "invalid_token");
    let (status, h, _) = get("/api/v1/curves/EU-ETS/latest", Some("not.a.token"), &[]);
    assert_eq!(status, 401, "a malformed token");
    let challenge = header(&h, "www-authenticate")
        .unwrap_or_else(|| panic!("no www-authenticate for a malformed token: {h:?}"));
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
}

#[test]
fn a_valid_token_reaches_the_upstream_with_identity_headers() {
    let sub = unique("alice");
    let t = token(&sub, "EU-ETS,CAISO");
    let (status, _, body) = get(
        "/api/v1/curves/EU-ETS/latest",
        Some(&t),
        &[
            ("x-auth-subject", "mallory"),
            ("x-auth-tenant", "evil"),
            ("x-auth-roles", "admin"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let echo = &v["echo"];
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/v1/curves/EU-ETS/latest");
    assert_eq!(
        echo["headers"]["x-auth-subject"],
        json!(sub),
        "never the client's copy"
    );
    assert_eq!(echo["headers"]["x-auth-tenant"], "acme");
    assert_eq!(echo["headers"]["x-auth-roles"], "trader");
    assert_eq!(
        echo["headers"]["x-auth-issuer"],
        format!("http://{IDP}/realms/254carbon")
    );
    assert_eq!(v["market"], "EU-ETS");
}

#[test]
fn spoofed_identity_headers_never_reach_the_upstream_without_a_token_either() {
    // An instruments route needs a tenant: a forged one must not open it.
    let (status, _, body) = get(
        "/api/v1/instruments/all",
        None,
        &[("x-auth-subject", "mallory"), ("x-auth-tenant", "evil")],
    );
    assert_eq!(status, 401, "{body}");
}

#[test]
fn an_unentitled_market_gets_403() {
    let t = token(&unique("bob"), "EU-ETS");
    let (status, h, body) = get("/api/v1/curves/PJM/latest", Some(&t), &[]);
    assert_eq!(status, 403, "{body}");
    assert_eq!(header(&h, "content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "forbidden");
    assert!(v["rule"].is_string());
}

#[test]
fn over_the_limit_gets_429_with_its_headers() {
    let t = token(&unique("carol"), "EU-ETS");
    let mut limited = None;
    for i in 0..60 {
        let (status, h, body) = get("/api/v1/curves/EU-ETS/history", Some(&t), &[]);
        match status {
            200 => continue,
            429 => {
                limited = Some((i, h, body));
                break;
            }
            s => panic!("request {i}: {s} {body}"),
        }
    }
    let (i, h, body) = limited.expect("no 429 within 60 requests");
    assert!(i >= 10, "limited after only {i} requests");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "rate_limited");
    let retry_after =
        header(&h, "retry-after").unwrap_or_else(|| panic!("a 429 without retry-after: {h:?}"));
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "retry-after {retry_after:?}, expected whole seconds >= 1"
    );
    assert!(header(&h, "ratelimit-policy").is_some(), "{h:?}");
    assert!(header(&h, "ratelimit").is_some(), "{h:?}");
    assert_eq!(header(&h, "x-ratelimit-remaining"), Some("0"));
}

async fn ws(
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://{GATEWAY}/ws?access_token={token}");
    let req = url.into_client_request().unwrap();
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("websocket upgrade through {GATEWAY}/ws: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `v` as a text frame; `what` names it in a failure.
async fn send_json(ws: &mut Ws, v: Value, what: &str) {
    ws.send(Message::text(v.to_string()))
        .await
        .unwrap_or_else(|e| panic!("sending {what}: {e}"));
}

/// The next text frame, as JSON; `what` names the frame awaited.
async fn next_json(ws: &mut Ws, what: &str) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap_or_else(|_| panic!("waiting for {what}: no frame within 10 s"))
            .unwrap_or_else(|| panic!("waiting for {what}: the connection closed"))
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        if let Message::Text(t) = m {
            return serde_json::from_str(&t)
                .unwrap_or_else(|e| panic!("waiting for {what}: not JSON ({e}): {t}"));
        }
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_websocket_subscription_gets_the_snapshot_then_live_updates() {
    let t = token(&unique("dave"), "EU-ETS");
    run(async {
        let ch = "pricing.curves.EU-ETS.DEC26";
        // The publisher writes every channel at least once a second; until
        // it first has, the snapshot is empty (a stack just started): then
        // subscribe again on a new connection, bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut attempts = 0;
        let (mut ws, sub) = loop {
            attempts += 1;
            let mut ws = ws(&t).await;
            send_json(
                &mut ws,
                json!({"type": "subscribe", "id": 7, "channels": [ch]}),
                &format!("the subscribe to {ch}"),
            )
            .await;
            let sub = next_json(&mut ws, "the subscribed frame").await;
            assert_eq!(sub["type"], "subscribed", "{sub}");
            assert_eq!(sub["id"], 7, "{sub}");
            let empty = sub["snapshot"]
                .as_array()
                .unwrap_or_else(|| panic!("no snapshot array: {sub}"))
                .is_empty();
            if !empty {
                break (ws, sub);
            }
            assert!(
                Instant::now() < deadline,
                "the snapshot of {ch} still empty after {attempts} subscriptions in 10 s: \
                 the publisher has not written it"
            );
            let _ = ws.close(None).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let snap = sub["snapshot"].as_array().unwrap();
        assert_eq!(snap.len(), 1, "{sub}");
        assert_eq!(snap[0]["channel"], ch, "{sub}");
        let seq0 = snap[0]["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("a snapshot entry without seq: {sub}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < 2 {
            assert!(
                Instant::now() < deadline,
                "only {got} of 2 live messages on {ch} after seq {seq0} within 10 s"
            );
            let m = next_json(&mut ws, &format!("live message {} on {ch}", got + 1)).await;
            if m["type"] == "message" {
                assert_eq!(m["channel"], ch, "{m}");
                assert!(
                    m["seq"].as_u64().is_some_and(|seq| seq > seq0),
                    "a live message not after the snapshot's seq {seq0}: {m}"
                );
                got += 1;
            }
        }
    });
}

#[test]
fn an_unentitled_channel_gets_an_error_frame() {
    let t = token(&unique("erin"), "EU-ETS");
    run(async {
        let mut ws = ws(&t).await;
        send_json(
            &mut ws,
            json!({"type": "subscribe", "id": "x", "channels": ["pricing.curves.PJM.DEC26"]}),
            "the subscribe",
        )
        .await;
        let mut error = None;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let m = next_json(&mut ws, "the error frame for PJM").await;
            if m["type"] == "error" {
                error = Some(m);
                break;
            }
            seen.push(m);
        }
        let e = error.unwrap_or_else(|| panic!("no error frame in the first 3: {seen:?}"));
        assert_eq!(e["code"], "forbidden", "{e}");
        assert_eq!(e["channel"], "pricing.curves.PJM.DEC26", "{e}");
        // The connection stays usable.
        send_json(
            &mut ws,
            json!({"type": "ping", "id": 2}),
            "the ping after the error",
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = next_json(&mut ws, "the pong after the error").await;
            if m["type"] == "pong" {
                assert_eq!(m["id"], 2, "{m}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no pong within 10 s after the error, last frame {m}"
            );
        }
    });
}

#[test]
fn a_websocket_with_a_bad_token_is_refused() {
    stack();
    let (status, h, _) = http(
        GATEWAY,
        "GET",
        "/ws?access_token=not-a-token",
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    );
    assert_eq!(status, 401, "a websocket upgrade with a bad token");
    assert!(header(&h, "www-authenticate").is_some(), "{h:?}");
}

const UPGRADE: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
];

#[test]
fn the_sidecar_takes_identity_headers_only_with_their_token() {
    stack();
    let sidecar = "127.0.0.1:8081";
    // Straight to the sidecar with made-up identity: refused (issue 26).
    let forged = [
        ("x-auth-subject", "mallory"),
        ("x-auth-tenant", "acme"),
        ("x-auth-roles", "trader,publisher"),
    ];
    let mut h: Vec<(&str, &str)> = UPGRADE.to_vec();
    h.extend(forged);
    let (status, _, body) = http(sidecar, "GET", "/ws", &h);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("identity_unproven"), "{body}");
    let (status, _, body) = http_body(
        sidecar,
        "POST",
        "/publish/pricing.curves.PJM.DEC26",
        &forged,
        "1",
    );
    assert_eq!(status, 401, "a forged publish: {body}");
    // A real token with another subject's headers: refused.
    let t = token(&unique("tia"), "EU-ETS");
    let bearer = format!("Bearer {t}");
    let mut h: Vec<(&str, &str)> = UPGRADE.to_vec();
    h.push(("authorization", &bearer));
    h.push(("x-auth-subject", "someone-else"));
    let (status, _, body) = http(sidecar, "GET", "/ws", &h);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("identity_mismatch"), "{body}");
    // (An expired token: sidecar/tests/inband.rs; here the dev provider's
    // 60 s clock skew would make the test wait a minute.)
    // Through the gateway, the same token is served.
    run(async {
        let mut w = ws(&t).await;
        send_json(
            &mut w,
            json!({"type": "subscribe", "id": 1, "channels": ["pricing.curves.EU-ETS.DEC26"]}),
            "subscribe",
        )
        .await;
        assert_eq!(next_json(&mut w, "subscribed").await["type"], "subscribed");
    });
}

/// The close frame's (code, reason), within `within`.
async fn close_of(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    within: Duration,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no close within {within:?}"));
        match m {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[test]
fn a_stream_closes_4001_when_its_token_expires() {
    // 3 s of token, the dev provider's 5 s of skew, an `expiring` first.
    let t = token_ttl(&unique("erin"), "EU-ETS", 3);
    run(async {
        let mut ws = ws(&t).await;
        let ch = "pricing.curves.EU-ETS.DEC26";
        send_json(
            &mut ws,
            json!({"type": "subscribe", "channels": [ch]}),
            "the subscribe",
        )
        .await;
        // The warning comes at once (less than the warning time is left),
        // then the subscription's frames, then the close.
        let started = tokio::time::Instant::now();
        let mut types = Vec::new();
        let (code, reason) = loop {
            let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
                .await
                .unwrap_or_else(|_| panic!("no close within 15 s; frames: {types:?}"));
            match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    types.push(v["type"].as_str().unwrap_or("?").to_string());
                }
                Some(Ok(Message::Close(Some(f)))) => {
                    break (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(_)) => {}
                other => panic!("expected frames and a close, got {other:?}"),
            }
        };
        assert_eq!(
            (code, reason.as_str()),
            (4001, "token expired"),
            "{types:?}"
        );
        assert_eq!(
            types.iter().filter(|t| *t == "expiring").count(),
            1,
            "{types:?}"
        );
        assert!(types.iter().any(|t| t == "subscribed"), "{types:?}");
        assert!(started.elapsed() < Duration::from_secs(15));
    });
}

#[test]
fn a_websocket_without_a_token_authenticates_in_band_and_refreshes() {
    let sub = unique("gina");
    let first = token_ttl(&sub, "EU-ETS", 600);
    let second = token_ttl(&sub, "EU-ETS", 1200);
    let other = token(&unique("mallory"), "EU-ETS");
    run(async {
        let url = format!("ws://{GATEWAY}/ws");
        let (mut ws, resp) = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
            .await
            .unwrap_or_else(|e| panic!("websocket upgrade without a token: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let ch = "pricing.curves.EU-ETS.DEC26";
        // Before auth: refused.
        send_json(
            &mut ws,
            json!({"type": "subscribe", "channels": [ch]}),
            "the subscribe",
        )
        .await;
        let e = next_json(&mut ws, "the unauthenticated error").await;
        assert_eq!(e["code"], "unauthenticated", "{e}");
        send_json(&mut ws, json!({"type": "auth", "token": first}), "the auth").await;
        let a = next_json(&mut ws, "authenticated").await;
        assert_eq!(a["type"], "authenticated", "{a}");
        send_json(
            &mut ws,
            json!({"type": "subscribe", "channels": [ch]}),
            "the subscribe",
        )
        .await;
        let s = next_json(&mut ws, "subscribed").await;
        assert_eq!(s["type"], "subscribed", "{s}");
        send_json(
            &mut ws,
            json!({"type": "refresh", "id": 1, "token": second}),
            "the refresh",
        )
        .await;
        loop {
            let v = next_json(&mut ws, "refreshed").await;
            if v["type"] == "refreshed" {
                assert!(
                    v["expires"].as_u64().unwrap() > a["expires"].as_u64().unwrap(),
                    "{v}"
                );
                break;
            }
            assert_eq!(v["type"], "message", "{v}");
        }
        send_json(
            &mut ws,
            json!({"type": "refresh", "token": other}),
            "the refresh",
        )
        .await;
        let (code, reason) = close_of(&mut ws, Duration::from_secs(10)).await;
        assert_eq!((code, reason.as_str()), (4003, "identity changed"));
    });
}

#[test]
fn requests_are_metered_in_the_sidecar() {
    let sub = unique("frank");
    let t = token(&sub, "CAISO");
    // The series is shared with the other tests (same tenant and route,
    // run in parallel): count from what it holds now.
    let metered = || {
        let (status, _, body) = http("127.0.0.1:8081", "GET", "/metrics", &[]);
        assert_eq!(status, 200, "the sidecar's /metrics: {body}");
        let n: u64 = body
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"usage_requests_total{tenant="acme",route="/api/v1/curves/{market}/latest",status_class="2xx"} "#)
            })
            .map_or(0, |v| {
                v.parse()
                    .unwrap_or_else(|e| panic!("usage_requests_total {v:?}: {e}"))
            });
        (n, body)
    };
    let (before, _) = metered();
    for i in 0..3 {
        let (status, _, body) = get("/api/v1/curves/CAISO/latest", Some(&t), &[]);
        assert_eq!(status, 200, "request {i}: {body}");
    }
    // The usage filter flushes every second; the sidecar aggregates.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n, body) = metered();
        if n >= before + 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s {} of the 3 requests metered ({before} before):\n{body}",
            n.saturating_sub(before)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A token of the dev identity provider with this tenant and roles.
fn token_as(sub: &str, tenant: &str, roles: &str, markets: &str) -> String {
    stack();
    let (status, _, body) = http(
        IDP,
        "GET",
        &format!(
            "/dev/token?sub={sub}&tenant={tenant}&roles={roles}&markets={markets}&ttl=600&format=raw"
        ),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    body.trim().to_string()
}

/// PUT or DELETE a grant through the gateway with an `access-admin` token.
fn grant(admin: &str, method: &str, tenant: &str, resource: &str, action: &str) -> (u16, String) {
    let body = json!({"tenant": tenant, "resource": resource, "action": action}).to_string();
    let bearer = format!("Bearer {admin}");
    let (status, _, answer) = http_body(
        GATEWAY,
        method,
        "/admin/v1/grants",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        &body,
    );
    (status, answer)
}

/// Polls `GET path` until it answers `want`, at most 5 s; the time it took.
fn until_status(path: &str, token: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _, body) = get(path, Some(token), &[]);
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{path}: still {status} after 5 s, not {want}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_grant_through_the_admin_api_opens_a_market_and_its_revoke_ends_the_stream() {
    let tenant = unique("grantee");
    let t = token_as(&unique("gina"), &tenant, "viewer", "EU-ETS");
    let path = "/api/v1/curves/CAISO/latest";
    let (status, _, body) = get(path, Some(&t), &[]);
    assert_eq!(status, 403, "no claim, no grant yet: {body}");
    // Without the role the admin API is refused at the gateway.
    let (status, answer) = grant(&t, "PUT", &tenant, "curves:CAISO", "read");
    assert_eq!(status, 403, "{answer}");

    let admin = token_as(&unique("sales"), "254carbon", "access-admin", "");
    for action in ["read", "subscribe"] {
        let (status, answer) = grant(&admin, "PUT", &tenant, "curves:CAISO", action);
        assert_eq!(status, 200, "PUT {action}: {answer}");
    }
    let took = until_status(path, &t, 200);
    eprintln!(
        "e2e: PUT → first request allowed in {} ms",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(3), "{took:?}");

    run(async {
        let mut ws = ws(&t).await;
        let ch = "pricing.curves.CAISO.>";
        send_json(
            &mut ws,
            json!({"type": "subscribe", "id": "g", "channels": [ch]}),
            "the subscribe to CAISO",
        )
        .await;
        let sub = next_json(&mut ws, "the subscribed frame").await;
        assert_eq!(sub["type"], "subscribed", "allowed by the grant: {sub}");

        for action in ["read", "subscribe"] {
            let (status, answer) = grant(&admin, "DELETE", &tenant, "curves:CAISO", action);
            assert_eq!(status, 200, "DELETE {action}: {answer}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = next_json(&mut ws, "the revoked frame").await;
            if m["type"] == "unsubscribed" {
                assert_eq!(m["reason"], "revoked", "{m}");
                assert_eq!(m["channels"], json!([ch]), "{m}");
                break;
            }
            assert!(Instant::now() < deadline, "no revoke within 5 s, last {m}");
        }
    });
    let took = until_status(path, &t, 403);
    assert!(took <= Duration::from_secs(3), "{took:?}");
}

/// A client frame: FIN, RSV bits, opcode, masked (with a key that changes
/// the bytes) unless `unmasked`, and the payload; `announce` puts another
/// length in the header than the payload's.
fn frame(
    fin: bool,
    rsv: u8,
    op: u8,
    payload: &[u8],
    unmasked: bool,
    announce: Option<u64>,
) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (rsv << 4) | op];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    let len = announce.unwrap_or(payload.len() as u64);
    if len < 126 {
        f.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        f.push(mask_bit | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(mask_bit | 127);
        f.extend_from_slice(&len.to_be_bytes());
    }
    if unmasked {
        f.extend_from_slice(payload);
    } else {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    f
}

/// A raw WebSocket through the gateway, after its `101`.
fn raw_ws(token: &str) -> TcpStream {
    let mut s = TcpStream::connect(GATEWAY).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET /ws?access_token={token} HTTP/1.1\r\nhost: {GATEWAY}\r\n");
    for (k, v) in UPGRADE {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "closed in the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Server frames until its close frame: (opcode, payload) of each; then
/// the connection must end.
fn frames_until_close(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse what is buffered (server frames are unmasked).
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, usize::from(buf[1] & 0x7f));
            let (len, at) = match len7 {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n, 2),
            };
            if buf.len() < at + len {
                break;
            }
            let payload = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            got.push((op, payload));
            if op == 8 {
                // After its close frame the server closes the connection.
                let n = s.read(&mut chunk).unwrap_or(0);
                assert_eq!(n, 0, "bytes after the close frame");
                return got;
            }
        }
        let n = s.read(&mut chunk).expect("a close frame within 10 s");
        assert!(n > 0, "closed without a close frame after {got:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn close_code(frames: &[(u8, Vec<u8>)]) -> u16 {
    let (_, p) = frames.last().unwrap();
    u16::from_be_bytes([p[0], p[1]])
}

#[test]
fn the_websocket_server_keeps_rfc_6455_s_failure_rules_through_the_gateway() {
    stack();
    let t = token(&unique("rfc"), "EU-ETS");
    let text = |s: &str| frame(true, 0, 1, s.as_bytes(), false, None);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "an unmasked client frame",
            frame(true, 0, 1, b"{}", true, None),
            1002,
        ),
        (
            "a reserved bit",
            frame(true, 0b100, 1, b"{}", false, None),
            1002,
        ),
        (
            "a reserved opcode",
            frame(true, 0, 3, b"", false, None),
            1002,
        ),
        (
            "a control frame over 125 bytes",
            frame(true, 0, 9, &[b'p'; 126], false, None),
            1002,
        ),
        (
            "a fragmented control frame",
            frame(false, 0, 9, b"p", false, None),
            1002,
        ),
        (
            "a continuation without a start",
            frame(true, 0, 0, b"x", false, None),
            1002,
        ),
        (
            "a close code that may not be sent",
            frame(true, 0, 8, &1005u16.to_be_bytes(), false, None),
            1002,
        ),
        (
            "a close reason that is not UTF-8",
            frame(true, 0, 8, &[0x03, 0xe8, 0xff, 0xfe], false, None),
            1007,
        ),
        (
            "text that is not UTF-8",
            frame(true, 0, 1, &[b'"', 0xc3, 0x28, b'"'], false, None),
            1007,
        ),
        (
            "UTF-8 split across fragments, invalid when joined",
            [
                frame(false, 0, 1, &[b'"', 0xe2, 0x82], false, None),
                frame(true, 0, 0, &[0x28, b'"'], false, None),
            ]
            .concat(),
            1007,
        ),
        (
            "a length far beyond the limit",
            frame(true, 0, 1, b"", false, Some(1 << 40)),
            1009,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_ws(&t);
        s.write_all(&bytes).unwrap();
        let got = frames_until_close(&mut s);
        assert_eq!(close_code(&got), want, "{what}: {got:?}");
    }
    // A ping between the fragments of a message is answered, and the
    // message still arrives whole (as a protocol reply).
    let mut s = raw_ws(&t);
    let msg = br#"{"type":"ping","id":"frag"}"#;
    let (a, b) = msg.split_at(10);
    s.write_all(
        &[
            frame(false, 0, 1, a, false, None),
            frame(true, 0, 9, b"hi", false, None),
            frame(true, 0, 0, b, false, None),
        ]
        .concat(),
    )
    .unwrap();
    s.write_all(&frame(true, 0, 8, &1000u16.to_be_bytes(), false, None))
        .unwrap();
    let got = frames_until_close(&mut s);
    assert_eq!(got[0], (10, b"hi".to_vec()), "the pong first: {got:?}");
    let reply: Value = serde_json::from_slice(&got[1].1).unwrap();
    assert_eq!(reply, json!({"type": "pong", "id": "frag"}));
    assert_eq!(close_code(&got), 1000);
    // And it keeps serving.
    let mut s = raw_ws(&t);
    s.write_all(&text(r#"{"type":"ping","id":1}"#)).unwrap();
    s.write_all(&frame(true, 0, 8, &1000u16.to_be_bytes(), false, None))
        .unwrap();
    let got = frames_until_close(&mut s);
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].1).unwrap()["type"],
        "pong"
    );
}

/// The sidecar is on the bus this run asks for: with `E2E_KAFKA` (the
/// broker `scripts/dev.sh --kafka` runs), Kafka, the demo curve updates
/// coming through the curve topic; else the embedded bus.
#[test]
fn the_sidecar_is_on_the_bus_asked_for() {
    stack();
    let kafka = std::env::var("E2E_KAFKA").is_ok_and(|k| !k.is_empty());
    let want = if kafka { "bus: ok (kafka)" } else { "bus: ok" };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = http("127.0.0.1:8081", "GET", "/readyz", &[]);
        if status == 200 && body.lines().any(|l| l == want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar's /readyz has no line {want:?} after 20 s: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if !kafka {
        return;
    }
    let series = "sidecar_kafka_consumed_total{topic=\"254carbon.pricing.curve.updates.v1\"}";
    let consumed = || {
        let (_, _, body) = http("127.0.0.1:8081", "GET", "/metrics", &[]);
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = consumed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumed() <= before {
        assert!(
            Instant::now() < deadline,
            "{series} still {before} after 10 s: the publisher's updates do not come from Kafka"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
