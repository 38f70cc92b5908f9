use crate::common::*;
use serde_json::json;
use wasm_host::{Callback, Direction, Host, TraceEntry};

fn callbacks(trace: &[TraceEntry]) -> Vec<(usize, Callback, Option<bool>)> {
    trace
        .iter()
        .map(|t| (t.filter, t.callback, t.continued))
        .collect()
}

#[test]
fn full_stream_callbacks_in_envoy_order() {
    use Callback::*;
    let host = Host::default();
    let p = probe(&host, json!({}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/p"), (":authority", "a")],
        false,
    );
    s.request_body(b"abc", false);
    s.request_trailers(&[("x-t", "1")]);
    s.response_headers(&[(":status", "200")], false);
    s.response_body(b"xyz", false);
    s.response_trailers(&[("grpc-status", "0")]);
    let got: Vec<_> = callbacks(&s.trace())
        .into_iter()
        .map(|(_, c, _)| c)
        .collect();
    assert_eq!(
        got,
        vec![
            ContextCreate,
            RequestHeaders,
            RequestBody,
            RequestTrailers,
            ResponseHeaders,
            ResponseBody,
            ResponseTrailers,
            Log,
            Done
        ]
    );
    assert!(s.is_complete());
    let up = s.upstream_request().unwrap();
    assert_eq!(up.body, b"abc");
    assert_eq!(
        up.trailers.unwrap(),
        vec![("x-t".to_string(), b"1".to_vec())]
    );
    assert_eq!(s.response().unwrap().trailers.unwrap()[0].0, "grpc-status");
}

#[test]
fn chain_passes_header_changes_on_and_encodes_in_reverse_order() {
    let host = Host::builder().workers(1).build();
    let a = host
        .load(
            probe_config(json!({
                "request_headers": [{"add_header": ["request_headers", "x-from-a", "1"]}],
                "response_headers": [{"get_header": ["response_headers", "x-from-b"]}]
            }))
            .name("a"),
        )
        .unwrap();
    let b = host
        .load(probe_config(json!({
            "request_headers": [{"get_header": ["request_headers", "x-from-a"]}, {"remove_header": ["request_headers", "x-drop"]}],
            "response_headers": [{"set_header": ["response_headers", "x-from-b", "2"]}]
        })).name("b"))
        .unwrap();
    let s = host.stream(&host.chain(&[&a, &b]));
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "h"),
            ("x-drop", "x"),
        ],
        true,
    );
    assert_eq!(
        lines(&host, "header x-from-a"),
        vec![r#"header x-from-a=Some("1")"#]
    );
    let up = s.upstream_request().unwrap();
    assert_eq!(up.header("x-from-a").as_deref(), Some("1"));
    assert_eq!(up.header("x-drop"), None);
    s.respond(200, &[], b"");
    // Encoders run in reverse: b sets the header, then a sees it.
    assert_eq!(
        lines(&host, "header x-from-b"),
        vec![r#"header x-from-b=Some("2")"#]
    );
    let resp: Vec<_> = callbacks(&s.trace())
        .into_iter()
        .filter(|(_, c, _)| *c == Callback::ResponseHeaders)
        .map(|(f, _, _)| f)
        .collect();
    assert_eq!(resp, vec![1, 0]);
}

#[test]
fn pause_on_headers_holds_body_until_resume_then_delivers_it_buffered() {
    let host = Host::builder().workers(1).build();
    host.add_cluster("authz", |_| {
        wasm_host::Reply::ok(200, "yes").after(std::time::Duration::from_millis(50))
    });
    let p = probe(
        &host,
        json!({
            "request_headers": [
                {"http_call": {"cluster": "authz", "headers": [[":method", "GET"], [":path", "/check"], [":authority", "authz"]], "timeout_ms": 1000}},
                "pause"
            ],
            "call_response": [{"add_header": ["request_headers", "x-checked", "yes"]}, {"resume": "request"}]
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"hello ", false);
    s.request_body(b"world", true);
    assert_eq!(s.paused_at(Direction::Request), Some(0));
    assert!(s.upstream_request().is_none());
    assert!(
        lines(&host, "request_body").is_empty(),
        "no body callback while stopped at headers"
    );
    host.advance(std::time::Duration::from_millis(50));
    assert_eq!(s.paused_at(Direction::Request), None);
    // The two chunks arrive as one buffered body, with end of stream.
    assert_eq!(
        lines(&host, "request_body"),
        vec!["ctx 2 request_body size=11 eos=true"]
    );
    let up = s.upstream_request().unwrap();
    assert_eq!(
        up.header("x-checked").as_deref(),
        Some("yes"),
        "headers writable while paused"
    );
    assert_eq!(up.body, b"hello world");
}

#[test]
fn pause_on_body_buffers_and_reports_cumulative_sizes() {
    let host = Host::builder().workers(1).build();
    let p = probe(&host, json!({"request_body": ["pause"]}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"aaa", false);
    s.request_body(b"bb", false);
    s.request_body(b"c", true);
    assert_eq!(
        lines(&host, "request_body"),
        vec![
            "ctx 2 request_body size=3 eos=false",
            "ctx 2 request_body size=5 eos=false",
            "ctx 2 request_body size=6 eos=true"
        ]
    );
    assert!(
        s.upstream_request().unwrap().body.is_empty(),
        "still buffered"
    );
}

#[test]
fn body_can_be_read_and_replaced() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"request_body": [
            {"get_body": "request_body"},
            {"set_body": {"buf": "request_body", "start": 0, "size": 5, "data": "HELLO"}},
            {"set_body": {"buf": "request_body", "start": 100, "size": 0, "data": "!"}}
        ]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"hello world", true);
    assert_eq!(starting(&host, "body="), vec![r#"body="hello world""#]);
    assert_eq!(
        lines(&host, "set_body="),
        vec!["set_body=Ok(())", "set_body=Ok(())"]
    );
    assert_eq!(s.upstream_request().unwrap().body, b"HELLO world!");
}

#[test]
fn trailers_can_be_added_from_the_last_body_chunk() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"request_body": [{"add_header": ["request_trailers", "x-digest", "abc"]}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"x", true);
    assert_eq!(
        s.upstream_request().unwrap().trailers.unwrap(),
        vec![("x-digest".to_string(), b"abc".to_vec())]
    );
}

#[test]
fn local_reply_skips_the_rest_of_the_request_but_runs_encoders_and_log() {
    use Callback::*;
    let host = Host::builder().workers(1).build();
    let a = host
        .load(
            probe_config(
                json!({"response_headers": [{"get_header": ["response_headers", ":status"]}]}),
            )
            .name("a"),
        )
        .unwrap();
    let b = host
        .load(
            probe_config(json!({"request_headers": [{"send_local_response": {
            "status": 403, "body": "{\"error\":\"forbidden\"}",
            "headers": [["content-type", "application/json"], ["x-rule", "r1"]]}}]}))
            .name("b"),
        )
        .unwrap();
    let c = host.load(probe_config(json!({})).name("c")).unwrap();
    let s = host.stream(&host.chain(&[&a, &b, &c]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"ignored", true);
    assert!(s.upstream_request().is_none());
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(403));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("x-rule").as_deref(), Some("r1"));
    assert_eq!(r.header("content-length").as_deref(), Some("21"));
    assert_eq!(r.body_text(), r#"{"error":"forbidden"}"#);
    assert_eq!(s.local_reply().unwrap().status, 403);
    assert!(s.is_complete());
    assert_eq!(
        lines(&host, "header :status"),
        vec![r#"header :status=Some("403")"#]
    );
    let t = callbacks(&s.trace());
    // b's own headers callback reports Continue but is forced to Stop; no
    // request body callbacks. Envoy encodes the reply through the whole
    // encoder chain, but c's wasm context was never created, so Envoy's
    // Context::encodeHeaders returns Continue without calling its VM; its
    // Context::log then creates the context, so c still logs.
    assert_eq!(
        t,
        vec![
            (0, ContextCreate, None),
            (0, RequestHeaders, Some(true)),
            (1, ContextCreate, None),
            (1, RequestHeaders, Some(true)),
            (1, ResponseHeaders, Some(true)),
            (0, ResponseHeaders, Some(true)),
            (1, ResponseBody, Some(true)),
            (0, ResponseBody, Some(true)),
            (0, Log, None),
            (1, Log, None),
            (2, ContextCreate, None),
            (2, Log, None),
            (0, Done, None),
            (1, Done, None),
            (2, Done, None),
        ]
    );
}

#[test]
fn local_reply_while_encoding_replaces_the_upstream_response() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"response_headers": [{"send_local_response": {"status": 502, "body": "bad upstream", "headers": []}}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.respond(200, &[("x-up", "1")], b"upstream body");
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(502));
    assert_eq!(r.body_text(), "bad upstream");
    assert_eq!(r.header("x-up"), None);
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
}

#[test]
fn header_maps_are_reachable_only_when_envoy_allows() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({
            "request_headers": [{"raw_get_header": ["request_headers", ":path"]}, {"raw_get_header": ["response_headers", ":status"]}],
            "response_headers": [{"raw_get_header": ["request_headers", ":path"]}, {"raw_set_header": ["request_headers", "x", "y"]}, {"get_headers": "request_headers"}],
            "log": [{"raw_get_header": ["request_headers", ":path"]}, {"raw_get_header": ["response_headers", ":status"]}, {"raw_set_header": ["response_headers", "x", "y"]}]
        }),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.respond(200, &[], b"");
    assert_eq!(
        lines(&host, "raw_"),
        vec![
            // on_request_headers: request headers yes, response headers not yet.
            r#"raw_get :path status=0 value="/api/v1/curves/EU-ETS?at=now""#,
            "raw_get :status status=2 value=None",
            // on_response_headers: the request map is gone (BadArgument).
            "raw_get :path status=2 value=None",
            "raw_set x status=2",
            // on_log: both readable again, not writable.
            r#"raw_get :path status=0 value="/api/v1/curves/EU-ETS?at=now""#,
            r#"raw_get :status status=0 value="200""#,
            "raw_set x status=2",
        ]
    );
    assert_eq!(
        lines(&host, "headers="),
        vec!["headers=[]"],
        "pairs of an unavailable map are empty"
    );
}

#[test]
fn sdk_filter_reading_headers_outside_their_window_traps() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"response_headers": [{"get_header": ["request_headers", ":path"]}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.respond(200, &[], b"");
    // The SDK panics on BadArgument: the VM fails and the client gets a 503.
    assert!(p.failed(0));
    assert_eq!(s.response().unwrap().status(), Some(503));
    assert_eq!(s.local_reply().unwrap().details, "wasm_fail_stream");
}

#[test]
fn properties_served_as_envoy_serves_them() {
    let host = Host::builder().workers(1).build();
    let props = [
        "request.path",
        "request.url_path",
        "request.method",
        "request.host",
        "request.id",
        "source.address",
        "source.port",
        "connection.mtls",
        "plugin_name",
        "plugin_root_id",
        "plugin_vm_id",
        "request.headers.x-multi",
        "node.id",
    ];
    let ops: Vec<_> = props
        .iter()
        .map(|p| json!({"property": p.split('.').collect::<Vec<_>>()}))
        .collect();
    let p = probe(
        &host,
        json!({"request_headers": ops, "response_headers": [{"property": ["request", "path"]}, {"property": ["response", "code"]}]}),
    );
    let opts = wasm_host::StreamOptions {
        source: "203.0.113.9:41000".into(),
        mtls: true,
        ..Default::default()
    };
    let s = host.stream_with(&host.chain(&[&p]), opts);
    let mut h = GET.to_vec();
    h.push(("x-request-id", "req-1"));
    h.push(("x-multi", "a"));
    h.push(("x-multi", "b"));
    s.request_headers(&h, true);
    s.respond(201, &[], b"");
    let got = lines(&host, "property ");
    assert_eq!(
        got,
        vec![
            r#"property request.path="/api/v1/curves/EU-ETS?at=now""#,
            r#"property request.url_path="/api/v1/curves/EU-ETS""#,
            r#"property request.method="GET""#,
            r#"property request.host="api.254carbon.test""#,
            r#"property request.id="req-1""#,
            r#"property source.address="203.0.113.9:41000""#,
            format!("property source.port=hex:{}", hex(&41000i64.to_le_bytes())).as_str(),
            "property connection.mtls=hex:01",
            r#"property plugin_name="probe""#,
            r#"property plugin_root_id="probe_root""#,
            r#"property plugin_vm_id="probe_vm""#,
            r#"property request.headers.x-multi="a,b""#,
            // Removed from Envoy in 2024: NotFound, which the SDK maps to None.
            "property node.id=None",
            // Request attributes are gone once request headers continued.
            "property request.path=None",
            format!("property response.code=hex:{}", hex(&201i64.to_le_bytes())).as_str(),
        ]
    );
}

#[test]
fn request_id_is_generated_when_absent() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"property": ["request", "id"]}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    let id = s
        .upstream_request()
        .unwrap()
        .header("x-request-id")
        .expect("generated");
    assert_eq!(
        lines(&host, "property request.id="),
        vec![format!("property request.id={id:?}")]
    );
}

