//! The WebSocket fan-out end to end over real sockets: protocol, entitlements,
//! limits, slow consumers, bad input, shutdown.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const EU: &str = "pricing.curves.EU-ETS.DEC26";

#[tokio::test]
async fn a_subscriber_gets_the_snapshot_then_live_updates() {
    let sc = start(&[]).await;
    assert_eq!(
        publish(sc.addr, EU, json!({"mid": 70.1})).await,
        (202, json!({"channel": EU, "seq": 1}))
    );
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "s1", "channels": ["pricing.curves.EU-ETS.>"]}),
    )
    .await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(sub["id"], "s1");
    assert_eq!(sub["channels"], json!(["pricing.curves.EU-ETS.>"]));
    assert_eq!(
        sub["snapshot"],
        json!([{"channel": EU, "seq": 1, "data": {"mid": 70.1}}])
    );
    publish_ok(sc.addr, EU, json!({"mid": 70.2})).await;
    publish_ok(sc.addr, "pricing.curves.CAISO.DEC26", json!({"mid": 1})).await;
    publish_ok(sc.addr, "pricing.curves.EU-ETS.DEC27", json!({"mid": 72})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "message", "channel": EU, "seq": 2, "data": {"mid": 70.2}})
    );
    assert_eq!(
        recv(&mut ws).await["channel"],
        "pricing.curves.EU-ETS.DEC27"
    );
    send(&mut ws, json!({"type": "ping", "id": 9})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong", "id": 9}));
    send(
        &mut ws,
        json!({"type": "unsubscribe", "id": "u", "channels": ["pricing.curves.EU-ETS.>"]}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "unsubscribed", "id": "u", "channels": ["pricing.curves.EU-ETS.>"]})
    );
    publish_ok(sc.addr, EU, json!({"mid": 70.3})).await;
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));
    let m = &sc.app.ctx.hub.metrics;
    assert_eq!(m.delivered.get(), 2);
    assert_eq!(m.subscriptions.get(), 0);
}

#[tokio::test]
async fn a_denied_channel_gets_an_error_and_the_connection_stays() {
    let sc = start(&[]).await;
    let mut ws = connect(sc.addr, &identity("bob", "viewer", &["CAISO"])).await;
    send(&mut ws, json!({"type": "subscribe", "id": 1, "channels": [EU, "pricing.curves.CAISO.>", "pricing.curves.*.DEC26"]})).await;
    let e1 = recv(&mut ws).await;
    assert_eq!(e1["type"], "error");
    assert_eq!(
        (e1["id"].clone(), e1["code"].clone(), e1["channel"].clone()),
        (json!(1), json!("forbidden"), json!(EU))
    );
    assert!(
        e1["message"].as_str().unwrap().contains("rule default"),
        "{e1}"
    );
    let e2 = recv(&mut ws).await;
    assert_eq!(
        (e2["code"].clone(), e2["channel"].clone()),
        (json!("forbidden"), json!("pricing.curves.*.DEC26"))
    );
    let ok = recv(&mut ws).await;
    assert_eq!(
        (ok["type"].clone(), ok["channels"].clone()),
        (json!("subscribed"), json!(["pricing.curves.CAISO.>"]))
    );
    // Without claims at all, nothing of the curves.
    let mut anon = connect(sc.addr, &[]).await;
    send(
        &mut anon,
        json!({"type": "subscribe", "channels": [EU, "open.news"]}),
    )
    .await;
    assert_eq!(recv(&mut anon).await["code"], "forbidden");
    assert_eq!(recv(&mut anon).await["channels"], json!(["open.news"]));
    assert_eq!(sc.app.ctx.hub.metrics.subscribe_denied.get(), 3);
}

