//! Re-evaluation of live subscriptions after a policy change, and in-band
//! authentication, measured.
//!
//! **Reload.** The sidecar binary runs as a child process on loopback
//! (`--policy-poll 0`: reloads on SIGHUP only). N connections (10,000;
//! `--quick` 2,000), each with its own identity (100 tenants), subscribe to
//! 10 patterns `bench.c0.>` … `bench.c9.>`; a publisher posts to
//! `bench.c1.<k>` at 5 messages/s (each reaching every connection), the
//! data carrying its send time. Each round rewrites the policy so that
//! `bench.c0.>` is denied (rule `c0-closed`) and sends SIGHUP; the figure
//! is the time from the signal to the last `unsubscribed` received. Then
//! the open policy comes back and the clients subscribe again. Latency is
//! publish-to-receive at the clients, p50/p99 over messages published
//! while no reload was running ("quiet") and over those published from a
//! signal to its last `unsubscribed` + 100 ms ("during").
//!
//! **In-band auth.** `Verifier::verify` natively on RS256 tokens: cold
//! (a new token each call, the signature checked) and cached (the same
//! token again), tokens per second.
//!
//! `cargo bench -p sidecar --bench reeval [-- --quick]`. Bounded in count
//! and time; traffic stays on 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../filters/auth/core/tests/common/mod.rs"]
mod keys;

use benchkit::{Plan, Row};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SUBS: usize = 10;
const RATE: u64 = 5;

fn base() -> Instant {
    static B: OnceLock<Instant> = OnceLock::new();
    *B.get_or_init(Instant::now)
}

fn us() -> u64 {
    base().elapsed().as_micros() as u64
}

fn policy(c0_closed: bool) -> String {
    let mut rules = vec![];
    if c0_closed {
        rules
            .push(json!({"id": "c0-closed", "effect": "deny", "match": {"channel": "bench.c0.>"}}));
    }
    rules.push(
        json!({"id": "tenants", "effect": "allow", "match": {"channel": "bench.>"},
                      "when": [{"attr": "tenant", "op": "exists"}]}),
    );
    rules.push(json!({"id": "publishers", "effect": "allow",
        "match": {"channel": ">", "actions": ["publish"]},
        "when": [{"attr": "roles", "op": "contains", "value": "publisher"}]}));
    json!({ "rules": rules }).to_string()
}

fn write_policy(path: &PathBuf, c0_closed: bool) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, policy(c0_closed)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\nx-auth-subject: feed\r\nx-auth-roles: publisher\r\nx-auth-tenant: feed\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)[9..12].parse().unwrap_or(0)
}

struct Shared {
    /// Round whose `unsubscribed` the clients are waiting for.
    revoked: AtomicUsize,
    /// Latest `unsubscribed` arrival (µs).
    last_revoked_us: AtomicU64,
    resubscribed: AtomicUsize,
    ready: AtomicUsize,
}

/// Finds `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A masked client text frame (the mask is zero: the bytes go as they are).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81u8];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The decimal number after `key` in `frame`.
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(frame, key)? + key.len();
    let digits = frame.get(at..)?.iter().take_while(|b| b.is_ascii_digit());
    let mut n = 0u64;
    let mut any = false;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
        any = true;
    }
    any.then_some(n)
}

