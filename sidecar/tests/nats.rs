//! The NATS bus against the real NATS server on 127.0.0.1:4222: replicas
//! sharing publishes, and NATS going away and coming back (through a proxy
//! the test cuts and restores).

mod common;

use common::proxy::TcpProxy;
use common::*;
use serde_json::json;
use sidecar::server::App;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NATS: &str = "127.0.0.1:4222";

fn prefix() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "test{:x}",
        RandomState::new().hash_one(std::time::SystemTime::now())
    )
}

async fn replica(nats_url: &str, prefix: &str) -> (SocketAddr, Arc<App>, CancellationToken) {
    let cfg = config(&[
        "--bus",
        "nats",
        "--nats-url",
        nats_url,
        "--nats-prefix",
        prefix,
    ]);
    let policy = entitlements_core::policy::Policy::from_json(POLICY.as_bytes()).unwrap();
    let shutdown = CancellationToken::new();
    let app = sidecar::app_with_bus(&cfg, policy, shutdown.clone())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sidecar::server::serve(
        listener,
        app.clone(),
        shutdown.clone(),
    ));
    (addr, app, shutdown)
}

/// Reads messages until every one of `want` has arrived (in any order) or
/// 5 s have passed; the failure names the replica, what is missing and
/// what came instead.
async fn expect_all(ws: &mut Ws, replica: &str, want: &[serde_json::Value]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while !want.iter().all(|w| got.contains(w)) {
        match tokio::time::timeout_at(deadline, recv_any(ws)).await {
            Ok(m) => got.push(m),
            Err(_) => {
                let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).collect();
                panic!("replica {replica}: within 5 s, missing {missing:?}; received {got:?}");
            }
        }
    }
    assert_eq!(got.len(), want.len(), "replica {replica}: {got:?}");
}

#[tokio::test]
async fn replicas_share_publishes_through_nats() {
    let p = prefix();
    let (a, _app_a, _sa) = replica(&format!("nats://{NATS}"), &p).await;
    let (b, app_b, _sb) = replica(&format!("nats://{NATS}"), &p).await;
    let mut on_a = connect(a, &[]).await;
    let mut on_b = connect(b, &[]).await;
    for ws in [&mut on_a, &mut on_b] {
        send(
            ws,
            json!({"type": "subscribe", "channels": ["open.curves.>"]}),
        )
        .await;
        assert_eq!(recv(ws).await["type"], "subscribed");
    }
    let (status, body) = publish(a, "open.curves.x", json!({"mid": 1})).await;
    assert_eq!(
        (status, body),
        (202, json!({"channel": "open.curves.x"})),
        "publish through replica A"
    );
    let (status, body) = publish(b, "open.curves.y", json!({"mid": 2})).await;
    assert_eq!(
        (status, body),
        (202, json!({"channel": "open.curves.y"})),
        "publish through replica B"
    );
    // Published through two replicas (two NATS connections): the server
    // may order them either way. Each is the first of its channel on every
    // replica, so seq 1 everywhere.
    let want = [
        json!({"type": "message", "channel": "open.curves.x", "seq": 1, "data": {"mid": 1}}),
        json!({"type": "message", "channel": "open.curves.y", "seq": 1, "data": {"mid": 2}}),
    ];
    for (who, ws) in [("A", &mut on_a), ("B", &mut on_b)] {
        expect_all(ws, who, &want).await;
    }
    // Something else on the subjects that is not JSON is dropped and counted.
    let raw = async_nats::connect(NATS).await.unwrap();
    raw.publish(format!("{p}.open.curves.z"), "not json".into())
        .await
        .unwrap();
    raw.publish(format!("{p}.open.curves.x"), "3".into())
        .await
        .unwrap();
    raw.flush().await.unwrap();
    let m = recv(&mut on_b).await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("open.curves.x"), json!(3))
    );
    assert_eq!(app_b.ctx.hub.metrics.bus_errors.get(), 1);
}

#[tokio::test]
async fn nats_going_away_and_coming_back() {
    let p = prefix();
    let proxy = TcpProxy::start(NATS).await;
    let (addr, app, _s) = replica(&format!("nats://{}", proxy.addr), &p).await;
    let m = app.ctx.hub.metrics.clone();
    let mut ws = connect(addr, &[]).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["open.a"]}),
    )
    .await;
    recv(&mut ws).await;
    assert_eq!(publish(addr, "open.a", json!(1)).await.0, 202);
    assert_eq!(recv(&mut ws).await["data"], 1);

    proxy.cut();
    eventually("the bus noticing", || m.bus_connected.get() == 0).await;
    let (status, body) = publish(addr, "open.a", json!(2)).await;
    assert_eq!(
        (status, body["error"].clone()),
        (503, json!("bus_unavailable"))
    );
    assert_eq!(http(addr, "GET", "/readyz", &[], b"").await.0, 503);
    // The WebSocket side is unaffected.
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));

    let _back = TcpProxy::start_at(proxy.addr, NATS).await;
    eventually("the reconnect", || m.bus_connected.get() == 1).await;
    assert!(m.bus_reconnects.get() >= 1);
    assert_eq!(http(addr, "GET", "/readyz", &[], b"").await.0, 200);
    // Resubscribed: publishes flow again.
    let mut got = None;
    for i in 3..50 {
        assert_eq!(publish(addr, "open.a", json!(i)).await.0, 202);
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(200), recv(&mut ws)).await {
            got = Some(v);
            break;
        }
    }
    let got = got.expect("a message after the reconnect");
    assert_eq!(got["channel"], "open.a");
}
