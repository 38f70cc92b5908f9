//! Header maps: the stream's four, reachable only when Envoy allows it, and a
//! callout answer's headers and trailers. In the strict profile, removing a
//! request header does nothing.

use super::{give, link, ok, read, read_key, st, C};
use crate::abi::{map, parse_pairs, serialize_pairs, Pairs, Status};
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
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
            if m == map::REQUEST_HEADERS && c.data().core.settings.profile.strict() {
                // Reachable or not as in Envoy, but nothing is removed.
                return st(with_map_mut(&c, m, |_| {}));
            }
            st(with_map_mut(&c, m, |map| map.retain(|(k, _)| *k != key)))
        },
    )?;
    Ok(())
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
