//! The 37 `env` imports of ABI 0.2.1, with Envoy's statuses and rules.

use crate::abi::{buffer, map, parse_pairs, serialize_pairs, Pairs, Status};
use crate::callout::{self, Cluster, Outcome, PendingCall, Reply};
use crate::host::{EventKind, LogLevel, Metric, MetricKind, Queue, SharedEntry};
use crate::stream::{Direction, Op};
use crate::vm::{StreamLink, VmState};
use crate::{CallRequest, GrpcRequest};
use std::sync::atomic::Ordering;
use wasmtime::{Caller, Linker, Result};

type C<'a> = Caller<'a, VmState>;

pub(crate) fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = c
        .data()
        .memory
        .ok_or_else(|| wasmtime::format_err!("no memory"))?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&*c);
    let end = ptr
        .checked_add(len)
        .ok_or_else(|| wasmtime::format_err!("pointer overflow"))?;
    data.get(ptr..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::format_err!("out of bounds read at {ptr}+{len}"))
}

/// A header name, lower-cased as Envoy stores them (one allocation).
fn read_key(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    let mut b = read(c, ptr, len)?;
    b.make_ascii_lowercase();
    Ok(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn read_string(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

pub(crate) fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = c
        .data()
        .memory
        .ok_or_else(|| wasmtime::format_err!("no memory"))?;
    mem.write(&mut *c, ptr as u32 as usize, bytes)
        .map_err(|_| wasmtime::format_err!("out of bounds write at {ptr}"))
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Hands `data` to the guest: allocates exactly `len` bytes with the guest's
/// allocator (the SDK adopts the buffer with `Vec::from_raw_parts`) and writes
/// pointer and length; an empty value is `(0, 0)` without allocating, as in Envoy.
fn give(c: &mut C<'_>, data: &[u8], ptr_out: i32, len_out: i32) -> Result<()> {
    if data.is_empty() {
        write_u32(c, ptr_out, 0)?;
        return write_u32(c, len_out, 0);
    }
    let alloc = c
        .data()
        .alloc
        .clone()
        .ok_or_else(|| wasmtime::format_err!("no allocator"))?;
    let p = alloc.call(&mut *c, data.len() as i32)?;
    if p == 0 {
        wasmtime::bail!("the guest allocator returned null for {} bytes", data.len());
    }
    write(c, p, data)?;
    write_u32(c, ptr_out, p as u32)?;
    write_u32(c, len_out, data.len() as u32)
}

fn ok() -> Result<i32> {
    Ok(Status::Ok as i32)
}

fn st(s: Status) -> Result<i32> {
    Ok(s as i32)
}

fn link(c: &C<'_>) -> Option<StreamLink> {
    let d = c.data();
    d.streams
        .iter()
        .find(|(id, _)| *id == d.effective)
        .map(|(_, l)| l.clone())
}

fn stream_map_index(m: i32) -> Option<usize> {
    match m {
        map::REQUEST_HEADERS => Some(0),
        map::REQUEST_TRAILERS => Some(1),
        map::RESPONSE_HEADERS => Some(2),
        map::RESPONSE_TRAILERS => Some(3),
        _ => None,
    }
}

/// Runs `f` on a header map (no copy), or `None` where Envoy has no map to give.
fn with_map<R>(c: &C<'_>, m: i32, f: impl FnOnce(&Pairs) -> R) -> Option<R> {
    if let Some(i) = stream_map_index(m) {
        let l = link(c)?;
        let d = l.stream.lock();
        if !d.access[l.filter].can_read(i) {
            return None;
        }
        return d.map(i).map(f);
    }
    let call = c.data().call.as_ref()?;
    match m {
        map::CALL_RESPONSE_HEADERS => Some(f(&call.headers)),
        map::CALL_RESPONSE_TRAILERS => Some(f(&call.trailers)),
        _ => None,
    }
}

/// Mutates a stream's header map; `BadArgument` where Envoy has no writable map.
fn with_map_mut(c: &C<'_>, m: i32, f: impl FnOnce(&mut Pairs)) -> Status {
    let Some(i) = stream_map_index(m) else {
        return Status::BadArgument;
    };
    let Some(l) = link(c) else {
        return Status::BadArgument;
    };
    let mut d = l.stream.lock();
    if !d.access[l.filter].can_write(i) {
        return Status::BadArgument;
    }
    if d.map(i).is_none() && d.access[l.filter].can_create(i) {
        d.create_map(i);
    }
    match d.map_mut(i) {
        Some(p) => {
            f(p);
            Status::Ok
        }
        None => Status::BadArgument,
    }
}

pub(crate) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, p: i32, n: i32| -> Result<i32> {
            let msg = read_string(&mut c, p, n)?;
            let Some(level) = LogLevel::from_i32(level) else {
                return st(Status::BadArgument);
            };
            c.data().log(level, msg);
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, out: i32| -> Result<i32> {
            let lvl = c.data().core.settings.log_level as u32;
            write_u32(&mut c, out, lvl)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, out: i32| -> Result<i32> {
            let now = c.data().core.lock().now();
            write(&mut c, out, &now.to_le_bytes())?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> Result<i32> {
            let st = c.data_mut();
            st.tick_generation += 1;
            st.tick_period_ns = u64::from(ms as u32) * 1_000_000;
            if st.tick_period_ns > 0 {
                let (plugin, worker, root, generation) =
                    (st.plugin, st.worker_key(), st.root_id, st.tick_generation);
                let period = st.tick_period_ns;
                st.core.lock().schedule(
                    period,
                    EventKind::Tick {
                        plugin,
                        worker,
                        root,
                        generation,
                    },
                );
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, ty: i32, start: i32, max: i32, pp: i32, pn: i32| -> Result<i32> {
            let data: Option<Vec<u8>> = match ty {
                buffer::REQUEST_BODY | buffer::RESPONSE_BODY => link(&c).and_then(|l| {
                    let dir = if ty == buffer::REQUEST_BODY {
                        Direction::Request
                    } else {
                        Direction::Response
                    };
                    let d = l.stream.lock();
                    d.body(l.filter, dir).cloned()
                }),
                buffer::CALL_RESPONSE_BODY => c.data().call.as_ref().and_then(|x| x.body.clone()),
                buffer::GRPC_RECEIVE => c.data().call.as_ref().and_then(|x| x.grpc_message.clone()),
                buffer::VM_CONFIGURATION => Some(c.data().meta.vm_configuration.clone()),
                buffer::PLUGIN_CONFIGURATION if c.data().in_configure => {
                    Some(c.data().meta.configuration.clone())
                }
                _ => None,
            };
            let Some(data) = data else {
                return st(Status::NotFound);
            };
            let (start, max) = (u64::from(start as u32), u64::from(max as u32));
            if start.checked_add(max).is_none() {
                return st(Status::BadArgument);
            }
            let len = data.len() as u64;
            let slice: &[u8] = if start > len {
                &[]
            } else {
                let end = len.min(start + max);
                &data[start as usize..end as usize]
            };
            give(&mut c, slice, pp, pn)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, ty: i32, start: i32, size: i32, p: i32, n: i32| -> Result<i32> {
            let bytes = read(&mut c, p, n)?;
            let dir = match ty {
                buffer::REQUEST_BODY => Direction::Request,
                buffer::RESPONSE_BODY => Direction::Response,
                _ => return st(Status::BadArgument),
            };
            let Some(l) = link(&c) else {
                return st(Status::NotFound);
            };
            let mut d = l.stream.lock();
            let Some(body) = d.body_mut(l.filter, dir) else {
                return st(Status::NotFound);
            };
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start == 0 {
                // Envoy: drain `size` bytes from the front, then prepend.
                let drop = size.min(body.len());
                body.drain(..drop);
                body.splice(0..0, bytes);
            } else if start >= body.len() {
                body.extend_from_slice(&bytes);
            } else {
                return st(Status::BadArgument);
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, m: i32, pp: i32, pn: i32| -> Result<i32> {
            let bytes = with_map(&c, m, |pairs| {
                if pairs.is_empty() {
                    Vec::new()
                } else {
                    serialize_pairs(pairs)
                }
            })
            .unwrap_or_default();
            give(&mut c, &bytes, pp, pn)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, m: i32, p: i32, n: i32| -> Result<i32> {
            let data = read(&mut c, p, n)?;
            let pairs: Pairs = parse_pairs(&data)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            st(with_map_mut(&c, m, |map| *map = pairs))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kl: i32, pp: i32, pn: i32| -> Result<i32> {
            let key = read_key(&mut c, kp, kl)?;
            let value = if let Some(i) = stream_map_index(m) {
                let Some(l) = link(&c) else {
                    return st(Status::BadArgument);
                };
                let d = l.stream.lock();
                if !d.access[l.filter].can_read(i) {
                    return st(Status::BadArgument);
                }
                match d.map(i) {
                    Some(p) => p.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()),
                    None => return st(Status::BadArgument),
                }
            } else {
                match with_map(&c, m, |p| {
                    p.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
                }) {
                    Some(v) => v,
                    None => return st(Status::BadArgument),
                }
            };
            match value {
                Some(v) => {
                    give(&mut c, &v, pp, pn)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
            let key = read_key(&mut c, kp, kl)?;
            let value = read(&mut c, vp, vl)?;
            st(with_map_mut(&c, m, |map| {
                match map.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        map[i].1 = value;
                        let mut j = i + 1;
                        while j < map.len() {
                            if map[j].0 == key {
                                map.remove(j);
                            } else {
                                j += 1;
                            }
                        }
                    }
                    None => map.push((key, value)),
                }
            }))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
            let key = read_key(&mut c, kp, kl)?;
            let value = read(&mut c, vp, vl)?;
            st(with_map_mut(&c, m, |map| map.push((key, value))))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kl: i32| -> Result<i32> {
            let key = read_key(&mut c, kp, kl)?;
            st(with_map_mut(&c, m, |map| map.retain(|(k, _)| *k != key)))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, p: i32, n: i32, pp: i32, pn: i32| -> Result<i32> {
            let raw = read(&mut c, p, n)?;
            let path: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            match crate::stream::property(c.data(), link(&c).as_ref(), &path) {
                Some(v) => {
                    give(&mut c, &v, pp, pn)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, p: i32, n: i32, vp: i32, vn: i32| -> Result<i32> {
            let raw = read(&mut c, p, n)?;
            let value = read(&mut c, vp, vn)?;
            let key = String::from_utf8_lossy(&raw).replace('\0', ".");
            match link(&c) {
                Some(l) => {
                    l.stream.lock().properties.insert(key, value);
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, pp: i32, pn: i32, pcas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let vm_id = c.data().meta.vm_id.clone();
            let found = {
                let s = c.data().core.lock();
                s.shared_data
                    .get(&(vm_id, key))
                    .map(|e| (e.value.clone(), e.cas))
            };
            match found {
                Some((v, cas)) => {
                    give(&mut c, &v, pp, pn)?;
                    write_u32(&mut c, pcas, cas)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let value = read(&mut c, vp, vl)?;
            let vm_id = c.data().meta.vm_id.clone();
            let cas = cas as u32;
            let mut s = c.data().core.lock();
            let k = (vm_id, key);
            if let Some(e) = s.shared_data.get(&k) {
                if cas != 0 && cas != e.cas {
                    return st(Status::CasMismatch);
                }
            }
            let new_cas = s.next_cas();
            s.shared_data.insert(
                k,
                SharedEntry {
                    value,
                    cas: new_cas,
                },
            );
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, out: i32| -> Result<i32> {
            let name = read_string(&mut c, np, nl)?;
            let st_ = c.data();
            let owner = st_.worker.map(|w| (st_.plugin, w, st_.root_id));
            let vm_id = st_.meta.vm_id.clone();
            let token = {
                let mut s = st_.core.lock();
                let key = (vm_id, name);
                match s.queue_names.get(&key).copied() {
                    Some(t) => {
                        if let Some(q) = s.queues.get_mut(&t) {
                            q.owner = owner;
                        }
                        t
                    }
                    None => {
                        let t = s.next_queue;
                        s.next_queue += 1;
                        s.queue_names.insert(key, t);
                        s.queues.insert(
                            t,
                            Queue {
                                items: Default::default(),
                                owner,
                            },
                        );
                        t
                    }
                }
            };
            write_u32(&mut c, out, token)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vl: i32, np: i32, nl: i32, out: i32| -> Result<i32> {
            let vm_id = read_string(&mut c, vp, vl)?;
            let name = read_string(&mut c, np, nl)?;
            let t = c
                .data()
                .core
                .lock()
                .queue_names
                .get(&(vm_id, name))
                .copied();
            match t {
                Some(t) => {
                    write_u32(&mut c, out, t)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vp: i32, vl: i32| -> Result<i32> {
            let value = read(&mut c, vp, vl)?;
            let mut s = c.data().core.lock();
            let Some(q) = s.queues.get_mut(&(id as u32)) else {
                return st(Status::NotFound);
            };
            q.items.push_back(value);
            if let Some((plugin, worker, root)) = q.owner {
                s.schedule(
                    0,
                    EventKind::QueueReady {
                        plugin,
                        worker,
                        root,
                        queue: id as u32,
                    },
                );
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, pp: i32, pn: i32| -> Result<i32> {
            let item = {
                let mut s = c.data().core.lock();
                let Some(q) = s.queues.get_mut(&(id as u32)) else {
                    return st(Status::NotFound);
                };
                q.items.pop_front()
            };
            match item {
                Some(v) => {
                    give(&mut c, &v, pp, pn)?;
                    ok()
                }
                None => st(Status::Empty),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, ty: i32| -> Result<i32> { stream_op(&mut c, ty, Op::Continue) },
    )?;
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, ty: i32| -> Result<i32> { stream_op(&mut c, ty, |_, _| Op::Close) },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         grpc: i32|
         -> Result<i32> {
            let details = read_string(&mut c, dp, dl)?.replace(' ', "_");
            let body = read(&mut c, bp, bl)?;
            let headers = parse_pairs(&read(&mut c, hp, hl)?).unwrap_or_default();
            // Without a stream (a root context) Envoy does nothing and says Ok.
            let Some(l) = link(&c) else { return ok() };
            let op = Op::LocalReply {
                filter: l.filter,
                status: code as u32,
                details,
                body,
                headers,
                grpc_status: if grpc < 0 { None } else { Some(grpc as u32) },
            };
            c.data_mut().ops.push((l.stream.id, op));
            ok()
        },
    )?;
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
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> Result<i32> {
            let id = id as u32;
            let st_ = c.data_mut();
            if id == st_.root_id || st_.streams.iter().any(|(i, _)| *i == id) {
                st_.effective = id;
                ok()
            } else {
                st(Status::BadArgument)
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> Result<i32> {
            st(Status::NotFound)
        },
    )?;
    l.func_wrap("env", "proxy_done", |_c: C<'_>| -> Result<i32> { ok() })?;
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, ty: i32, np: i32, nl: i32, out: i32| -> Result<i32> {
            let name = read_string(&mut c, np, nl)?;
            let kind = match ty {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return st(Status::BadArgument),
            };
            let ty = ty as u32;
            let st_ = c.data_mut();
            // Type in the low 2 bits, one sequence per type, as Envoy: counters
            // 4, 8…, gauges 5, 9…, histograms 6, 10…; defining a name again
            // gives a new id for the same stat.
            st_.next_metric[ty as usize] += 4;
            let id = st_.next_metric[ty as usize];
            st_.metric_by_id.insert(id, (name.clone(), ty));
            st_.core.lock().metrics.entry(name).or_insert(Metric {
                kind,
                value: 0,
                samples: Vec::new(),
            });
            write_u32(&mut c, out, id)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, out: i32| -> Result<i32> {
            let Some((name, ty)) = c.data().metric_by_id.get(&(id as u32)).cloned() else {
                return st(Status::NotFound);
            };
            if ty == 2 {
                return st(Status::BadArgument);
            }
            let v = c
                .data()
                .core
                .lock()
                .metrics
                .get(&name)
                .map(|m| m.value)
                .unwrap_or(0);
            write(&mut c, out, &v.to_le_bytes())?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, v: i64| -> Result<i32> {
            let data = c.data();
            let Some((name, ty)) = data.metric_by_id.get(&(id as u32)) else {
                return st(Status::NotFound);
            };
            let ty = *ty;
            let mut s = data.core.lock();
            let Some(m) = s.metrics.get_mut(name) else {
                return st(Status::NotFound);
            };
            match ty {
                0 => m.value = m.value.wrapping_add(v as u64),
                1 => m.value = v as u64,
                _ => m.samples.push(v as u64),
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| -> Result<i32> {
            let data = c.data();
            let Some((name, ty)) = data.metric_by_id.get(&(id as u32)) else {
                return st(Status::NotFound);
            };
            let ty = *ty;
            let mut s = data.core.lock();
            let Some(m) = s.metrics.get_mut(name) else {
                return st(Status::NotFound);
            };
            match ty {
                0 if delta > 0 => m.value = m.value.wrapping_add(delta as u64),
                1 => m.value = (m.value as i64).wrapping_add(delta) as u64,
                _ => return st(Status::BadArgument),
            }
            ok()
        },
    )?;
    Ok(())
}

fn stream_op(c: &mut C<'_>, ty: i32, op: impl FnOnce(Direction, usize) -> Op) -> Result<i32> {
    let dir = match ty {
        0 => Direction::Request,
        1 => Direction::Response,
        _ => return st(Status::BadArgument),
    };
    let Some(l) = link(c) else {
        return st(Status::BadArgument);
    };
    c.data_mut().ops.push((l.stream.id, op(dir, l.filter)));
    ok()
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
