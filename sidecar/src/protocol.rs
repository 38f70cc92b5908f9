//! The JSON messages of the WebSocket protocol (sidecar/README.md shows
//! them with examples): what clients send, parsed strictly, and the frames
//! the server sends, encoded straight into WebSocket frames.

use crate::ws;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// A request id as the client sent it (a string or a number), echoed back
/// verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id(Box<str>);

impl Id {
    pub fn raw(&self) -> &str {
        &self.0
    }
}

/// What `since` asks for: the messages after these sequence numbers, if the
/// epoch is still the server's.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub epoch: String,
    /// Channel → the last sequence number the client saw.
    pub seq: BTreeMap<String, u64>,
}

/// A client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe {
        id: Option<Id>,
        channels: Vec<String>,
        since: Option<Since>,
    },
    Unsubscribe {
        id: Option<Id>,
        channels: Vec<String>,
    },
    Ping {
        id: Option<Id>,
    },
    /// In-band authentication (a connection that arrived without a token).
    Auth {
        id: Option<Id>,
        token: String,
    },
    /// A new token for a live connection.
    Refresh {
        id: Option<Id>,
        token: String,
    },
}

/// Why a client message was refused: the error frame's code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub id: Option<Id>,
    pub code: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    token: Option<String>,
}

/// Longest id echoed back, in bytes.
const MAX_ID_BYTES: usize = 128;

fn id_of(raw: Option<&RawValue>) -> Result<Option<Id>, String> {
    let Some(r) = raw else { return Ok(None) };
    let s = r.get();
    let ok =
        (s.starts_with('"') || s.starts_with('-') || s.starts_with(|c: char| c.is_ascii_digit()))
            && s.len() <= MAX_ID_BYTES;
    if ok {
        Ok(Some(Id(s.into())))
    } else {
        Err(format!(
            "id must be a string or a number of at most {MAX_ID_BYTES} bytes"
        ))
    }
}

/// Parses a text frame.
pub fn parse(text: &[u8]) -> Result<ClientMessage, Refusal> {
    let refuse = |id: Option<Id>, code, message: String| Refusal { id, code, message };
    let raw: Raw<'_> = serde_json::from_slice(text)
        .map_err(|e| refuse(None, "bad_request", format!("not a valid message: {e}")))?;
    let id = id_of(raw.id).map_err(|m| refuse(None, "bad_request", m))?;
    let channels = |raw_channels: Option<Vec<String>>, id: &Option<Id>| match raw_channels {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err(refuse(
            id.clone(),
            "bad_request",
            "channels must be a non-empty list".into(),
        )),
    };
    let kind = raw.kind.as_str();
    if raw.token.is_some() && kind != "auth" && kind != "refresh" {
        return Err(refuse(
            id,
            "bad_request",
            "token belongs to auth and refresh".into(),
        ));
    }
    match kind {
        "auth" | "refresh" => {
            if raw.channels.is_some() || raw.since.is_some() {
                return Err(refuse(
                    id,
                    "bad_request",
                    format!("{kind} takes only an id and a token"),
                ));
            }
            let token = match raw.token {
                Some(t) if !t.is_empty() => t,
                _ => return Err(refuse(id, "bad_request", format!("{kind} needs a token"))),
            };
            Ok(if kind == "auth" {
                ClientMessage::Auth { id, token }
            } else {
                ClientMessage::Refresh { id, token }
            })
        }
        "subscribe" => Ok(ClientMessage::Subscribe {
            channels: channels(raw.channels, &id)?,
            since: raw.since,
            id,
        }),
        "unsubscribe" => {
            if raw.since.is_some() {
                return Err(refuse(
                    id,
                    "bad_request",
                    "since belongs to subscribe".into(),
                ));
            }
            Ok(ClientMessage::Unsubscribe {
                channels: channels(raw.channels, &id)?,
                id,
            })
        }
        "ping" => {
            if raw.channels.is_some() || raw.since.is_some() {
                return Err(refuse(id, "bad_request", "ping takes only an id".into()));
            }
            Ok(ClientMessage::Ping { id })
        }
        other => Err(refuse(
            id,
            "unknown_type",
            format!("unknown message type {:?}", truncate(other, 64)),
        )),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_id(out: &mut Vec<u8>, id: Option<&Id>) {
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(id.raw().as_bytes());
        out.push(b',');
    }
}

/// `{"type":"message","channel":..,"seq":..,"data":..}`, framed; built once
/// per published message and shared by every subscriber.
pub fn message(channel: &str, seq: u64, data: &[u8]) -> Bytes {
    ws::text_with(data.len() + channel.len() + 64, |out| {
        out.extend_from_slice(b"{\"type\":\"message\",\"channel\":");
        push_str(out, channel);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data);
        out.push(b'}');
    })
}

