//! Local replies: through the encoder chain before the upstream answered,
//! directly to the client while encoding, a reset once response headers went
//! out; the reply built as Envoy builds it.

use super::engine::{Engine, Frame, Stop};
use super::{Access, Direction, LocalReply, Message};
use crate::abi::Pairs;
use std::sync::Arc;

impl Engine {
    /// Sends a local reply: before the upstream response, through the encoder
    /// chain (Envoy's sendLocalReplyViaFilterChain); while encoding, directly
    /// to the client; after response headers went out, a reset.
    pub(super) fn local_reply(
        &mut self,
        filter: usize,
        status: u32,
        details: String,
        body: Vec<u8>,
        headers: Pairs,
        grpc_status: Option<u32>,
    ) {
        if self.local_reply.is_some() || self.finished {
            return;
        }
        self.local_reply = Some(LocalReply {
            filter,
            status,
            details,
        });
        // No more request processing.
        self.dirs[0].halted = true;
        for s in &mut self.dirs[0].slots {
            s.queue.clear();
            s.stop = Stop::None;
        }
        if self.downstream.is_some() {
            self.reset = true;
            self.finish();
            return;
        }
        let is_grpc = self.shared.lock().maps[0]
            .as_ref()
            .and_then(|m| {
                m.iter()
                    .find(|(k, _)| k == "content-type")
                    .map(|(_, v)| v.starts_with(b"application/grpc"))
            })
            .unwrap_or(false);
        let (h, body) = local_reply_message(status, headers, body, grpc_status, is_grpc);
        let h = Arc::new(h);
        if self.response_started {
            // Sent while encoding, before the client got headers: Envoy
            // replaces the response directly, without the encoder filters.
            for s in &mut self.dirs[1].slots {
                s.queue.clear();
                s.stop = Stop::None;
            }
            {
                // The reply's body goes to the client here, not through
                // `output`, so it is counted here (once).
                let mut s = self.shared.lock();
                s.maps[2] = Some(h.clone());
                s.bytes_sent += body.len() as u64;
            }
            self.downstream = Some(Message {
                headers: h,
                body,
                trailers: None,
            });
            self.finish();
            return;
        }
        let n = self.n();
        for s in &mut self.dirs[1].slots {
            s.queue.clear();
            s.stop = Stop::None;
        }
        {
            let mut s = self.shared.lock();
            s.maps[2] = Some(h);
            s.maps[3] = None;
            for f in 0..n {
                s.bodies[f][1].clear();
                s.access[f] = Access::default();
            }
        }
        // Envoy encodes a local reply through every encoder filter, from the
        // first (encodeHeaders(nullptr, …)), but a wasm filter whose context
        // was never created (the request did not reach it) returns Continue
        // without calling into its VM.
        for f in 0..n {
            if self.ctx[f].is_none() {
                self.skipped[f] = true;
            }
        }
        let eos = body.is_empty();
        self.input(Direction::Response, Frame::Headers { eos });
        if !eos && !self.finished {
            self.input(
                Direction::Response,
                Frame::Data {
                    bytes: body,
                    eos: true,
                },
            );
        }
    }
}

/// gRPC status for an HTTP status, as Envoy's `Grpc::Utility::httpToGrpcStatus`.
fn http_to_grpc_status(code: u32) -> u32 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Builds a local reply as Envoy's `Utility::prepareLocalReply` /
/// `encodeLocalReply` do: `:status`, the filter's headers, then
/// `content-length` and a default `content-type: text/plain` for a body; an
/// empty body drops both. To a gRPC request the reply is trailers-only:
/// `:status 200`, `application/grpc`, `grpc-status` and the body as a
/// percent-encoded `grpc-message`.
pub(crate) fn local_reply_message(
    status: u32,
    headers: Pairs,
    body: Vec<u8>,
    grpc_status: Option<u32>,
    is_grpc: bool,
) -> (Pairs, Vec<u8>) {
    let mut h: Pairs = vec![(":status".into(), status.to_string().into_bytes())];
    h.extend(
        headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v)),
    );
    let set = |h: &mut Pairs, k: &str, v: Vec<u8>| {
        h.retain(|(n, _)| n != k);
        h.push((k.to_string(), v));
    };
    if is_grpc {
        h[0].1 = b"200".to_vec();
        set(&mut h, "content-type", b"application/grpc".to_vec());
        if !h.iter().any(|(k, _)| k == "grpc-status") {
            let g = grpc_status.unwrap_or_else(|| http_to_grpc_status(status));
            h.push(("grpc-status".into(), g.to_string().into_bytes()));
        }
        if !body.is_empty() {
            let mut msg = Vec::with_capacity(body.len());
            for &b in &body {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    msg.push(b);
                } else {
                    msg.extend_from_slice(format!("%{b:02X}").as_bytes());
                }
            }
            set(&mut h, "grpc-message", msg);
        }
        h.retain(|(k, _)| k != "content-length");
        return (h, Vec::new());
    }
    if body.is_empty() {
        h.retain(|(k, _)| k != "content-length" && k != "content-type");
    } else {
        set(
            &mut h,
            "content-length",
            body.len().to_string().into_bytes(),
        );
        if !h.iter().any(|(k, _)| k == "content-type") {
            h.push(("content-type".into(), b"text/plain".to_vec()));
        }
    }
    (h, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Pairs {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn local_reply_headers_follow_envoy() {
        let (h, b) = local_reply_message(
            403,
            p(&[("content-type", "application/json")]),
            b"{}".to_vec(),
            None,
            false,
        );
        assert_eq!(
            h,
            p(&[
                (":status", "403"),
                ("content-type", "application/json"),
                ("content-length", "2")
            ])
        );
        assert_eq!(b, b"{}");
        let (h, _) = local_reply_message(500, vec![], b"oops".to_vec(), None, false);
        assert_eq!(
            h,
            p(&[
                (":status", "500"),
                ("content-length", "4"),
                ("content-type", "text/plain")
            ])
        );
        let (h, b) = local_reply_message(
            204,
            p(&[("content-type", "x/y"), ("content-length", "9")]),
            vec![],
            None,
            false,
        );
        assert_eq!(h, p(&[(":status", "204")]));
        assert!(b.is_empty());
    }

    #[test]
    fn local_reply_to_grpc_is_trailers_only() {
        let (h, b) = local_reply_message(429, vec![], b"slow down 100%".to_vec(), None, true);
        assert_eq!(
            h,
            p(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "14"),
                ("grpc-message", "slow down 100%25")
            ])
        );
        assert!(b.is_empty());
        let (h, _) = local_reply_message(503, vec![], vec![], Some(14), true);
        assert!(h.contains(&("grpc-status".to_string(), b"14".to_vec())));
    }
}