#[tokio::test]
async fn bad_messages_get_error_frames_and_change_nothing() {
    let sc = start(&[]).await;
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    let cases = [
        ("not json", "bad_request"),
        ("[1,2,3]", "bad_request"),
        (r#"{"type":"subscribe","channels":[]}"#, "bad_request"),
        (
            r#"{"type":"subscribe","channels":["a"],"bogus":true}"#,
            "bad_request",
        ),
        (r#"{"type":"publish","channels":["a"]}"#, "unknown_type"),
        (
            r#"{"type":"subscribe","channels":["a..b"]}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channels":["a.>.b"]}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channels":["sp ace"]}"#,
            "invalid_channel",
        ),
    ];
    for (text, code) in cases {
        ws.send(Message::Text(text.into())).await.unwrap();
        let e = recv(&mut ws).await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!(code)),
            "{text}: {e}"
        );
    }
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));
    let m = &sc.app.ctx.hub.metrics;
    assert_eq!(m.client_errors.get(), cases.len() as u64);
    assert_eq!(m.subscriptions.get(), 0);
}

#[tokio::test]
async fn protocol_violations_close_with_a_code_and_reason() {
    let sc = start(&["--max-message-bytes", "1024"]).await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            frame(true, 2, b"\x00\x01"),
            1003,
            "binary messages are not supported",
        ),
        (frame(true, 1, &[b' '; 2000]), 1009, "message too big"),
        (frame(true, 1, &[0xc3, 0x28]), 1007, "text is not UTF-8"),
        (
            {
                let mut f = frame(true, 1, b"{}");
                f[1] &= 0x7f;
                f.truncate(2);
                f.extend_from_slice(b"{}");
                f
            },
            1002,
            "client frames must be masked",
        ),
        (frame(true, 5, b""), 1002, "unknown opcode"),
        (
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            1002,
            "reserved bits set",
        ),
    ];
    for (bytes, code, reason) in cases {
        let mut s = raw(sc.addr).await;
        s.write_all(&bytes).await.unwrap();
        let (_, got, why) = raw_until_close(&mut s).await;
        assert_eq!((got, why.as_str()), (code, reason));
        // Then the server hangs up.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    }
    // Other clients were never affected.
    let mut ws = connect(sc.addr, &[]).await;
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));
    assert!(sc.app.ctx.hub.metrics.closes.protocol_error.get() >= 5);
}

#[tokio::test]
async fn a_subscribe_flood_closes_the_connection() {
    let sc = start(&["--client-rate", "5", "--client-burst", "10"]).await;
    let mut ws = connect(sc.addr, &[]).await;
    for i in 0..50 {
        if ws
            .send(Message::Text(
                json!({"type": "subscribe", "id": i, "channels": [format!("open.c{i}")]})
                    .to_string()
                    .into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, reason) = closed(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1008, "too many messages"));
    assert_eq!(sc.app.ctx.hub.metrics.closes.rate_limited.get(), 1);
    // Its subscriptions are gone with it.
    let m = sc.app.ctx.hub.metrics.clone();
    eventually("the closed connection's subscriptions removed", || {
        m.subscriptions.get() == 0
    })
    .await;
}

#[tokio::test]
async fn subscriptions_per_connection_are_bounded() {
    let sc = start(&["--max-subscriptions", "2"]).await;
    let mut ws = connect(sc.addr, &[]).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "channels": ["open.a", "open.b", "open.c"]}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["channel"].clone()),
        (json!("too_many_subscriptions"), json!("open.c"))
    );
    assert_eq!(recv(&mut ws).await["channels"], json!(["open.a", "open.b"]));
    // Subscribing again to what it has is fine.
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["open.a"]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_with_1013() {
    let sc = start(&["--max-connections", "2"]).await;
    let _a = connect(sc.addr, &[]).await;
    let _b = connect(sc.addr, &[]).await;
    let mut c = connect(sc.addr, &[]).await;
    assert_eq!(closed(&mut c).await, (1013, "try again later".to_string()));
    assert_eq!(sc.app.ctx.hub.metrics.closes.max_connections.get(), 1);
    assert_eq!(sc.app.connections(), 2);
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_the_others_get_everything() {
    let sc = start(&["--slow-policy", "close", "--queue-capacity", "8"]).await;
    let mut fast = connect(sc.addr, &[]).await;
    send(
        &mut fast,
        json!({"type": "subscribe", "channels": ["open.big"]}),
    )
    .await;
    recv(&mut fast).await;
    // The slow one subscribes and then never reads.
    let mut slow = raw(sc.addr).await;
    slow.write_all(&frame(
        true,
        1,
        br#"{"type":"subscribe","channels":["open.big"]}"#,
    ))
    .await
    .unwrap();
    let hub = sc.app.ctx.hub.clone();
    eventually("the slow client subscribed", || {
        hub.metrics.subscriptions.get() == 2
    })
    .await;
    let data = format!("\"{}\"", "x".repeat(60_000));
    let n = 600; // 36 MB: more than the socket buffers hold
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < n {
            let m = recv(&mut fast).await;
            seqs.push(m["seq"].as_u64().unwrap());
        }
        seqs
    });
    let subject = entitlements_core::channel::Subject::parse("open.big").unwrap();
    for _ in 0..n {
        hub.publish(&subject, data.clone().into()).unwrap();
        tokio::task::yield_now().await;
    }
    let seqs = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    assert_eq!(hub.metrics.closes.slow_consumer.get(), 1);
    assert!(hub.metrics.drops.slow_consumer.get() > 0);
    // The slow client finds the close frame after everything it had been sent.
    let (texts, code, reason) = raw_until_close(&mut slow).await;
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    assert_eq!(texts[0]["type"], "subscribed");
}

