//! The demo publisher: every second, a curve update for a few channels,
//! posted to the sidecar (`POST /publish/pricing.curves.<market>.<tenor>`)
//! with a publisher identity: a token of the dev identity provider with
//! the role `publisher`, which the sidecar verifies itself (its
//! `--identity-proof token`), renewed well before it expires.

use crate::idp::{Idp, TokenRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const CHANNELS: [&str; 4] = [
    "pricing.curves.EU-ETS.DEC26",
    "pricing.curves.EU-ETS.DEC27",
    "pricing.curves.CAISO.DEC26",
    "pricing.curves.PJM.DEC26",
];

/// The publisher's token lives an hour; a new one is minted after half.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

async fn post(sidecar: SocketAddr, token: &str, channel: &str, body: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(sidecar).await?;
    let req = format!(
        "POST /publish/{channel} HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let head = String::from_utf8_lossy(&out);
    Ok(head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Publishes every `every` until `shutdown`.
pub async fn run(sidecar: SocketAddr, idp: Arc<Idp>, every: Duration, shutdown: CancellationToken) {
    let mint = || {
        idp.token(&TokenRequest {
            sub: "demo-publisher".into(),
            tenant: None,
            roles: vec!["publisher".into()],
            markets: Vec::new(),
            ttl_s: TOKEN_TTL.as_secs(),
        })
    };
    let (mut token, mut minted) = (mint(), tokio::time::Instant::now());
    let mut tick = tokio::time::interval(every);
    let mut n = 0u64;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if minted.elapsed() > TOKEN_TTL / 2 {
            (token, minted) = (mint(), tokio::time::Instant::now());
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        for (i, ch) in CHANNELS.iter().enumerate() {
            let price = 50.0 + i as f64 * 7.0 + ((n as f64) * 0.37 + i as f64).sin() * 2.0;
            let body = format!(r#"{{"channel":"{ch}","price":{price:.2},"ts":{ts},"n":{n}}}"#);
            match post(sidecar, &token, ch, &body).await {
                Ok(202) => warned = false,
                Ok(code) if !warned => {
                    tracing::warn!(
                        channel = ch,
                        status = code,
                        "publisher: the sidecar refused a publish"
                    );
                    warned = true;
                }
                Err(e) if !warned => {
                    tracing::warn!(channel = ch, error = %e, "publisher: cannot publish");
                    warned = true;
                }
                _ => {}
            }
        }
    }
}
