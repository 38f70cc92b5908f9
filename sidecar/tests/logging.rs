//! The sidecar binary's log lines as an operator gets them (stderr,
//! `--log-format json`): the startup configuration with its secrets
//! redacted, NATS going away (through a proxy the test cuts), a PostgreSQL
//! write failing (its table dropped under it) with the batch named, and no
//! secret on any line. Needs NATS on 127.0.0.1:4222 and PostgreSQL on
//! 127.0.0.1:5432.

mod common;

use common::pg::Schema;
use common::proxy::TcpProxy;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A `sidecar` process and every line it wrote to stderr so far.
struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    async fn start(args: &[&str]) -> Process {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let policy =
            std::env::temp_dir().join(format!("sidecar-logging-{}.json", std::process::id()));
        std::fs::write(&policy, common::POLICY).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
            .arg(format!("--listen={addr}"))
            .arg(format!("--policy={}", policy.display()))
            .args(["--log-format", "json"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (out, seen) = (child.stderr.take().unwrap(), lines.clone());
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                seen.lock().unwrap().push(l);
            }
        });
        let p = Process { child, addr, lines };
        p.until("the sidecar listening", |v| {
            v["message"] == "sidecar: listening"
        })
        .await;
        // The listener is bound before the start (migrations, the bus):
        // serving is what says the start is over.
        let deadline = Instant::now() + Duration::from_secs(15);
        while common::http(p.addr, "GET", "/healthz", &[], b"").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "not serving within 15 s:\n{}",
                p.all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// The first line (parsed) that `want` accepts, waiting up to 15 s.
    async fn until(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
                want(&v).then_some(v)
            });
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no line for {what} within 15 s; the lines:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

fn has(v: &Value, field: &str, part: &str) -> bool {
    v[field].as_str().is_some_and(|s| s.contains(part))
}

#[test]
fn a_nats_disconnect_and_a_postgres_write_failure_are_logged_without_secrets() {
    let db = Schema::new("logging");
    common::block_on(logged(&db));
}

async fn logged(db: &Schema) {
    let nats = TcpProxy::start("127.0.0.1:4222").await;
    let nats_url = format!("nats://{}", nats.addr);
    let conninfo = db.conninfo();
    let mut p = Process::start(&[
        "--bus=nats",
        &format!("--nats-url={nats_url}"),
        &format!("--usage-postgres={conninfo}"),
        "--usage-secret=SECRET-usage-1",
        "--admin-secret=SECRET-admin-2",
        "--grants-feed-token=SECRET-feed-3",
    ])
    .await;

    // Startup: the effective configuration, the secrets redacted.
    let start = p
        .until("the startup line", |v| v["message"] == "sidecar: starting")
        .await;
    assert_eq!(start["level"], "INFO", "{start}");
    assert_eq!(start["target"], "sidecar", "{start}");
    assert!(
        has(&start, "config", "usage_secret: Some(\"<redacted>\")"),
        "{start}"
    );
    assert!(has(&start, "config", &nats_url), "{start}");

    // NATS away: one warning with the server's address.
    p.until("NATS connected", |v| v["message"] == "nats: connected")
        .await;
    nats.cut();
    let line = p
        .until("the NATS disconnect", |v| {
            has(v, "message", "nats: disconnected")
        })
        .await;
    assert_eq!(
        (&line["level"], &line["target"], &line["url"]),
        (
            &json!("WARN"),
            &json!("sidecar::bus::nats"),
            &json!(nats_url)
        ),
        "{line}"
    );

    // A usage batch whose write fails: the table is gone under the writer.
    tokio::task::block_in_place(|| db.exec("DROP TABLE usage_minute CASCADE"));
    let batch = json!({"batch": "log-b-1", "records": [
        {"tenant": "acme", "subject": "s", "route": "/a", "method": "GET", "status": 200,
         "request_bytes": 10, "response_bytes": 100, "duration_us": 5, "time_ms": 1_795_000_020_000u64}
    ]});
    let secret = [("x-usage-secret".to_string(), "SECRET-usage-1".to_string())];
    let (status, body) = common::http(
        p.addr,
        "POST",
        "/v1/usage",
        &secret,
        batch.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let line = p
        .until("the failed write", |v| {
            has(v, "message", "usage: postgres write failed")
        })
        .await;
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["batches"], "log-b-1", "{line}");
    assert!(has(&line, "error", "usage_minute"), "{line}");

    let all = p.all();
    assert!(!all.contains("SECRET-"), "a secret in the log:\n{all}");
    p.child.kill().await.unwrap();
}

#[tokio::test]
async fn a_bad_log_directive_stops_the_start_with_the_flag_named() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["--policy=/nonexistent", "--log=sidecar=loud"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log: \"sidecar=loud\""), "{err}");
}
