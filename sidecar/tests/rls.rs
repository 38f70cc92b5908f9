//! The rate limit service against the real Redis on 127.0.0.1:6379: GCRA,
//! hits_addend, shadow mode, unlimited, replaces, a descriptor tree from a
//! configuration file, reloads, reply ordering after an error element,
//! deadlines, response headers, `grpc.health.v1`; and end to end:
//! ratelimit.wasm (global mode) in the emulator → gRPC → this service →
//! Redis, and a stock Envoy-style descriptor list over tonic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message as _;
use serde_json::json;
use sidecar::rls::limits::Limits;
use sidecar::rls::store::{Settings, Store};
use sidecar::rls::{serve, Metrics, Options, ResponseHeaders, Service};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasm_host::{Host, Message, PluginConfig};

const REDIS: &str = "127.0.0.1:6379";

fn prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("254carbon-test-{}-{t}|", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn settings(url: &str) -> Settings {
    Settings {
        url: url.into(),
        prefix: prefix(),
        timeout: Duration::from_millis(1000),
        connect_timeout: Duration::from_millis(1000),
        ..Settings::default()
    }
}

fn service_with(url: &str, yaml: &str, opts: Options) -> Arc<Service> {
    let limits = if yaml.is_empty() {
        Limits::empty()
    } else {
        Limits::parse(&[("test.yaml".into(), yaml.into())]).unwrap()
    };
    Arc::new(Service::new(
        Store::new(&settings(url)).unwrap(),
        limits,
        opts,
        Metrics::new(),
    ))
}

fn service(yaml: &str) -> Arc<Service> {
    service_with(REDIS, yaml, Options::default())
}

fn entries(e: &[(&str, &str)]) -> Vec<Entry> {
    e.iter()
        .map(|(k, v)| Entry {
            key: (*k).into(),
            value: (*v).into(),
        })
        .collect()
}

fn with_override(e: &[(&str, &str)], per_minute: u32) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(e),
        limit: Some(RateLimitOverride {
            requests_per_unit: per_minute,
            unit: 2,
        }),
        ..RateLimitDescriptor::default()
    }
}

fn plain(e: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(e),
        ..RateLimitDescriptor::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

async fn call(s: &Service, r: &RateLimitRequest) -> RateLimitResponse {
    s.should_rate_limit(r, None)
        .await
        .unwrap_or_else(|e| panic!("ShouldRateLimit on Redis at {REDIS}: {e:?}"))
}

fn codes(r: &RateLimitResponse) -> Vec<(i32, u32)> {
    r.statuses
        .iter()
        .map(|s| (s.code, s.limit_remaining))
        .collect()
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

fn reset(r: &RateLimitResponse, i: usize) -> Duration {
    let d = r.statuses[i].duration_until_reset.unwrap();
    Duration::new(d.seconds as u64, d.nanos as u32)
}

#[test]
fn redis_counts_each_descriptor_with_gcra() {
    let rt = runtime();
    let s = service("");
    rt.block_on(async {
        let req = request(
            "carbon",
            vec![with_override(
                &[("policy", "per-tenant"), ("tenant", "acme")],
                3,
            )],
        );
        let started = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..5 {
            let r = call(&s, &req).await;
            seen.push((r.overall_code, r.statuses[0].limit_remaining));
        }
        assert_eq!(seen, vec![(OK, 2), (OK, 1), (OK, 0), (OVER, 0), (OVER, 0)]);
        // The wait until one more: 20 s (3 per minute) from the first hit,
        // less the time the hits took (Redis' clock runs meanwhile).
        let r = call(&s, &req).await;
        let elapsed = started.elapsed();
        let wait = reset(&r, 0);
        let earliest = Duration::from_secs(20).saturating_sub(elapsed + Duration::from_millis(5));
        assert!(
            (earliest..=Duration::from_secs(20)).contains(&wait),
            "wait {wait:?}, expected 20 s less the {elapsed:?} since the first hit"
        );
        let limit = r.statuses[0].current_limit.clone().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (3, 2));
        // Another tenant, and a descriptor that no configuration limits,
        // are untouched.
        let other = request(
            "carbon",
            vec![
                with_override(&[("policy", "per-tenant"), ("tenant", "other")], 3),
                plain(&[("tenant", "acme")]),
            ],
        );
        let r = call(&s, &other).await;
        assert_eq!(r.overall_code, OK, "tenant other has its own bucket: {r:?}");
        assert_eq!(r.statuses[1].current_limit, None, "{r:?}");
    });
}

#[test]
fn hits_addend_counts_several_hits_and_zero_only_looks() {
    let rt = runtime();
    let s = service("");
    rt.block_on(async {
        let d = || with_override(&[("tenant", "acme")], 10);
        // The request's hits_addend: 4 at once.
        let mut req = request("carbon", vec![d()]);
        req.hits_addend = 4;
        assert_eq!(codes(&call(&s, &req).await), vec![(OK, 6)]);
        // A descriptor's own hits_addend wins; 0 looks without counting.
        let mut look = d();
        look.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
        let r = call(&s, &request("carbon", vec![look.clone()])).await;
        assert_eq!(codes(&r), vec![(OK, 6)]);
        let mut five = d();
        five.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 5 });
        assert_eq!(
            codes(&call(&s, &request("carbon", vec![five.clone()])).await),
            vec![(OK, 1)]
        );
        // Five more do not fit: refused whole, nothing counted.
        let r = call(&s, &request("carbon", vec![five])).await;
        assert_eq!(r.overall_code, OVER);
        assert_eq!(
            codes(&call(&s, &request("carbon", vec![look.clone()])).await),
            vec![(OK, 1)]
        );
        // Negative hits give back.
        let mut back = d();
        back.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 3 });
        back.is_negative_hits = true;
        assert_eq!(
            codes(&call(&s, &request("carbon", vec![back])).await),
            vec![(OK, 4)]
        );
    });
}

