//! ABI 0.2.1 constants and the wire formats shared by host and guest:
//! statuses, map and buffer types, and the header-pair serialization.

/// Host call statuses as the proxy-wasm Rust SDK knows them (0.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl From<Status> for i32 {
    fn from(s: Status) -> i32 {
        s as i32
    }
}

/// `proxy_get_header_map_*` map types.
pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const CALL_RESPONSE_HEADERS: i32 = 6;
    pub const CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// `proxy_get_buffer_bytes` buffer types.
pub mod buffer {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const CALL_RESPONSE_BODY: i32 = 4;
    pub const GRPC_RECEIVE: i32 = 5;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// Envoy's limits on a serialized pair list (proxy-wasm-cpp-host limits.h).
pub const MAX_PAIRS: usize = 1024;
pub const MAX_PAIRS_BYTES: usize = 1 << 20;

/// A header map as Envoy keeps it: ordered, keys lowercased, repeated keys allowed.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Serializes pairs: u32 count, count × (u32 key len, u32 value len), then
/// each key and value followed by a NUL byte; little endian.
pub fn serialize_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses serialized pairs the way Envoy does: any malformation, more than
/// [`MAX_PAIRS`] pairs or more than [`MAX_PAIRS_BYTES`] bytes gives `None`
/// (Envoy then treats the list as empty).
pub fn parse_pairs(data: &[u8]) -> Option<Pairs> {
    if data.is_empty() {
        return Some(Vec::new());
    }
    if data.len() > MAX_PAIRS_BYTES || data.len() < 4 {
        return None;
    }
    let count = u32::from_le_bytes(data[0..4].try_into().ok()?) as usize;
    if count > MAX_PAIRS {
        return None;
    }
    let sizes_end = 4usize.checked_add(count.checked_mul(8)?)?;
    if sizes_end > data.len() {
        return None;
    }
    let mut pos = sizes_end;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * 8;
        let kl = u32::from_le_bytes(data[at..at + 4].try_into().ok()?) as usize;
        let vl = u32::from_le_bytes(data[at + 4..at + 8].try_into().ok()?) as usize;
        let k = data.get(pos..pos.checked_add(kl)?)?;
        pos += kl;
        if data.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let v = data.get(pos..pos.checked_add(vl)?)?;
        pos += vl;
        if data.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let p: Pairs = vec![
            (":path".into(), b"/a?b=c".to_vec()),
            ("x-empty".into(), Vec::new()),
            ("x-bin".into(), vec![0xff, 0]),
        ];
        assert_eq!(parse_pairs(&serialize_pairs(&p)), Some(p));
        assert_eq!(parse_pairs(&serialize_pairs(&[])), Some(vec![]));
    }

    #[test]
    fn malformed_pairs_are_rejected() {
        let mut s = serialize_pairs(&[("k".into(), b"v".to_vec())]);
        s.pop();
        assert_eq!(parse_pairs(&s), None, "truncated");
        let mut s = serialize_pairs(&[("k".into(), b"v".to_vec())]);
        let l = s.len();
        s[l - 1] = b'x';
        assert_eq!(parse_pairs(&s), None, "missing NUL");
        let mut big = (2000u32).to_le_bytes().to_vec();
        big.extend(vec![0u8; 8]);
        assert_eq!(parse_pairs(&big), None, "too many pairs");
        assert_eq!(parse_pairs(&[1, 0]), None, "short count");
    }
}
