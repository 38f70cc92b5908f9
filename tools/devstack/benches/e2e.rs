//! The local stack end to end under load: requests/s and latency through
//! the gateway with the full filter chain (usage, auth with a cached token,
//! entitlements, ratelimit), against the same embedded proxy path with no
//! filters; the ratio is the chain's overhead.
//!
//! Starts the stack in-process on DESIGN.md's ports (they must be free:
//! stop `scripts/dev.sh` first), plus a second embedded proxy without
//! filters on an ephemeral port, both routing to the same demo upstream.
//! The ratelimit policy's rate is raised for the run so every request is
//! admitted (the code path is the same; a 429 would measure something
//! else). C keep-alive clients on loopback, windows sampled in turn.
//!
//! `cargo bench -p devstack --bench e2e [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use benchkit::{Plan, Row};
use devstack::gateway::Gateway;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 16;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (windows, window) = if quick {
        (3, Duration::from_millis(1000))
    } else {
        (7, Duration::from_millis(2500))
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    rt.block_on(async {
        // The stack, with the rate limit out of the way.
        let mut gw = Gateway::load(&root.join("envoy/envoy.yaml"), &root).unwrap();
        for f in gw.filters.iter_mut().filter(|f| f.name == "ratelimit") {
            let mut c: serde_json::Value = serde_json::from_str(&f.configuration).unwrap();
            for p in c["policies"].as_array_mut().unwrap() {
                p["rate"] = serde_json::json!({"requests": 1_000_000, "per": "second"});
                p["burst"] = serde_json::json!(1_000_000);
            }
            f.configuration = c.to_string();
        }
        let dir = benchkit::bench_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
        let file = dir.join("e2e-envoy.yaml");
        write_gateway(&root.join("envoy/envoy.yaml"), &gw, &file);
        let cfg = devstack::StackConfig {
            root: root.clone(),
            gateway: file,
            proxy: true,
            publish_every: Duration::from_secs(1),
            sidecar_args: vec![],
            log_level: wasm_host::LogLevel::Error,
            kafka: None,
        };
        let addrs = devstack::start(&cfg, shutdown.clone())
            .await
            .unwrap_or_else(|e| panic!("{e} (is scripts/dev.sh running? stop it first)"));
        // The same proxy path without filters.
        let mut bare = gw.clone();
        bare.filters.clear();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_addr = l.local_addr().unwrap();
        let p = devstack::proxy::Proxy::start(bare, wasm_host::LogLevel::Error).unwrap();
        tokio::spawn(devstack::proxy::serve(l, p, shutdown.clone()));

        let token = fetch_token(addrs.idp).await;
        let path = "/api/v1/curves/EU-ETS/latest";
        // Both answer 200 before measuring.
        for a in [addrs.gateway, bare_addr] {
            let mut c = Client::connect(a).await;
            assert_eq!(c.get(path, &token).await, 200, "{a}");
        }
        let targets = [("full chain", addrs.gateway), ("no filters", bare_addr)];
        let mut per_req: Vec<Vec<f64>> = vec![Vec::new(); 2];
        let mut p50: Vec<Vec<f64>> = vec![Vec::new(); 2];
        let mut p99: Vec<Vec<f64>> = vec![Vec::new(); 2];
        // Warm-up window each, then alternate.
        for (_, a) in targets {
            load(a, &token, path, window / 2).await;
        }
        for _ in 0..windows {
            for (i, (_, a)) in targets.iter().enumerate() {
                let (n, mut lat) = load(*a, &token, path, window).await;
                lat.sort_by(|a, b| a.total_cmp(b));
                per_req[i].push(window.as_secs_f64() * 1e6 / n.max(1) as f64);
                p50[i].push(pct(&lat, 0.50));
                p99[i].push(pct(&lat, 0.99));
            }
        }
        let mut rows = Vec::new();
        for (i, (name, _)) in targets.iter().enumerate() {
            rows.push(Row {
                name: format!(
                    "gateway, {name}: µs per request (1 / throughput, {CLIENTS} clients)"
                ),
                samples_us: per_req[i].clone(),
            });
        }
        for (i, (name, _)) in targets.iter().enumerate() {
            rows.push(Row {
                name: format!("gateway, {name}: latency p50 µs"),
                samples_us: p50[i].clone(),
            });
            rows.push(Row {
                name: format!("gateway, {name}: latency p99 µs"),
                samples_us: p99[i].clone(),
            });
        }
        println!(
            "{}",
            benchkit::table("Local stack end to end (embedded dev proxy)", &rows, &[1])
        );
        println!("| path | requests/s (from the median) |\n|---|---:|");
        for r in rows.iter().take(2) {
            println!("| {} | {:.0} |", r.name, 1e6 / r.median());
        }
        let plan = Plan {
            samples: windows,
            per_sample: 0,
        };
        if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "e2e", plan, &rows) {
            println!("wrote {p}");
        }
    });
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_millis(200));
}

/// `gw`'s filter configurations written back into a copy of `original`.
fn write_gateway(original: &std::path::Path, gw: &Gateway, out: &std::path::Path) {
    let mut v: serde_json::Value =
        serde_yaml::from_slice(&std::fs::read(original).unwrap()).unwrap();
    let filters = v
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .unwrap()
        .as_array_mut()
        .unwrap();
    for f in filters {
        let Some(name) = f
            .pointer("/typed_config/config/name")
            .and_then(|n| n.as_str())
        else {
            continue;
        };
        if let Some(g) = gw.filters.iter().find(|g| g.name == name) {
            *f.pointer_mut("/typed_config/config/configuration/value")
                .unwrap() = serde_json::Value::String(g.configuration.clone());
        }
    }
    std::fs::write(out, serde_yaml::to_string(&v).unwrap()).unwrap();
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn fetch_token(idp: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(idp).await.unwrap();
    s.write_all(
        b"GET /dev/token?sub=bench&tenant=acme&markets=EU-ETS&format=raw HTTP/1.1\r\nhost: idp\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.trim().to_string()
}

/// A keep-alive HTTP/1.1 client.
struct Client {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(a: SocketAddr) -> Client {
        let s = tokio::net::TcpStream::connect(a).await.unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            s,
            buf: vec![0; 64 * 1024],
        }
    }

    /// One GET; the status.
    async fn get(&mut self, path: &str, token: &str) -> u16 {
        let req =
            format!("GET {path} HTTP/1.1\r\nhost: api\r\nauthorization: Bearer {token}\r\n\r\n");
        self.s.write_all(req.as_bytes()).await.unwrap();
        let mut have = 0;
        loop {
            let n = self.s.read(&mut self.buf[have..]).await.unwrap();
            assert!(n > 0, "connection closed");
            have += n;
            if let Some(p) = self.buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..p])
                    .unwrap()
                    .to_ascii_lowercase();
                let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while have < p + 4 + len {
                    let n = self.s.read(&mut self.buf[have..]).await.unwrap();
                    assert!(n > 0);
                    have += n;
                }
                return status;
            }
        }
    }
}

/// `CLIENTS` clients for `d`: (requests answered 200, latencies µs).
async fn load(a: SocketAddr, token: &str, path: &str, d: Duration) -> (u64, Vec<f64>) {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let end = Instant::now() + d;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (lat, token, path) = (lat.clone(), token.to_string(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(a).await;
            let mut mine = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                let s = c.get(&path, &token).await;
                assert_eq!(s, 200);
                mine.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    (lat.len() as u64, lat)
}
