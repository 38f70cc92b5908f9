//! Usage metering end to end: batches into the sidecar (in memory and with
//! the real PostgreSQL on 127.0.0.1:5432), the exposition checked line by
//! line, and the usage filter in the emulator posting to a real sidecar
//! that is restarted while batches are in flight.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A sidecar on its own runtime, so the (blocking) emulator can drive it.
struct Running {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    shutdown: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
}

fn start_at(addr: &str, args: &[&str]) -> Result<Running, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = common::config(args);
    let policy = entitlements_core::policy::Policy::from_json(common::POLICY.as_bytes()).unwrap();
    let shutdown = CancellationToken::new();
    let (addr, done) = rt.block_on(async {
        let app = sidecar::app_with_bus(&cfg, policy, shutdown.clone())
            .await
            .map_err(|e| e.to_string())?;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        let addr = l.local_addr().unwrap();
        let done = tokio::spawn(sidecar::server::serve(l, app, shutdown.clone()));
        Ok::<_, String>((addr, done))
    })?;
    Ok(Running {
        rt,
        addr,
        shutdown,
        done: Some(done),
    })
}

fn start(args: &[&str]) -> Running {
    start_at("127.0.0.1:0", args).unwrap()
}

impl Running {
    /// Stops at once: open connections are dropped with the runtime.
    fn kill(mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.done.take() {
            d.abort();
        }
        self.rt.shutdown_timeout(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request, `connection: close`: (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let what = format!("{method} {path} on {addr}");
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: sidecar\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .and_then(|()| s.write_all(body))
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{what}: no complete answer within 10 s: {e}"));
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: not an HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status in {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", "/v1/usage", &[], body.to_string().as_bytes());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "POST /v1/usage {}: {status} with a body that is not JSON ({e}): {text:?}",
            body["batch"]
        )
    });
    (status, v)
}

fn metrics(addr: SocketAddr, accept: Option<&str>) -> String {
    let h: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let (status, text) = http(addr, "GET", "/metrics", &h, b"");
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing {line:?} in\n{text}"
    );
}

fn rec(tenant: &str, route: &str, status: u16, dur_us: u64, t_ms: u64) -> Value {
    json!({"tenant": tenant, "subject": "s", "route": route, "method": "GET", "status": status,
           "request_bytes": 10, "response_bytes": 100, "duration_us": dur_us, "time_ms": t_ms})
}

const T0: u64 = 1_795_000_020_000; // 2026-11-18, a minute boundary + 20 s

#[test]
fn batches_are_aggregated_and_exposed_in_both_formats() {
    let sc = start(&[]);
    let batch = json!({"batch": "b-1", "records": [
        rec("acme", "/api/v1/curves/{market}/latest", 200, 1_500, T0),
        rec("acme", "/api/v1/curves/{market}/latest", 200, 30_000, T0),
        rec("acme", "/api/v1/curves/{market}/latest", 503, 2_000_000, T0),
        rec("beta", "other", 404, 100, T0),
    ], "metrics": [
        {"name": "curve_builds", "value": 2, "labels": {"tenant": "acme"}},
        {"name": "curve_builds", "value": 3.5, "labels": {"tenant": "acme"}},
    ]});
    let (status, v) = post(sc.addr, &batch);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"batch": "b-1", "records": 4, "metrics": 2, "duplicate": false})
    );
    // The same batch again counts nothing.
    let (status, v) = post(sc.addr, &batch);
    assert_eq!((status, &v["duplicate"]), (200, &json!(true)));

    let p = metrics(sc.addr, None);
    let l = r#"tenant="acme",route="/api/v1/curves/{market}/latest""#;
    for line in [
        "# TYPE usage_requests_total counter".to_string(),
        format!(r#"usage_requests_total{{{l},status_class="2xx"}} 2"#),
        format!(r#"usage_requests_total{{{l},status_class="5xx"}} 1"#),
        r#"usage_requests_total{tenant="beta",route="other",status_class="4xx"} 1"#.into(),
        format!(r#"usage_request_bytes_total{{{l},status_class="2xx"}} 20"#),
        format!(r#"usage_response_bytes_total{{{l},status_class="2xx"}} 200"#),
        "# TYPE usage_request_duration_seconds histogram".into(),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="2xx",le="0.001"}} 0"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="2xx",le="0.0025"}} 1"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="2xx",le="0.025"}} 1"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="2xx",le="0.05"}} 2"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="2xx",le="+Inf"}} 2"#),
        format!(r#"usage_request_duration_seconds_sum{{{l},status_class="2xx"}} 0.0315"#),
        format!(r#"usage_request_duration_seconds_count{{{l},status_class="2xx"}} 2"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="5xx",le="1.0"}} 0"#),
        format!(r#"usage_request_duration_seconds_bucket{{{l},status_class="5xx",le="2.5"}} 1"#),
        "# TYPE app_curve_builds summary".into(),
        r#"app_curve_builds_count{tenant="acme"} 2"#.into(),
        r#"app_curve_builds_sum{tenant="acme"} 5.5"#.into(),
        r#"usage_ingest_batches_total{outcome="accepted"} 1"#.into(),
        r#"usage_ingest_batches_total{outcome="duplicate"} 1"#.into(),
        "usage_ingest_records_total 4".into(),
        "usage_ingest_metric_events_total 2".into(),
        "usage_tenants 2".into(),
        "usage_series 3".into(),
    ] {
        has(&p, &line);
    }
    assert!(!p.contains("# EOF"));
    let om = metrics(sc.addr, Some("application/openmetrics-text; version=1.0.0"));
    has(&om, "# TYPE usage_requests counter");
    has(&om, "# HELP usage_requests Requests through the mesh, by tenant, route template and status class.");
    has(
        &om,
        &format!(r#"usage_requests_total{{{l},status_class="2xx"}} 2"#),
    );
    has(&om, "# TYPE app_curve_builds summary");
    assert!(om.ends_with("# EOF\n"));
    // Every sample line of both formats is well formed.
    for text in [&p, &om] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad sample {line:?}"
            );
        }
    }

    sc.kill();
}