const CONFIG: &str = r#"
domain: carbon
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 2}
    descriptors:
      - key: route
        value: "/api/v1/curves*"
        rate_limit: {unit: minute, requests_per_unit: 1}
  - key: tenant
    value: acme
    rate_limit: {unit: minute, requests_per_unit: 3, name: acme}
  - key: generic_key
    value: analytics
    rate_limit: {unit: hour, requests_per_unit: 1}
    shadow_mode: true
  - key: remote_address
    rate_limit: {unlimited: true}
  - key: plan
    value: trial
    rate_limit: {unit: minute, requests_per_unit: 1, name: trial}
  - key: plan
    value: promo
    rate_limit: {unit: minute, requests_per_unit: 5, replaces: [{name: trial}]}
  - key: blocked
    rate_limit: {unit: second, requests_per_unit: 0}
"#;

#[test]
fn a_descriptor_tree_from_the_configuration_file_limits_envoy_descriptors() {
    let rt = runtime();
    let s = service(CONFIG);
    rt.block_on(async {
        // Key only: every tenant its own bucket of 2.
        let beta = request("carbon", vec![plain(&[("tenant", "beta")])]);
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(call(&s, &beta).await.overall_code);
        }
        assert_eq!(out, vec![OK, OK, OVER]);
        let r = call(&s, &request("carbon", vec![plain(&[("tenant", "gamma")])])).await;
        assert_eq!(codes(&r), vec![(OK, 1)]);
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            2
        );
        // The exact value wins over the key-only entry.
        let r = call(&s, &request("carbon", vec![plain(&[("tenant", "acme")])])).await;
        let l = r.statuses[0].current_limit.clone().unwrap();
        assert_eq!((l.requests_per_unit, l.name.as_str()), (3, "acme"));
        // Nested, with a wildcard value: only the two-entry descriptor.
        let curves = request(
            "carbon",
            vec![plain(&[
                ("tenant", "delta"),
                ("route", "/api/v1/curves/EU-ETS"),
            ])],
        );
        assert_eq!(codes(&call(&s, &curves).await), vec![(OK, 0)]);
        assert_eq!(call(&s, &curves).await.overall_code, OVER);
        let other_route = request(
            "carbon",
            vec![plain(&[
                ("tenant", "delta"),
                ("route", "/api/v1/instruments"),
            ])],
        );
        let r = call(&s, &other_route).await;
        assert_eq!(
            r.statuses[0].current_limit, None,
            "no match below tenant: {r:?}"
        );
        // Shadow mode: over the limit, answered OK with the limit shown.
        let shadow = request("carbon", vec![plain(&[("generic_key", "analytics")])]);
        assert_eq!(codes(&call(&s, &shadow).await), vec![(OK, 0)]);
        let r = call(&s, &shadow).await;
        assert_eq!(r.overall_code, OK, "{r:?}");
        assert!(r.statuses[0].current_limit.is_some());
        // Unlimited: OK, everything left, no limit.
        let r = call(
            &s,
            &request("carbon", vec![plain(&[("remote_address", "10.0.0.1")])]),
        )
        .await;
        assert_eq!(codes(&r), vec![(OK, u32::MAX)]);
        // A limit of 0 refuses every request.
        let r = call(&s, &request("carbon", vec![plain(&[("blocked", "x")])])).await;
        assert_eq!(r.overall_code, OVER);
        // replaces: with promo matched, trial does not apply.
        let both = request(
            "carbon",
            vec![plain(&[("plan", "trial")]), plain(&[("plan", "promo")])],
        );
        for _ in 0..3 {
            let r = call(&s, &both).await;
            assert_eq!(r.overall_code, OK, "{r:?}");
            assert_eq!(r.statuses[0].current_limit, None, "trial replaced: {r:?}");
        }
        let trial = request("carbon", vec![plain(&[("plan", "trial")])]);
        assert_eq!(call(&s, &trial).await.overall_code, OK);
        assert_eq!(call(&s, &trial).await.overall_code, OVER);
        // Unknown domain: not limited; an override still is.
        let r = call(
            &s,
            &request("elsewhere", vec![plain(&[("tenant", "beta")])]),
        )
        .await;
        assert_eq!(codes(&r), vec![(OK, 0)]);
        assert_eq!(r.statuses[0].current_limit, None);
        // The request's limit override wins over the file.
        let r = call(
            &s,
            &request("carbon", vec![with_override(&[("tenant", "beta")], 100)]),
        )
        .await;
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            100
        );
        // Empty domain or descriptors: refused.
        let e = s
            .should_rate_limit(&request("", vec![plain(&[("a", "b")])]), None)
            .await;
        assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
        let e = s.should_rate_limit(&request("carbon", vec![]), None).await;
        assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
    });
}