#[tokio::test]
async fn replay_since_after_a_reconnect() {
    let sc = start(&["--history-messages", "10"]).await;
    let who = identity("alice", "trader", &["EU-ETS"]);
    let mut ws = connect(sc.addr, &who).await;
    send(&mut ws, json!({"type": "subscribe", "channels": [EU]})).await;
    let sub = recv(&mut ws).await;
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    publish_ok(sc.addr, EU, json!(1)).await;
    assert_eq!(recv(&mut ws).await["seq"], 1);
    drop(ws);
    publish_ok(sc.addr, EU, json!(2)).await;
    publish_ok(sc.addr, EU, json!(3)).await;
    let mut ws = connect(sc.addr, &who).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": [EU], "since": {"epoch": epoch, "seq": {EU: 1}}}),
    )
    .await;
    let sub = recv(&mut ws).await;
    assert_eq!(
        (sub["recovered"].clone(), sub["snapshot"].clone()),
        (json!(true), json!([]))
    );
    assert_eq!(recv(&mut ws).await["data"], 2);
    assert_eq!(recv(&mut ws).await["data"], 3);
    // Another epoch: no replay, the current value instead.
    let mut ws = connect(sc.addr, &who).await;
    send(&mut ws, json!({"type": "subscribe", "channels": [EU], "since": {"epoch": "before-restart", "seq": {EU: 1}}})).await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["recovered"], false);
    assert_eq!(
        sub["snapshot"],
        json!([{"channel": EU, "seq": 3, "data": 3}])
    );
}

#[tokio::test]
async fn unanswered_pings_close_the_connection() {
    let sc = start_with(config(&[]), |c| {
        c.ping_interval = Duration::from_millis(300)
    })
    .await;
    let mut s = raw(sc.addr).await;
    // A raw client that never answers pings.
    let (_, code, reason) = raw_until_close(&mut s).await;
    assert_eq!((code, reason.as_str()), (1008, "ping timeout"));
    assert_eq!(sc.app.ctx.hub.metrics.closes.ping_timeout.get(), 1);
    // tungstenite answers them while it reads: that connection stays.
    let mut ws = connect(sc.addr, &[]).await;
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&mut ws, json!({"type": "ping"})).await;
        assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let sc = start_with(config(&[]), |c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ws = connect(sc.addr, &[]).await;
    assert_eq!(closed(&mut ws).await, (1000, "idle timeout".to_string()));
    assert_eq!(sc.app.ctx.hub.metrics.closes.idle.get(), 1);
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001() {
    let sc = start(&[]).await;
    let mut a = connect(sc.addr, &[]).await;
    let mut b = connect(sc.addr, &[]).await;
    send(&mut a, json!({"type": "subscribe", "channels": ["open.x"]})).await;
    recv(&mut a).await;
    sc.shutdown.cancel();
    assert_eq!(
        closed(&mut a).await,
        (1001, "server shutting down".to_string())
    );
    assert_eq!(
        closed(&mut b).await,
        (1001, "server shutting down".to_string())
    );
    tokio::time::timeout(Duration::from_secs(10), sc.done)
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(sc.addr).await.is_err());
    assert_eq!(sc.app.connections(), 0);
}