/// A channel's current value, for `subscribed`.
#[derive(Debug, Clone)]
pub struct Current {
    pub channel: std::sync::Arc<str>,
    pub seq: u64,
    pub data: Bytes,
}

/// `{"type":"subscribed","id":..,"epoch":..,"channels":[..],"snapshot":[..],"recovered":..}`
pub fn subscribed(
    id: Option<&Id>,
    epoch: &str,
    channels: &[String],
    snapshot: &[Current],
    recovered: Option<bool>,
) -> Bytes {
    let size = snapshot
        .iter()
        .map(|c| c.data.len() + c.channel.len() + 40)
        .sum::<usize>()
        + channels.iter().map(|c| c.len() + 3).sum::<usize>()
        + 96;
    ws::text_with(size, |out| {
        out.extend_from_slice(b"{\"type\":\"subscribed\",");
        push_id(out, id);
        out.extend_from_slice(b"\"epoch\":");
        push_str(out, epoch);
        out.extend_from_slice(b",\"channels\":[");
        for (i, c) in channels.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str(out, c);
        }
        out.extend_from_slice(b"],\"snapshot\":[");
        for (i, c) in snapshot.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"channel\":");
            push_str(out, &c.channel);
            out.extend_from_slice(b",\"seq\":");
            out.extend_from_slice(c.seq.to_string().as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(&c.data);
            out.push(b'}');
        }
        out.push(b']');
        if let Some(r) = recovered {
            out.extend_from_slice(if r {
                b",\"recovered\":true"
            } else {
                b",\"recovered\":false"
            });
        }
        out.push(b'}');
    })
}

/// `{"type":"unsubscribed","id":..,"channels":[..]}`
pub fn unsubscribed(id: Option<&Id>, channels: &[String]) -> Bytes {
    ws::text_with(96, |out| {
        out.extend_from_slice(b"{\"type\":\"unsubscribed\",");
        push_id(out, id);
        out.extend_from_slice(b"\"channels\":");
        let _ = serde_json::to_writer(&mut *out, channels);
        out.push(b'}');
    })
}

/// `{"type":"unsubscribed","channels":[..],"reason":"revoked","rule":..}`:
/// subscriptions a new decision ended.
pub fn revoked(channels: &[String], rule: &str) -> Bytes {
    ws::text_with(96 + rule.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"unsubscribed\",\"channels\":");
        let _ = serde_json::to_writer(&mut *out, channels);
        out.extend_from_slice(b",\"reason\":\"revoked\",\"rule\":");
        push_str(out, rule);
        out.push(b'}');
    })
}

