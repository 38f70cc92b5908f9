//! Size and timing attributes (`request.size`, `request.total_size`,
//! `request.duration`, `response.size`, `response.total_size`) and
//! `response.code` after local replies, read by the probe in `on_log`.
use crate::common::*;
use crate::streams::hex;
use serde_json::{json, Value};
use std::time::Duration;
use wasm_host::Host;

/// How the probe shows an int64 (or duration) attribute: 8 bytes, little endian.
fn int(v: u64) -> String {
    format!("hex:{}", hex(&(v as i64).to_le_bytes()))
}

/// Envoy's `HeaderMap::byteSize`: names plus values.
fn byte_size(headers: &[(&str, &str)]) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum()
}

fn props(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|p| json!({"property": p.split('.').collect::<Vec<_>>()}))
        .collect()
}

const LOGGED: &[&str] = &[
    "request.size",
    "request.total_size",
    "request.duration",
    "response.code",
    "response.size",
    "response.total_size",
];

#[test]
fn sizes_and_duration_are_served_as_envoy_serves_them() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({
            "request_headers": props(&["request.duration", "request.size"]),
            "log": props(LOGGED),
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    host.advance(Duration::from_millis(30));
    let req: &[(&str, &str)] = &[
        (":method", "POST"),
        (":path", "/ingest"),
        (":authority", "api.254carbon.test"),
        (":scheme", "https"),
        ("content-type", "application/json"),
    ];
    s.request_headers(req, false);
    host.advance(Duration::from_millis(20));
    s.request_body(b"hello", true);
    host.advance(Duration::from_millis(50));
    let resp_headers: &[(&str, &str)] = &[("content-type", "text/plain"), ("x-up", "1")];
    s.respond(200, resp_headers, b"hello world");
    assert!(s.is_complete());

    // The emulator added an x-request-id to the request headers.
    let id = s
        .upstream_request()
        .unwrap()
        .header("x-request-id")
        .expect("generated");
    let req_bytes = byte_size(req) + byte_size(&[("x-request-id", id.as_str())]);
    let resp_bytes = byte_size(&[(":status", "200")]) + byte_size(resp_headers);
    assert_eq!(
        lines(&host, "property "),
        vec![
            // Only set once the stream is complete: NotFound, None in the SDK.
            "property request.duration=None".to_string(),
            format!("property request.size={}", int(0)),
            format!("property request.size={}", int(5)),
            format!("property request.total_size={}", int(5 + req_bytes)),
            format!("property request.duration={}", int(100_000_000)),
            format!("property response.code={}", int(200)),
            format!("property response.size={}", int(11)),
            format!("property response.total_size={}", int(11 + resp_bytes)),
        ]
    );
}

#[test]
fn request_size_prefers_content_length_as_envoy_does() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"log": props(&["request.size", "request.total_size"])}),
    );
    let s = host.stream(&host.chain(&[&p]));
    let req: &[(&str, &str)] = &[
        (":method", "POST"),
        (":path", "/"),
        (":authority", "a"),
        ("content-length", "7"),
        ("x-request-id", "r1"),
    ];
    s.request_headers(req, false);
    s.request_body(b"hello", true);
    s.respond(204, &[], b"");
    // request.size: the content-length header; request.total_size: the
    // bytes received plus the headers.
    assert_eq!(
        lines(&host, "property "),
        vec![
            format!("property request.size={}", int(7)),
            format!("property request.total_size={}", int(5 + byte_size(req))),
        ]
    );
}

#[test]
fn local_reply_sizes_and_code_in_on_log() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({
            "request_headers": [{"send_local_response": {"status": 403, "body": "denied!", "headers": []}}],
            "log": props(LOGGED),
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    host.advance(Duration::from_millis(7));
    let mut req = GET.to_vec();
    req.push(("x-request-id", "r1"));
    s.request_headers(&req, true);
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(403));
    assert_eq!(r.body_text(), "denied!");
    // The reply went through the encoder chain, with Envoy's local reply headers.
    let resp_bytes = byte_size(&[
        (":status", "403"),
        ("content-length", "7"),
        ("content-type", "text/plain"),
    ]);
    assert_eq!(
        lines(&host, "property "),
        vec![
            format!("property request.size={}", int(0)),
            format!("property request.total_size={}", int(byte_size(&req))),
            format!("property request.duration={}", int(7_000_000)),
            format!("property response.code={}", int(403)),
            format!("property response.size={}", int(7)),
            format!("property response.total_size={}", int(7 + resp_bytes)),
        ]
    );
}

#[test]
fn local_reply_while_encoding_counts_only_the_reply_body() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({
            "response_headers": [{"send_local_response": {"status": 502, "body": "bad upstream", "headers": []}}],
            "log": props(&["response.code", "response.size", "response.total_size"]),
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.respond(200, &[("x-up", "1")], b"upstream body, never sent");
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(502));
    assert_eq!(r.body_text(), "bad upstream");
    let resp_bytes = byte_size(&[
        (":status", "502"),
        ("content-length", "12"),
        ("content-type", "text/plain"),
    ]);
    assert_eq!(
        lines(&host, "property "),
        vec![
            format!("property response.code={}", int(502)),
            format!("property response.size={}", int(12)),
            format!("property response.total_size={}", int(12 + resp_bytes)),
        ]
    );
}
