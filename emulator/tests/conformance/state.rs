use crate::common::*;
use serde_json::json;
use std::time::{Duration, UNIX_EPOCH};
use wasm_host::{Host, LogLevel, MetricValue, StreamOptions};

fn on_worker(host: &Host, chain: &wasm_host::Chain, worker: usize) -> wasm_host::Stream {
    let s = host.stream_with(
        chain,
        StreamOptions {
            worker: Some(worker),
            ..Default::default()
        },
    );
    s.request_headers(GET, true);
    s
}

#[test]
fn shared_data_is_shared_across_vms_with_envoy_cas_rules() {
    let host = Host::builder().workers(2).canary(false).build();
    let set =
        |v: &str, cas: Option<u32>| json!({"shared_set": {"key": "k", "value": v, "cas": cas}});
    let w0 = probe(
        &host,
        json!({"request_headers": [{"shared_get": "k"}, set("a", None), {"shared_get": "k"}]}),
    );
    let chain = host.chain(&[&w0]);
    on_worker(&host, &chain, 0);
    assert_eq!(
        lines(&host, "shared k="),
        vec!["shared k=None cas=None", r#"shared k="a" cas=Some(1)"#]
    );
    let (v, cas) = host.shared_data("probe_vm", "k").unwrap();
    assert_eq!((v.as_slice(), cas), (b"a".as_slice(), 1));

    // Another worker VM sees it; a stale CAS is refused, the current one accepted.
    host.clear_logs();
    let w1 = probe(
        &host,
        json!({"request_headers": [{"shared_get": "k"}, set("b", Some(7)), set("c", Some(1)), set("d", Some(1)), set("e", Some(0))]}),
    );
    on_worker(&host, &host.chain(&[&w1]), 1);
    assert_eq!(
        lines(&host, "shared k="),
        vec![r#"shared k="a" cas=Some(1)"#]
    );
    assert_eq!(
        lines(&host, "shared_set"),
        vec![
            "shared_set k=Err(CasMismatch)",
            "shared_set k=Ok(())",
            "shared_set k=Err(CasMismatch)",
            "shared_set k=Ok(())"
        ]
    );
    assert_eq!(
        host.shared_data("probe_vm", "k").unwrap(),
        (b"e".to_vec(), 3)
    );
}

#[test]
fn absent_key_accepts_any_cas_and_vm_ids_are_separate() {
    let host = Host::builder().workers(1).canary(false).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"shared_set": {"key": "fresh", "value": "v", "cas": 42}}]}),
    );
    on_worker(&host, &host.chain(&[&p]), 0);
    assert_eq!(lines(&host, "shared_set"), vec!["shared_set fresh=Ok(())"]);
    let other = host
        .load(probe_config(json!({"request_headers": [{"shared_get": "fresh"}]})).vm_id("other"))
        .unwrap();
    on_worker(&host, &host.chain(&[&other]), 0);
    assert_eq!(
        lines(&host, "shared fresh="),
        vec!["shared fresh=None cas=None"]
    );
}

