//! The Envoy Rate Limit Service API (`envoy.service.ratelimit.v3`,
//! `RateLimitService/ShouldRateLimit`), encoded and decoded by hand: the
//! few messages of the public protobuf, so that the filter (wasm) and the
//! sidecar need no protobuf toolchain. Unknown fields are skipped, as
//! protobuf requires.

/// gRPC service and method.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
    fn number(self) -> u64 {
        match self {
            Code::Unknown => 0,
            Code::Ok => 1,
            Code::OverLimit => 2,
        }
    }
}

/// One descriptor: key/value entries, and an optional limit override
/// (requests per unit; unit 1 second, 2 minute, 3 hour, 4 day).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    pub limit: Option<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub domain: String,
    pub descriptors: Vec<Descriptor>,
    pub hits_addend: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub code: Code,
    /// `current_limit`: requests per unit, unit, name.
    pub limit: Option<(u32, u32, String)>,
    pub remaining: u32,
    /// `duration_until_reset`, ns.
    pub reset_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<Status>,
    pub response_headers: Vec<(String, String)>,
    pub raw_body: Vec<u8>,
}

/// Seconds in a `RateLimit.Unit`.
pub fn unit_seconds(unit: u32) -> u64 {
    match unit {
        1 => 1,
        2 => 60,
        3 => 3600,
        4 => 86_400,
        5 => 30 * 86_400,
        6 => 365 * 86_400,
        7 => 7 * 86_400,
        _ => 0,
    }
}

// ---- wire format ----

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn uint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(out, field, 0);
        varint(out, v);
    }
}

/// A protobuf reader over one message.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

/// A field's value.
enum Val<'a> {
    Int(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.at)?;
            self.at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The next field, or `None` at the end; `Err` on malformed input.
    fn next(&mut self) -> Result<Option<(u32, Val<'a>)>, String> {
        if self.at >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint().ok_or("truncated tag")?;
        let field = u32::try_from(key >> 3).map_err(|_| "bad field number")?;
        let val = match key & 7 {
            0 => Val::Int(self.varint().ok_or("truncated varint")?),
            1 => {
                self.at = self
                    .at
                    .checked_add(8)
                    .filter(|&e| e <= self.b.len())
                    .ok_or("truncated fixed64")?;
                Val::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint().ok_or("truncated length")?)
                    .map_err(|_| "length")?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|&e| e <= self.b.len())
                    .ok_or("truncated bytes")?;
                let v = self.b.get(self.at..end).ok_or("truncated bytes")?;
                self.at = end;
                Val::Bytes(v)
            }
            5 => {
                self.at = self
                    .at
                    .checked_add(4)
                    .filter(|&e| e <= self.b.len())
                    .ok_or("truncated fixed32")?;
                Val::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((field, val)))
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

