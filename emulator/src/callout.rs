//! Callouts: `dispatch_http_call` and `dispatch_grpc_call` to named clusters,
//! answered by a handler the test gives or by a real server on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A `dispatch_http_call` as the filter made it.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub cluster: String,
    /// Headers in order, pseudo-headers included (`:method`, `:path`, `:authority`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// 0 means no timeout.
    pub timeout_ms: u32,
}

impl CallRequest {
    /// First value of a header (names are compared lowercased).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn method(&self) -> &str {
        self.header(":method").unwrap_or("")
    }

    pub fn path(&self) -> &str {
        self.header(":path").unwrap_or("")
    }
}

/// The answer to an HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResponse {
    /// Headers as the filter sees them, `:status` first.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl CallResponse {
    pub fn new(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        let mut h = vec![(":status".to_string(), status.to_string().into_bytes())];
        h.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())),
        );
        CallResponse {
            headers: h,
            body: body.into(),
            trailers: Vec::new(),
        }
    }

    /// What Envoy's async client hands the filter when it answers itself
    /// (timeout 504, connection failure 503).
    pub(crate) fn local(status: u16, body: &str) -> Self {
        CallResponse::new(
            status,
            &[
                ("content-length", &body.len().to_string()),
                ("content-type", "text/plain"),
            ],
            body.as_bytes().to_vec(),
        )
    }
}

/// A `dispatch_grpc_call` as the filter made it.
#[derive(Debug, Clone)]
pub struct GrpcRequest {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: Vec<(String, Vec<u8>)>,
    /// The serialized request message (protobuf bytes).
    pub message: Vec<u8>,
    pub timeout_ms: u32,
}

/// The answer to a gRPC unary call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcResponse {
    pub message: Vec<u8>,
}

/// How a cluster answers a callout.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An HTTP response, delivered `delay` later on the host clock.
    Http {
        response: CallResponse,
        delay: Duration,
    },
    /// A gRPC message (status OK), delivered `delay` later.
    Grpc {
        response: GrpcResponse,
        delay: Duration,
    },
    /// A gRPC failure with a status code and message, delivered `delay` later.
    GrpcError {
        status: u32,
        message: String,
        delay: Duration,
    },
    /// The connection is reset. HTTP: the filter gets a response with no
    /// headers and `get_status` gives (11, "reset"); gRPC: UNAVAILABLE (14).
    Reset { delay: Duration },
    /// Never answered: the call ends only by its timeout (or never, without one).
    Never,
}

impl Reply {
    /// An HTTP response with a status and body, at once.
    pub fn ok(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Http {
            response: CallResponse::new(status, &[], body),
            delay: Duration::ZERO,
        }
    }

    /// An HTTP response with headers, at once.
    pub fn http(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
        Reply::Http {
            response: CallResponse::new(status, headers, body),
            delay: Duration::ZERO,
        }
    }

    /// A gRPC message with status OK, at once.
    pub fn grpc(message: impl Into<Vec<u8>>) -> Reply {
        Reply::Grpc {
            response: GrpcResponse {
                message: message.into(),
            },
            delay: Duration::ZERO,
        }
    }

    /// The same reply, delivered `d` later on the host clock.
    pub fn after(self, d: Duration) -> Reply {
        match self {
            Reply::Http { response, .. } => Reply::Http { response, delay: d },
            Reply::Grpc { response, .. } => Reply::Grpc { response, delay: d },
            Reply::GrpcError {
                status, message, ..
            } => Reply::GrpcError {
                status,
                message,
                delay: d,
            },
            Reply::Reset { .. } => Reply::Reset { delay: d },
            Reply::Never => Reply::Never,
        }
    }
}

pub(crate) type HttpHandler = Arc<dyn Fn(&CallRequest) -> Reply + Send + Sync>;
pub(crate) type GrpcHandler = Arc<dyn Fn(&GrpcRequest) -> Reply + Send + Sync>;

pub(crate) enum Cluster {
    Handler(HttpHandler),
    Http(SocketAddr),
    Grpc(GrpcHandler),
    GrpcServer(SocketAddr),
}

/// What finally happened to a callout.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Response(CallResponse),
    Reset,
    Grpc(GrpcResponse),
    GrpcStatus(u32, String),
}

/// A callout not yet answered.
pub(crate) struct PendingCall {
    pub(crate) cluster: String,
    pub(crate) path: String,
    pub(crate) grpc: bool,
}