/// `{"type":"authenticated","id":..,"expires":<epoch s>|null}` and
/// `{"type":"refreshed",..}`: the identity in force and when its token
/// expires.
pub fn identity_accepted(kind: &str, id: Option<&Id>, expires: Option<u64>) -> Bytes {
    ws::text_with(80, |out| {
        out.extend_from_slice(b"{\"type\":");
        push_str(out, kind);
        out.push(b',');
        push_id(out, id);
        out.extend_from_slice(b"\"expires\":");
        match expires {
            Some(e) => out.extend_from_slice(e.to_string().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    })
}

/// `{"type":"expiring","in":<seconds>}`: the identity ends in that many
/// seconds unless refreshed.
pub fn expiring(seconds: u64) -> Bytes {
    ws::text_with(40, |out| {
        out.extend_from_slice(b"{\"type\":\"expiring\",\"in\":");
        out.extend_from_slice(seconds.to_string().as_bytes());
        out.push(b'}');
    })
}

/// `{"type":"error","id":..,"code":..,"message":..,"channel":..}`
pub fn error(id: Option<&Id>, code: &str, message: &str, channel: Option<&str>) -> Bytes {
    ws::text_with(message.len() + 96, |out| {
        out.extend_from_slice(b"{\"type\":\"error\",");
        push_id(out, id);
        out.extend_from_slice(b"\"code\":");
        push_str(out, code);
        out.extend_from_slice(b",\"message\":");
        push_str(out, message);
        if let Some(c) = channel {
            out.extend_from_slice(b",\"channel\":");
            push_str(out, c);
        }
        out.push(b'}');
    })
}

/// `{"type":"pong","id":..}`
pub fn pong(id: Option<&Id>) -> Bytes {
    ws::text_with(48, |out| {
        out.extend_from_slice(b"{\"type\":\"pong\"");
        if let Some(id) = id {
            out.extend_from_slice(b",\"id\":");
            out.extend_from_slice(id.raw().as_bytes());
        }
        out.push(b'}');
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn payload(frame: &Bytes) -> Value {
        let skip = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&frame[skip..]).unwrap()
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            parse(br#"{"type":"subscribe","id":"a1","channels":["x.y"],"since":{"epoch":"e","seq":{"x.y":4}}}"#),
            Ok(ClientMessage::Subscribe {
                id: Some(Id("\"a1\"".into())),
                channels: vec!["x.y".into()],
                since: Some(Since {
                    epoch: "e".into(),
                    seq: [("x.y".to_string(), 4)].into()
                }),
            })
        );
        assert_eq!(
            parse(br#"{"type":"unsubscribe","id":7,"channels":["x.>"]}"#),
            Ok(ClientMessage::Unsubscribe {
                id: Some(Id("7".into())),
                channels: vec!["x.>".into()]
            })
        );
        assert_eq!(
            parse(br#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping { id: None })
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let code = |t: &[u8]| parse(t).unwrap_err().code;
        assert_eq!(code(b"garbage"), "bad_request");
        assert_eq!(code(b"[1,2]"), "bad_request");
        assert_eq!(
            code(br#"{"type":"subscribe","channels":[]}"#),
            "bad_request"
        );
        assert_eq!(code(br#"{"type":"subscribe"}"#), "bad_request");
        assert_eq!(
            code(br#"{"type":"subscribe","channels":["a"],"extra":1}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"type":"subscribe","id":{"a":1},"channels":["a"]}"#),
            "bad_request"
        );
        assert_eq!(code(br#"{"type":"ping","channels":["a"]}"#), "bad_request");
        let r = parse(br#"{"type":"publish","id":3}"#).unwrap_err();
        assert_eq!((r.code, r.id), ("unknown_type", Some(Id("3".into()))));
        assert!(r.message.contains("\"publish\""));
    }

    #[test]
    fn server_frames_are_the_documented_json() {
        assert_eq!(
            payload(&message(
                "pricing.curves.EU-ETS.DEC26",
                42,
                br#"{"mid":71.25}"#
            )),
            json!({"type":"message","channel":"pricing.curves.EU-ETS.DEC26","seq":42,"data":{"mid":71.25}})
        );
        let snap = [Current {
            channel: "a.b".into(),
            seq: 3,
            data: Bytes::from_static(b"[1]"),
        }];
        let id = Id("\"s1\"".into());
        assert_eq!(
            payload(&subscribed(
                Some(&id),
                "ep",
                &["a.*".into()],
                &snap,
                Some(false)
            )),
            json!({"type":"subscribed","id":"s1","epoch":"ep","channels":["a.*"],
                   "snapshot":[{"channel":"a.b","seq":3,"data":[1]}],"recovered":false})
        );
        assert_eq!(
            payload(&subscribed(None, "ep", &["a".into()], &[], None)),
            json!({"type":"subscribed","epoch":"ep","channels":["a"],"snapshot":[]})
        );
        assert_eq!(
            payload(&error(
                Some(&Id("5".into())),
                "forbidden",
                "no \"quotes\"",
                Some("c")
            )),
            json!({"type":"error","id":5,"code":"forbidden","message":"no \"quotes\"","channel":"c"})
        );
        assert_eq!(payload(&pong(None)), json!({"type":"pong"}));
        assert_eq!(payload(&pong(Some(&id))), json!({"type":"pong","id":"s1"}));
        assert_eq!(
            payload(&unsubscribed(None, &["a".into()])),
            json!({"type":"unsubscribed","channels":["a"]})
        );
    }
}
