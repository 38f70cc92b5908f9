//! The strict host profile (`Profile::Strict`): each of its four rules, next
//! to Envoy's behaviour for the same script.
use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;
use wasm_host::{Host, Profile};

fn host(profile: Profile, workers: usize) -> Host {
    Host::builder()
        .workers(workers)
        .canary(false)
        .profile(profile)
        .build()
}

fn strict(workers: usize) -> Host {
    host(Profile::Strict, workers)
}

fn tick_workers(host: &Host) -> usize {
    host.logs()
        .iter()
        .filter(|r| r.message.contains("tick root"))
        .count()
}

#[test]
fn the_default_profile_is_envoy() {
    assert_eq!(Host::default().profile(), Profile::Envoy);
    assert_eq!(Host::builder().build().profile(), Profile::Envoy);
    assert_eq!(strict(1).profile(), Profile::Strict);
}

#[test]
fn strict_a_second_tick_period_in_on_configure_traps_the_load() {
    let script = json!({"configure": [{"tick_ms": 100}, {"tick_ms": 200}]});
    // Envoy: the second call re-arms the timer.
    let envoy = host(Profile::Envoy, 1);
    probe(&envoy, script.clone());
    envoy.advance(Duration::from_millis(150));
    assert_eq!(tick_workers(&envoy), 0);
    envoy.advance(Duration::from_millis(50));
    assert_eq!(tick_workers(&envoy), 1);

    let host = strict(1);
    let err = match host.load(probe_config(script)) {
        Ok(_) => panic!("a second tick period loaded in the strict profile"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tick_period already set"), "{err}");
    assert!(err.contains("proxy_on_configure"), "{err}");
}

#[test]
fn strict_a_zero_period_sets_nothing_so_the_next_call_is_the_first() {
    let host = strict(1);
    probe(
        &host,
        json!({"configure": [{"tick_ms": 0}, {"tick_ms": 100}]}),
    );
    host.advance(Duration::from_millis(250));
    assert_eq!(tick_workers(&host), 2);
}

#[test]
fn strict_setting_the_period_again_from_on_tick_fails_the_vm() {
    let script = json!({"configure": [{"tick_ms": 100}], "tick": [{"tick_ms": 100}]});
    let envoy = host(Profile::Envoy, 1);
    let p = probe(&envoy, script.clone());
    envoy.advance(Duration::from_millis(350));
    assert_eq!(tick_workers(&envoy), 3);
    assert!(!p.failed(0));

    let host = strict(1);
    let p = probe(&host, script);
    host.advance(Duration::from_millis(350));
    assert_eq!(tick_workers(&host), 1, "the first tick trapped; no more");
    let why = p.failure(0).unwrap();
    assert!(
        why.contains("proxy_on_tick") && why.contains("tick_period already set"),
        "{why}"
    );
    // A failed VM fails its streams, as after any trap.
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(s.response().unwrap().status(), Some(503));
}

#[test]
fn strict_a_tick_period_from_a_stream_context_traps() {
    let script = json!({"request_headers": [{"tick_ms": 100}]});
    let envoy = host(Profile::Envoy, 1);
    let p = probe(&envoy, script.clone());
    let s = envoy.stream(&envoy.chain(&[&p]));
    s.request_headers(GET, true);
    assert!(s.upstream_request().is_some());
    assert!(!p.failed(0));

    let host = strict(1);
    let p = probe(&host, script);
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    assert_eq!(s.response().unwrap().status(), Some(503));
    assert!(s.upstream_request().is_none());
    let why = p.failure(0).unwrap();
    assert!(
        why.contains("can only set tick_period in root context"),
        "{why}"
    );
}

fn set(key: &str, value: &str, cas: Option<u32>) -> Value {
    json!({"shared_set": {"key": key, "value": value, "cas": cas}})
}

#[test]
fn strict_cas_zero_only_creates_and_an_absent_key_wants_zero() {
    let script = json!({"request_headers": [
        set("k", "a", None),
        set("k", "b", None),
        {"shared_get": "k"},
        set("k", "c", Some(1)),
        set("k", "d", Some(1)),
        set("fresh", "v", Some(42)),
        {"shared_get": "k"},
        {"shared_get": "fresh"},
    ]});
    let run = |host: &Host| {
        let p = probe(host, script.clone());
        let s = host.stream(&host.chain(&[&p]));
        s.request_headers(GET, true);
        lines(host, "shared")
    };
    // Envoy: CAS 0 always writes, and an absent key takes any CAS.
    assert_eq!(
        run(&host(Profile::Envoy, 1)),
        vec![
            "shared_set k=Ok(())",
            "shared_set k=Ok(())",
            r#"shared k="b" cas=Some(2)"#,
            "shared_set k=Err(CasMismatch)",
            "shared_set k=Err(CasMismatch)",
            "shared_set fresh=Ok(())",
            r#"shared k="b" cas=Some(2)"#,
            r#"shared fresh="v" cas=Some(3)"#,
        ]
    );
    // Strict: 0 creates once, then only the current CAS writes.
    assert_eq!(
        run(&strict(1)),
        vec![
            "shared_set k=Ok(())",
            "shared_set k=Err(CasMismatch)",
            r#"shared k="a" cas=Some(1)"#,
            "shared_set k=Ok(())",
            "shared_set k=Err(CasMismatch)",
            "shared_set fresh=Err(CasMismatch)",
            r#"shared k="c" cas=Some(2)"#,
            "shared fresh=None cas=None",
        ]
    );
}

#[test]
fn strict_cas_zero_from_another_worker_is_refused_and_the_current_cas_lands() {
    // A filter's unconditional write must read the CAS and write with it
    // (0 only while the key is absent): a blind CAS-0 write from a second
    // worker VM is refused.
    let host = strict(2);
    let p = probe(
        &host,
        json!({"request_headers": [{"shared_get": "k"}, set("k", "w", None)]}),
    );
    let chain = host.chain(&[&p]);
    let s = host.stream(&chain);
    s.request_headers(GET, true);
    assert_eq!(host.shared_data("probe_vm", "k").unwrap().1, 1);
    // The second worker's CAS-0 write of an existing key is refused...
    let s2 = host.stream(&chain);
    s2.request_headers(GET, true);
    assert_eq!(
        lines(&host, "shared_set"),
        vec!["shared_set k=Ok(())", "shared_set k=Err(CasMismatch)"]
    );
    // ...and the one with the CAS it read goes through.
    host.clear_logs();
    let q = probe(&host, json!({"request_headers": [set("k", "x", Some(1))]}));
    let s3 = host.stream(&host.chain(&[&q]));
    s3.request_headers(GET, true);
    assert_eq!(lines(&host, "shared_set"), vec!["shared_set k=Ok(())"]);
    assert_eq!(
        host.shared_data("probe_vm", "k").unwrap(),
        (b"x".to_vec(), 2)
    );
}

#[test]
fn strict_removing_a_request_header_does_nothing_but_replace_is_exact() {
    let script = json!({
        "request_headers": [
            {"remove_header": ["request_headers", "x-spoof"]},
            {"raw_remove_header": ["request_headers", "x-auth-subject"]},
            {"set_header": ["request_headers", "x-auth-subject", "verified"]},
            {"get_header": ["request_headers", "x-spoof"]},
        ],
        "response_headers": [
            {"remove_header": ["response_headers", "x-up"]},
            // The request headers are out of reach by now, as in Envoy.
            {"raw_remove_header": ["request_headers", "x-spoof"]},
        ],
    });
    let req = || {
        let mut r = GET.to_vec();
        r.extend([
            ("x-spoof", "client"),
            ("x-auth-subject", "mallory"),
            ("x-auth-subject", "eve"),
        ]);
        r
    };
    let run = |host: &Host| {
        let p = probe(host, script.clone());
        let s = host.stream(&host.chain(&[&p]));
        s.request_headers(&req(), true);
        let up = s.upstream_request().unwrap();
        s.respond(200, &[("x-up", "1")], b"ok");
        let resp = s.response().unwrap();
        (
            up.header_all("x-spoof"),
            up.header_all("x-auth-subject"),
            resp.header("x-up"),
            lines(host, "raw_remove"),
            lines(host, "header x-spoof"),
        )
    };
    let envoy = run(&host(Profile::Envoy, 1));
    assert_eq!(envoy.0, Vec::<String>::new());
    assert_eq!(envoy.1, vec!["verified"]);
    assert_eq!(envoy.4, vec!["header x-spoof=None"]);

    let (spoof, subject, up, raw, got) = run(&strict(1));
    assert_eq!(spoof, vec!["client"], "the client's header leaks");
    assert_eq!(
        subject,
        vec!["verified"],
        "replace leaves exactly one value"
    );
    assert_eq!(got, vec![r#"header x-spoof=Some("client")"#]);
    assert_eq!(up, None, "response headers are still removed");
    assert_eq!(
        raw,
        vec![
            "raw_remove x-auth-subject status=0",
            "raw_remove x-spoof status=2"
        ],
        "Ok while reachable, BadArgument after"
    );
    assert_eq!(raw, envoy.3);
}

const INTS: &[&str] = &[
    "request.time",
    "request.size",
    "request.total_size",
    "request.duration",
    "response.code",
    "response.size",
    "response.total_size",
    "source.port",
    "destination.port",
    "connection.id",
];

/// The probe's `property` lines for the integer attributes, read in `on_log`
/// of one stream: a POST with a 5-byte body 20 ms after its headers, a 200
/// with an 11-byte body 50 ms later.
fn int_attributes(host: &Host) -> Vec<(String, String)> {
    let props: Vec<Value> = INTS
        .iter()
        .map(|p| json!({"property": p.split('.').collect::<Vec<_>>()}))
        .collect();
    let p = probe(host, json!({"log": props}));
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(
        &[
            (":method", "POST"),
            (":path", "/ingest"),
            (":authority", "api.254carbon.test"),
            ("x-request-id", "r1"),
        ],
        false,
    );
    host.advance(Duration::from_millis(20));
    s.request_body(b"hello", true);
    host.advance(Duration::from_millis(50));
    s.respond(200, &[("x-up", "1")], b"hello world");
    assert!(s.is_complete());
    lines(host, "property ")
        .into_iter()
        .map(|l| {
            let (k, v) = l
                .strip_prefix("property ")
                .and_then(|l| l.split_once('='))
                .unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// An int64 the probe showed as `hex:<8 bytes LE>`.
fn le(shown: &str) -> i64 {
    let h = shown
        .strip_prefix("hex:")
        .unwrap_or_else(|| panic!("{shown}"));
    let bytes: Vec<u8> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect();
    i64::from_le_bytes(bytes.try_into().unwrap())
}

#[test]
fn strict_integer_attributes_are_decimal_strings_of_envoys_numbers() {
    let envoy = int_attributes(&host(Profile::Envoy, 1));
    let strict = int_attributes(&strict(1));
    assert_eq!(envoy.len(), INTS.len());
    assert_eq!(strict.len(), INTS.len());
    let numbers: Vec<(String, i64)> = envoy.iter().map(|(k, v)| (k.clone(), le(v))).collect();
    let decimal: Vec<(String, String)> = numbers
        .iter()
        .map(|(k, n)| (k.clone(), format!("{:?}", n.to_string())))
        .collect();
    assert_eq!(strict, decimal);
    let get = |name: &str| strict.iter().find(|(k, _)| k == name).unwrap().1.as_str();
    assert_eq!(get("response.code"), r#""200""#);
    assert_eq!(get("request.size"), r#""5""#);
    assert_eq!(get("response.size"), r#""11""#);
    assert_eq!(get("request.duration"), r#""70000000""#);
    assert_eq!(get("source.port"), r#""50000""#);
    assert_eq!(get("destination.port"), r#""10000""#);
    assert_eq!(
        get("request.time"),
        format!("{:?}", (1_767_225_600u64 * 1_000_000_000).to_string())
    );
}

#[test]
fn strict_leaves_string_attributes_alone() {
    let p = [
        "request.path",
        "request.method",
        "source.address",
        "plugin_name",
    ];
    let run = |host: &Host| {
        let props: Vec<Value> = p
            .iter()
            .map(|p| json!({"property": p.split('.').collect::<Vec<_>>()}))
            .collect();
        let pr = probe(host, json!({"request_headers": props}));
        let s = host.stream(&host.chain(&[&pr]));
        s.request_headers(GET, true);
        lines(host, "property ")
    };
    assert_eq!(run(&strict(1)), run(&host(Profile::Envoy, 1)));
}
