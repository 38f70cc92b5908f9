use super::*;
use filter_common::double::FakeHost;
use filter_common::filter::configure;
use serde_json::{json, Value};
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const START: Duration = Duration::from_secs(1_800_000_000);

fn usage(extra: Value) -> (FakeHost, Usage) {
    let mut cfg = json!({
        "cluster": "sidecar",
        "max_batch_records": 3,
        "max_pending_records": 5,
        "retry_initial_ms": 100,
        "retry_max_ms": 400,
        "routes": ["/api/v1/curves/{market}/latest"],
    });
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let h = FakeHost::at(START).with_config(&cfg);
    let u = configure::<Usage, _>(&h).expect("configured");
    (h, u)
}

/// A stream that ends: its headers and Envoy's properties.
fn stream(h: &FakeHost, u: &mut Usage, path: &str, tenant: Option<&str>, status: i64) {
    let mut headers = vec![(":path", path), (":method", "GET")];
    if let Some(t) = tenant {
        headers.push(("x-auth-tenant", t));
        headers.push(("x-auth-subject", "alice"));
    }
    h.stream(2, &headers);
    h.set_property(&["request", "url_path"], path.as_bytes());
    h.set_property(&["request", "method"], b"GET");
    h.set_property(&["response", "code"], &status.to_le_bytes());
    h.set_property(&["request", "size"], &7i64.to_le_bytes());
    h.set_property(&["response", "size"], b"11"); // another host's form
    h.set_property(&["request", "duration"], &3_000_000i64.to_le_bytes());
    u.on_log(h, &mut (), 2);
}

fn batch(c: &filter_common::double::Call) -> (String, Vec<Value>) {
    let v: Value = serde_json::from_slice(c.body.as_deref().unwrap()).unwrap();
    (
        v["batch"].as_str().unwrap().to_string(),
        v["records"].as_array().unwrap().clone(),
    )
}

#[test]
fn a_stream_becomes_a_record_and_records_a_batch() {
    let (h, mut u) = usage(json!({}));
    assert_eq!(
        *h.ticks.borrow(),
        [Duration::from_secs(1)],
        "one tick period"
    );
    stream(&h, &mut u, "/api/v1/curves/EU/latest", Some("acme"), 200);
    stream(&h, &mut u, "/x", None, 404);
    assert_eq!(h.metric_value("usage.records"), 2);
    assert_eq!(h.queue_len("254carbon.usage"), 2);
    u.on_queue_ready(&h, 1);
    assert!(
        h.take_calls().is_empty(),
        "a partial batch waits for the tick"
    );
    u.on_tick(&h);
    let c = h.take_calls().pop().expect("sent at the tick");
    assert_eq!(
        (
            c.cluster.as_str(),
            c.header(":path"),
            c.header("x-usage-records")
        ),
        ("sidecar", Some("/v1/usage"), Some("2"))
    );
    let (_, records) = batch(&c);
    let r = &records[0];
    assert_eq!(
        (&r["tenant"], &r["subject"], &r["route"], &r["status"]),
        (
            &json!("acme"),
            &json!("alice"),
            &json!("/api/v1/curves/{market}/latest"),
            &json!(200)
        )
    );
    assert_eq!(
        (&r["request_bytes"], &r["response_bytes"], &r["duration_us"]),
        (&json!(7), &json!(11), &json!(3000)),
        "both integer forms"
    );
    assert_eq!(
        (&records[1]["tenant"], &records[1]["route"]),
        (&json!("anonymous"), &json!("other"))
    );
    h.answer(Some(200), &[], b"{}");
    u.on_http_call_response(&h, c.token, 2);
    assert_eq!(h.metric_value("usage.batches_sent"), 1);
    assert_eq!(h.metric_value("usage.records_sent"), 2);
}