fn pair(b: &[u8]) -> Result<(String, String), String> {
    let mut r = Reader::new(b);
    let (mut k, mut v) = (String::new(), String::new());
    while let Some((f, val)) = r.next()? {
        match (f, val) {
            (1, Val::Bytes(x)) => k = text(x)?,
            (2, Val::Bytes(x)) => v = text(x)?,
            _ => {}
        }
    }
    Ok((k, v))
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(&mut out, 1, self.domain.as_bytes());
        for d in &self.descriptors {
            let mut db = Vec::new();
            for (k, v) in &d.entries {
                let mut e = Vec::new();
                bytes_field(&mut e, 1, k.as_bytes());
                bytes_field(&mut e, 2, v.as_bytes());
                bytes_field(&mut db, 1, &e);
            }
            if let Some((n, unit)) = d.limit {
                let mut l = Vec::new();
                uint_field(&mut l, 1, u64::from(n));
                uint_field(&mut l, 2, u64::from(unit));
                bytes_field(&mut db, 2, &l);
            }
            bytes_field(&mut out, 2, &db);
        }
        uint_field(&mut out, 3, u64::from(self.hits_addend));
        out
    }

    pub fn decode(b: &[u8]) -> Result<Request, String> {
        let mut r = Reader::new(b);
        let mut req = Request::default();
        while let Some((f, v)) = r.next()? {
            match (f, v) {
                (1, Val::Bytes(x)) => req.domain = text(x)?,
                (2, Val::Bytes(x)) => {
                    let mut d = Descriptor::default();
                    let mut dr = Reader::new(x);
                    while let Some((df, dv)) = dr.next()? {
                        match (df, dv) {
                            (1, Val::Bytes(e)) => d.entries.push(pair(e)?),
                            (2, Val::Bytes(l)) => {
                                let mut lr = Reader::new(l);
                                let (mut n, mut unit) = (0, 0);
                                while let Some((lf, lv)) = lr.next()? {
                                    match (lf, lv) {
                                        (1, Val::Int(x)) => {
                                            n = u32::try_from(x).unwrap_or(u32::MAX)
                                        }
                                        (2, Val::Int(x)) => unit = u32::try_from(x).unwrap_or(0),
                                        _ => {}
                                    }
                                }
                                d.limit = Some((n, unit));
                            }
                            _ => {}
                        }
                    }
                    req.descriptors.push(d);
                }
                (3, Val::Int(x)) => req.hits_addend = u32::try_from(x).unwrap_or(u32::MAX),
                _ => {}
            }
        }
        Ok(req)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        uint_field(&mut out, 1, self.overall.number());
        for s in &self.statuses {
            let mut sb = Vec::new();
            uint_field(&mut sb, 1, s.code.number());
            if let Some((n, unit, name)) = &s.limit {
                let mut l = Vec::new();
                uint_field(&mut l, 1, u64::from(*n));
                uint_field(&mut l, 2, u64::from(*unit));
                if !name.is_empty() {
                    bytes_field(&mut l, 3, name.as_bytes());
                }
                bytes_field(&mut sb, 2, &l);
            }
            uint_field(&mut sb, 3, u64::from(s.remaining));
            let mut d = Vec::new();
            uint_field(&mut d, 1, s.reset_ns / 1_000_000_000);
            uint_field(&mut d, 2, s.reset_ns % 1_000_000_000);
            bytes_field(&mut sb, 4, &d);
            bytes_field(&mut out, 2, &sb);
        }
        for (k, v) in &self.response_headers {
            let mut h = Vec::new();
            bytes_field(&mut h, 1, k.as_bytes());
            bytes_field(&mut h, 2, v.as_bytes());
            bytes_field(&mut out, 3, &h);
        }
        if !self.raw_body.is_empty() {
            bytes_field(&mut out, 5, &self.raw_body);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Response, String> {
        let mut r = Reader::new(b);
        let mut resp = Response::default();
        while let Some((f, v)) = r.next()? {
            match (f, v) {
                (1, Val::Int(x)) => resp.overall = Code::from(x),
                (2, Val::Bytes(x)) => {
                    let mut s = Status::default();
                    let mut sr = Reader::new(x);
                    while let Some((sf, sv)) = sr.next()? {
                        match (sf, sv) {
                            (1, Val::Int(c)) => s.code = Code::from(c),
                            (2, Val::Bytes(l)) => {
                                let mut lr = Reader::new(l);
                                let mut lim = (0u32, 0u32, String::new());
                                while let Some((lf, lv)) = lr.next()? {
                                    match (lf, lv) {
                                        (1, Val::Int(n)) => {
                                            lim.0 = u32::try_from(n).unwrap_or(u32::MAX)
                                        }
                                        (2, Val::Int(u)) => lim.1 = u32::try_from(u).unwrap_or(0),
                                        (3, Val::Bytes(n)) => lim.2 = text(n)?,
                                        _ => {}
                                    }
                                }
                                s.limit = Some(lim);
                            }
                            (3, Val::Int(n)) => s.remaining = u32::try_from(n).unwrap_or(u32::MAX),
                            (4, Val::Bytes(d)) => {
                                let mut dr = Reader::new(d);
                                let (mut secs, mut nanos) = (0u64, 0u64);
                                while let Some((df, dv)) = dr.next()? {
                                    match (df, dv) {
                                        (1, Val::Int(x)) => secs = x,
                                        (2, Val::Int(x)) => nanos = x & 0xffff_ffff,
                                        _ => {}
                                    }
                                }
                                s.reset_ns = secs
                                    .saturating_mul(1_000_000_000)
                                    .saturating_add(nanos.min(999_999_999));
                            }
                            _ => {}
                        }
                    }
                    resp.statuses.push(s);
                }
                (3, Val::Bytes(h)) => resp.response_headers.push(pair(h)?),
                (5, Val::Bytes(body)) => resp.raw_body = body.to_vec(),
                _ => {}
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn request_round_trips_and_matches_known_bytes() {
        let req = Request {
            domain: "d".into(),
            descriptors: vec![Descriptor {
                entries: vec![("k".into(), "v".into())],
                limit: Some((10, 2)),
            }],
            hits_addend: 0,
        };
        let b = req.encode();
        // domain "d"; descriptor { entries { key "k" value "v" } limit { 10, MINUTE } }
        assert_eq!(
            b,
            vec![
                0x0a, 1, b'd', 0x12, 14, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x12, 4, 0x08, 10,
                0x10, 2
            ]
        );
        assert_eq!(Request::decode(&b).unwrap(), req);
    }

    #[test]
    fn response_round_trips_and_unknown_fields_are_skipped() {
        let resp = Response {
            overall: Code::OverLimit,
            statuses: vec![Status {
                code: Code::OverLimit,
                limit: Some((100, 2, "tenant".into())),
                remaining: 0,
                reset_ns: 12_500_000_000,
            }],
            response_headers: vec![("x-extra".into(), "1".into())],
            raw_body: b"slow down".to_vec(),
        };
        let mut b = resp.encode();
        // dynamic_metadata (6) and a fixed32 field 9 a newer server might send.
        b.extend_from_slice(&[0x32, 0]);
        b.extend_from_slice(&[0x4d, 1, 2, 3, 4]);
        assert_eq!(Response::decode(&b).unwrap(), resp);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &[0x0a, 5, b'a'][..],
            &[0x08],
            &[0x0b],
            &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f],
            &[0x80; 11],
        ] {
            assert!(Response::decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Response::decode(&[]).unwrap(), Response::default());
    }
}
