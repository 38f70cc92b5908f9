//! Throughput of the rate limit service against the real Redis: C
//! concurrent gRPC callers (one HTTP/2 connection each) send
//! `ShouldRateLimit` with one descriptor (a key per caller, a limit never
//! reached) for a fixed time; reports calls/s, latency percentiles, and the
//! CPU time per call of this process (callers and service) and of Redis.
//! Traffic stays on 127.0.0.1 and stops by itself.
//! `cargo bench -p sidecar --bench rls [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use bytes::{BufMut, Bytes, BytesMut};
use ratelimit_core::rls::{Descriptor, Request};
use sidecar::rls::limits::Limits;
use sidecar::rls::store::{Settings, Store};
use sidecar::rls::{serve, Metrics, Options, Service, PATH};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 2 } else { 10 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("254carbon-bench-{}|", std::process::id());
    // RLS_BENCH_CONNECTIONS: the Redis connections of every row instead.
    let fixed: Option<usize> = std::env::var("RLS_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok());
    // RLS_BENCH_BATCH: most hits per script call (1: one call per hit).
    let batch: usize = std::env::var("RLS_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(Settings::default().batch);
    let redis_pid = redis_pid();
    for (callers, conns) in [(1usize, 1usize), (16, 4), (64, 8)] {
        let conns = fixed.unwrap_or(conns);
        let (me, redis) = (cpu_us("self"), cpu_us(&redis_pid));
        let (rate, lat) = rt.block_on(run(callers, conns, batch, secs, &prefix));
        let calls = rate * secs as f64;
        let (me, redis) = (
            (cpu_us("self") - me) / calls,
            (cpu_us(&redis_pid) - redis) / calls,
        );
        println!(
            "{callers:>3} callers, {conns} Redis connections, batch {batch}: {rate:>8.0} calls/s, latency p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs; CPU per call: this process {me:.1} µs, Redis {redis:.1} µs",
            lat[0], lat[1], lat[2]
        );
    }
}

async fn run(
    callers: usize,
    conns: usize,
    batch: usize,
    secs: u64,
    prefix: &str,
) -> (f64, [f64; 3]) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let store = Store::new(&Settings {
        url: "127.0.0.1:6379".into(),
        connections: conns,
        batch,
        prefix: prefix.into(),
        ..Settings::default()
    })
    .unwrap();
    let service = Service::new(store, Limits::empty(), Options::default(), Metrics::new());
    tokio::spawn(serve(listener, Arc::new(service), async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..callers {
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            let mut client = client.ready().await.unwrap();
            let req = Request {
                domain: "bench".into(),
                descriptors: vec![Descriptor {
                    entries: vec![("caller".into(), c.to_string())],
                    limit: Some((1_000_000, 1)),
                }],
                hits_addend: 0,
            };
            let msg = req.encode();
            let mut framed = BytesMut::new();
            framed.put_u8(0);
            framed.put_u32(msg.len() as u32);
            framed.put_slice(&msg);
            let framed: Bytes = framed.freeze();
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let http_req = http::Request::builder()
                    .method("POST")
                    .uri(format!("http://{addr}{PATH}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
                client = client.ready().await.unwrap();
                let (resp, mut send) = client.send_request(http_req, false).unwrap();
                send.send_data(framed.clone(), true).unwrap();
                let resp = resp.await.unwrap();
                let mut body = resp.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                let trailers = body.trailers().await.unwrap().unwrap();
                assert_eq!(trailers.get("grpc-status").unwrap(), "0");
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let _ = stop.send(());
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (
        all.len() as f64 / secs as f64,
        [pct(0.5), pct(0.99), pct(0.999)],
    )
}

/// CPU time (user + system) of process `pid` so far, in µs.
fn cpu_us(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name's closing parenthesis: fields 3.. of proc(5).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks * 10_000.0
}

/// The Redis server's process id (`INFO server`), for its CPU time.
fn redis_pid() -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect("127.0.0.1:6379").unwrap();
    c.write_all(b"INFO server\r\n").unwrap();
    let mut buf = vec![0u8; 16384];
    let n = c.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap_or("0")
        .trim()
        .to_string()
}
