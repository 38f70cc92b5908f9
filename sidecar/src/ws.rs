//! RFC 6455 WebSocket, server side: the handshake's accept key, an
//! incremental parser for client frames that enforces the protocol (masking,
//! control frame rules, fragmentation, UTF-8, size bounds), and server frame
//! encoding. No extensions are negotiated, so every RSV bit must be zero.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::Digest;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = sha1::Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A valid `Sec-WebSocket-Key`: base64 of 16 bytes.
pub fn valid_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .is_ok_and(|k| k.len() == 16)
}

/// Why an upgrade request is refused: the answer's status, error code and
/// message, and a header it carries (what the server speaks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub header: Option<(http::HeaderName, &'static str)>,
}

/// Whether a comma-separated header has `token` (any case) in any of its
/// values.
fn has_token(h: &http::HeaderMap, name: http::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks an upgrade request's headers (RFC 6455 §4.2.1): `Upgrade:
/// websocket` and `Connection: upgrade` (tokens, any case, in any of the
/// header's lines), `Sec-WebSocket-Version: 13`, and one
/// `Sec-WebSocket-Key` that is base64 of 16 bytes. Gives the
/// `Sec-WebSocket-Accept` value.
pub fn handshake(h: &http::HeaderMap) -> Result<String, Refused> {
    use http::header;
    if !has_token(h, header::UPGRADE, "websocket") || !has_token(h, header::CONNECTION, "upgrade") {
        return Err(Refused {
            status: 426,
            code: "upgrade_required",
            message: "this endpoint speaks WebSocket",
            header: Some((header::UPGRADE, "websocket")),
        });
    }
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    if versions.next().map(|v| v.as_bytes()) != Some(b"13") || versions.next().is_some() {
        return Err(Refused {
            status: 400,
            code: "bad_request",
            message: "Sec-WebSocket-Version must be 13",
            header: Some((header::SEC_WEBSOCKET_VERSION, "13")),
        });
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next().and_then(|k| k.to_str().ok()), keys.next()) {
        (Some(k), None) if valid_key(k) => Ok(accept_key(k)),
        _ => Err(Refused {
            status: 400,
            code: "bad_request",
            message: "Sec-WebSocket-Key must be one base64 value of 16 bytes",
            header: None,
        }),
    }
}

/// Close codes the server sends (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The identity is missing, invalid or expired (in-band auth, expiry).
    pub const TOKEN_INVALID: u16 = 4001;
    /// A refresh named another subject or issuer.
    pub const IDENTITY_CHANGED: u16 = 4003;
}

/// Why the connection must close: the code and reason the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message, UTF-8 checked.
    Text(Vec<u8>),
    /// A binary message (its length; the protocol has no use for them).
    Binary(usize),
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code and reason, if it gave one.
    Close(Option<(u16, String)>),
}

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// Parses client frames from whatever the socket delivered. Keeps bytes
/// only while a frame or a fragmented message is incomplete, so an idle
/// connection holds no buffer.
#[derive(Debug)]
pub struct Parser {
    max_message: usize,
    /// Bytes of an incomplete frame.
    partial: Vec<u8>,
    /// A fragmented message being assembled: its opcode and payload so far.
    fragments: Option<(u8, Vec<u8>)>,
}

