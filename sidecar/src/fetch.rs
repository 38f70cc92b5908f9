//! One HTTP/1.1 `GET` of a remote document (a JWKS, a policy), bounded in
//! time and size, for the sidecar's verifier and its remote policy.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// What came back.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub etag: Option<String>,
    /// `Cache-Control: max-age`, seconds.
    pub max_age: Option<u64>,
    pub body: Bytes,
}

/// `GET path` from `addr` (`host:port`) with `Host: authority`, an
/// optional `If-None-Match`, within `timeout`, the body at most
/// `max_bytes`.
pub async fn get(
    addr: &str,
    authority: &str,
    path: &str,
    if_none_match: Option<&str>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Fetched, String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let mut req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json");
        if let Some(tag) = if_none_match {
            req = req.header(http::header::IF_NONE_MATCH, tag);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}{path}: {e}"))?;
        let header = |n: http::header::HeaderName| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = resp.status().as_u16();
        let etag = header(http::header::ETAG);
        let max_age = header(http::header::CACHE_CONTROL)
            .as_deref()
            .and_then(filter_common::refresh::max_age);
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| format!("{addr}{path}: body: {e} (at most {max_bytes} bytes)"))?
            .to_bytes();
        Ok(Fetched {
            status,
            etag,
            max_age,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{addr}{path}: no answer within {timeout:?}"))?
}
