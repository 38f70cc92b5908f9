//! Stream and plugin attributes (`proxy_get_property`), as Envoy's
//! attribute wrappers compute them (integers as decimal strings in the
//! strict profile).

use crate::abi::Pairs;
use crate::vm::{StreamLink, VmState};

/// Serves `proxy_get_property`: stream attributes from the stream the
/// effective context belongs to, plugin attributes from the plugin.
pub(crate) fn property(
    vm: &VmState,
    link: Option<&StreamLink>,
    path: &[String],
) -> Option<Vec<u8>> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["plugin_name"] => return Some(vm.meta.name.clone().into_bytes()),
        ["plugin_root_id"] => return Some(vm.meta.root_id.clone().into_bytes()),
        ["plugin_vm_id"] => return Some(vm.meta.vm_id.clone().into_bytes()),
        _ => {}
    }
    let l = link?;
    let d = l.stream.lock();
    if let Some(v) = d.properties.get(&path.join(".")) {
        return Some(v.clone());
    }
    let req_live = d.access[l.filter].read[0] || d.in_log;
    let header = |name: &str| -> Option<Vec<u8>> {
        if !req_live {
            return None;
        }
        d.maps[0]
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<i64>().ok())
    };
    // An int64 attribute: 8 bytes little endian (Envoy), or decimal ASCII
    // in the strict profile.
    let strict = vm.core.settings.profile.strict();
    let int = |n: i64| -> Vec<u8> {
        if strict {
            n.to_string().into_bytes()
        } else {
            n.to_le_bytes().to_vec()
        }
    };
    match p.as_slice() {
        ["request", "path"] => header(":path"),
        ["request", "url_path"] => header(":path").map(|v| {
            let end = v.iter().position(|b| *b == b'?').unwrap_or(v.len());
            v[..end].to_vec()
        }),
        ["request", "query"] => header(":path").map(|v| match v.iter().position(|b| *b == b'?') {
            Some(i) => v[i + 1..].to_vec(),
            None => Vec::new(),
        }),
        ["request", "method"] => header(":method"),
        ["request", "host"] => header(":authority"),
        ["request", "scheme"] => header(":scheme"),
        ["request", "id"] => header("x-request-id"),
        ["request", "referer"] => header("referer"),
        ["request", "useragent"] => header("user-agent"),
        ["request", "protocol"] => Some(b"HTTP/1.1".to_vec()),
        ["request", "time"] => Some(int(d.start_ns as i64)),
        ["request", "headers"] => {
            if !req_live {
                return None;
            }
            let mut merged: Vec<(String, Vec<u8>)> = Vec::new();
            for (k, v) in d.maps[0].as_deref()? {
                match merged.iter_mut().find(|(mk, _)| mk == k) {
                    Some((_, mv)) => {
                        mv.push(b',');
                        mv.extend_from_slice(v);
                    }
                    None => merged.push((k.clone(), v.clone())),
                }
            }
            Some(crate::abi::serialize_pairs(&merged))
        }
        ["request", "headers", name] => {
            if !req_live {
                return None;
            }
            let name = name.to_ascii_lowercase();
            let vals: Vec<&Vec<u8>> = d.maps[0]
                .as_ref()?
                .iter()
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .collect();
            if vals.is_empty() {
                None
            } else {
                Some(
                    vals.iter()
                        .map(|v| v.as_slice())
                        .collect::<Vec<_>>()
                        .join(&b','),
                )
            }
        }
        // Envoy's RequestWrapper: a valid `content-length` when the headers
        // are reachable (an invalid one: NotFound), otherwise bytesReceived.
        ["request", "size"] => match header("content-length") {
            Some(v) => {
                let n: i64 = std::str::from_utf8(&v).ok()?.trim().parse().ok()?;
                Some(int(n))
            }
            None => Some(int(d.bytes_received as i64)),
        },
        ["request", "total_size"] => {
            let headers = if req_live {
                byte_size(d.maps[0].as_deref())
            } else {
                0
            };
            Some(int((d.bytes_received + headers) as i64))
        }
        // Set once the stream is complete (Envoy's `requestComplete`).
        ["request", "duration"] => {
            let ns = d.end_ns?.saturating_sub(d.start_ns);
            Some(int(ns as i64))
        }
        ["response", "size"] => Some(int(d.bytes_sent as i64)),
        // bytesSent plus the headers and trailers while reachable (as the
        // request's: in their callback or in `on_log`).
        ["response", "total_size"] => {
            let a = &d.access[l.filter];
            let mut n = d.bytes_sent;
            if a.read[2] || d.in_log {
                n += byte_size(d.maps[2].as_deref());
            }
            if a.read[3] || d.in_log {
                n += byte_size(d.maps[3].as_deref());
            }
            Some(int(n as i64))
        }
        ["response", "code"] => {
            let h = d.maps[2].as_ref()?;
            let s = h.iter().find(|(k, _)| k == ":status")?;
            let code: i64 = std::str::from_utf8(&s.1).ok()?.parse().ok()?;
            Some(int(code))
        }
        ["source", "address"] => Some(d.source.clone().into_bytes()),
        ["source", "port"] => port(&d.source).map(int),
        ["destination", "address"] => Some(d.destination.clone().into_bytes()),
        ["destination", "port"] => port(&d.destination).map(int),
        ["connection", "mtls"] => Some(vec![u8::from(d.mtls)]),
        ["connection", "id"] => Some(int(d.connection_id as i64)),
        _ => None,
    }
}

/// Envoy's `HeaderMap::byteSize`: every name and value, pseudo-headers included.
fn byte_size(map: Option<&Pairs>) -> u64 {
    map.map_or(0, |m| {
        m.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
    })
}
