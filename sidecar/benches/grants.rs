//! Grants at 254Carbon's size (issue 17): 500,000 grants (5,000 tenants
//! with 50 each, 50,000 subjects with 5 each) in the real PostgreSQL on
//! 127.0.0.1:5432 (a fresh schema, dropped afterwards), served by a real
//! sidecar on loopback to the entitlements filter in the host emulator
//! (2 worker VMs), as Envoy would load it.
//!
//! Figures:
//! - the first snapshot: time to load it into the Envoy, pages, bytes;
//! - memory per Envoy: shared data (keys and values, what every worker
//!   shares; Envoy adds its own per-entry overhead, estimated at 100 bytes
//!   a key) and the workers' linear memory before and after;
//! - a decision on a decision-cache miss: a `grant` condition (the holder
//!   cache warm, and off) against the claim condition (`in` on a 50-market
//!   claim) of today, same run, sampled in turn;
//! - one grant change: `PUT` (admin API) to the sidecar serving the new
//!   version, the filter's fetch and apply of the delta (bytes fetched),
//!   and to the first request decided with it; the filter polls every
//!   `refresh_interval_ms` (1 s), so a change waits up to that long more.
//!
//! `cargo bench -p sidecar --bench grants [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use benchkit::Plan;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wasm_host::{Chain, Host, Message, PluginConfig};

const PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
const TENANTS: usize = 5_000;
const PER_TENANT: usize = 50;
const SUBJECTS: usize = 50_000;
const PER_SUBJECT: usize = 5;
const SECRET: &str = "bench-admin";

