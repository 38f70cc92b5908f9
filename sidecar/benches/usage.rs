//! Usage ingestion throughput: records aggregated per second in memory,
//! and persisted per second to the real PostgreSQL on 127.0.0.1:5432.
//!
//! Batches of 1000 realistic records (50 tenants, 20 routes, statuses
//! mostly 2xx, durations spread over the histogram, all in the current
//! minute). Single-thread cases, sampled interleaved (benchkit): the
//! aggregation alone (`Agg::add`), parsing and validation alone, and
//! `Usage::ingest` in memory (parse, validate, dedup, rollup, aggregate).
//! Then over HTTP on loopback with C keep-alive clients: a sidecar in
//! memory, and a sidecar persisting to PostgreSQL (a fresh schema, dropped
//! afterwards). Figures are µs per 1000-record batch (min/median/max), and
//! records/s from the median. Bounded in time; traffic stays on 127.0.0.1.
//!
//! `cargo bench -p sidecar --bench usage [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use benchkit::{Plan, Row};
use sidecar::usage::agg::Agg;
use sidecar::usage::{Usage, UsageConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RECORDS: usize = 1000;

/// The records of one batch as JSON array items, joined.
fn records(seed: u64, now_ms: u64) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(RECORDS);
    for _ in 0..RECORDS {
        let r = next();
        let tenant = format!("tenant-{:02}", r % 50);
        let route = format!("/api/v1/curves/{{market}}/view{}", (r >> 8) % 20);
        let status = match (r >> 16) % 100 {
            0..=89 => 200,
            90..=94 => 404,
            95..=97 => 429,
            _ => 503,
        };
        let dur = 200 + (r >> 24) % 200_000;
        out.push(format!(
            r#"{{"tenant":"{tenant}","subject":"user-{}","route":"{route}","method":"GET","status":{status},"request_bytes":{},"response_bytes":{},"duration_us":{dur},"time_ms":{}}}"#,
            (r >> 32) % 500,
            (r >> 40) % 512,
            (r >> 44) % 65_536,
            now_ms - (r >> 50) % 1000
        ));
    }
    out.join(",")
}

fn body(id: &str, records: &str) -> String {
    format!(r#"{{"batch":"{id}","records":[{records}]}}"#)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = Plan::from_args(
        Plan {
            samples: 15,
            per_sample: 40,
        },
        Plan {
            samples: 5,
            per_sample: 10,
        },
    );
    let now = sidecar::usage::now_ms();
    let sets: Vec<String> = (0..8).map(|i| records(i + 1, now)).collect();
    let bodies: Vec<String> = sets
        .iter()
        .enumerate()
        .map(|(i, r)| body(&format!("fixed-{i}"), r))
        .collect();
    println!(
        "batches of {RECORDS} records, {} KiB each",
        bodies[0].len() / 1024
    );

    // Single-thread cases.
    let parsed: Vec<usage_core::wire::Batch<'_>> = bodies
        .iter()
        .map(|b| usage_core::wire::parse(b.as_bytes()).unwrap())
        .collect();
    let limits = UsageConfig::default().limits;
    let mut agg = Agg::new(limits);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let usage = Usage::in_memory(UsageConfig::default());
    let (mut i, mut j, mut k) = (0usize, 0usize, 0u64);
    let mut cases: Vec<benchkit::Case<'_>> = vec![
        (
            "aggregate (Agg::add), per 1000 records",
            Box::new(|| {
                agg.add(&parsed[i % parsed.len()]);
                i += 1;
            }),
        ),
        (
            "parse + validate, per 1000 records",
            Box::new(|| {
                let b = usage_core::wire::parse(bodies[j % bodies.len()].as_bytes()).unwrap();
                std::hint::black_box(&b);
                j += 1;
            }),
        ),
        (
            "ingest in memory (parse, dedup, rollup, aggregate), per 1000 records",
            Box::new(|| {
                k += 1;
                let b = body(&format!("m-{k}"), &sets[k as usize % sets.len()]);
                let a = rt.block_on(usage.ingest(b.as_bytes())).unwrap();
                assert!(!a.duplicate);
            }),
        ),
    ];
    let mut rows = benchkit::run(plan, &mut cases);
    drop(cases);

    // Over HTTP with concurrent clients.
    let windows = if quick { 3 } else { 5 };
    let window = Duration::from_millis(if quick { 700 } else { 2000 });
    let clients = 8;
    let mrt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rows.push(mrt.block_on(http_case(
        "HTTP, in memory, 8 clients, per 1000 records",
        &[],
        &sets,
        clients,
        windows,
        window,
    )));
    let schema = format!("usage_bench_{}", std::process::id());
    let admin = "host=127.0.0.1 port=5432 user=postgres dbname=test";
    mrt.block_on(exec(admin, &format!("CREATE SCHEMA {schema}")));
    let conninfo = format!("{admin} options='-c search_path={schema}'");
    let row = mrt.block_on(http_case(
        "HTTP, persisted to PostgreSQL, 8 clients, per 1000 records",
        &["--usage-postgres", &conninfo],
        &sets,
        clients,
        windows,
        window,
    ));
    let stored = mrt.block_on(count(&conninfo));
    mrt.block_on(exec(admin, &format!("DROP SCHEMA {schema} CASCADE")));
    rows.push(row);

    println!("{}", benchkit::table("Usage ingestion", &rows, &[0]));
    println!("| case | records/s (from the median) |\n|---|---:|");
    for r in &rows {
        println!("| {} | {:.0} |", r.name, RECORDS as f64 / r.median() * 1e6);
    }
    println!("\n(PostgreSQL: {stored} records in usage_batches after the run, all committed)");
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "usage", plan, &rows) {
        println!("wrote {p}");
    }
}