/// One client, on a raw socket so that the clients cost the machine as
/// little as they can (the sidecar shares its two cores with them): the
/// upgrade by hand, server frames cut by their header, a frame's type and
/// send time found by a byte search instead of a JSON parse. Subscribes,
/// records latencies, counts its `unsubscribed`, subscribes again when
/// `resub` moves.
async fn client(
    addr: SocketAddr,
    i: usize,
    shared: Arc<Shared>,
    mut resub: tokio::sync::watch::Receiver<usize>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(u64, u64)> {
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         x-auth-subject: user-{i}\r\nx-auth-tenant: t-{}\r\nx-auth-roles: trader\r\n\r\n",
        i % 100
    );
    let mut s = loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            if s.write_all(upgrade.as_bytes()).await.is_ok() {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16384];
    while find(&buf, b"\r\n\r\n").is_none() {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client {i}: closed during the upgrade");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "client {i}: upgrade refused"
    );
    let head = find(&buf, b"\r\n\r\n").unwrap() + 4;
    buf.drain(..head);
    let channels: Vec<String> = (0..SUBS).map(|j| format!("bench.c{j}.>")).collect();
    let sub = json!({"type": "subscribe", "channels": channels}).to_string();
    s.write_all(&text_frame(sub.as_bytes())).await.unwrap();
    let resub_frame = text_frame(br#"{"type":"subscribe","channels":["bench.c0.>"]}"#);
    let mut samples = Vec::new();
    loop {
        // Every whole frame in the buffer.
        let mut at = 0;
        loop {
            if buf.len() < at + 2 {
                break;
            }
            let (b0, b1) = (buf[at], buf[at + 1]);
            let (len, hl) = match b1 & 0x7f {
                126 => match buf.get(at + 2..at + 4) {
                    Some(l) => (u16::from_be_bytes([l[0], l[1]]) as usize, 4),
                    None => break,
                },
                127 => match buf.get(at + 2..at + 10) {
                    Some(l) => (u64::from_be_bytes(l.try_into().unwrap()) as usize, 10),
                    None => break,
                },
                n => (n as usize, 2),
            };
            let Some(payload) = buf.get(at + hl..at + hl + len) else {
                break;
            };
            at += hl + len;
            if b0 & 0x0f != 1 {
                continue;
            }
            let now = us();
            if payload.starts_with(br#"{"type":"message""#) {
                let sent = number_after(payload, br#""t":"#).unwrap_or(now);
                samples.push((sent, now.saturating_sub(sent)));
            } else if payload.starts_with(br#"{"type":"unsubscribed""#) {
                shared.last_revoked_us.fetch_max(now, Ordering::SeqCst);
                shared.revoked.fetch_add(1, Ordering::SeqCst);
            } else if payload.starts_with(br#"{"type":"subscribed""#) {
                if find(payload, br#""bench.c9.>""#).is_some() {
                    shared.ready.fetch_add(1, Ordering::SeqCst);
                } else {
                    shared.resubscribed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        buf.drain(..at);
        tokio::select! {
            _ = stop.cancelled() => break,
            r = resub.changed() => {
                if r.is_err() { break; }
                s.write_all(&resub_frame).await.unwrap();
            }
            r = s.read(&mut chunk) => match r {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            },
        }
    }
    samples
}

async fn until(what: &str, secs: u64, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn reload(n: usize, rounds: usize) -> (Vec<f64>, [f64; 4]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sidecar-reeval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.json");
    write_policy(&file, false);
    let addr = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args([
            "--listen",
            &addr.to_string(),
            "--policy",
            file.to_str().unwrap(),
            "--policy-poll",
            "0",
            "--ping-interval",
            "1000",
            "--idle-timeout",
            "0",
            "--max-connections",
            "20000",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let hup = || {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    let out = rt.block_on(async {
        until("the sidecar listening", 20, || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .await;
        let shared = Arc::new(Shared {
            revoked: AtomicUsize::new(0),
            last_revoked_us: AtomicU64::new(0),
            resubscribed: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
        });
        let (resub_tx, resub_rx) = tokio::sync::watch::channel(0usize);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            clients.push(tokio::spawn(client(
                addr,
                i,
                shared.clone(),
                resub_rx.clone(),
                stop.clone(),
            )));
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        until("every client subscribed", 120, || {
            shared.ready.load(Ordering::SeqCst) == n
        })
        .await;
        // The publisher, all along.
        let pub_stop = tokio_util::sync::CancellationToken::new();
        let publisher = {
            let stop = pub_stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
                let mut k = 0u64;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    k += 1;
                    let body = json!({"t": us(), "k": k}).to_string();
                    assert_eq!(
                        post(addr, &format!("/publish/bench.c1.m{}", k % 4), &body).await,
                        202
                    );
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(4)).await;
        let quiet_until = us();
        let mut windows = Vec::new();
        let mut times = Vec::new();
        for r in 0..rounds {
            write_policy(&file, true);
            let t0 = us();
            hup();
            until("every connection's unsubscribed", 60, || {
                shared.revoked.load(Ordering::SeqCst) == n * (r + 1)
            })
            .await;
            let last = shared.last_revoked_us.load(Ordering::SeqCst);
            times.push((last - t0) as f64 / 1000.0);
            windows.push((t0, last + 100_000));
            tokio::time::sleep(Duration::from_millis(700)).await;
            write_policy(&file, false);
            hup();
            tokio::time::sleep(Duration::from_millis(300)).await;
            resub_tx.send_replace(r + 1);
            until("every connection subscribed again", 60, || {
                shared.resubscribed.load(Ordering::SeqCst) == n * (r + 1)
            })
            .await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        pub_stop.cancel();
        let _ = publisher.await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        let mut quiet = Vec::new();
        let mut during = Vec::new();
        for c in clients {
            for (sent, lat) in c.await.unwrap() {
                if sent < quiet_until {
                    quiet.push(lat);
                } else if windows.iter().any(|&(a, b)| sent >= a && sent <= b) {
                    during.push(lat);
                }
            }
        }
        let q = [percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99)];
        let d = [percentile(&mut during, 0.5), percentile(&mut during, 0.99)];
        eprintln!(
            "reload: {} quiet samples, {} during reloads",
            quiet.len(),
            during.len()
        );
        (times, [q[0], q[1], d[0], d[1]])
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn inband(plan: Plan) -> Vec<Row> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = json!({
        "providers": {"kc": {"issuer": keys::ISSUER,
            "jwks": {"inline": {"keys": [keys::rsa_key(2048).jwk("rsa-1")]}}}},
        "cache_max_entries": 100_000,
        "max_token_bytes": 16384
    });
    let clock = sidecar::access::Clock::new();
    let v = sidecar::verifier::Verifier::from_json(
        cfg.to_string().as_bytes(),
        Default::default(),
        clock,
    )
    .unwrap();
    let now = clock.now_secs();
    let total = plan.samples * plan.per_sample;
    // Distinct tokens for the cold case (signing is slower than verifying:
    // made before timing).
    let tokens: Vec<String> = (0..total)
        .map(|i| {
            keys::token(
                &json!({"alg": "RS256", "kid": "rsa-1"}),
                &json!({"iss": keys::ISSUER, "sub": format!("user-{i}"), "exp": now + 3600, "tenant": "acme"}),
            )
        })
        .collect();
    let hot = tokens[0].clone();
    rt.block_on(async {
        v.verify(&hot).await.unwrap();
    });
    let mut cold = Row {
        name: "in-band auth, RS256 cold (µs per token)".into(),
        samples_us: vec![],
    };
    let mut cached = Row {
        name: "in-band auth, cached token (µs per token)".into(),
        samples_us: vec![],
    };
    let mut next = tokens.iter().skip(1);
    for _ in 0..plan.samples {
        let t = Instant::now();
        for _ in 0..plan.per_sample {
            let tok = next.next().unwrap_or(&hot);
            rt.block_on(v.verify(tok)).unwrap();
        }
        cold.samples_us
            .push(t.elapsed().as_secs_f64() * 1e6 / plan.per_sample as f64);
        let t = Instant::now();
        for _ in 0..plan.per_sample {
            rt.block_on(v.verify(&hot)).unwrap();
        }
        cached
            .samples_us
            .push(t.elapsed().as_secs_f64() * 1e6 / plan.per_sample as f64);
    }
    vec![cold, cached]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let _ = base();
    let (n, rounds) = if quick { (2000, 3) } else { (10_000, 12) };
    let (times, lat) = reload(n, rounds);
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    println!(
        "\nreload with {n} connections x {SUBS} subscriptions ({} revoked per round), {rounds} rounds",
        n
    );
    println!(
        "  signal to last unsubscribed: median {median:.1} ms, min {:.1}, max {:.1} (target <= 250 ms)",
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!(
        "  publish-to-receive: quiet p50 {:.2} ms p99 {:.2} ms; during reloads p50 {:.2} ms p99 {:.2} ms; p99 ratio during/quiet {:.2} (target <= 2)",
        lat[0],
        lat[1],
        lat[2],
        lat[3],
        lat[3] / lat[1]
    );
    let plan = Plan::from_args(
        Plan {
            samples: 15,
            per_sample: 200,
        },
        Plan {
            samples: 5,
            per_sample: 100,
        },
    );
    let rows = inband(plan);
    println!(
        "{}",
        benchkit::table("in-band auth (Verifier::verify)", &rows, &[1])
    );
    benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "reeval", plan, &rows);
    for r in &rows {
        println!("  {}: {:.0} tokens/s (median)", r.name, 1e6 / r.median());
    }
    let json = json!({
        "reload_ms": {"samples": times, "median": median},
        "latency_ms": {"quiet_p50": lat[0], "quiet_p99": lat[1], "during_p50": lat[2], "during_p99": lat[3]},
        "connections": n, "subscriptions_per_connection": SUBS
    });
    // Beside benchkit's file.
    if let Some(dir) = benchkit::bench_dir(env!("CARGO_MANIFEST_DIR")) {
        let _ = std::fs::write(dir.join("reeval-reload.json"), json.to_string());
    }
}