#[test]
fn recent_rollups_are_kept_in_memory() {
    let sc = start(&[]);
    let now = sidecar::usage::now_ms();
    let (status, v) = post(
        sc.addr,
        &json!({"batch": "r-1", "records": [
            rec("acme", "/a", 200, 10, now), rec("acme", "/a", 201, 30, now),
            rec("beta", "/a", 200, 5, now)],
            "metrics": [{"name": "m", "value": 4, "labels": {"k": "v"}, "time_ms": now}]}),
    );
    assert_eq!(status, 200, "batch r-1 accepted: {v}");
    let (status, text) = http(sc.addr, "GET", "/v1/usage/rollups?tenant=acme", &[], b"");
    assert_eq!(status, 200, "GET /v1/usage/rollups: {text}");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET /v1/usage/rollups: not JSON ({e}): {text:?}"));
    let minute = (now / 60_000 * 60) as i64;
    assert_eq!(
        v["usage"],
        json!([{"minute": minute, "tenant": "acme", "route": "/a", "method": "GET",
                "status_class": "2xx", "requests": 2, "request_bytes": 20, "response_bytes": 200,
                "duration_us_sum": 40, "duration_us_max": 30}])
    );
    assert_eq!(
        v["metrics"],
        json!([{"minute": minute, "name": "m", "labels": {"k": "v"}, "count": 1, "sum": 4.0,
                "min": 4.0, "max": 4.0}])
    );
    sc.kill();
}

