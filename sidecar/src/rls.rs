//! The Envoy Rate Limit Service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`)
//! over gRPC (HTTP/2, h2c), counting in Redis so that every Envoy and
//! every sidecar replica shares the limits.
//!
//! Algorithm: GCRA, the same as the filter's local mode, in one Lua
//! script per descriptor: atomic in Redis, one round trip, one key per
//! bucket holding its theoretical arrival time (µs, Redis' own clock, so
//! replicas need not agree on time), expiring when the bucket is full
//! again (so Redis memory follows active keys only). Chosen over a
//! pipelined INCRBY+EXPIRE fixed window because a fixed window admits up
//! to twice the limit across a window boundary, and so that a policy means
//! the same in local and global mode.
//!
//! A descriptor's limit is its `limit` override (requests per unit), which
//! the ratelimit filter always sends; a descriptor without one is not
//! limited. Redis errors answer `UNAVAILABLE` (14), so the filter's
//! `on_error` decides.

use crate::resp::{Client, RedisError, Value};
use bytes::{Buf, Bytes, BytesMut};
use ratelimit_core::rls::{self, Code, Descriptor, Request, Response, Status};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local window = interval * burst
local ahead = new_tat - now
if ahead <= window then
  redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(ahead / 1000) + 1)
  return {1, math.floor((window - ahead) / interval), ahead}
end
return {0, 0, tat - now, ahead - window}
"#;

/// Buckets in Redis.
pub struct Limiter {
    clients: Vec<tokio::sync::Mutex<Client>>,
    next: AtomicUsize,
    prefix: String,
}

/// Largest request message accepted.
const MAX_MESSAGE: usize = 64 * 1024;
pub const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

impl Limiter {
    /// `connections` Redis connections to `addr`; keys start with `prefix`.
    pub fn new(addr: &str, connections: usize, prefix: &str) -> Limiter {
        Limiter {
            clients: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(Client::new(addr)))
                .collect(),
            next: AtomicUsize::new(0),
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, domain: &str, d: &Descriptor) -> String {
        let mut k = format!("{}{}:{domain}", self.prefix, domain.len());
        for (name, value) in &d.entries {
            k.push_str(&format!("|{}:{name}={}:{value}", name.len(), value.len()));
        }
        k
    }

    /// One hit on a descriptor.
    pub async fn hit(&self, domain: &str, d: &Descriptor) -> Result<Status, RedisError> {
        let Some((requests, unit)) = d.limit.filter(|(n, u)| *n > 0 && rls::unit_seconds(*u) > 0)
        else {
            return Ok(Status {
                code: Code::Ok,
                ..Status::default()
            });
        };
        let interval_us = (rls::unit_seconds(unit) * 1_000_000 / u64::from(requests)).max(1);
        let key = self.key(domain, d);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let Some(client) = self.clients.get(i) else {
            return Err(RedisError::Protocol("no client".into()));
        };
        let (interval, burst) = (interval_us.to_string(), requests.to_string());
        let reply = client
            .lock()
            .await
            .cmd(&[
                b"EVAL",
                SCRIPT.as_bytes(),
                b"1",
                key.as_bytes(),
                interval.as_bytes(),
                burst.as_bytes(),
            ])
            .await?;
        let ints: Vec<i64> = match reply {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::Int(n) => Ok(n),
                    other => Err(RedisError::Protocol(format!("script returned {other:?}"))),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(RedisError::Protocol(format!("script returned {other:?}"))),
        };
        let us = |n: Option<&i64>| {
            u64::try_from(n.copied().unwrap_or(0))
                .unwrap_or(0)
                .saturating_mul(1000)
        };
        let limit = Some((requests, unit, String::new()));
        Ok(match ints.first() {
            Some(1) => Status {
                code: Code::Ok,
                limit,
                remaining: u32::try_from(ints.get(1).copied().unwrap_or(0)).unwrap_or(0),
                reset_ns: us(ints.get(2)),
            },
            _ => Status {
                code: Code::OverLimit,
                limit,
                remaining: 0,
                // The wait until one more request is admitted.
                reset_ns: us(ints.get(3)),
            },
        })
    }

    /// Answers a `ShouldRateLimit` request.
    pub async fn should_rate_limit(&self, req: &Request) -> Result<Response, RedisError> {
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            statuses.push(self.hit(&req.domain, d).await?);
        }
        let overall = if statuses.iter().any(|s| s.code == Code::OverLimit) {
            Code::OverLimit
        } else {
            Code::Ok
        };
        Ok(Response {
            overall,
            statuses,
            ..Response::default()
        })
    }
}

/// Redis failures: a line at most every 10 s.
static REDIS_ERRORS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    limiter: Arc<Limiter>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                // Small request/response messages: no Nagle delay.
                let _ = socket.set_nodelay(true);
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else { return };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        let limiter = limiter.clone();
                        tokio::spawn(async move { handle(req, respond, &limiter).await });
                    }
                });
            }
        }
    }
}

fn trailers(status: u32, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&status.to_string()) {
        t.insert("grpc-status", v);
    }
    if !message.is_empty() {
        if let Ok(v) = http::HeaderValue::from_str(
            &message.replace(|c: char| !c.is_ascii_graphic() && c != ' ', "?"),
        ) {
            t.insert("grpc-message", v);
        }
    }
    t
}

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    limiter: &Limiter,
) {
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(());
    let Ok(head) = head else { return };
    let answer = async {
        if req.uri().path() != PATH {
            return Err((12, format!("unknown method {}", req.uri().path())));
        }
        let mut body = req.into_body();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| (13, e.to_string()))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if buf.len() + chunk.len() > MAX_MESSAGE + 5 {
                return Err((8, "message too large".to_string()));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() < 5 || buf[0] != 0 {
            return Err((3, "expected one uncompressed gRPC message".to_string()));
        }
        let mut b = buf.freeze();
        b.advance(1);
        let len = b.get_u32() as usize;
        if len != b.len() {
            return Err((3, "gRPC message length mismatch".to_string()));
        }
        let request = Request::decode(&b).map_err(|e| (3, e))?;
        limiter.should_rate_limit(&request).await.map_err(|e| {
            if let Some(more) = REDIS_ERRORS_LOG.allow() {
                tracing::warn!(
                    domain = request.domain.as_str(),
                    error = %e,
                    failed_since_last_line = more,
                    "rls: redis failed; answered UNAVAILABLE"
                );
            }
            (14, e.to_string())
        })
    };
    match answer.await {
        Ok(resp) => {
            let msg = resp.encode();
            let mut framed = BytesMut::with_capacity(5 + msg.len());
            framed.extend_from_slice(&[0]);
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let _ = send.send_data(framed.freeze(), false);
            let _ = send.send_trailers(trailers(0, ""));
        }
        Err((code, message)) => {
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let _ = send.send_trailers(trailers(code, &message));
        }
    }
}