#[test]
fn close_stream_resets_it() {
    let host = Host::builder().workers(1).build();
    let p = probe(&host, json!({"request_headers": [{"close": "request"}]}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(s.was_reset());
    assert!(s.is_complete());
    assert!(s.response().is_none());
    assert_eq!(
        lines(&host, " log").len(),
        1,
        "on_log still runs for a reset stream"
    );
}

#[test]
fn client_reset_runs_log_done_delete() {
    let host = Host::builder().workers(1).build();
    let p = probe(&host, json!({"request_headers": ["pause"]}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    s.reset();
    assert!(s.is_complete());
    let t: Vec<_> = s.trace().iter().map(|t| t.callback).collect();
    assert_eq!(
        t,
        vec![
            Callback::ContextCreate,
            Callback::RequestHeaders,
            Callback::Log,
            Callback::Done
        ]
    );
}

#[test]
fn upstream_responder_answers_complete_requests() {
    let host = Host::builder().workers(1).build();
    let p = probe(&host, json!({}));
    let chain = host.chain(&[&p]).with_upstream(|req| wasm_host::Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: format!("echo {}", req.header(":path").unwrap_or_default()).into_bytes(),
        trailers: None,
    });
    let s = host.stream(&chain);
    s.request_headers(GET, true);
    assert_eq!(
        s.response().unwrap().body_text(),
        "echo /api/v1/curves/EU-ETS?at=now"
    );
    assert!(s.is_complete());
}

#[test]
fn empty_chain_passes_through() {
    let host = Host::default();
    let s = host.stream(&host.chain(&[]));
    s.request_headers(GET, true);
    s.respond(204, &[], b"");
    assert_eq!(s.response().unwrap().status(), Some(204));
    assert!(s.is_complete());
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn on_resume_later_filters_get_headers_before_the_resumed_filter_gets_the_body() {
    use Callback::*;
    let host = Host::builder().workers(1).build();
    host.add_cluster("authz", |_| {
        wasm_host::Reply::ok(200, "").after(std::time::Duration::from_millis(5))
    });
    let a = host
        .load(probe_config(json!({
            "request_headers": [{"http_call": {"cluster": "authz", "headers": [[":method", "GET"], [":path", "/"], [":authority", "authz"]], "timeout_ms": 100}}, "pause"],
            "call_response": [{"resume": "request"}]
        })).name("a"))
        .unwrap();
    let b = host.load(probe_config(json!({})).name("b")).unwrap();
    let s = host.stream(&host.chain(&[&a, &b]));
    s.request_headers(
        &[(":method", "POST"), (":path", "/"), (":authority", "h")],
        false,
    );
    s.request_body(b"payload", true);
    host.advance(std::time::Duration::from_millis(5));
    let t: Vec<_> = callbacks(&s.trace())
        .into_iter()
        .map(|(f, c, _)| (f, c))
        .collect();
    assert_eq!(
        t,
        vec![
            (0, ContextCreate),
            (0, RequestHeaders),
            (1, ContextCreate),
            (1, RequestHeaders),
            (0, RequestBody),
            (1, RequestBody)
        ]
    );
    assert_eq!(s.upstream_request().unwrap().body, b"payload");
}

#[test]
fn local_reply_to_a_grpc_request_is_trailers_only() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"send_local_response": {"status": 429, "body": "rate limited", "headers": []}}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[
            (":method", "POST"),
            (":path", "/pkg.Svc/Get"),
            (":authority", "h"),
            ("content-type", "application/grpc"),
        ],
        false,
    );
    let r = s.response().unwrap();
    assert_eq!(r.status(), Some(200));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(r.header("grpc-status").as_deref(), Some("14"));
    assert_eq!(r.header("grpc-message").as_deref(), Some("rate limited"));
    assert!(r.body.is_empty());
    assert!(s.is_complete());
}

#[test]
fn local_reply_with_empty_body_has_no_content_headers() {
    let host = Host::builder().workers(1).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"send_local_response": {"status": 401, "body": "", "headers": [["content-type", "application/json"], ["www-authenticate", "Bearer"]]}}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    let r = s.response().unwrap();
    assert_eq!(
        *r.headers,
        vec![
            (":status".to_string(), b"401".to_vec()),
            ("www-authenticate".to_string(), b"Bearer".to_vec())
        ]
    );
}

#[test]
fn local_response_from_a_root_context_is_a_no_op() {
    let host = Host::builder().workers(1).canary(false).build();
    probe(
        &host,
        json!({"configure": [{"send_local_response": {"status": 500, "body": "", "headers": []}}]}),
    );
    assert_eq!(
        lines(&host, "local_response="),
        vec!["local_response=Ok(())"]
    );
}