#[test]
fn a_bad_batch_is_refused_whole_with_the_field() {
    let sc = start(&["--usage-max-batch-bytes", "2000"]);
    let bad = json!({"batch": "bad-1", "records": [
        rec("acme", "/a", 200, 1, T0),
        rec("acme", "/a", 700, 1, T0),
    ]});
    let (status, v) = post(sc.addr, &bad);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "invalid_batch");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("records[1].status: 700"),
        "{v}"
    );
    let (status, v) = http(sc.addr, "POST", "/v1/usage", &[], b"{\"batch\":");
    assert_eq!(status, 400, "{v}");
    let big = json!({"batch": "big", "records": (0..20).map(|_| rec("acme", "/a", 200, 1, T0)).collect::<Vec<_>>()});
    let (status, v) = post(sc.addr, &big);
    assert_eq!((status, &v["error"]), (413, &json!("too_large")));
    let p = metrics(sc.addr, None);
    has(&p, "usage_ingest_records_total 0");
    has(&p, r#"usage_ingest_batches_total{outcome="bad"} 2"#);
    has(&p, r#"usage_ingest_batches_total{outcome="too_large"} 1"#);
    assert!(
        !p.contains("usage_requests_total{"),
        "nothing applied:\n{p}"
    );
    sc.kill();
}

#[test]
fn with_a_secret_only_the_secret_is_accepted() {
    let sc = start(&["--usage-secret", "s3cret"]);
    let b = json!({"batch": "s-1", "records": [rec("acme", "/a", 200, 1, T0)]}).to_string();
    let (status, _) = http(sc.addr, "POST", "/v1/usage", &[], b.as_bytes());
    assert_eq!(
        status, 403,
        "loopback alone is not enough once a secret is set"
    );
    let (status, text) = http(
        sc.addr,
        "POST",
        "/v1/usage",
        &[("x-usage-secret", "wrong")],
        b.as_bytes(),
    );
    assert_eq!(status, 403, "a wrong secret: {text}");
    let (status, text) = http(
        sc.addr,
        "POST",
        "/v1/usage",
        &[("x-usage-secret", "s3cret")],
        b.as_bytes(),
    );
    assert_eq!(status, 200, "the right secret: {text}");
    let (status, text) = http(sc.addr, "GET", "/v1/usage/rollups", &[], b"");
    assert_eq!(status, 403, "rollups without the secret: {text}");
    has(
        &metrics(sc.addr, None),
        r#"usage_ingest_batches_total{outcome="unauthorized"} 3"#,
    );
    sc.kill();
}

#[test]
fn tenants_beyond_the_cap_fold_into_other() {
    let sc = start(&["--usage-max-tenants", "2", "--usage-max-app-series", "1"]);
    let (status, v) = post(
        sc.addr,
        &json!({"batch": "c-1", "records": [
            rec("t1", "/a", 200, 1, T0), rec("t2", "/a", 200, 1, T0),
            rec("t3", "/a", 200, 1, T0), rec("t4", "/a", 200, 1, T0)],
            "metrics": [{"name": "x", "value": 1}, {"name": "y", "value": 1}]}),
    );
    assert_eq!(status, 200, "{v}");
    let p = metrics(sc.addr, None);
    has(
        &p,
        r#"usage_requests_total{tenant="other",route="/a",status_class="2xx"} 2"#,
    );
    has(
        &p,
        r#"usage_requests_total{tenant="t1",route="/a",status_class="2xx"} 1"#,
    );
    has(&p, r#"usage_folded_total{dimension="tenant"} 2"#);
    has(&p, r#"usage_folded_total{dimension="app_series"} 1"#);
    has(&p, "app_other_count 1");
    sc.kill();
}

// ---------------------------------------------------------------- PostgreSQL

use common::pg::Schema;

#[test]
fn rollups_are_upserted_once_per_batch_id() {
    let db = Schema::new("upsert");
    let conninfo = db.conninfo();
    let sc = start(&["--usage-postgres", &conninfo]);
    let minute = T0 / 60_000 * 60_000;
    let b1 = json!({"batch": "p-1", "records": [
        rec("acme", "/a", 200, 10, T0), rec("acme", "/a", 200, 30, T0 + 1000),
        rec("acme", "/a", 500, 7, T0 + 60_000)],
        "metrics": [{"name": "m", "value": 2, "labels": {"b": "2", "a": "1"}, "time_ms": T0},
                    {"name": "m", "value": -1, "labels": {"a": "1", "b": "2"}, "time_ms": T0}]});
    let b2 = json!({"batch": "p-2", "records": [rec("acme", "/a", 204, 50, T0)]});
    for b in [&b1, &b2, &b1, &b2] {
        let (status, v) = post(sc.addr, b);
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(db.int("SELECT count(*) FROM usage_batches"), 2);
    assert_eq!(
        db.int(&format!(
            "SELECT requests FROM usage_minute WHERE tenant = 'acme' AND status_class = '2xx' AND minute = to_timestamp({})",
            minute / 1000
        )),
        3
    );
    assert_eq!(
        db.int("SELECT duration_us_sum FROM usage_minute WHERE status_class = '2xx'"),
        90
    );
    assert_eq!(
        db.int("SELECT duration_us_max FROM usage_minute WHERE status_class = '2xx'"),
        50
    );
    assert_eq!(db.int("SELECT sum(requests)::int8 FROM usage_minute"), 4);
    assert_eq!(
        db.int("SELECT count FROM app_metric_minute WHERE name = 'm' AND labels = '{\"a\":\"1\",\"b\":\"2\"}'::jsonb"),
        2
    );
    assert_eq!(
        db.int("SELECT (sum * 10)::int8 FROM app_metric_minute WHERE name = 'm'"),
        10
    );
    let p = metrics(sc.addr, None);
    has(&p, "usage_postgres_batches_total 2");
    has(&p, "usage_postgres_duplicate_batches_total 2");
    has(&p, "usage_postgres_connected 1");
    has(&p, "usage_ingest_records_total 4");
    sc.kill();
    // A second start finds the schema migrated and changes nothing.
    let sc = start(&["--usage-postgres", &conninfo]);
    assert_eq!(db.int("SELECT count(*) FROM usage_schema_migrations"), 1);
    assert_eq!(db.int("SELECT sum(requests)::int8 FROM usage_minute"), 4);
    sc.kill();
}

#[test]
fn a_lost_database_connection_is_replaced_and_nothing_counts_twice() {
    let db = Schema::new("down");
    let conninfo = format!("{} application_name={}", db.conninfo(), db.name);
    let sc = start(&["--usage-postgres", &conninfo]);
    let b = |id: &str| json!({"batch": id, "records": [rec("acme", "/a", 200, 1, T0)]});
    let (status, v) = post(sc.addr, &b("d-1"));
    assert_eq!(status, 200, "batch d-1 before the connection is lost: {v}");
    // Take the writer's connection away, and wait until its backend is gone
    // (pg_terminate_backend alone only signals it): otherwise d-2 could
    // still go through the old connection and nothing be replaced.
    let writer = format!(
        "FROM pg_stat_activity WHERE application_name = '{}'",
        db.name
    );
    let old = db.int(&format!("SELECT max(pid)::int8 {writer}"));
    assert!(old > 0, "no backend for the sidecar's writer ({writer})");
    let terminated = db.int(&format!(
        "SELECT count(*) FILTER (WHERE t) FROM (SELECT pg_terminate_backend(pid, 10000) AS t {writer}) s"
    ));
    assert!(
        terminated >= 1,
        "the writer's backend {old} was not terminated within 10 s"
    );
    // Each batch is committed (200) or not at all (503, to be resent);
    // the writer reconnects within a second or two.
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = post(sc.addr, &b("d-2"));
        statuses.push(status);
        if status == 200 {
            break;
        }
        assert_eq!((status, &v["error"]), (503, &json!("storage_unavailable")));
        assert!(Instant::now() < deadline, "no reconnect: {statuses:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        db.int(&format!("SELECT count(*) {writer} AND pid <> {old}")),
        1,
        "d-2 was committed through a new connection, not the terminated {old} ({statuses:?})"
    );
    assert_eq!(db.int("SELECT count(*) FROM usage_batches"), 2);
    assert_eq!(db.int("SELECT sum(requests)::int8 FROM usage_minute"), 2);
    sc.kill();
    // A sidecar that cannot reach PostgreSQL at start says so.
    let err = start_at(
        "127.0.0.1:0",
        &[
            "--usage-postgres",
            "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2",
        ],
    )
    .err()
    .expect("a sidecar started although PostgreSQL is unreachable");
    assert!(err.contains("usage: postgres"), "{err}");
}

// ------------------------------------------- the filter, restarts, exact totals

/// Forwards each connection to `to`; while `swallow` is set, the answer
/// is read and thrown away, and the client's connection closed: the
/// sidecar committed the batch, the filter never hears of it.
fn lossy_proxy(to: SocketAddr, swallow: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let swallow = swallow.clone();
            std::thread::spawn(move || {
                let Ok(mut up) = TcpStream::connect(to) else {
                    return; // the sidecar is down: the filter sees a reset
                };
                let mut down = c.try_clone().unwrap();
                let mut up2 = up.try_clone().unwrap();
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut down, &mut up2);
                });
                let mut answer = Vec::new();
                let _ = up.read_to_end(&mut answer);
                if !swallow.load(Ordering::SeqCst) {
                    let _ = c.write_all(&answer);
                }
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = t.join();
            });
        }
    });
    addr
}

