//! The Kafka bus against a real Kafka-protocol broker (tansu, one per test
//! on a free loopback port; tests/common/kafka.rs): records into channels
//! and the refusals, order per partition, the same `seq` on two replicas
//! and `since` across them, the snapshot at start, publishing through
//! Kafka, and the broker killed and started again mid-stream.

mod common;

use common::kafka::{create_topic, produce, Broker};
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CURVES: &str = "254carbon.pricing.curve.updates.v1";

struct Replica {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn replica(broker: &Broker, extra: &[&str]) -> Replica {
    let brokers = broker.addr();
    let topic = format!("{CURVES}=open.curves.{{key}}");
    let mut args = vec![
        "--bus",
        "kafka",
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--kafka-fetch-wait-ms",
        "100",
        "--kafka-timeout-ms",
        "1000",
        "--kafka-metadata-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let cfg = config(&args);
    let policy = entitlements_core::policy::Policy::from_json(POLICY.as_bytes()).unwrap();
    let shutdown = CancellationToken::new();
    let app = sidecar::app_with_bus(&cfg, policy, shutdown.clone())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sidecar::server::serve(listener, app, shutdown.clone()));
    Replica { addr, shutdown }
}

async fn ready(r: &Replica) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = http(r.addr, "GET", "/readyz", &[], b"").await;
        if status == 200 {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within 15 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(r: &Replica) -> String {
    http(r.addr, "GET", "/metrics", &[], b"").await.1
}

/// The value of the metric line that starts with `prefix` (0 if absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn subscribe(r: &Replica, channels: Value, since: Option<Value>) -> (Ws, Value) {
    let mut ws = connect(r.addr, &[]).await;
    let mut m = json!({"type": "subscribe", "id": "s", "channels": channels});
    if let Some(s) = since {
        m["since"] = s;
    }
    send(&mut ws, m).await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    (ws, sub)
}

/// The next `n` messages: (channel, seq, data).
async fn messages(ws: &mut Ws, n: usize) -> Vec<(String, u64, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), recv_any(ws))
            .await
            .unwrap_or_else(|_| panic!("within 10 s only {out:?}"));
        assert_eq!(m["type"], "message", "{m}");
        out.push((
            m["channel"].as_str().unwrap().to_string(),
            m["seq"].as_u64().unwrap(),
            m["data"].clone(),
        ));
    }
    out
}

#[tokio::test]
async fn records_become_channel_messages_and_bad_ones_are_counted() {
    let broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 2).await;
    let r = replica(&broker, &[]).await;
    ready(&r).await;
    let (mut ws, sub) = subscribe(&r, json!(["open.curves.>"]), None).await;
    assert_eq!(sub["snapshot"], json!([]));
    type KeyValue<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);
    // One more than --max-publish-bytes (65536) of JSON.
    let big = format!("\"{}\"", "x".repeat(65535));
    let bad: [KeyValue; 9] = [
        (None, Some(b"1")),
        (Some(b"\xff\xfe"), Some(b"1")),
        (Some(b"EUA"), None),
        (Some(b"EUA"), Some(b"not json")),
        (Some(b"EUA"), Some(b"\x00\x01")),
        (Some(b"a.*"), Some(b"1")),
        (Some(b"a b"), Some(b"1")),
        (Some(b"EUA"), Some(b"null")),
        (Some(b"EUA"), Some(big.as_bytes())),
    ];
    for (k, v) in bad {
        produce(&client, CURVES, 0, k, v).await;
    }
    let o = produce(
        &client,
        CURVES,
        0,
        Some(b"EU-ETS.DEC26"),
        Some(br#"{"mid":71.25}"#),
    )
    .await;
    let got = messages(&mut ws, 1).await;
    assert_eq!(
        got,
        vec![(
            "open.curves.EU-ETS.DEC26".to_string(),
            o as u64 + 1,
            json!({"mid": 71.25})
        )]
    );
    assert_eq!(o, 9, "the refused records took offsets 0–8");
    let m = metrics(&r).await;
    for (reason, n) in [
        ("no_key", 1.0),
        ("key_not_utf8", 1.0),
        ("no_value", 2.0),
        ("not_json", 2.0),
        ("invalid_channel", 2.0),
        ("too_large", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!("sidecar_kafka_dropped_total{{reason=\"{reason}\"}}")
            ),
            n,
            "{reason}: {m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            &format!("sidecar_kafka_consumed_total{{topic=\"{CURVES}\"}}")
        ),
        1.0
    );
    assert_eq!(metric(&m, "sidecar_kafka_connected "), 1.0, "{m}");
}