#[test]
fn response_headers_come_from_the_descriptor_closest_to_its_limit() {
    let rt = runtime();
    let opts = Options {
        response_headers: ResponseHeaders::Both,
        ..Options::default()
    };
    let s = service_with(REDIS, "", opts);
    rt.block_on(async {
        let req = request(
            "carbon",
            vec![
                with_override(&[("tenant", "acme")], 100),
                with_override(&[("user", "u1")], 2),
            ],
        );
        let r = call(&s, &req).await;
        let h: Vec<(String, String)> = r
            .response_headers_to_add
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert_eq!(h.len(), 6, "{h:?}");
        assert_eq!(h[0], ("RateLimit-Limit".into(), "2".into()));
        assert_eq!(h[1], ("RateLimit-Remaining".into(), "1".into()));
        assert_eq!(h[2].0, "RateLimit-Reset");
        assert_eq!(h[3], ("X-RateLimit-Limit".into(), "2".into()));
        let reset: u64 = h[2].1.parse().unwrap();
        assert!((1..=30).contains(&reset), "{h:?}");
        let none = service("");
        let r = call(&none, &req).await;
        assert!(r.response_headers_to_add.is_empty());
    });
}

#[test]
fn the_configuration_reloads_and_a_bad_file_is_refused() {
    let rt = runtime();
    let dir = std::env::temp_dir().join(format!("254carbon-rls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("carbon.yaml");
    let write = |text: &str| {
        // A new file renamed over the old one, as a ConfigMap update does.
        let tmp = dir.join(".carbon.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("domain: carbon\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: minute, requests_per_unit: 1}\n");
    let seen = sidecar::rls::fingerprint(&dir);
    let s = Arc::new(Service::new(
        Store::new(&settings(REDIS)).unwrap(),
        Limits::load(&dir).unwrap(),
        Options::default(),
        Metrics::new(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    rt.spawn(sidecar::rls::watch_config(
        s.clone(),
        dir.clone(),
        seen,
        Duration::from_millis(50),
        stop.clone(),
    ));
    let limit_of = |s: &Service| {
        let l = s.limits();
        l.find("carbon", &[("tenant".to_string(), "x".to_string())])
            .and_then(|l| l.rate)
            .map(|(n, _)| n)
    };
    let wait_for = |want: Option<u32>| {
        let until = Instant::now() + Duration::from_secs(10);
        while limit_of(&s) != want {
            assert!(
                Instant::now() < until,
                "limit still {:?}, want {want:?}",
                limit_of(&s)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(limit_of(&s), Some(1));
    // mtime has a resolution; make the sizes differ as well.
    write("domain: carbon\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: minute, requests_per_unit: 50}\n");
    wait_for(Some(50));
    // Refused: an unknown field. The last good limit stays.
    write("domain: carbon\ndescriptors:\n  - key: tenant\n    rate_limt: {unit: minute, requests_per_unit: 7}\n");
    let until = Instant::now() + Duration::from_secs(10);
    while rendered(&s)
        .lines()
        .all(|l| !l.starts_with("sidecar_rls_config_load_error_total 1"))
    {
        assert!(
            Instant::now() < until,
            "the bad file was not refused:\n{}",
            rendered(&s)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(limit_of(&s), Some(50));
    write("domain: carbon\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: minute, requests_per_unit: 7}\n");
    wait_for(Some(7));
    let text = rendered(&s);
    assert!(
        text.contains("sidecar_rls_config_load_success_total 2"),
        "{text}"
    );
    stop.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn rendered(s: &Service) -> String {
    let mut r = prometheus_client::registry::Registry::default();
    s.metrics().register(&mut r);
    sidecar::metrics::render(&r)
}

#[test]
fn replies_stay_in_order_after_a_redis_error_element() {
    let rt = runtime();
    let s = service("");
    rt.block_on(async {
        // An array with an error element in the middle, then a good call on
        // the same connections: each gets its own reply.
        let bad = redis::Script::new("return {1, redis.error_reply('boom'), 3}");
        let good = with_override(&[("tenant", "order")], 10);
        for i in 0..4 {
            let e = s
                .store()
                .run(&bad, &format!("{}order-bad", s.store().prefix()), &[], None)
                .await;
            // The crate returns the array with the error inside, or the error.
            if let Ok(v) = &e {
                assert!(format!("{v:?}").contains("boom"), "{v:?}");
            }
            let r = call(&s, &request("carbon", vec![good.clone()])).await;
            assert_eq!(codes(&r), vec![(OK, 9 - i)], "call {i}: {r:?}");
        }
        // A script that fails outright.
        let fails = redis::Script::new("return redis.call('NOSUCHCOMMAND')");
        assert!(s.store().run(&fails, "x", &[], None).await.is_err());
        let r = call(&s, &request("carbon", vec![good])).await;
        assert_eq!(codes(&r), vec![(OK, 5)]);
    });
}

#[test]
fn hits_that_wait_together_share_a_call_and_a_bad_bucket_fails_alone() {
    let rt = runtime();
    let s = service("");
    rt.block_on(async {
        let st = s.store();
        let (one, bad) = (
            format!("{}batch-one", st.prefix()),
            format!("{}batch-bad", st.prefix()),
        );
        // A hash where a bucket should be: its script step fails.
        let mut c = redis::Client::open(format!("redis://{REDIS}"))
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("HSET")
            .arg(&bad)
            .arg("f")
            .arg("v")
            .exec(&mut c)
            .unwrap();
        let minute = Duration::from_secs(60);
        // 30 hits on one bucket of 10 at once, with the bad bucket among
        // them: they wait together and go in a few calls, in order.
        let hits =
            futures_util::future::join_all((0..30).map(|_| st.hit(&one, 10, minute, 1, None)));
        let broken = st.hit(&bad, 10, minute, 1, None);
        let (hits, broken) = tokio::join!(hits, broken);
        let hits: Vec<_> = hits.into_iter().map(Result::unwrap).collect();
        let mut left: Vec<u32> = hits
            .iter()
            .filter(|h| h.admitted)
            .map(|h| h.remaining)
            .collect();
        left.sort_unstable();
        assert_eq!(left, (0..10).collect::<Vec<_>>(), "{hits:?}");
        assert!(hits
            .iter()
            .filter(|h| !h.admitted)
            .all(|h| h.remaining == 0));
        let e = broken.unwrap_err();
        assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        // The connection is still good.
        let again = st.hit(&one, 10, minute, 0, None).await.unwrap();
        assert!(!again.admitted || again.remaining == 0, "{again:?}");
        redis::cmd("DEL").arg(&bad).arg(&one).exec(&mut c).unwrap();
    });
}

#[test]
fn without_redis_calls_answer_unavailable_at_once_and_never_hang() {
    let rt = runtime();
    let s = service_with("127.0.0.1:1", "", Options::default());
    rt.block_on(async {
        let req = request("carbon", vec![with_override(&[("tenant", "acme")], 3)]);
        for _ in 0..3 {
            let e = s.should_rate_limit(&req, None).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        }
        let text = rendered(&s);
        assert!(
            text.contains("sidecar_rls_redis_errors_total{kind="),
            "{text}"
        );
        assert!(
            text.contains(r#"sidecar_rls_calls_total{domain="carbon",code="unavailable"} 3"#),
            "{text}"
        );
    });
}

#[test]
fn a_redis_that_never_answers_is_bounded_by_the_callers_deadline() {
    let rt = runtime();
    // Accepts and reads, never writes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let s = service_with(&addr.to_string(), "", Options::default());
    rt.block_on(async {
        let req = request("carbon", vec![with_override(&[("tenant", "acme")], 3)]);
        let t = Instant::now();
        let e = s
            .should_rate_limit(&req, Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "took {:?}",
            t.elapsed()
        );
        // Without a deadline, the Redis timeout (1 s here) bounds it.
        let t = Instant::now();
        let e = s.should_rate_limit(&req, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    });
}

/// The filter's hand-written encoder and decoder agree with the protobuf
/// messages the service uses.
#[test]
fn the_filters_encoding_matches_the_v3_messages() {
    use ratelimit_core::rls as f;
    let ours = f::Request {
        domain: "carbon".into(),
        descriptors: vec![
            f::Descriptor {
                entries: vec![
                    ("policy".into(), "per-tenant".into()),
                    ("tenant".into(), "acme".into()),
                ],
                limit: Some((600, 2)),
            },
            f::Descriptor {
                entries: vec![("route".into(), "/api/v1/curves/é".into())],
                limit: None,
            },
        ],
        hits_addend: 3,
    };
    let bytes = ours.encode();
    let theirs = RateLimitRequest::decode(&bytes[..]).unwrap();
    assert_eq!(theirs.domain, "carbon");
    assert_eq!(theirs.hits_addend, 3);
    assert_eq!(theirs.descriptors.len(), 2);
    assert_eq!(theirs.descriptors[0].entries[1].value, "acme");
    let o = theirs.descriptors[0].limit.unwrap();
    assert_eq!((o.requests_per_unit, o.unit), (600, 2));
    assert_eq!(theirs.descriptors[1].limit, None);
    assert_eq!(theirs.descriptors[1].entries[0].value, "/api/v1/curves/é");
    // And byte for byte what prost writes for the same message.
    assert_eq!(bytes, theirs.encode_to_vec());

    let mut resp = RateLimitResponse {
        overall_code: OVER,
        ..RateLimitResponse::default()
    };
    resp.statuses.push(
        envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::DescriptorStatus {
            code: OVER,
            current_limit: Some(
                envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::RateLimit {
                    name: "acme".into(),
                    requests_per_unit: 600,
                    unit: 2,
                },
            ),
            limit_remaining: 0,
            duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 12,
                nanos: 500,
            }),
            ..Default::default()
        },
    );
    resp.response_headers_to_add
        .push(envoy_types::pb::envoy::config::core::v3::HeaderValue {
            key: "RateLimit-Remaining".into(),
            value: "0".into(),
            ..Default::default()
        });
    let decoded = f::Response::decode(&resp.encode_to_vec()).unwrap();
    assert_eq!(decoded.overall, f::Code::OverLimit);
    assert_eq!(decoded.statuses.len(), 1);
    assert_eq!(decoded.statuses[0].limit, Some((600, 2, "acme".into())));
    assert_eq!(decoded.statuses[0].reset_ns, 12_000_000_500);
    assert_eq!(
        decoded.response_headers,
        vec![("RateLimit-Remaining".into(), "0".into())]
    );
    // The filter's own response encoding decodes to the same message.
    let again = RateLimitResponse::decode(&decoded.encode()[..]).unwrap();
    assert_eq!(again.overall_code, OVER);
    assert_eq!(
        again.statuses[0].current_limit,
        resp.statuses[0].current_limit
    );
}

fn start(
    s: Arc<Service>,
    rt: &tokio::runtime::Runtime,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(serve(listener, s, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[test]
fn envoy_style_descriptors_over_grpc_are_limited_by_the_configuration() {
    let rt = runtime();
    let (addr, stop) = start(service(CONFIG), &rt);
    rt.block_on(async {
        let mut client = RateLimitServiceClient::new(channel(addr).await);
        // What Envoy sends for `rate_limits: [{actions: [{request_headers:
        // {header_name: x-auth-tenant, descriptor_key: tenant}}]}]`.
        let req = request("carbon", vec![plain(&[("tenant", "epsilon")])]);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_millis(500));
            got.push(
                client
                    .should_rate_limit(r)
                    .await
                    .unwrap()
                    .into_inner()
                    .overall_code,
            );
        }
        assert_eq!(got, vec![OK, OK, OVER]);
    });
    let _ = stop.send(());
}

#[test]
fn grpc_health_says_serving_and_not_serving_while_redis_is_away() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let rt = runtime();
    let up = Options {
        health_interval: Duration::from_millis(100),
        ..Options::default()
    };
    let (addr, stop) = start(service_with(REDIS, "", up.clone()), &rt);
    let (down_addr, stop_down) = start(service_with("127.0.0.1:1", "", up), &rt);
    rt.block_on(async {
        let status = |addr: SocketAddr, name: &'static str| async move {
            let mut h = HealthClient::new(channel(addr).await);
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let s = h
                    .check(HealthCheckRequest {
                        service: name.into(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                // Unknown (no status yet) until the first ping.
                if s.is_ok() || Instant::now() > until {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        for name in [
            "",
            "ratelimit",
            "envoy.service.ratelimit.v3.RateLimitService",
        ] {
            assert_eq!(status(addr, name).await.unwrap(), 1, "{name:?} SERVING");
            assert_eq!(
                status(down_addr, name).await.unwrap(),
                2,
                "{name:?} NOT_SERVING"
            );
        }
    });
    let _ = stop.send(());
    let _ = stop_down.send(());
}

fn ok(_: &Message) -> Message {
    Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: vec![],
        trailers: None,
    }
}

fn filter_with_service(
    s: Arc<Service>,
    rt: &tokio::runtime::Runtime,
) -> (Host, wasm_host::Chain, tokio::sync::oneshot::Sender<()>) {
    let (addr, stop) = start(s, rt);
    let host = Host::builder().workers(2).real_clock(true).build();
    host.add_grpc_server("ratelimit", addr);
    let cfg = json!({
        "policies": [{"id": "per-tenant", "key": ["tenant"], "rate": {"requests": 3, "per": "minute"}}],
        "global": {"cluster": "ratelimit", "domain": "carbon", "timeout_ms": 5000}
    });
    let p = host
        .load(
            PluginConfig::new(wasm_host::wasm_path("ratelimit"))
                .name("ratelimit")
                .root_id("ratelimit")
                .vm_id("ratelimit")
                .config_json(&cfg),
        )
        .unwrap();
    let chain = host.chain(&[&p]).with_upstream(ok);
    (host, chain, stop)
}

fn send(host: &Host, chain: &wasm_host::Chain, tenant: &str) -> u16 {
    let s = host.stream(chain);
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", "/api/v1/curves/EU-ETS"),
            (":authority", "api"),
            ("x-auth-subject", "u"),
            ("x-auth-tenant", tenant),
        ],
        true,
    );
    // Longer than the filter's timeout (5 s), so the call always ends here.
    assert!(
        host.wait_for_callouts(Duration::from_secs(10)),
        "tenant {tenant}: the rate limit call still pending after 10 s: {:?}",
        host.pending_calls()
    );
    s.response()
        .unwrap_or_else(|| panic!("tenant {tenant}: no response after the rate limit call"))
        .status()
        .unwrap_or_else(|| panic!("tenant {tenant}: a response without :status"))
}

#[test]
fn the_filter_in_global_mode_is_limited_by_the_service_and_redis() {
    let rt = runtime();
    let (host, chain, stop) = filter_with_service(service(""), &rt);
    let statuses: Vec<u16> = (0..5).map(|_| send(&host, &chain, "acme")).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    assert_eq!(send(&host, &chain, "other"), 200);
    // Every 200 was the service's answer, not the filter failing open
    // (a timeout or an error would also let the request through).
    assert_eq!(
        host.counter("wasmcustom.ratelimit.fail_open"),
        0,
        "the service failed to answer: {:?}",
        host.logs_containing("ratelimit:")
    );
    let _ = stop.send(());
}

#[test]
fn the_filters_override_wins_over_the_configuration_file() {
    let rt = runtime();
    // The file would allow 1 per minute per tenant; the filter's policy
    // (3 per minute, sent as the override) decides.
    let yaml = "domain: carbon\ndescriptors:\n  - key: policy\n    descriptors:\n      - key: tenant\n        rate_limit: {unit: minute, requests_per_unit: 1}\n";
    let (host, chain, stop) = filter_with_service(service(yaml), &rt);
    let statuses: Vec<u16> = (0..4).map(|_| send(&host, &chain, "acme")).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    let _ = stop.send(());
}

#[test]
fn without_redis_the_service_answers_unavailable_and_the_filter_fails_open() {
    let rt = runtime();
    let (host, chain, stop) =
        filter_with_service(service_with("127.0.0.1:1", "", Options::default()), &rt);
    assert_eq!(send(&host, &chain, "acme"), 200);
    assert_eq!(host.counter("wasmcustom.ratelimit.fail_open"), 1);
    let _ = stop.send(());
}

/// The configuration shipped in k8s/ and shown in the README loads, and
/// means what the README says.
#[test]
fn the_shipped_and_documented_configurations_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cm = std::fs::read_to_string(root.join("k8s/base/ratelimit-configmap.yaml")).unwrap();
    let cm: serde_json::Value = serde_norway::from_str(&cm).unwrap();
    let shipped = cm["data"]["carbon.yaml"].as_str().unwrap().to_string();
    let readme = std::fs::read_to_string(root.join("sidecar/README.md")).unwrap();
    let start = readme
        .find("254Carbon's policies, as `carbon.yaml`:\n\n```yaml\n")
        .expect("the README's example")
        + "254Carbon's policies, as `carbon.yaml`:\n\n```yaml\n".len();
    let documented = &readme[start..start + readme[start..].find("```").unwrap()];
    assert_eq!(
        shipped, documented,
        "k8s/base/ratelimit-configmap.yaml and the README differ"
    );
    let l = Limits::parse(&[("carbon.yaml".into(), shipped)]).unwrap();
    let find = |e: &[(&str, &str)]| {
        let e: Vec<(String, String)> = e.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        l.find("carbon", &e).cloned()
    };
    let rate = |e: &[(&str, &str)]| find(e).and_then(|l| l.rate).map(|(n, u)| (n, u.seconds()));
    assert_eq!(rate(&[("tenant", "beta")]), Some((600, 60)));
    assert_eq!(rate(&[("tenant", "acme")]), Some((6000, 60)));
    assert_eq!(
        rate(&[("tenant", "beta"), ("route", "/api/v1/curves/EU-ETS")]),
        Some((20, 1))
    );
    assert_eq!(
        rate(&[("tenant", "beta"), ("route", "/api/v1/instruments")]),
        None
    );
    assert!(find(&[("generic_key", "analytics")]).unwrap().shadow_mode);
    let office = find(&[("remote_address", "10.20.3.4")]).unwrap();
    assert_eq!(office.rate, None, "unlimited");
    assert_eq!(find(&[("remote_address", "192.0.2.1")]), None);
}