#[test]
fn totals_are_exact_across_a_restart_with_batches_in_flight() {
    use wasm_host::Host;
    let db = Schema::new("restart");
    let conninfo = db.conninfo();
    let args = ["--usage-postgres", conninfo.as_str()];
    let sc = start(&args);
    let port = sc.addr;
    let swallow = Arc::new(AtomicBool::new(true));
    let proxy = lossy_proxy(port, swallow.clone());

    let host = Host::builder().workers(2).build();
    host.add_http_cluster("sidecar", proxy);
    let plugin = host
        .load(
            wasm_host::PluginConfig::new(wasm_host::wasm_path("usage"))
                .name("usage")
                .root_id("usage")
                .vm_id("usage")
                .config_json(&json!({
                    "cluster": "sidecar", "max_batch_records": 50, "flush_interval_ms": 1000,
                    "retry_initial_ms": 200, "retry_max_ms": 1000,
                    "routes": ["/api/v1/curves/{market}/latest"]})),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let chain = host
        .chain(&[&plugin])
        .with_upstream(|_| wasm_host::Message {
            headers: vec![(":status".into(), b"200".to_vec())].into(),
            body: b"{}".to_vec(),
            trailers: None,
        });
    let mut sent = 0u64;
    let mut send = |n: usize, tenant: &str| {
        for i in 0..n {
            let s = host.stream(&chain);
            let path = format!("/api/v1/curves/M{}/latest", i % 7);
            s.request_headers(
                &[
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", "api"),
                    ("x-auth-tenant", tenant),
                ],
                true,
            );
            assert!(
                s.is_complete(),
                "request {i} of tenant {tenant} not completed"
            );
            sent += 1;
        }
    };
    let counter = |n: &str| host.counter(&format!("usage.{n}"));

    // 1. The sidecar commits batches but its answers are lost.
    let settle = |step: &str| {
        assert!(
            host.wait_for_callouts(Duration::from_secs(20)),
            "{step}: batches still in flight after 20 s: {:?}",
            host.pending_calls()
        );
    };
    send(230, "acme");
    host.advance(Duration::from_millis(1000));
    settle("1. first flush, answers lost");
    host.advance(Duration::from_millis(1000));
    settle("1. the resend, answers lost");
    // The same batch went twice, was committed, and both answers were lost.
    assert!(
        counter("batch_failures") >= 2,
        "answers were lost: {} batch failures",
        counter("batch_failures")
    );
    assert_eq!(counter("records_sent"), 0, "no answer reached the filter");
    assert!(
        db.int("SELECT count(*) FROM usage_batches") >= 1,
        "the sidecar committed what it answered"
    );

    // 2. Batches go out and the sidecar dies under them.
    swallow.store(false, Ordering::SeqCst);
    send(170, "beta");
    host.advance(Duration::from_millis(1000));
    sc.kill();
    settle("2. the sidecar killed under batches");
    send(100, "gamma");
    host.advance(Duration::from_millis(1000));
    settle("2. batches while the sidecar is down");

    // 3. A new sidecar on the same port, the same database. The port can
    // be held a moment (a loopback connection of another test may have
    // been given it as its own): retry the bind, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sc = loop {
        match start_at(&port.to_string(), &args) {
            Ok(sc) => break sc,
            Err(e) if e.starts_with("bind ") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("3. restarting the sidecar on {port}: {e}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter("records_sent") < sent {
        assert!(
            Instant::now() < deadline,
            "only {} of {sent} acknowledged",
            counter("records_sent")
        );
        host.advance(Duration::from_millis(500));
        settle("3. resending to the new sidecar");
    }
    assert_eq!(counter("records"), sent, "records seen by the filter");
    assert_eq!(
        counter("records_dropped"),
        0,
        "records dropped by the filter"
    );
    assert_eq!(
        db.int("SELECT sum(requests)::int8 FROM usage_minute"),
        sent as i64,
        "requests in usage_minute"
    );
    for (tenant, n) in [("acme", 230), ("beta", 170), ("gamma", 100)] {
        assert_eq!(
            db.int(&format!(
                "SELECT sum(requests)::int8 FROM usage_minute WHERE tenant = '{tenant}'"
            )),
            n,
            "{tenant}"
        );
    }
    assert_eq!(
        db.int("SELECT sum(records)::int8 FROM usage_batches"),
        sent as i64,
        "every batch once"
    );
    // The new sidecar saw resent batches that the first one had committed.
    let p = metrics(sc.addr, None);
    let dup = p
        .lines()
        .find_map(|l| l.strip_prefix("usage_postgres_duplicate_batches_total "))
        .unwrap_or_else(|| panic!("no usage_postgres_duplicate_batches_total in\n{p}"));
    assert!(dup.parse::<u64>().unwrap() >= 1, "{p}");
    sc.kill();
}