#[test]
fn a_full_batch_goes_at_once_and_one_is_in_flight() {
    let (h, mut u) = usage(json!({"max_pending_records": 20}));
    for _ in 0..7 {
        stream(&h, &mut u, "/x", Some("t"), 200);
    }
    u.on_queue_ready(&h, 1);
    let calls = h.take_calls();
    assert_eq!(calls.len(), 1, "one in flight");
    assert_eq!(batch(&calls[0]).1.len(), 3);
    h.answer(Some(204), &[], b"");
    u.on_http_call_response(&h, calls[0].token, 0);
    let next = h.take_calls();
    assert_eq!(next.len(), 1, "the next full batch follows the answer");
    assert_ne!(batch(&next[0]).0, batch(&calls[0]).0, "new id");
}

#[test]
fn a_failed_batch_is_resent_under_its_id_after_a_backoff() {
    let (h, mut u) = usage(json!({}));
    stream(&h, &mut u, "/x", Some("t"), 200);
    u.on_tick(&h);
    let first = h.take_calls().pop().unwrap();
    let mut waits = Vec::new();
    let mut token = first.token;
    for status in [Some(503), None, Some(500), Some(502)] {
        h.answer(status, &[], b"");
        u.on_http_call_response(&h, token, 0);
        let mut waited = 0;
        loop {
            u.on_tick(&h);
            if let Some(c) = h.take_calls().pop() {
                assert_eq!(batch(&c).0, batch(&first).0, "same id");
                token = c.token;
                break;
            }
            h.advance(Duration::from_millis(50));
            waited += 50;
        }
        waits.push(waited);
    }
    assert_eq!(waits, [100, 200, 400, 400], "doubling up to retry_max_ms");
    assert_eq!(h.metric_value("usage.batch_failures"), 4);
    h.answer(Some(200), &[], b"");
    u.on_http_call_response(&h, token, 0);
    assert_eq!(h.metric_value("usage.records_sent"), 1);
}

#[test]
fn a_refused_batch_is_dropped_and_logged() {
    let (h, mut u) = usage(json!({}));
    stream(&h, &mut u, "/x", Some("t"), 200);
    u.on_tick(&h);
    let c = h.take_calls().pop().unwrap();
    let n = h.answer(Some(422), &[], b"bad record");
    u.on_http_call_response(&h, c.token, n);
    assert_eq!(h.metric_value("usage.records_rejected"), 1);
    assert!(h.logged("refused batch") && h.logged("bad record"));
    h.advance(Duration::from_secs(10));
    u.on_tick(&h);
    assert!(h.take_calls().is_empty(), "not resent");
}

#[test]
fn beyond_max_pending_the_oldest_go_never_the_batch_in_flight() {
    let (h, mut u) = usage(json!({}));
    for _ in 0..3 {
        stream(&h, &mut u, "/x", Some("t"), 200);
    }
    u.on_queue_ready(&h, 1);
    let c = h.take_calls().pop().unwrap();
    for i in 0..6 {
        stream(&h, &mut u, &format!("/p{i}"), Some("t"), 200);
    }
    u.on_queue_ready(&h, 1);
    assert_eq!(u.held(), 5);
    assert_eq!(h.metric_value("usage.records_dropped"), 4);
    h.answer(Some(200), &[], b"");
    u.on_http_call_response(&h, c.token, 0);
    assert_eq!(
        h.metric_value("usage.records_sent"),
        3,
        "the batch in flight was kept"
    );
    u.on_tick(&h);
    let next = h.take_calls().pop().unwrap();
    assert_eq!(batch(&next).1.len(), 2, "the two newest");
    assert!(h.logged("dropped the 4 oldest records"));
}

#[test]
fn a_cluster_that_does_not_exist_is_a_failure_and_refusals_name_the_field() {
    let (h, mut u) = usage(json!({"cluster": "nowhere"}));
    h.clusters.borrow_mut().push("sidecar".into());
    stream(&h, &mut u, "/x", Some("t"), 200);
    u.on_tick(&h);
    assert!(h.logged("cannot call cluster nowhere"));
    assert_eq!(h.metric_value("usage.batch_failures"), 1);

    let bad = FakeHost::default().with_config(&json!({"cluster": "c", "queue": ""}));
    assert!(configure::<Usage, _>(&bad).is_none());
    assert!(bad.logged("usage: configuration: queue: must not be empty"));
    let missing = FakeHost::default();
    assert!(configure::<Usage, _>(&missing).is_none());
    assert!(missing.logged("usage: configuration: missing"));
}
