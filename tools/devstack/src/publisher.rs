//! The demo publisher: every second, a curve update for a few channels,
//! posted to the sidecar (`POST /publish/pricing.curves.<market>.<tenor>`)
//! with a publisher identity: a token of the dev identity provider with
//! the role `publisher`, which the sidecar verifies itself (its
//! `--identity-proof token`), renewed well before it expires. With Kafka
//! ([`run_kafka`]) it produces the same updates to the curve topic
//! instead, keyed by market and contract, as 254Carbon's pricing service
//! does.

use crate::idp::{Idp, TokenRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const CHANNELS: [&str; 4] = [
    "pricing.curves.EU-ETS.DEC26",
    "pricing.curves.EU-ETS.DEC27",
    "pricing.curves.CAISO.DEC26",
    "pricing.curves.PJM.DEC26",
];

/// The curve updates' topic, and the sidecar's channels from it.
pub const CURVES_TOPIC: &str = "254carbon.pricing.curve.updates.v1";
pub const CURVES_TEMPLATE: &str = "pricing.curves.{key}";
/// Where the sidecar produces `POST /publish` on Kafka.
pub const BUS_TOPIC: &str = "254carbon.live.publish.v1";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The update body of `channel`'s `i`th channel at tick `n`.
fn update(i: usize, ch: &str, n: u64) -> String {
    let ts = now_ms();
    let price = 50.0 + i as f64 * 7.0 + ((n as f64) * 0.37 + i as f64).sin() * 2.0;
    format!(r#"{{"channel":"{ch}","price":{price:.2},"ts":{ts},"n":{n}}}"#)
}

/// The publisher's token lives an hour; a new one is minted after half.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

async fn post(sidecar: SocketAddr, token: &str, channel: &str, body: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(sidecar).await?;
    let req = format!(
        "POST /publish/{channel} HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let head = String::from_utf8_lossy(&out);
    Ok(head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Publishes every `every` until `shutdown`.
pub async fn run(sidecar: SocketAddr, idp: Arc<Idp>, every: Duration, shutdown: CancellationToken) {
    let mint = || {
        idp.token(&TokenRequest {
            sub: "demo-publisher".into(),
            tenant: None,
            roles: vec!["publisher".into()],
            markets: Vec::new(),
            ttl_s: TOKEN_TTL.as_secs(),
        })
    };
    let (mut token, mut minted) = (mint(), tokio::time::Instant::now());
    let mut tick = tokio::time::interval(every);
    let mut n = 0u64;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if minted.elapsed() > TOKEN_TTL / 2 {
            (token, minted) = (mint(), tokio::time::Instant::now());
        }
        for (i, ch) in CHANNELS.iter().enumerate() {
            let body = update(i, ch, n);
            match post(sidecar, &token, ch, &body).await {
                Ok(202) => warned = false,
                Ok(code) if !warned => {
                    tracing::warn!(
                        channel = ch,
                        status = code,
                        "publisher: the sidecar refused a publish"
                    );
                    warned = true;
                }
                Err(e) if !warned => {
                    tracing::warn!(channel = ch, error = %e, "publisher: cannot publish");
                    warned = true;
                }
                _ => {}
            }
        }
    }
}

/// Makes the curve topic (3 partitions) and the bus topic (1) unless they
/// exist, waiting up to 30 s for the brokers.
pub async fn kafka_topics(brokers: &str) -> Result<(), String> {
    let client = kafka_client(brokers, Duration::from_secs(30)).await?;
    let controller = client
        .controller_client()
        .map_err(|e| format!("kafka {brokers}: {e}"))?;
    for (topic, partitions) in [(CURVES_TOPIC, 3), (BUS_TOPIC, 1)] {
        let have = client
            .list_topics()
            .await
            .map_err(|e| format!("kafka {brokers}: {e}"))?;
        if have.iter().any(|t| t.name == topic) {
            continue;
        }
        controller
            .create_topic(topic, partitions, 1, 5_000)
            .await
            .map_err(|e| format!("kafka {brokers}: creating {topic}: {e}"))?;
    }
    Ok(())
}

async fn kafka_client(brokers: &str, wait: Duration) -> Result<rskafka::client::Client, String> {
    let list: Vec<String> = brokers.split(',').map(str::to_string).collect();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            rskafka::client::ClientBuilder::new(list.clone()).build(),
        )
        .await;
        match r {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("kafka {brokers}: {e}"))
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("kafka {brokers}: no answer"))
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Produces the updates to [`CURVES_TOPIC`], key `<market>.<contract>`
/// (the channel without `pricing.curves.`), to the partition Kafka's
/// default partitioner picks, every `every` until `shutdown`.
pub async fn run_kafka(brokers: String, every: Duration, shutdown: CancellationToken) {
    use rskafka::client::partition::{Compression, UnknownTopicHandling};
    let client = tokio::select! {
        _ = shutdown.cancelled() => return,
        c = kafka_client(&brokers, Duration::from_secs(3600)) => match c {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "publisher: no Kafka");
                return;
            }
        },
    };
    let mut parts = std::collections::HashMap::new();
    let mut count = 0usize;
    let mut tick = tokio::time::interval(every);
    let mut n = 0u64;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        // The partition count, looked up again only after a failure.
        if count == 0 {
            count = match client.list_topics().await {
                Ok(ts) => ts
                    .iter()
                    .find(|t| t.name == CURVES_TOPIC)
                    .map_or(0, |t| t.partitions.len()),
                Err(_) => 0,
            };
        }
        if count == 0 {
            if !warned {
                tracing::warn!(
                    topic = CURVES_TOPIC,
                    "publisher: the curve topic is not there"
                );
                warned = true;
            }
            continue;
        }
        let mut failed = false;
        for (i, ch) in CHANNELS.iter().enumerate() {
            let key = ch.trim_start_matches("pricing.curves.");
            let p = sidecar::bus::kafka::partition_for(key.as_bytes(), count);
            let pc = match parts.entry(p) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => match client
                    .partition_client(CURVES_TOPIC, p, UnknownTopicHandling::Error)
                    .await
                {
                    Ok(pc) => e.insert(pc),
                    Err(err) => {
                        failed = true;
                        if !warned {
                            tracing::warn!(error = %err, "publisher: cannot produce");
                            warned = true;
                        }
                        continue;
                    }
                },
            };
            let record = rskafka::record::Record {
                key: Some(key.as_bytes().to_vec()),
                value: Some(update(i, ch, n).into_bytes()),
                headers: std::collections::BTreeMap::new(),
                timestamp: rskafka::chrono::DateTime::from_timestamp_millis(now_ms())
                    .unwrap_or_default(),
            };
            match pc.produce(vec![record], Compression::NoCompression).await {
                Ok(_) => warned = false,
                Err(e) => {
                    failed = true;
                    parts.remove(&p);
                    if !warned {
                        tracing::warn!(error = %e, "publisher: cannot produce");
                        warned = true;
                    }
                }
            }
        }
        if failed {
            count = 0;
        }
    }
}
