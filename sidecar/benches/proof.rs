//! The per-connection cost of the identity proof (issue 26): one WebSocket
//! upgrade (connect, `GET /ws`, the `101` read back, closed) to a sidecar
//! in-process on loopback, with the identity headers the gateway sets,
//! in turn:
//! - `--identity-proof none`: the headers trusted (the reference);
//! - `--identity-proof token`, the token they came from seen before (the
//!   verifier's cache: a client reconnecting with its token);
//! - `--identity-proof token`, a new RS256 token each connection (its
//!   signature checked: the first connection of a token).
//!
//! `cargo bench -p sidecar --bench proof [-- --quick]`. Traffic stays on
//! 127.0.0.1; bounded in count.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../filters/auth/core/tests/common/mod.rs"]
mod keys;

use benchkit::Plan;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"{"rules": [{"id": "open", "effect": "allow", "match": {"channel": ">"}}]}"#;

/// A sidecar on its own runtime thread; its address.
fn sidecar(rt: &tokio::runtime::Runtime, args: &[&str], dir: &std::path::Path) -> SocketAddr {
    let policy = dir.join("policy.json");
    std::fs::write(&policy, POLICY).unwrap();
    let mut all = vec![
        "sidecar".to_string(),
        format!("--policy={}", policy.display()),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let cfg: sidecar::config::Config = clap::Parser::parse_from(all);
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(sidecar::run(l, cfg, CancellationToken::new()));
        // Up when /healthz answers.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        addr
    })
}

/// One upgrade; panics unless it is a `101`.
fn upgrade(addr: SocketAddr, headers: &str) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nhost: sidecar\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{headers}\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 20,
            per_sample: 200,
        },
        Plan {
            samples: 5,
            per_sample: 50,
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sidecar-proof-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let auth = dir.join("auth.json");
    std::fs::write(
        &auth,
        json!({
            "providers": {"kc": {"issuer": keys::ISSUER,
                "jwks": {"inline": {"keys": [keys::rsa_key(2048).jwk("rsa-1")]}}}},
            "cache_max_entries": 100_000,
            "max_token_bytes": 16384
        })
        .to_string(),
    )
    .unwrap();
    let auth_flag = format!("--auth-config={}", auth.display());
    let quiet = ["--log=error", "--ping-interval=100000"];
    let mut trusting: Vec<&str> = vec!["--identity-proof=none"];
    trusting.extend(quiet);
    let mut proving: Vec<&str> = vec!["--identity-proof=token", &auth_flag];
    proving.extend(quiet);
    let none = sidecar(&rt, &trusting, &dir);
    let token = sidecar(&rt, &proving, &dir);

    let clock = sidecar::access::Clock::new();
    let verifier = sidecar::verifier::Verifier::from_json(
        std::fs::read(&auth).unwrap().as_slice(),
        Default::default(),
        clock,
    )
    .unwrap();
    let now = clock.now_secs();
    // Headers as the gateway sets them, and the token: what the auth
    // filter computes (the same code, through the verifier).
    let headers_of = |t: &str| -> String {
        let v = rt.block_on(verifier.verify(t)).unwrap();
        let mut h: String = v
            .headers
            .iter()
            .map(|(k, x)| format!("{k}: {x}\r\n"))
            .collect();
        h.push_str(&format!("authorization: Bearer {t}\r\n"));
        h
    };
    let token_of = |i: usize| {
        keys::token(
            &json!({"alg": "RS256", "kid": "rsa-1"}),
            &json!({"iss": keys::ISSUER, "sub": format!("user-{i}"), "exp": now + 3600, "tenant": "acme"}),
        )
    };
    // Fresh tokens for every cold connection (warm-up included), signed
    // before timing.
    let total = (plan.samples + 1) * plan.per_sample;
    let fresh: Vec<String> = (1..=total).map(|i| headers_of(&token_of(i))).collect();
    let hot = headers_of(&token_of(0));
    let trusted: String = hot
        .lines()
        .filter(|l| !l.starts_with("authorization"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let mut next = fresh.iter();
    let mut cases: Vec<benchkit::Case<'_>> = vec![
        (
            "upgrade, --identity-proof none (headers trusted)",
            Box::new(|| upgrade(none, &trusted)),
        ),
        (
            "upgrade, --identity-proof token, token seen before",
            Box::new(|| upgrade(token, &hot)),
        ),
        (
            "upgrade, --identity-proof token, new RS256 token",
            Box::new(|| upgrade(token, next.next().expect("enough fresh tokens"))),
        ),
    ];
    let rows = benchkit::run(plan, &mut cases);
    drop(cases);
    println!(
        "{}",
        benchkit::table(
            &format!(
                "One WebSocket upgrade with identity ({} samples × {})",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "proof", plan, &rows);
    let _ = std::fs::remove_dir_all(&dir);
}
