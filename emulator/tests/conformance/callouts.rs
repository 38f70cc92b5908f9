use crate::common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasm_host::{Direction, Host, Reply};

fn call(cluster: &str, timeout_ms: u64) -> serde_json::Value {
    json!({"http_call": {"cluster": cluster, "headers": [[":method", "GET"], [":path", "/keys"], [":authority", "idp"], ["x-a", "1"]], "body": "q", "timeout_ms": timeout_ms}})
}

#[test]
fn unknown_cluster_and_missing_pseudo_headers_are_bad_argument() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("idp", |_| Reply::ok(200, ""));
    let p = probe(
        &host,
        json!({"request_headers": [
            call("nope", 100),
            {"http_call": {"cluster": "idp", "headers": [[":method", "GET"], [":path", "/"]], "timeout_ms": 100}}
        ]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(
        lines(&host, "http_call="),
        vec!["http_call=Err(BadArgument)", "http_call=Err(BadArgument)"]
    );
}

#[test]
fn response_goes_to_the_root_then_the_calling_context_later() {
    let host = Host::builder().workers(1).build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    host.add_cluster("idp", move |req| {
        seen2.lock().unwrap().push((
            req.method().to_string(),
            req.path().to_string(),
            req.header("x-a").map(str::to_string),
            req.body.clone(),
            req.timeout_ms,
        ));
        Reply::http(
            200,
            &[("content-type", "application/json")],
            r#"{"keys":[]}"#,
        )
    });
    let p = probe(
        &host,
        json!({
            "request_headers": [call("idp", 5000), {"log": "after dispatch"}, "pause"],
            "call_response": [{"get_headers": "call_headers"}, {"get_body": "call_body"}, {"resume": "request"}]
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(
        seen.lock().unwrap()[0],
        (
            "GET".into(),
            "/keys".into(),
            Some("1".into()),
            b"q".to_vec(),
            5000
        )
    );
    // Token 4 (Envoy's first); the answer arrives after the callback, not inside it,
    // and the SDK routes it to the stream context 2.
    let l = lines(&host, "");
    let i = l.iter().position(|x| x == "after dispatch").unwrap();
    assert_eq!(l[i - 1], "http_call=Ok(4)");
    assert_eq!(
        l[i + 1],
        "ctx 2 call_response token=4 headers=2 body=11 trailers=0"
    );
    assert_eq!(
        l[i + 2],
        r#"headers=[(":status", "200"), ("content-type", "application/json")]"#
    );
    assert_eq!(l[i + 3], r#"body="{\"keys\":[]}""#);
    assert_eq!(s.paused_at(Direction::Request), None);
    assert!(s.upstream_request().is_some());
}

#[test]
fn root_context_calls_are_answered_to_the_root() {
    let host = Host::builder().workers(1).canary(false).build();
    host.add_cluster("idp", |_| Reply::ok(200, "x").after(Duration::from_secs(1)));
    probe(&host, json!({"configure": [call("idp", 0)]}));
    assert!(lines(&host, "call_response").is_empty());
    assert_eq!(
        host.pending_calls(),
        vec![("idp".to_string(), "/keys".to_string())]
    );
    host.advance(Duration::from_secs(1));
    assert_eq!(
        lines(&host, "call_response"),
        vec!["root 1 call_response token=4 headers=1 body=1 trailers=0"]
    );
    assert!(host.pending_calls().is_empty());
}

#[test]
fn canary_callouts_are_cancelled_with_the_canary() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("idp", |_| {
        Reply::ok(200, "x").after(Duration::from_millis(10))
    });
    probe(&host, json!({"configure": [call("idp", 0)]}));
    host.advance(Duration::from_secs(1));
    // Two calls were made (canary, worker); only the worker's is answered.
    assert_eq!(lines(&host, "http_call=Ok").len(), 2);
    assert_eq!(lines(&host, "call_response").len(), 1);
}

#[test]
fn timeout_delivers_a_504_at_the_deadline() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("slow", |_| Reply::Never);
    let p = probe(
        &host,
        json!({"request_headers": [call("slow", 1000), "pause"], "call_response": [{"get_header": ["call_headers", ":status"]}, {"get_body": "call_body"}, {"resume": "request"}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    host.advance(Duration::from_millis(999));
    assert!(lines(&host, "call_response").is_empty());
    assert_eq!(s.paused_at(Direction::Request), Some(0));
    host.advance(Duration::from_millis(1));
    assert_eq!(
        lines(&host, "header :status"),
        vec![r#"header :status=Some("504")"#]
    );
    assert_eq!(
        starting(&host, "body="),
        vec![r#"body="upstream request timeout""#]
    );
    assert!(s.upstream_request().is_some());
}

#[test]
fn a_late_answer_after_the_timeout_is_dropped() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("slow", |_| {
        Reply::ok(200, "late").after(Duration::from_secs(5))
    });
    let p = probe(&host, json!({"request_headers": [call("slow", 100)]}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    host.advance(Duration::from_secs(10));
    assert_eq!(
        lines(&host, "call_response").len(),
        1,
        "one answer only: the timeout"
    );
}

#[test]
fn reset_callout_has_no_headers() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("idp", |_| Reply::Reset {
        delay: Duration::ZERO,
    });
    let p = probe(&host, json!({"request_headers": [call("idp", 100)]}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(
        lines(&host, "call_response"),
        vec!["ctx 2 call_response token=4 headers=0 body=0 trailers=0"]
    );
}

#[test]
fn answer_for_a_finished_stream_is_not_delivered_to_it() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("idp", |_| {
        Reply::ok(200, "x").after(Duration::from_millis(10))
    });
    let p = probe(
        &host,
        json!({"request_headers": [call("idp", 0)], "call_response": [{"resume": "request"}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.respond(200, &[], b"");
    assert!(s.is_complete());
    host.advance(Duration::from_millis(10));
    // The SDK finds no context for the token any more: no callback, no trap.
    assert!(lines(&host, "call_response").is_empty());
    assert!(!p.failed(0));
}

fn serve_once(body: &'static str) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut req = Vec::new();
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&req).to_string();
        let reply_body = format!("{body} {}", head.lines().next().unwrap_or(""));
        write!(c, "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{reply_body}\r\n0\r\n\r\n", reply_body.len()).unwrap();
    });
    addr
}

#[test]
fn real_http_server_on_loopback_answers() {
    let host = Host::builder().workers(1).build();
    host.add_http_cluster("idp", serve_once("from-server"));
    let p = probe(
        &host,
        json!({"request_headers": [call("idp", 5000), "pause"], "call_response": [{"get_body": "call_body"}, {"resume": "request"}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(host.wait_for_callouts(Duration::from_secs(10)));
    assert_eq!(
        starting(&host, "body="),
        vec![r#"body="from-server GET /keys HTTP/1.1""#]
    );
    assert!(s.upstream_request().is_some());
}

#[test]
fn unreachable_real_server_is_a_503() {
    let host = Host::builder().workers(1).build();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    host.add_http_cluster("idp", dead);
    let p = probe(
        &host,
        json!({"request_headers": [call("idp", 2000)], "call_response": [{"get_header": ["call_headers", ":status"]}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(host.wait_for_callouts(Duration::from_secs(10)));
    assert_eq!(
        lines(&host, "header :status"),
        vec![r#"header :status=Some("503")"#]
    );
}

#[test]
fn grpc_call_success_and_failure() {
    let host = Host::builder().workers(1).build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    host.add_grpc_cluster("rls", move |req| {
        seen2.lock().unwrap().push((
            req.service.clone(),
            req.method.clone(),
            req.message.clone(),
            req.metadata.clone(),
        ));
        if req.message == b"deny" {
            Reply::GrpcError {
                status: 8,
                message: "over limit".into(),
                delay: Duration::ZERO,
            }
        } else {
            Reply::grpc(b"\x08\x01".to_vec())
        }
    });
    let g = |m: &str| json!({"grpc_call": {"cluster": "rls", "service": "envoy.service.ratelimit.v3.RateLimitService", "method": "ShouldRateLimit", "message": m, "timeout_ms": 100}});
    let p = probe(
        &host,
        json!({"request_headers": [g("ok"), g("deny"), {"grpc_call": {"cluster": "nope", "service": "s", "method": "m", "message": "", "timeout_ms": 1}}], "call_response": [{"get_body": "grpc_message"}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(
        lines(&host, "grpc_call="),
        vec![
            "grpc_call=Ok(5)",
            "grpc_call=Ok(9)",
            "grpc_call=Err(ParseFailure)"
        ]
    );
    let r = lines(&host, "grpc_response");
    assert_eq!(
        r[0],
        r#"ctx 2 grpc_response token=5 status=0 size=2 get_status=(0,None)"#
    );
    assert_eq!(
        r[1],
        r#"ctx 2 grpc_response token=9 status=8 size=0 get_status=(8,Some("over limit"))"#
    );
    assert_eq!(starting(&host, "body=")[0], "body=hex:0801");
    let s0 = &seen.lock().unwrap()[0];
    assert_eq!(
        (s0.0.as_str(), s0.1.as_str(), s0.2.as_slice()),
        (
            "envoy.service.ratelimit.v3.RateLimitService",
            "ShouldRateLimit",
            b"ok".as_slice()
        )
    );
    assert_eq!(s0.3, vec![("x-probe".to_string(), b"1".to_vec())]);
}

#[test]
fn grpc_timeout_is_unavailable_as_the_routers_504() {
    let host = Host::builder().workers(1).build();
    host.add_grpc_cluster("rls", |_| Reply::Never);
    let p = probe(
        &host,
        json!({"request_headers": [{"grpc_call": {"cluster": "rls", "service": "s", "method": "m", "message": "", "timeout_ms": 20}}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    host.advance(Duration::from_millis(20));
    assert_eq!(
        lines(&host, "grpc_response"),
        vec![
            r#"ctx 2 grpc_response token=5 status=14 size=0 get_status=(14,Some("upstream request timeout"))"#
        ]
    );
}

/// A gRPC server (HTTP/2, no TLS) on loopback that answers every call with
/// `<path>|<request message>|<x-probe metadata>` and grpc-status 0, or with
/// the given error status.
fn grpc_server(error: Option<(u32, &'static str)>) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let (sock, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(sock).await.unwrap();
            while let Some(r) = conn.accept().await {
                let (req, mut respond) = r.unwrap();
                let path = req.uri().path().to_string();
                let md = req
                    .headers()
                    .get("x-probe")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let mut body = req.into_body();
                let mut data = Vec::new();
                while let Some(c) = body.data().await {
                    data.extend_from_slice(&c.unwrap());
                }
                let resp = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(resp, false).unwrap();
                let mut trailers = http::HeaderMap::new();
                match error {
                    Some((code, msg)) => {
                        trailers.insert("grpc-status", code.to_string().parse().unwrap());
                        trailers.insert("grpc-message", msg.parse().unwrap());
                    }
                    None => {
                        let out = format!("{path}|{}|{md}", String::from_utf8_lossy(&data[5..]));
                        let mut frame = vec![0u8];
                        frame.extend_from_slice(&(out.len() as u32).to_be_bytes());
                        frame.extend_from_slice(out.as_bytes());
                        send.send_data(bytes::Bytes::from(frame), false).unwrap();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                    }
                }
                send.send_trailers(trailers).unwrap();
            }
        });
    });
    addr
}

fn grpc_probe(host: &Host) -> wasm_host::Plugin {
    probe(
        host,
        json!({"request_headers": [
        {"grpc_call": {"cluster": "rls", "service": "envoy.service.ratelimit.v3.RateLimitService", "method": "ShouldRateLimit", "message": "descriptor", "timeout_ms": 5000}}
    ], "call_response": [{"get_body": "grpc_message"}]}),
    )
}

#[test]
fn real_grpc_server_on_loopback_answers() {
    let host = Host::builder().workers(1).build();
    host.add_grpc_server("rls", grpc_server(None));
    let p = grpc_probe(&host);
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(host.wait_for_callouts(Duration::from_secs(10)));
    assert_eq!(
        starting(&host, "body="),
        vec![r#"body="/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit|descriptor|1""#]
    );
    assert_eq!(
        lines(&host, "grpc_response")[0],
        "ctx 2 grpc_response token=5 status=0 size=73 get_status=(0,None)"
    );
}

#[test]
fn real_grpc_server_error_status_reaches_the_filter() {
    let host = Host::builder().workers(1).build();
    host.add_grpc_server("rls", grpc_server(Some((8, "over the limit"))));
    let p = grpc_probe(&host);
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(host.wait_for_callouts(Duration::from_secs(10)));
    assert_eq!(
        lines(&host, "grpc_response"),
        vec![
            r#"ctx 2 grpc_response token=5 status=8 size=0 get_status=(8,Some("over the limit"))"#
        ]
    );
}

#[test]
fn unreachable_grpc_server_is_unavailable() {
    let host = Host::builder().workers(1).build();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    host.add_grpc_server("rls", dead);
    let p = grpc_probe(&host);
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(host.wait_for_callouts(Duration::from_secs(10)));
    let r = lines(&host, "grpc_response");
    assert!(
        r[0].starts_with("ctx 2 grpc_response token=5 status=14 size=0"),
        "{r:?}"
    );
}

#[test]
fn http_and_grpc_tokens_are_separate_sequences() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("idp", |_| Reply::Never);
    host.add_grpc_cluster("rls", |_| Reply::Never);
    let g = json!({"grpc_call": {"cluster": "rls", "service": "s", "method": "m", "message": "", "timeout_ms": 0}});
    let p = probe(
        &host,
        json!({"request_headers": [call("idp", 0), g, call("idp", 0), g]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(
        lines(&host, "_call="),
        vec![
            "http_call=Ok(4)",
            "grpc_call=Ok(5)",
            "http_call=Ok(8)",
            "grpc_call=Ok(9)"
        ]
    );
}