#[tokio::test]
async fn two_replicas_number_alike_and_since_recovers_on_the_other() {
    let broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 3).await;
    let a = replica(&broker, &[]).await;
    let b = replica(&broker, &[]).await;
    ready(&a).await;
    ready(&b).await;
    let (mut on_a, sub_a) = subscribe(&a, json!(["open.curves.>"]), None).await;
    let (mut on_b, sub_b) = subscribe(&b, json!(["open.curves.>"]), None).await;
    assert_eq!(sub_a["epoch"], sub_b["epoch"], "one epoch on both");
    assert!(sub_a["epoch"].as_str().unwrap().starts_with('k'));
    // Two keys on each of two partitions, interleaved.
    let mut want = Vec::new();
    for i in 0..10 {
        let (p, key) = [(0, "EUA.DEC26"), (1, "CAISO.DEC26"), (0, "UKA.DEC26")][i % 3];
        let o = produce(
            &client,
            CURVES,
            p,
            Some(key.as_bytes()),
            Some(json!({"i": i}).to_string().as_bytes()),
        )
        .await;
        want.push((format!("open.curves.{key}"), o as u64 + 1, json!({"i": i})));
    }
    let got_a = messages(&mut on_a, 10).await;
    let got_b = messages(&mut on_b, 10).await;
    // In order per partition (per channel here), the same numbers on both.
    for (got, name) in [(&got_a, "a"), (&got_b, "b")] {
        for ch in [
            "open.curves.EUA.DEC26",
            "open.curves.CAISO.DEC26",
            "open.curves.UKA.DEC26",
        ] {
            let mine: Vec<_> = got.iter().filter(|m| m.0 == ch).collect();
            let wanted: Vec<_> = want.iter().filter(|m| m.0 == ch).collect();
            assert_eq!(mine, wanted, "replica {name}, {ch}");
        }
    }
    // A client of A that saw EUA up to its second message reconnects to B.
    let eua: Vec<_> = want
        .iter()
        .filter(|m| m.0 == "open.curves.EUA.DEC26")
        .collect();
    let seen = eua[1].1;
    let since = json!({"epoch": sub_a["epoch"], "seq": {"open.curves.EUA.DEC26": seen}});
    let (mut again, sub) = subscribe(&b, json!(["open.curves.EUA.DEC26"]), Some(since)).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let replayed = messages(&mut again, eua.len() - 2).await;
    assert_eq!(
        replayed,
        eua[2..].iter().map(|m| (*m).clone()).collect::<Vec<_>>()
    );
    // Another epoch: the snapshot instead.
    let since = json!({"epoch": "k0000000000000000", "seq": {"open.curves.EUA.DEC26": seen}});
    let (_ws, sub) = subscribe(&b, json!(["open.curves.EUA.DEC26"]), Some(since)).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["snapshot"][0]["seq"], eua.last().unwrap().1, "{sub}");
}