async fn exec(conninfo: &str, sql: &str) {
    let (c, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(sql).await.unwrap();
}

async fn count(conninfo: &str) -> i64 {
    let (c, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query_one(
        "SELECT coalesce(sum(records), 0)::int8 FROM usage_batches",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Runs a sidecar with `args`, then `clients` keep-alive clients posting
/// batches for `windows` windows; each window gives one sample (µs per
/// batch over all clients).
async fn http_case(
    name: &str,
    args: &[&str],
    sets: &[String],
    clients: usize,
    windows: usize,
    window: Duration,
) -> Row {
    use clap::Parser;
    let mut all = vec!["sidecar", "--policy", "unused.json"];
    all.extend_from_slice(args);
    let cfg = sidecar::config::Config::parse_from(all);
    let policy = entitlements_core::policy::Policy::from_json(
        br#"{"rules":[{"id":"open","effect":"allow","match":{"channel":"open.>"}}]}"#,
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = sidecar::app_with_bus(&cfg, policy, shutdown.clone())
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(sidecar::server::serve(l, app, shutdown.clone()));
    let done = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (done, stop) = (done.clone(), stop.clone());
        let sets: Vec<String> = sets.to_vec();
        tasks.push(tokio::spawn(async move {
            client(addr, c, &sets, &done, &stop).await;
        }));
    }
    // Warm up, then one sample per window.
    tokio::time::sleep(window / 2).await;
    let mut samples = Vec::new();
    for _ in 0..windows {
        let (t, n0) = (Instant::now(), done.load(Ordering::Relaxed));
        tokio::time::sleep(window).await;
        let n = done.load(Ordering::Relaxed) - n0;
        samples.push(t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64);
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    shutdown.cancel();
    Row {
        name: name.to_string(),
        samples_us: samples,
    }
}

/// Posts batches on one keep-alive connection until `stop`.
async fn client(
    addr: SocketAddr,
    c: usize,
    sets: &[String],
    done: &AtomicU64,
    stop: &tokio_util::sync::CancellationToken,
) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0usize;
    while !stop.is_cancelled() {
        n += 1;
        let b = body(
            &format!("h{}-{c}-{n}", std::process::id()),
            &sets[n % sets.len()],
        );
        let req = format!(
            "POST /v1/usage HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            b.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(b.as_bytes()).await.unwrap();
        // Read one response: headers, then content-length bytes.
        let mut have = 0usize;
        let (head_end, len) = loop {
            let r = s.read(&mut buf[have..]).await.unwrap();
            assert!(r > 0, "the sidecar closed the connection");
            have += r;
            if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..p]).unwrap();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                break (p + 4, len);
            }
        };
        while have < head_end + len {
            let r = s.read(&mut buf[have..]).await.unwrap();
            assert!(r > 0);
            have += r;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}