/// One blocking HTTP/1.1 exchange: status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: sidecar\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..head_end]).to_string();
    let status = head[9..12].parse().unwrap();
    let mut body = out[head_end..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

fn feed_version(addr: SocketAddr) -> u64 {
    // A delta from far ahead is a 304 at once; a snapshot of one grant
    // would be too big: ask for the epoch's version with `limit=1`.
    let (status, body) = http(addr, "GET", "/internal/v1/grants?limit=1", &[], "");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["version"].as_u64().unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "min {:.2}, median {:.2}, max {:.2}",
        s[0],
        s[s.len() / 2],
        s[s.len() - 1]
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 2000,
        },
        Plan {
            samples: 8,
            per_sample: 300,
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The grants, in a fresh schema.
    let schema = format!("bench_grants_{}", std::process::id());
    let conninfo = format!("{PG} options='-c search_path={schema}'");
    let t = Instant::now();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(PG, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        drop(sidecar::grants::GrantStore::connect(&conninfo).await.unwrap());
        c.batch_execute(&format!(
            "SET search_path = {schema};
             INSERT INTO grants (holder_kind, holder, resource, action, created_by)
               SELECT 'tenant', 'tenant-' || (i / {PER_TENANT}), 'curves:M' || (i % {PER_TENANT}), 'read', 'bench'
               FROM generate_series(0, {} - 1) i;
             INSERT INTO grants (holder_kind, holder, resource, action, created_by)
               SELECT 'subject', 'user-' || (i / {PER_SUBJECT}), 'instruments:I' || (i % {PER_SUBJECT}), 'read', 'bench'
               FROM generate_series(0, {} - 1) i;",
            TENANTS * PER_TENANT,
            SUBJECTS * PER_SUBJECT
        ))
        .await
        .unwrap();
    });
    let total = TENANTS * PER_TENANT + SUBJECTS * PER_SUBJECT;
    println!(
        "seeded {total} grants in PostgreSQL in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The sidecar.
    let dir = std::env::temp_dir().join(format!("grants-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy_file = dir.join("policy.json");
    std::fs::write(&policy_file, r#"{"rules": []}"#).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let config: sidecar::config::Config = clap::Parser::parse_from([
        "sidecar",
        "--policy",
        policy_file.to_str().unwrap(),
        "--grants-postgres",
        &conninfo,
        "--admin-secret",
        SECRET,
    ]);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let t = Instant::now();
    rt.spawn(async move {
        if let Err(e) = sidecar::run(listener, config, stop).await {
            panic!("sidecar: {e}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(
                b"GET /internal/v1/grants?limit=1 HTTP/1.1\r\nhost: s\r\nconnection: close\r\n\r\n",
            );
            let mut b = [0u8; 12];
            if s.read_exact(&mut b).is_ok() && &b[9..12] == b"200" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar did not load the grants"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "sidecar up with the grants loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The filter, two workers, three configurations on one VM id (one
    // copy of the grants): the holder cache on, off; and the claim policy.
    let host = Host::builder().workers(2).build();
    host.add_http_cluster("sidecar", addr);
    let grants_cfg = |holder_cache: usize| {
        json!({
            "policy": {"default": "deny", "rules": [{
                "id": "curves-granted", "effect": "allow",
                "match": {"methods": ["GET"], "path": {"template": "/api/v1/curves/{market}/**"}},
                "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]}]},
            "grants": {"cluster": "sidecar", "refresh_interval_ms": 1000,
                       "holder_cache_entries": holder_cache},
            "cache": {"max_entries": 0}
        })
    };
    let claim_cfg = json!({
        "policy": {"default": "deny", "rules": [{
            "id": "curves-claimed", "effect": "allow",
            "match": {"methods": ["GET"], "path": {"template": "/api/v1/curves/{market}/**"}},
            "when": [{"attr": "claims.entitlements.markets", "op": "in", "capture": "market"}]}]},
        "cache": {"max_entries": 0}
    });
    let load = |name: &str, vm: &str, cfg: &Value| {
        host.load(
            PluginConfig::new(wasm_host::wasm_path("entitlements"))
                .name(name)
                .root_id(name)
                .vm_id(vm)
                .config_json(cfg),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let noop = host
        .load(PluginConfig::new(wasm_host::wasm_path("noop")).name("noop"))
        .unwrap();
    let warm = load("granted", "entitlements", &grants_cfg(4096));
    let mem_before: usize = (0..2).map(|w| warm.memory_size(w)).sum();
    let cold = load("granted-nocache", "entitlements", &grants_cfg(0));
    let claimed = load("claimed", "claims", &claim_cfg);

    // The first snapshot.
    let t = Instant::now();
    let mut polls = 0;
    while host.counter("wasmcustom.entitlements.grants.snapshots") == 0 {
        host.advance(Duration::from_millis(1000));
        while !host.wait_for_callouts(Duration::from_secs(30)) {}
        polls += 1;
        assert!(polls < 30, "no snapshot: {}", host.stats_text());
    }
    let load_s = t.elapsed().as_secs_f64();
    let pages = host.counter("wasmcustom.entitlements.grants.pages");
    let in_force = host.counter("wasmcustom.entitlements.grants.in_force");
    assert_eq!(in_force as usize, total);
    let shared = host.shared_data_bytes();
    let keys = host.shared_data_len();
    let mem_after: usize = (0..2).map(|w| warm.memory_size(w)).sum();
    println!(
        "first snapshot: {total} grants in {pages} pages, in force after {load_s:.2} s (incl. the sidecar's paging)"
    );
    println!(
        "memory per Envoy: shared data {:.1} MiB in {keys} keys (+ ~{:.1} MiB Envoy overhead at 100 B/key = {:.1} MiB); worker linear memory {:.1} → {:.1} MiB (2 workers)",
        shared as f64 / 1048576.0,
        keys as f64 * 100.0 / 1048576.0,
        (shared + keys * 100) as f64 / 1048576.0,
        mem_before as f64 / 1048576.0,
        mem_after as f64 / 1048576.0
    );

    // Decisions on a decision-cache miss.
    let markets: Vec<String> = (0..PER_TENANT).map(|i| format!("M{i}")).collect();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"entitlements": {"markets": markets}}).to_string());
    let upstream = |_: &Message| Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: Vec::new(),
        trailers: None,
    };
    let chains: Vec<Chain> = [&noop, &claimed, &warm, &cold]
        .iter()
        .map(|p| host.chain(&[p]).with_upstream(upstream))
        .collect();
    let tenants: Vec<String> = (0..TENANTS).map(|i| format!("tenant-{i}")).collect();
    let one = |chain: &Chain, i: &mut usize| {
        *i = (*i + 1) % TENANTS;
        let path = format!("/api/v1/curves/M{}/latest", *i % PER_TENANT);
        let s = host.stream(chain);
        s.request_headers(
            &[
                (":method", "GET"),
                (":path", &path),
                (":authority", "api"),
                ("x-auth-subject", "user-7"),
                ("x-auth-tenant", &tenants[*i]),
                ("x-auth-claims", &claims),
            ],
            true,
        );
        s.respond(200, &[], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    // Allowed, each of them.
    for c in &chains {
        let s = host.stream(c);
        s.request_headers(
            &[
                (":method", "GET"),
                (":path", "/api/v1/curves/M3/latest"),
                (":authority", "api"),
                ("x-auth-subject", "user-7"),
                ("x-auth-tenant", "tenant-3"),
                ("x-auth-claims", &claims),
            ],
            true,
        );
        assert!(s.upstream_request().is_some(), "{:?}", s.local_reply());
    }
    let (mut i0, mut i1, mut i2, mut i3) = (0, 0, 0, 0);
    let rows = benchkit::run(
        plan,
        &mut [
            ("1 no-op filter", Box::new(|| one(&chains[0], &mut i0))),
            (
                "claim condition (in, 50 markets), decision cache off",
                Box::new(|| one(&chains[1], &mut i1)),
            ),
            (
                "grant condition, holder cache warm, decision cache off",
                Box::new(|| one(&chains[2], &mut i2)),
            ),
            (
                "grant condition, holder cache off (2 shared-data reads), decision cache off",
                Box::new(|| one(&chains[3], &mut i3)),
            ),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!(
                "One request on a decision-cache miss with {total} grants in force ({} samples × {} requests, 2 worker VMs)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0, 1],
        )
    );
    let over = |r: &benchkit::Row| r.median() - rows[0].median();
    println!(
        "over the no-op filter: claim {:.2} µs, grant (warm) {:.2} µs = {:.2}× the claim, grant (no holder cache) {:.2} µs = {:.2}×",
        over(&rows[1]),
        over(&rows[2]),
        over(&rows[2]) / over(&rows[1]),
        over(&rows[3]),
        over(&rows[3]) / over(&rows[1])
    );

    // One grant change, repeated: PUT (or DELETE) for tenant-1 of a new
    // market, then the filter's next poll.
    let changes = if quick { 5 } else { 20 };
    let (mut to_sidecar, mut to_filter, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let mut version = feed_version(addr);
    let epoch = {
        let (_, b) = http(addr, "GET", "/internal/v1/grants?limit=1", &[], "");
        serde_json::from_slice::<Value>(&b).unwrap()["epoch"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for k in 0..changes {
        let method = if k % 2 == 0 { "PUT" } else { "DELETE" };
        let body =
            json!({"tenant": "tenant-1", "resource": "curves:NEW", "action": "read"}).to_string();
        let t = Instant::now();
        let (status, answer) = http(
            addr,
            method,
            "/admin/v1/grants",
            &[
                ("x-admin-secret", SECRET),
                ("content-type", "application/json"),
            ],
            &body,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        while feed_version(addr) == version {
            std::thread::sleep(Duration::from_micros(200));
        }
        to_sidecar.push(t.elapsed().as_secs_f64() * 1000.0);
        let (_, delta) = http(
            addr,
            "GET",
            &format!("/internal/v1/grants?limit=10000&epoch={epoch}&after={version}"),
            &[],
            "",
        );
        bytes.push(delta.len() as f64);
        version = feed_version(addr);
        let t = Instant::now();
        let deltas = host.counter("wasmcustom.entitlements.grants.deltas");
        while host.counter("wasmcustom.entitlements.grants.deltas") == deltas {
            host.advance(Duration::from_millis(1000));
            while !host.wait_for_callouts(Duration::from_secs(5)) {}
        }
        let s = host.stream(&chains[2]);
        s.request_headers(
            &[
                (":method", "GET"),
                (":path", "/api/v1/curves/NEW/latest"),
                (":authority", "api"),
                ("x-auth-tenant", "tenant-1"),
            ],
            true,
        );
        let allowed = s.upstream_request().is_some();
        assert_eq!(allowed, method == "PUT");
        to_filter.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "one grant change ({changes} in turn, PUT and DELETE): PUT → sidecar serving it {} ms; the filter's poll, fetch and apply of the delta, then a request decided with it {} ms (plus up to refresh_interval_ms = 1000 ms waiting for the poll); delta {} bytes",
        spread(&to_sidecar),
        spread(&to_filter),
        spread(&bytes)
    );
    println!(
        "worst case PUT → effect ≈ {:.0} ms (medians + the full interval)",
        median(&mut to_sidecar) + median(&mut to_filter) + 1000.0
    );
    shutdown.cancel();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(PG, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "grants", plan, &rows) {
        println!("wrote {p}");
    }
}