#[tokio::test]
async fn a_restarted_replica_has_the_last_values_before_it_is_ready() {
    let broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 2).await;
    // Older records of UKA, then three values of EUA on partition 0; CAISO
    // on partition 1.
    produce(&client, CURVES, 0, Some(b"UKA.DEC26"), Some(b"{\"mid\":1}")).await;
    for i in 0..3 {
        produce(
            &client,
            CURVES,
            0,
            Some(b"EUA.DEC26"),
            Some(json!({"mid": 70 + i}).to_string().as_bytes()),
        )
        .await;
    }
    let caiso = produce(
        &client,
        CURVES,
        1,
        Some(b"CAISO.DEC26"),
        Some(b"{\"mid\":40}"),
    )
    .await;
    let r = replica(&broker, &[]).await;
    let body = ready(&r).await;
    assert!(body.contains("bus: ok (kafka)"), "{body}");
    let (_ws, sub) = subscribe(&r, json!(["open.curves.>"]), None).await;
    let mut snap: Vec<(String, u64, Value)> = sub["snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().to_string(),
                c["seq"].as_u64().unwrap(),
                c["data"].clone(),
            )
        })
        .collect();
    snap.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        snap,
        vec![
            (
                "open.curves.CAISO.DEC26".to_string(),
                caiso as u64 + 1,
                json!({"mid": 40})
            ),
            ("open.curves.EUA.DEC26".to_string(), 4, json!({"mid": 72})),
            ("open.curves.UKA.DEC26".to_string(), 1, json!({"mid": 1})),
        ]
    );
    let m = metrics(&r).await;
    assert_eq!(metric(&m, "sidecar_kafka_snapshot_messages "), 5.0, "{m}");
    assert!(metric(&m, "sidecar_kafka_snapshot_seconds ") > 0.0, "{m}");

    // The bound: the last 2 records of each partition only.
    let bounded = replica(&broker, &["--kafka-snapshot-messages", "2"]).await;
    ready(&bounded).await;
    let (_ws, sub) = subscribe(&bounded, json!(["open.curves.>"]), None).await;
    let names: Vec<&str> = sub["snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{sub}");
    assert!(!names.contains(&"open.curves.UKA.DEC26"), "{sub}");

    // From the end: nothing old.
    let none = replica(&broker, &["--kafka-snapshot-messages", "0"]).await;
    ready(&none).await;
    let (_ws, sub) = subscribe(&none, json!(["open.curves.>"]), None).await;
    assert_eq!(sub["snapshot"], json!([]));
}

#[tokio::test]
async fn publishes_go_through_kafka_to_every_replica() {
    let broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 1).await;
    create_topic(&client, "254carbon.access.live.v1", 3).await;
    let extra = ["--kafka-bus-topic", "254carbon.access.live.v1"];
    let a = replica(&broker, &extra).await;
    let b = replica(&broker, &extra).await;
    ready(&a).await;
    ready(&b).await;
    let (mut on_a, _) = subscribe(&a, json!(["open.>"]), None).await;
    let (mut on_b, _) = subscribe(&b, json!(["open.>"]), None).await;
    let mut want = Vec::new();
    for i in 0..4 {
        let ch = format!("open.desk.{}", ["a", "b"][i % 2]);
        let (status, body) = publish(a.addr, &ch, json!({"n": i})).await;
        assert_eq!(status, 202, "{body}");
        want.push((ch, body["seq"].as_u64().unwrap(), json!({"n": i})));
    }
    for ws in [&mut on_a, &mut on_b] {
        let mut got = messages(ws, 4).await;
        got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
        let mut w = want.clone();
        w.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
        assert_eq!(got, w);
    }
    assert_eq!(
        metric(&metrics(&a).await, "sidecar_kafka_produced_total "),
        4.0
    );
    // Without a bus topic: refused, with the reason.
    let c = replica(&broker, &[]).await;
    ready(&c).await;
    let (status, body) = publish(c.addr, "open.desk.a", json!(1)).await;
    assert_eq!(status, 503);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("--kafka-bus-topic"),
        "{body}"
    );
}