#[test]
fn queue_notifications_are_asynchronous_and_go_to_the_latest_registrant() {
    let host = Host::builder().workers(2).build();
    let p = probe(
        &host,
        json!({
            "configure": [{"register_queue": "usage"}],
            "request_headers": [{"enqueue": {"name": "usage", "vm_id": "probe_vm", "value": "rec1"}}, {"log": "enqueued"}],
            "queue_ready": [{"dequeue": "usage"}, {"dequeue": "usage"}]
        }),
    );
    // Canary, worker 0, worker 1 all registered the same name: one queue.
    assert_eq!(lines(&host, "queue usage="), vec!["queue usage=1"; 3]);
    let s = on_worker(&host, &host.chain(&[&p]), 0);
    let l = lines(&host, "");
    let at = l.iter().position(|x| x == "enqueued").unwrap();
    assert_eq!(l[at - 1], "enqueue usage=Ok(())");
    // Delivered after the enqueueing callback, to worker 1's root (the last to register).
    let ready: Vec<_> = host
        .logs()
        .into_iter()
        .filter(|r| r.message.contains("queue_ready"))
        .map(|r| r.worker)
        .collect();
    assert_eq!(ready, vec![Some(1)]);
    assert_eq!(
        lines(&host, "dequeue"),
        vec![r#"dequeue usage="rec1""#, "dequeue usage=None"]
    );
    drop(s);
}

#[test]
fn resolve_and_unknown_queues() {
    let host = Host::builder().workers(1).canary(false).build();
    let p = probe(
        &host,
        json!({
            "configure": [{"resolve_queue": {"vm_id": "probe_vm", "name": "missing"}}, {"register_queue": "q"}, {"resolve_queue": {"vm_id": "probe_vm", "name": "q"}}],
            "request_headers": [{"dequeue": "nope"}]
        }),
    );
    assert_eq!(
        lines(&host, "resolve"),
        vec!["resolve missing=None", "resolve q=Some(1)"]
    );
    on_worker(&host, &host.chain(&[&p]), 0);
    assert_eq!(lines(&host, "dequeue"), vec!["dequeue nope error=NotFound"]);
}

#[test]
fn ticks_fire_per_root_per_vm_on_the_test_clock() {
    let host = Host::builder().workers(2).build();
    probe(
        &host,
        json!({"configure": [{"tick_ms": 100}], "tick": [{"time": null}]}),
    );
    host.advance(Duration::from_millis(99));
    assert!(lines(&host, "tick root").is_empty());
    host.advance(Duration::from_millis(151));
    // Two workers × ticks at 100 and 200 ms; the canary's timer died with it.
    let ticks: Vec<_> = host
        .logs()
        .into_iter()
        .filter(|r| r.message.contains("tick root"))
        .map(|r| r.worker)
        .collect();
    assert_eq!(ticks, vec![Some(0), Some(1), Some(0), Some(1)]);
    let start = 1_767_225_600u128 * 1_000_000_000;
    let times = lines(&host, "time=");
    assert_eq!(
        times[0],
        format!(
            "time={} wasi_time={}",
            start + 100_000_000,
            start + 100_000_000
        )
    );
    assert_eq!(
        times[3],
        format!(
            "time={} wasi_time={}",
            start + 200_000_000,
            start + 200_000_000
        )
    );
}

#[test]
fn tick_period_zero_stops_ticks() {
    let host = Host::builder().workers(1).canary(false).build();
    probe(
        &host,
        json!({"configure": [{"tick_ms": 10}], "tick": [{"tick_ms": 0}]}),
    );
    host.advance(Duration::from_millis(100));
    assert_eq!(lines(&host, "tick root").len(), 1);
}

#[test]
fn current_time_follows_the_host_clock() {
    let start = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let host = Host::builder().workers(1).start_time(start).build();
    let p = probe(&host, json!({"request_headers": [{"time": null}]}));
    on_worker(&host, &host.chain(&[&p]), 0);
    host.advance(Duration::from_secs(3600));
    on_worker(&host, &host.chain(&[&p]), 0);
    let t = lines(&host, "time=");
    assert_eq!(
        t[0],
        "time=2000000000000000000 wasi_time=2000000000000000000"
    );
    assert_eq!(
        t[1],
        "time=2000003600000000000 wasi_time=2000003600000000000"
    );
    assert_eq!(host.now(), start + Duration::from_secs(3600));
}

#[test]
fn metrics_aggregate_across_vms_under_envoy_names() {
    let host = Host::builder().workers(2).build();
    let p = probe(
        &host,
        json!({"request_headers": [
            {"counter": ["requests_total", 1]}, {"counter": ["requests_total", 0]},
            {"gauge": ["inflight", 7]}, {"histogram": ["latency_ms", 12]}, {"get_metric": "requests_total"}, {"get_metric": "latency_ms"}
        ]}),
    );
    let chain = host.chain(&[&p]);
    on_worker(&host, &chain, 0);
    on_worker(&host, &chain, 1);
    on_worker(&host, &chain, 0);
    assert_eq!(
        host.metric("wasmcustom.requests_total"),
        Some(MetricValue::Counter(3))
    );
    assert_eq!(host.counter("requests_total"), 3);
    assert_eq!(host.metric("inflight"), Some(MetricValue::Gauge(7)));
    assert_eq!(
        host.metric("latency_ms"),
        Some(MetricValue::Histogram(vec![12, 12, 12]))
    );
    // Counters only go up; histograms cannot be read back.
    assert_eq!(
        lines(&host, "counter requests_total=Err"),
        vec!["counter requests_total=Err(BadArgument)"; 3]
    );
    assert_eq!(
        lines(&host, "metric latency_ms="),
        vec!["metric latency_ms=Err(BadArgument)"; 3]
    );
    assert_eq!(
        lines(&host, "metric requests_total=")[0],
        "metric requests_total=Ok(1)"
    );
    assert_eq!(
        host.stats_text(),
        "wasmcustom.inflight: 7\nwasmcustom.latency_ms: count=3 sum=36\nwasmcustom.requests_total: 3\n"
    );
}

#[test]
fn logs_are_captured_with_levels_and_filtered_like_envoys_wasm_logger() {
    let host = Host::builder()
        .workers(1)
        .canary(false)
        .log_level(LogLevel::Warn)
        .build();
    let p = probe(
        &host,
        json!({"request_headers": [
            {"log_at": {"level": 1, "msg": "debug line"}}, {"log_at": {"level": 3, "msg": "warn line"}},
            {"log_at": {"level": 5, "msg": "critical line"}}, {"stdout": "to stdout"}, {"stderr": "to stderr"}, "log_level"
        ]}),
    );
    on_worker(&host, &host.chain(&[&p]), 0);
    let got: Vec<_> = host
        .logs()
        .into_iter()
        .map(|r| (r.level, r.message))
        .collect();
    assert_eq!(
        got,
        vec![
            (LogLevel::Warn, "warn line".to_string()),
            (LogLevel::Critical, "critical line".to_string()),
            // fd 1 is info (dropped at warn), fd 2 is error; one log line per
            // fd_write with its trailing newline stripped (eprintln! writes
            // the newline separately, so Envoy logs an empty line too).
            (LogLevel::Error, "to stderr".to_string()),
            (LogLevel::Error, String::new()),
        ]
    );
    let host = Host::builder()
        .workers(1)
        .canary(false)
        .log_level(LogLevel::Debug)
        .build();
    let p = probe(
        &host,
        json!({"request_headers": ["log_level", {"stdout": "to stdout"}]}),
    );
    on_worker(&host, &host.chain(&[&p]), 0);
    assert_eq!(lines(&host, "log_level="), vec!["log_level=Debug"]);
    let out: Vec<_> = host
        .logs()
        .into_iter()
        .filter(|r| r.message == "to stdout")
        .map(|r| r.level)
        .collect();
    assert_eq!(out, vec![LogLevel::Info]);
    let rec = host
        .logs()
        .into_iter()
        .find(|r| r.message == "to stdout")
        .unwrap();
    assert_eq!(
        rec.to_string(),
        "[Info] wasm log probe probe_root probe_vm: to stdout"
    );
}

#[test]
fn wasi_environment_and_randomness() {
    let host = Host::builder().workers(1).canary(false).build();
    let p = host
        .load(
            probe_config(
                json!({"request_headers": [{"env": "REGION"}, {"env": "HOME"}, {"random": 100}]}),
            )
            .env("REGION", "eu-west"),
        )
        .unwrap();
    on_worker(&host, &host.chain(&[&p]), 0);
    assert_eq!(
        lines(&host, "env "),
        vec![r#"env REGION=Some("eu-west")"#, "env HOME=None"]
    );
    assert_eq!(lines(&host, "random_ok="), vec!["random_ok=100"]);
}

#[test]
fn metric_ids_carry_their_type_in_the_low_bits() {
    let host = Host::builder().workers(1).canary(false).build();
    probe(
        &host,
        json!({"configure": [
            {"counter": ["c1", 1]}, {"gauge": ["g1", 1]}, {"counter": ["c2", 1]}, {"histogram": ["h1", 1]}, {"gauge": ["g2", 1]}
        ]}),
    );
    assert_eq!(
        lines(&host, "define "),
        vec![
            "define c1=4",
            "define g1=5",
            "define c2=8",
            "define h1=6",
            "define g2=9"
        ]
    );
}