#[tokio::test]
async fn shutdown_spreads_the_closes_over_close_spread() {
    let sc = start(&["--close-spread", "2", "--drain-timeout", "8"]).await;
    let mut socks = Vec::new();
    for _ in 0..24 {
        socks.push(connect(sc.addr, &[]).await);
    }
    let t = std::time::Instant::now();
    sc.shutdown.cancel();
    // Each socket's close, as it arrives.
    let closes = futures_util::future::join_all(socks.iter_mut().map(|ws| async {
        let c = closed(ws).await;
        (c, t.elapsed())
    }))
    .await;
    let mut at: Vec<Duration> = closes
        .iter()
        .map(|(c, at)| {
            assert_eq!(*c, (1001, "server shutting down".to_string()));
            *at
        })
        .collect();
    at.sort();
    // Spread over the window, not all at once: the first quarter of the
    // sockets closed in the first half of it, the last quarter after it.
    assert!(at[5] < Duration::from_millis(1000), "{at:?}");
    assert!(at[18] > Duration::from_millis(1000), "{at:?}");
    assert!(at[23] < Duration::from_millis(4000), "{at:?}");
    tokio::time::timeout(Duration::from_secs(10), sc.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sc.app.connections(), 0);
}

#[tokio::test]
async fn publish_checks_its_input_and_the_policy() {
    let sc = start(&["--max-publish-bytes", "100"]).await;
    let publisher = identity("feed", "publisher", &[]);
    let trader = identity("alice", "trader", &["EU-ETS"]);
    type Case<'a> = (&'a str, &'a [(String, String)], &'a [u8], u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("/publish/open.a", &publisher, b"{\"ok\":1}", 202, ""),
        ("/publish/open.*", &publisher, b"1", 400, "invalid_channel"),
        ("/publish/a..b", &publisher, b"1", 400, "invalid_channel"),
        (
            "/publish/open.a",
            &publisher,
            b"{not json",
            400,
            "invalid_json",
        ),
        ("/publish/open.a", &publisher, b"1 2", 400, "invalid_json"),
        (
            "/publish/open.a",
            &publisher,
            &[b'1'; 200],
            413,
            "too_large",
        ),
        ("/publish/open.a", &trader, b"1", 403, "forbidden"),
        ("/publish/open.a", &[], b"1", 403, "forbidden"),
    ];
    for (path, who, body, status, code) in cases {
        let (got, text) = http(sc.addr, "POST", path, who, body).await;
        assert_eq!(got, status, "{path} {text}");
        if !code.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"], code, "{text}");
        }
    }
    assert_eq!(
        http(sc.addr, "GET", "/publish/open.a", &publisher, b"")
            .await
            .0,
        405
    );
    assert_eq!(http(sc.addr, "GET", "/nope", &[], b"").await.0, 404);
    // A plain GET on /ws asks for the upgrade.
    assert_eq!(http(sc.addr, "GET", "/ws", &[], b"").await.0, 426);
    // A malformed claims header fails closed.
    let bad = vec![("x-auth-claims".to_string(), "%%%".to_string())];
    assert_eq!(
        http(sc.addr, "POST", "/publish/open.a", &bad, b"1").await.0,
        403
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let sc = start(&[]).await;
    assert_eq!(
        http(sc.addr, "GET", "/healthz", &[], b"").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http(sc.addr, "GET", "/readyz", &[], b"").await,
        (
            200,
            "ready\nbus: ok\ngrants: ok, no source, version 0, 0 grants\n".to_string()
        )
    );
    let mut ws = connect(sc.addr, &[]).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["open.m"]}),
    )
    .await;
    recv(&mut ws).await;
    publish_ok(sc.addr, "open.m", json!(1)).await;
    recv(&mut ws).await;
    let (status, text) = http(sc.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    for line in [
        "sidecar_ws_connections 1",
        "sidecar_ws_connections_opened_total 1",
        "sidecar_ws_subscriptions 1",
        "sidecar_messages_published_total 1",
        "sidecar_messages_delivered_total 1",
        "sidecar_channels 1",
        "sidecar_messages_dropped_total{reason=\"coalesced\"} 0",
        "sidecar_ws_server_closes_total{reason=\"slow_consumer\"} 0",
        "sidecar_publish_to_send_seconds_count 1",
        "sidecar_bus_connected 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Prometheus text by default: counters named with _total, no # EOF.
    assert!(text
        .lines()
        .any(|l| l == "# TYPE sidecar_ws_connections_opened_total counter"));
    assert!(!text.contains("# EOF"));
    // Streaming usage per tenant, in the same registry.
    assert!(
        text.lines()
            .any(|l| l.starts_with("usage_ws_messages_total{tenant=") && l.ends_with(" 1")),
        "{text}"
    );
    let (status, om) = http(
        sc.addr,
        "GET",
        "/metrics",
        &[(
            "accept".to_string(),
            "application/openmetrics-text; version=1.0.0".to_string(),
        )],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(om
        .lines()
        .any(|l| l == "# TYPE sidecar_ws_connections_opened counter"));
    assert!(om.ends_with("# EOF\n"));
    assert_eq!(om.matches("# EOF").count(), 1);
}

#[tokio::test]
async fn a_slow_reader_gets_the_latest_value_of_each_channel() {
    let sc = start(&["--slow-policy", "coalesce", "--queue-capacity", "16"]).await;
    let mut slow = raw(sc.addr).await;
    slow.write_all(&frame(
        true,
        1,
        br#"{"type":"subscribe","channels":["open.a","open.b"]}"#,
    ))
    .await
    .unwrap();
    let hub = sc.app.ctx.hub.clone();
    eventually("the slow client subscribed to open.a and open.b", || {
        hub.metrics.subscriptions.get() == 2
    })
    .await;
    let data = format!("\"{}\"", "x".repeat(60_000));
    let (a, b) = (
        entitlements_core::channel::Subject::parse("open.a").unwrap(),
        entitlements_core::channel::Subject::parse("open.b").unwrap(),
    );
    // Far more than the socket buffers hold, while the client reads nothing.
    for _ in 0..400 {
        hub.publish(&a, data.clone().into()).unwrap();
        hub.publish(&b, data.clone().into()).unwrap();
        tokio::task::yield_now().await;
    }
    hub.publish(&a, "\"last-a\"".into()).unwrap();
    hub.publish(&b, "\"last-b\"".into()).unwrap();
    assert!(hub.metrics.drops.coalesced.get() > 0);
    assert_eq!(hub.metrics.closes.slow_consumer.get(), 0);
    // Now it reads: everything it gets is in order, and it ends with the
    // latest value of each channel.
    let mut last = std::collections::HashMap::new();
    let (mut got_a, mut got_b) = (false, false);
    let mut buf = Vec::new();
    while !(got_a && got_b) {
        let mut chunk = vec![0u8; 1 << 16];
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if buf.len() < 2 {
                break;
            }
            let (len, hl) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < hl + len {
                break;
            }
            let v: serde_json::Value = serde_json::from_slice(&buf[hl..hl + len]).unwrap();
            buf.drain(..hl + len);
            if v["type"] != "message" {
                continue;
            }
            let seq = v["seq"].as_u64().unwrap();
            let ch = v["channel"].as_str().unwrap().to_string();
            if let Some(prev) = last.insert(ch.clone(), seq) {
                assert!(seq > prev, "{ch}: {seq} after {prev}");
            }
            got_a |= v["data"] == "last-a";
            got_b |= v["data"] == "last-b";
        }
    }
    assert_eq!((last["open.a"], last["open.b"]), (401, 401));
}