impl Parser {
    /// A parser refusing frames and messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Parser {
        Parser {
            max_message,
            partial: Vec::new(),
            fragments: None,
        }
    }

    /// Feeds bytes read from the socket; `on` gets each complete message
    /// and may stop the parse by returning an error. Stops at the first
    /// violation; after one the connection must close.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on: impl FnMut(Incoming) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        if self.partial.is_empty() {
            let used = self.frames(data, &mut on)?;
            if let Some(rest) = data.get(used..) {
                self.partial.extend_from_slice(rest);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.frames(&buf, &mut on)?;
            buf.drain(..used);
            if buf.is_empty() && buf.capacity() > 4096 {
                buf = Vec::new();
            }
            self.partial = buf;
        }
        Ok(())
    }

    /// Bytes held for incomplete frames and messages.
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.fragments.as_ref().map_or(0, |(_, p)| p.len())
    }

    /// Parses complete frames from the start of `data`; returns the bytes used.
    fn frames(
        &mut self,
        data: &[u8],
        on: &mut impl FnMut(Incoming) -> Result<(), Violation>,
    ) -> Result<usize, Violation> {
        let mut at = 0;
        while let Some((header, len)) = self.header(data.get(at..).unwrap_or(&[]))? {
            let Some(frame) = data.get(at + header..at + header + len) else {
                break;
            };
            let b0 = data[at];
            let mask: [u8; 4] = data
                .get(at + header - 4..at + header)
                .and_then(|m| m.try_into().ok())
                .unwrap_or([0; 4]);
            let mut payload = frame.to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            at += header + len;
            self.frame(b0 & 0x80 != 0, b0 & 0x0f, payload, on)?;
        }
        Ok(at)
    }

    /// The header length and payload length of the frame at the start of
    /// `d`, once enough of it is there; checks what the header alone tells.
    fn header(&self, d: &[u8]) -> Result<Option<(usize, usize)>, Violation> {
        let (Some(&b0), Some(&b1)) = (d.first(), d.get(1)) else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(violation(close::PROTOCOL_ERROR, "reserved bits set"));
        }
        let op = b0 & 0x0f;
        if !matches!(
            op,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(violation(close::PROTOCOL_ERROR, "unknown opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(violation(
                close::PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        let (len, size_bytes) = match b1 & 0x7f {
            126 => match d.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
                None => return Ok(None),
            },
            127 => match d.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(b) => (u64::from_be_bytes(b), 8),
                None => return Ok(None),
            },
            n => (u64::from(n), 0),
        };
        if op >= OP_CLOSE {
            if b0 & 0x80 == 0 {
                return Err(violation(close::PROTOCOL_ERROR, "fragmented control frame"));
            }
            if len > 125 {
                return Err(violation(
                    close::PROTOCOL_ERROR,
                    "control frame over 125 bytes",
                ));
            }
        }
        let held = self.fragments.as_ref().map_or(0, |(_, p)| p.len() as u64);
        if len.saturating_add(held) > self.max_message as u64 {
            return Err(violation(close::TOO_BIG, "message too big"));
        }
        Ok(Some((2 + size_bytes + 4, len as usize)))
    }

    fn frame(
        &mut self,
        fin: bool,
        op: u8,
        payload: Vec<u8>,
        on: &mut impl FnMut(Incoming) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        match op {
            OP_PING => on(Incoming::Ping(payload)),
            OP_PONG => on(Incoming::Pong),
            OP_CLOSE => on(Incoming::Close(close_payload(&payload)?)),
            OP_TEXT | OP_BINARY => {
                if self.fragments.is_some() {
                    return Err(violation(
                        close::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    ));
                }
                if fin {
                    on(message(op, payload)?)
                } else {
                    self.fragments = Some((op, payload));
                    Ok(())
                }
            }
            _ => {
                let Some((first, mut so_far)) = self.fragments.take() else {
                    return Err(violation(
                        close::PROTOCOL_ERROR,
                        "continuation without a message",
                    ));
                };
                so_far.extend_from_slice(&payload);
                if fin {
                    on(message(first, so_far)?)
                } else {
                    self.fragments = Some((first, so_far));
                    Ok(())
                }
            }
        }
    }
}

fn message(op: u8, payload: Vec<u8>) -> Result<Incoming, Violation> {
    if op == OP_BINARY {
        return Ok(Incoming::Binary(payload.len()));
    }
    if std::str::from_utf8(&payload).is_err() {
        return Err(violation(close::INVALID_PAYLOAD, "text is not UTF-8"));
    }
    Ok(Incoming::Text(payload))
}

fn close_payload(p: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match p {
        [] => Ok(None),
        [_] => Err(violation(close::PROTOCOL_ERROR, "close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(violation(close::PROTOCOL_ERROR, "invalid close code"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| violation(close::INVALID_PAYLOAD, "close reason is not UTF-8"))?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

/// A server frame (unmasked, final) with `payload`.
fn frame(op: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut b, op, payload.len());
    b.put_slice(payload);
    b.freeze()
}

fn put_header(b: &mut BytesMut, op: u8, len: usize) {
    b.put_u8(0x80 | op);
    match len {
        0..=125 => b.put_u8(len as u8),
        126..=0xffff => {
            b.put_u8(126);
            b.put_u16(len as u16);
        }
        _ => {
            b.put_u8(127);
            b.put_u64(len as u64);
        }
    }
}

/// A text frame holding `payload`.
pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// A text frame built in place: `fill` writes the payload after room left
/// for the longest header, which is then moved up against the payload
/// (one allocation, the payload never copied).
pub fn text_with(capacity: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut v = Vec::with_capacity(capacity + 10);
    v.resize(10, 0);
    fill(&mut v);
    let len = v.len() - 10;
    let mut h = BytesMut::with_capacity(10);
    put_header(&mut h, OP_TEXT, len);
    let start = 10 - h.len();
    v[start..10].copy_from_slice(&h);
    Bytes::from(v).slice(start..)
}

pub fn ping(payload: &[u8]) -> Bytes {
    frame(OP_PING, payload)
}

pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, payload)
}

/// A client frame (masked with a fixed key), as a test or load client
/// sends it; `op` is the opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong).
pub fn client_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = BytesMut::with_capacity(payload.len() + 14);
    put_header(&mut f, op, payload.len());
    if !fin {
        f[0] &= 0x7f;
    }
    f[1] |= 0x80;
    f.put_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f.to_vec()
}

/// A close frame; the reason is cut to fit a control frame.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut p = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &p)
}

#[cfg(test)]
mod tests;
