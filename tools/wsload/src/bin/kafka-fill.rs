//! `kafka-fill`: makes a topic on a Kafka-protocol broker (loopback only)
//! unless it exists, and optionally fills it with curve updates, for the
//! fan-out bench's Kafka source (`scripts/bench-fanout.sh --buses`).
//!
//! ```sh
//! kafka-fill --brokers 127.0.0.1:19092 --topic t --partitions 3 --records 100000 --channels 1000
//! ```
//!
//! Records are keyed `C<i>` (i < `--channels`, round robin) and go to the
//! partition Kafka's default partitioner picks for the key (what the
//! sidecar's `partition_for` computes); values are ~200-byte JSON objects.

use clap::Parser;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use rskafka::record::Record;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "kafka-fill")]
struct Args {
    /// Broker address (must be in 127.0.0.0/8).
    #[arg(long)]
    brokers: std::net::SocketAddr,
    #[arg(long)]
    topic: String,
    /// Partitions of the topic when it is made.
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// Records to produce (0: only make the topic).
    #[arg(long, default_value_t = 0)]
    records: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000)]
    channels: u64,
    /// Records per produce call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

fn main() {
    let a = Args::parse();
    if !a.brokers.ip().is_loopback() {
        eprintln!("kafka-fill: --brokers must be a loopback address");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = rt.block_on(run(&a)) {
        eprintln!("kafka-fill: {e}");
        std::process::exit(1);
    }
}

async fn run(a: &Args) -> Result<(), String> {
    let brokers = vec![a.brokers.to_string()];
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match ClientBuilder::new(brokers.clone()).build().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let topics = client.list_topics().await.map_err(|e| e.to_string())?;
    let partitions = match topics.iter().find(|t| t.name == a.topic) {
        Some(t) => t.partitions.len(),
        None => {
            client
                .controller_client()
                .map_err(|e| e.to_string())?
                .create_topic(&a.topic, a.partitions, 1, 5_000)
                .await
                .map_err(|e| format!("create {}: {e}", a.topic))?;
            a.partitions as usize
        }
    };
    if a.records == 0 {
        return Ok(());
    }
    let mut parts = Vec::new();
    for p in 0..partitions as i32 {
        parts.push(
            client
                .partition_client(&a.topic, p, UnknownTopicHandling::Retry)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let t0 = Instant::now();
    let mut pending: Vec<Vec<Record>> = vec![Vec::new(); partitions];
    let pad = "x".repeat(120);
    for n in 0..a.records {
        let key = format!("C{}", n % a.channels.max(1));
        let p = sidecar::bus::kafka::partition_for(key.as_bytes(), partitions) as usize;
        let value = format!(
            r#"{{"n":{n},"price":{:.2},"pad":"{pad}"}}"#,
            50.0 + (n % 100) as f64 / 10.0
        );
        pending[p].push(Record {
            key: Some(key.into_bytes()),
            value: Some(value.into_bytes()),
            headers: BTreeMap::new(),
            timestamp: rskafka::chrono::DateTime::from_timestamp_millis(1_790_000_000_000)
                .unwrap_or_default(),
        });
        if pending[p].len() >= a.batch {
            let batch = std::mem::take(&mut pending[p]);
            parts[p]
                .produce(batch, Compression::NoCompression)
                .await
                .map_err(|e| format!("produce: {e}"))?;
        }
    }
    for (p, batch) in pending.into_iter().enumerate() {
        if !batch.is_empty() {
            parts[p]
                .produce(batch, Compression::NoCompression)
                .await
                .map_err(|e| format!("produce: {e}"))?;
        }
    }
    eprintln!(
        "kafka-fill: {} records to {} ({partitions} partitions) in {:.1} s",
        a.records,
        a.topic,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
