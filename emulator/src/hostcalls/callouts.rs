//! HTTP and gRPC callouts: dispatched to a cluster's handler or to a real
//! server on loopback, answered later as events (never re-entrantly), with
//! Envoy's tokens, timeouts and statuses; streaming gRPC is not emulated.

use super::{give, ok, read, read_string, st, write_u32, C};
use crate::abi::{parse_pairs, Pairs, Status};
use crate::callout::{self, Cluster, Outcome, PendingCall, Reply};
use crate::host::EventKind;
use crate::vm::VmState;
use crate::{CallRequest, GrpcRequest};
use std::sync::atomic::Ordering;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout: i32,
         out: i32|
         -> Result<i32> {
            let cluster = read_string(&mut c, up, ul)?;
            let headers = parse_pairs(&read(&mut c, hp, hl)?).unwrap_or_default();
            let body = read(&mut c, bp, bl)?;
            let trailers = parse_pairs(&read(&mut c, tp, tl)?).unwrap_or_default();
            let text = |p: Pairs| -> Vec<(String, String)> {
                p.into_iter()
                    .map(|(k, v)| {
                        (
                            k.to_ascii_lowercase(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect()
            };
            let req = CallRequest {
                cluster,
                headers: text(headers),
                body,
                trailers: text(trailers),
                timeout_ms: timeout as u32,
            };
            for required in [":method", ":path", ":authority"] {
                if req.header(required).is_none_or(str::is_empty) {
                    return st(Status::BadArgument);
                }
            }
            let token = match dispatch(
                &mut c,
                &req.cluster.clone(),
                req.path().to_string(),
                false,
                req.timeout_ms,
                Callout::Http(req),
            ) {
                Some(t) => t,
                None => return st(Status::BadArgument),
            };
            write_u32(&mut c, out, token)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: i32,
         ul: i32,
         sp: i32,
         sl: i32,
         mp: i32,
         ml: i32,
         mdp: i32,
         mdl: i32,
         msgp: i32,
         msgl: i32,
         timeout: i32,
         out: i32|
         -> Result<i32> {
            let req = GrpcRequest {
                cluster: read_string(&mut c, up, ul)?,
                service: read_string(&mut c, sp, sl)?,
                method: read_string(&mut c, mp, ml)?,
                metadata: parse_pairs(&read(&mut c, mdp, mdl)?).unwrap_or_default(),
                message: read(&mut c, msgp, msgl)?,
                timeout_ms: timeout as u32,
            };
            let path = format!("/{}/{}", req.service, req.method);
            // Envoy answers an unknown gRPC cluster with ParseFailure (the
            // upstream is parsed as a GrpcService proto first, then as a name).
            let token = match dispatch(
                &mut c,
                &req.cluster.clone(),
                path,
                true,
                req.timeout_ms,
                Callout::Grpc(req),
            ) {
                Some(t) => t,
                None => return st(Status::ParseFailure),
            };
            write_u32(&mut c, out, token)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_c: C<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> Result<i32> {
            // Streaming gRPC is not emulated: answer as for an unknown cluster.
            st(Status::BadArgument)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| -> Result<i32> { st(Status::NotFound) },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |c: C<'_>, token: i32| -> Result<i32> {
            let key = (c.data().plugin, c.data().worker_key(), token as u32);
            match c.data().core.lock().pending_calls.remove(&key) {
                Some(_) => ok(),
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_close",
        |c: C<'_>, token: i32| -> Result<i32> {
            let key = (c.data().plugin, c.data().worker_key(), token as u32);
            match c.data().core.lock().pending_calls.remove(&key) {
                Some(_) => ok(),
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code: i32, pp: i32, pn: i32| -> Result<i32> {
            let (s, msg) = c.data().status.clone();
            write_u32(&mut c, code, s)?;
            give(&mut c, &msg, pp, pn)?;
            ok()
        },
    )?;
    Ok(())
}

enum Callout {
    Http(CallRequest),
    Grpc(GrpcRequest),
}

/// Registers a callout and arranges its answer. `None` = unknown cluster or
/// a cluster of the wrong kind (Envoy: BadArgument).
fn dispatch(
    c: &mut C<'_>,
    cluster: &str,
    path: String,
    grpc: bool,
    timeout_ms: u32,
    call: Callout,
) -> Option<u32> {
    let st_ = c.data_mut();
    let (plugin, worker) = (st_.plugin, st_.worker_key());
    let core = st_.core.clone();
    let handler = {
        let s = core.lock();
        match (s.clusters.get(cluster)?, &call) {
            (Cluster::Handler(h), Callout::Http(_)) => Handling::Http(h.clone()),
            (Cluster::Http(addr), Callout::Http(_)) => Handling::Real(*addr),
            (Cluster::Grpc(h), Callout::Grpc(_)) => Handling::Grpc(h.clone()),
            (Cluster::GrpcServer(addr), Callout::Grpc(_)) => Handling::Real(*addr),
            _ => return None,
        }
    };
    // Tokens per VM as proxy-wasm-cpp-host numbers them: the callout type
    // in the low 2 bits, +4 each time (HTTP 4, 8…; gRPC calls 5, 9…).
    let token = if grpc {
        st_.next_grpc_token += 4;
        st_.next_grpc_token
    } else {
        st_.next_http_token += 4;
        st_.next_http_token
    };
    let reply = match (handler, call) {
        (Handling::Http(h), Callout::Http(req)) => Some(h(&req)),
        (Handling::Grpc(h), Callout::Grpc(req)) => Some(h(&req)),
        (Handling::Real(addr), call) => {
            let tx = core
                .completion_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            core.in_flight.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let outcome = match call {
                    Callout::Http(req) => callout::http_exchange(addr, &req),
                    Callout::Grpc(req) => callout::grpc_exchange(addr, &req),
                };
                let _ = tx.send((plugin, worker, token, outcome));
            });
            None
        }
        _ => return None,
    };
    let mut s = core.lock();
    s.pending_calls.insert(
        (plugin, worker, token),
        PendingCall {
            cluster: cluster.to_string(),
            path,
            grpc,
        },
    );
    if timeout_ms > 0 {
        s.schedule(
            u64::from(timeout_ms) * 1_000_000,
            EventKind::CallTimeout {
                plugin,
                worker,
                token,
            },
        );
    }
    if let Some(reply) = reply {
        let (delay, outcome) = match reply {
            Reply::Http { response, delay } => (Some(delay), Outcome::Response(response)),
            Reply::Grpc { response, delay } => (Some(delay), Outcome::Grpc(response)),
            Reply::GrpcError {
                status,
                message,
                delay,
            } => (Some(delay), Outcome::GrpcStatus(status, message)),
            Reply::Reset { delay } => (Some(delay), Outcome::Reset),
            Reply::Never => (None, Outcome::Reset),
        };
        if let Some(d) = delay {
            s.schedule(
                d.as_nanos() as u64,
                EventKind::CallDone {
                    plugin,
                    worker,
                    token,
                    outcome,
                },
            );
        }
    }
    Some(token)
}

enum Handling {
    Http(callout::HttpHandler),
    Grpc(callout::GrpcHandler),
    Real(std::net::SocketAddr),
}