/// Performs an HTTP/1.1 request against a real server (one connection per
/// call, `connection: close`). Errors become the 503 Envoy would hand over.
pub(crate) fn http_exchange(addr: SocketAddr, req: &CallRequest) -> Outcome {
    match try_http_exchange(addr, req) {
        Ok(r) => Outcome::Response(r),
        Err(e) => Outcome::Response(CallResponse::local(
            503,
            &format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {e}"
            ),
        )),
    }
}

fn try_http_exchange(addr: SocketAddr, req: &CallRequest) -> std::io::Result<CallResponse> {
    let limit = if req.timeout_ms == 0 {
        Duration::from_secs(30)
    } else {
        Duration::from_millis(u64::from(req.timeout_ms))
    };
    let mut sock = TcpStream::connect_timeout(&addr, limit)?;
    sock.set_read_timeout(Some(limit))?;
    sock.set_write_timeout(Some(limit))?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method(), req.path());
    let host = req.header(":authority").unwrap_or("localhost");
    head.push_str(&format!("host: {host}\r\n"));
    for (k, v) in &req.headers {
        if k.starts_with(':') || k == "host" || k == "content-length" || k == "connection" {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        req.body.len()
    ));
    sock.write_all(head.as_bytes())?;
    sock.write_all(&req.body)?;
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = vec![(":status".to_string(), status.to_string().into_bytes())];
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim();
        if k == "content-length" {
            length = v.parse().ok();
        }
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
            continue;
        }
        headers.push((k, v.as_bytes().to_vec()));
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(CallResponse {
        headers,
        body,
        trailers: Vec::new(),
    })
}

/// Performs a unary gRPC call against a real server over HTTP/2 (prior
/// knowledge, one connection per call), mapping failures as Envoy's async
/// client does: no connection or an expired deadline → UNAVAILABLE (14,
/// the router's 503/504 local reply), a reset or an OK without a message →
/// INTERNAL (13), a non-200 `:status` without `grpc-status` → CANCELLED (1).
pub(crate) fn grpc_exchange(addr: SocketAddr, req: &GrpcRequest) -> Outcome {
    let limit = if req.timeout_ms == 0 {
        Duration::from_secs(30)
    } else {
        Duration::from_millis(u64::from(req.timeout_ms))
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::GrpcStatus(14, format!("runtime: {e}")),
    };
    rt.block_on(async {
        match tokio::time::timeout(limit, grpc_unary(addr, req)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => e,
            Err(_) => Outcome::GrpcStatus(14, "upstream request timeout".into()),
        }
    })
}

async fn grpc_unary(addr: SocketAddr, req: &GrpcRequest) -> Result<Outcome, Outcome> {
    let unavailable =
        |e: &dyn std::fmt::Display| Outcome::GrpcStatus(14, format!("upstream connect error: {e}"));
    let internal = |e: &dyn std::fmt::Display| Outcome::GrpcStatus(13, e.to_string());
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unavailable(&e))?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| internal(&e))?;
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/{}/{}",
            req.cluster, req.service, req.method
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if req.timeout_ms > 0 {
        builder = builder.header("grpc-timeout", format!("{}m", req.timeout_ms));
    }
    for (k, v) in &req.metadata {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let request = builder.body(()).map_err(|e| internal(&e))?;
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| internal(&e))?;
    let mut frame = Vec::with_capacity(5 + req.message.len());
    frame.push(0);
    frame.extend_from_slice(&(req.message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&req.message);
    send.send_data(bytes::Bytes::from(frame), true)
        .map_err(|e| internal(&e))?;
    let response = response.await.map_err(|e| internal(&e))?;
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| internal(&e))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| internal(&e))?;
    let status_of = |m: &http::HeaderMap| {
        m.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
    };
    let message_of = |m: &http::HeaderMap| {
        m.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, message) = match trailers
        .as_ref()
        .and_then(|t| status_of(t).map(|s| (s, message_of(t))))
    {
        Some(s) => s,
        None => match status_of(&parts.headers) {
            Some(s) => (s, message_of(&parts.headers)),
            None if parts.status != http::StatusCode::OK => {
                (14, format!("http status {}", parts.status))
            }
            None => (2, "missing grpc-status".into()),
        },
    };
    if status != 0 {
        return Ok(Outcome::GrpcStatus(status, message));
    }
    // OK without a message is INTERNAL in Envoy's async client.
    if data.len() < 5 {
        return Ok(Outcome::GrpcStatus(13, String::new()));
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    let Some(message) = data.get(5..5 + len).map(<[u8]>::to_vec) else {
        return Ok(Outcome::GrpcStatus(13, "truncated gRPC message".into()));
    };
    Ok(Outcome::Grpc(GrpcResponse { message }))
}