#[tokio::test]
async fn the_broker_killed_and_back_loses_nothing_and_repeats_nothing() {
    let mut broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 2).await;
    create_topic(&client, "254carbon.access.live.v1", 1).await;
    let r = replica(&broker, &["--kafka-bus-topic", "254carbon.access.live.v1"]).await;
    ready(&r).await;
    let (mut ws, _) = subscribe(&r, json!(["open.curves.>"]), None).await;
    let key = |i: i32| [&b"EUA.DEC26"[..], b"CAISO.DEC26"][i as usize % 2];
    for i in 0..3 {
        produce(
            &client,
            CURVES,
            i % 2,
            Some(key(i)),
            Some(json!({"i": i}).to_string().as_bytes()),
        )
        .await;
    }
    let before = messages(&mut ws, 3).await;
    drop(client);

    broker.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = http(r.addr, "GET", "/readyz", &[], b"").await;
        if status == 503 {
            assert!(body.contains("kafka"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready 15 s after the broker died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = publish(r.addr, "open.desk.a", json!(1)).await;
    assert_eq!(status, 503, "{body}");
    // The WebSocket stays up.
    send(&mut ws, json!({"type": "ping", "id": 1})).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");

    broker.resume().await;
    ready(&r).await;
    let client = broker.client().await;
    for i in 3..6 {
        produce(
            &client,
            CURVES,
            i % 2,
            Some(key(i)),
            Some(json!({"i": i}).to_string().as_bytes()),
        )
        .await;
    }
    let after = messages(&mut ws, 3).await;
    let mut all: Vec<_> = before
        .iter()
        .chain(&after)
        .map(|m| m.2["i"].as_i64().unwrap())
        .collect();
    all.sort();
    assert_eq!(
        all,
        (0..6).collect::<Vec<_>>(),
        "each once: {before:?} {after:?}"
    );
    for ch in ["open.curves.EUA.DEC26", "open.curves.CAISO.DEC26"] {
        let seqs: Vec<u64> = before
            .iter()
            .chain(&after)
            .filter(|m| m.0 == ch)
            .map(|m| m.1)
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{ch}: in offset order"
        );
    }
    let m = metrics(&r).await;
    assert!(
        metric(&m, "sidecar_kafka_errors_total{op=\"fetch\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sidecar_kafka_connected "), 1.0);
    // And nothing delivered twice after more time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), recv_any(&mut ws))
            .await
            .is_err(),
        "a message after the last one"
    );
}

/// A replica that began reading a partition after some of a channel's
/// records does not claim to recover a client that may have missed one of
/// them; a client that saw past where it began is recovered.
#[tokio::test]
async fn since_is_not_recovered_across_records_the_replica_never_read() {
    let broker = Broker::start().await;
    let client = broker.client().await;
    create_topic(&client, CURVES, 1).await;
    // EUA at offsets 0, 3, 6; UKA between.
    let mut eua = Vec::new();
    for i in 0..3 {
        let o = produce(
            &client,
            CURVES,
            0,
            Some(b"EUA.DEC26"),
            Some(json!({"mid": i}).to_string().as_bytes()),
        )
        .await;
        eua.push(o as u64 + 1);
        for _ in 0..2 {
            produce(&client, CURVES, 0, Some(b"UKA.DEC26"), Some(b"{\"mid\":1}")).await;
        }
    }
    // Offsets 0..=8; the replica reads the last 4 (from offset 5): EUA's
    // third record only.
    let r = replica(&broker, &["--kafka-snapshot-messages", "4"]).await;
    ready(&r).await;
    let (_ws, sub) = subscribe(&r, json!(["open.curves.UKA.DEC26"]), None).await;
    let epoch = sub["epoch"].clone();
    // Saw EUA's first record (seq 1): its second (seq 4) is not here.
    let since = json!({"epoch": epoch, "seq": {"open.curves.EUA.DEC26": eua[0]}});
    let (_ws, sub) = subscribe(&r, json!(["open.curves.EUA.DEC26"]), Some(since)).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["snapshot"][0]["seq"], eua[2], "{sub}");
    // Saw up to offset 5 (seq 6 ≥ where the replica began): nothing of
    // EUA is missing, its third record is replayed.
    let since = json!({"epoch": epoch, "seq": {"open.curves.EUA.DEC26": 5}});
    let (mut ws, sub) = subscribe(&r, json!(["open.curves.EUA.DEC26"]), Some(since)).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let got = messages(&mut ws, 1).await;
    assert_eq!(got[0].1, eua[2]);
}
