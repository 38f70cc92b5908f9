//! `wsload`: a WebSocket fan-out load generator for the sidecar and, for
//! comparison, nginx with nchan, on loopback only.
//!
//! N subscribers connect from several 127.0.0.x source addresses (past the
//! ~28k ephemeral ports of one address), all on one channel; one publisher
//! POSTs about 200-byte JSON messages carrying their send time at M msg/s.
//! After a warm-up, messages sent during the measured window are counted
//! at every subscriber: delivered/s, loss, latency percentiles, and the
//! server's CPU time (from /proc/<pid>/stat) per delivered message and RSS.
//! `--rate 0` holds N idle connections and reports RSS per connection.
//! Everything is bounded in count and time, and stops by itself.

use clap::Parser;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    /// The sidecar: `/ws`, a subscribe message, `POST /publish/{channel}`.
    Sidecar,
    /// nginx + nchan: `/sub/{channel}` (WebSocket), `POST /pub/{channel}`.
    Nchan,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "wsload", about = "WebSocket fan-out load tool (loopback only)")]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    /// Server address (must be in 127.0.0.0/8).
    #[arg(long)]
    server: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages per second published (0: idle connections only).
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of publishing before the measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+sources).
    #[arg(long, default_value_t = 4)]
    sources: u8,
    #[arg(long, default_value = "bench.curves.EU-ETS.DEC26")]
    channel: String,
    /// Server process ids whose CPU and RSS are measured (comma separated).
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Payload size in bytes (about).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Give up after this many seconds in all.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
    /// Worker threads of the load tool itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A name for the row in the output.
    #[arg(long, default_value = "")]
    label: String,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// utime + stime in clock ticks, and resident memory (PSS) in KiB, summed over `pids`.
fn proc_usage(pids: &[u32]) -> (u64, u64) {
    let mut ticks = 0;
    let mut rss = 0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command (which may hold spaces) in parentheses.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // rest starts at field 3 (state); utime is field 14, stime 15.
                let get = |i: usize| {
                    f.get(i - 3)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                ticks += get(14) + get(15);
            }
        }
        // PSS: shared pages split between the processes that map them, so
        // a sum over nginx's master and workers counts them once.
        let mem = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .filter(|s| s.contains("Pss:"))
            .map(|s| (s, "Pss:"))
            .or_else(|| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .map(|s| (s, "VmRSS:"))
            });
        if let Some((text, key)) = mem {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix(key) {
                    rss += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
    }
    (ticks, rss)
}

fn ticks_per_second() -> f64 {
    // Linux reports CPU times in USER_HZ, which is 100 on every platform it runs on.
    100.0
}

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | op];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// Finds `"ts":<digits>` in a payload.
fn timestamp(p: &[u8]) -> Option<u64> {
    let at = p.windows(5).position(|w| w == b"\"ts\":")? + 5;
    let digits = p.get(at..)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()
}

struct Shared {
    /// Messages with a send time in [start, end) are measured.
    window: Mutex<(u64, u64)>,
    received: AtomicU64,
    stop: AtomicBool,
    latencies: Mutex<Vec<u32>>,
}

async fn handshake(args: &Args, i: usize) -> Result<TcpStream, String> {
    let src = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % args.sources.max(1) as usize) as u8,
    ));
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(src, 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let mut s = sock
        .connect(args.server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let path = match args.target {
        Target::Sidecar => "/ws".to_string(),
        Target::Nchan => format!("/sub/{}", args.channel),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        args.server
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed during the handshake".into());
        }
        head.push(b[0]);
        if head.len() > 8192 {
            return Err("handshake response too long".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "handshake refused: {}",
            String::from_utf8_lossy(&head).lines().next().unwrap_or("")
        ));
    }
    if args.target == Target::Sidecar {
        let sub = serde_json::json!({"type": "subscribe", "channels": [args.channel]}).to_string();
        s.write_all(&client_frame(1, sub.as_bytes()))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// Reads server frames until stopped; answers pings; measures messages.
async fn subscriber(mut s: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut mine: Vec<u32> = Vec::new();
    let mut count = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => continue,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let (Some(&b0), Some(&b1)) = (buf.get(at), buf.get(at + 1)) {
            let (len, hl) = match b1 & 0x7f {
                126 => match buf.get(at + 2..at + 4) {
                    Some(b) => (u16::from_be_bytes([b[0], b[1]]) as usize, 4),
                    None => break,
                },
                127 => match buf.get(at + 2..at + 10) {
                    Some(b) => (
                        u64::from_be_bytes(b.try_into().unwrap_or([0; 8])) as usize,
                        10,
                    ),
                    None => break,
                },
                n => (n as usize, 2),
            };
            let Some(payload) = buf.get(at + hl..at + hl + len) else {
                break;
            };
            match b0 & 0x0f {
                1 | 2 => {
                    if let Some(ts) = timestamp(payload) {
                        let (start, end) = *shared.window.lock().unwrap_or_else(|e| e.into_inner());
                        if ts >= start && ts < end {
                            let lat = now_ns().saturating_sub(ts) / 1000;
                            mine.push(lat.min(u32::MAX as u64) as u32);
                            count += 1;
                        }
                    }
                }
                9 => {
                    let pong = client_frame(10, payload);
                    if s.write_all(&pong).await.is_err() {
                        break;
                    }
                }
                8 => break,
                _ => {}
            }
            at += hl + len;
        }
        buf.drain(..at);
    }
    shared.received.fetch_add(count, Ordering::Relaxed);
    shared
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend_from_slice(&mine);
}

async fn reconnect(args: &Args) -> Result<TcpStream, String> {
    let s = TcpStream::connect(args.server)
        .await
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Publishes at `rate` msg/s until `until`; returns how many had a send
/// time inside the window.
async fn publisher(args: Args, shared: Arc<Shared>, until: Instant) -> Result<u64, String> {
    let mut s = reconnect(&args).await?;
    let path = match args.target {
        Target::Sidecar => format!("/publish/{}", args.channel),
        Target::Nchan => format!("/pub/{}", args.channel),
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let pad = "x".repeat(args.payload.saturating_sub(60));
    let mut in_window = 0;
    let mut resp = vec![0u8; 4096];
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let ts = now_ns();
        n += 1;
        let body = format!("{{\"ts\":{ts},\"n\":{n},\"pad\":\"{pad}\"}}");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             x-auth-subject: wsload\r\nx-auth-roles: publisher\r\nContent-Length: {}\r\n\r\n{body}",
            args.server,
            body.len()
        );
        // A server may end a keep-alive connection after so many requests:
        // then reconnect and send again (once).
        let mut fresh = false;
        if s.write_all(req.as_bytes()).await.is_err() {
            s = reconnect(&args).await?;
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            fresh = true;
        }
        // Read one response (headers + Content-Length body).
        let mut got = 0;
        loop {
            let r = s.read(&mut resp[got..]).await.unwrap_or(0);
            if r == 0 && got == 0 && !fresh {
                s = reconnect(&args).await?;
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                fresh = true;
                continue;
            }
            if r == 0 {
                return Err("publisher connection closed".into());
            }
            got += r;
            let text = &resp[..got];
            if let Some(h) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&text[..h]).to_ascii_lowercase();
                if !(head.starts_with("http/1.1 20")) {
                    return Err(format!(
                        "publish refused: {}",
                        head.lines().next().unwrap_or("")
                    ));
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got >= h + 4 + len {
                    break;
                }
            }
            if got == resp.len() {
                return Err("publish response too long".into());
            }
        }
        let (start, end) = *shared.window.lock().unwrap_or_else(|e| e.into_inner());
        if ts >= start && ts < end {
            in_window += 1;
        }
    }
    Ok(in_window)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    if !matches!(args.server.ip(), IpAddr::V4(ip) if ip.is_loopback()) {
        return Err("the server must be on 127.0.0.0/8".into());
    }
    let (_, rss_before) = proc_usage(&args.pid);
    let shared = Arc::new(Shared {
        window: Mutex::new((u64::MAX, u64::MAX)),
        received: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies: Mutex::new(Vec::new()),
    });
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut connects = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let (args, gate) = (args.clone(), gate.clone());
        connects.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            handshake(&args, i).await
        }));
    }
    let mut tasks = Vec::with_capacity(args.subscribers);
    let mut failed = 0;
    let mut first_error = None;
    for c in connects {
        match c.await {
            Ok(Ok(s)) => tasks.push(tokio::spawn(subscriber(s, shared.clone()))),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if tasks.is_empty() {
        return Err(format!(
            "no subscriber connected: {}",
            first_error.unwrap_or_default()
        ));
    }
    // Let subscriptions settle.
    tokio::time::sleep(Duration::from_millis(500 + args.subscribers as u64 / 20)).await;
    let mut result = serde_json::json!({
        "label": args.label,
        "target": format!("{:?}", args.target).to_lowercase(),
        "subscribers": tasks.len(),
        "failed_connections": failed,
        "connect_seconds": connect_secs,
    });
    if let Some(e) = first_error {
        result["first_connect_error"] = e.into();
    }
    if args.rate == 0 {
        tokio::time::sleep(Duration::from_secs(args.duration.min(60))).await;
        let (_, rss) = proc_usage(&args.pid);
        result["rss_kib_before"] = rss_before.into();
        result["rss_kib"] = rss.into();
        result["rss_kib_per_connection"] =
            ((rss.saturating_sub(rss_before)) as f64 / tasks.len() as f64).into();
        shared.stop.store(true, Ordering::Relaxed);
        return Ok(result);
    }
    let t_pub = Instant::now();
    let window_start = now_ns() + args.warmup * 1_000_000_000;
    *shared.window.lock().unwrap_or_else(|e| e.into_inner()) =
        (window_start, window_start + args.duration * 1_000_000_000);
    let until = t_pub + Duration::from_secs(args.warmup + args.duration);
    let publish = tokio::spawn(publisher(args.clone(), shared.clone(), until));
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let (cpu0, _) = proc_usage(&args.pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let (cpu1, rss) = proc_usage(&args.pid);
    let window_secs = t0.elapsed().as_secs_f64();
    let published = publish.await.map_err(|e| e.to_string())??;
    // Late deliveries count (as latency), then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let received = shared.received.load(Ordering::Relaxed);
    let expected = published * result["subscribers"].as_u64().unwrap_or(0);
    let mut lat = std::mem::take(&mut *shared.latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let cpu_secs = (cpu1.saturating_sub(cpu0)) as f64 / ticks_per_second();
    result["rate"] = args.rate.into();
    result["published"] = published.into();
    result["delivered"] = received.into();
    result["expected"] = expected.into();
    result["loss"] = (if expected > 0 {
        1.0 - received as f64 / expected as f64
    } else {
        0.0
    })
    .into();
    result["delivered_per_second"] = (received as f64 / window_secs).into();
    result["latency_ms"] = serde_json::json!({
        "p50": percentile(&lat, 0.50),
        "p99": percentile(&lat, 0.99),
        "p999": percentile(&lat, 0.999),
        "max": percentile(&lat, 1.0),
    });
    result["server_cpu_seconds"] = cpu_secs.into();
    result["server_cpu_us_per_delivery"] = (if received > 0 {
        cpu_secs * 1e6 / received as f64
    } else {
        f64::NAN
    })
    .into();
    result["rss_kib"] = rss.into();
    result["rss_kib_per_subscriber"] = ((rss.saturating_sub(rss_before)) as f64
        / result["subscribers"].as_f64().unwrap_or(1.0))
    .into();
    Ok(result)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsload: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let deadline = Duration::from_secs(args.deadline);
    match rt.block_on(async { tokio::time::timeout(deadline, run(args)).await }) {
        Ok(Ok(v)) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("wsload: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("wsload: gave up after {deadline:?}");
            std::process::ExitCode::FAILURE
        }
    }
    // The runtime is dropped here with any stragglers.
}
