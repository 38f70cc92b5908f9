//! The rate limit service on Redis topologies the test starts itself on
//! free loopback ports (tests/common/redis.rs): a server with a password,
//! an ACL user and a database; Sentinel (a master, a replica, three
//! sentinels) failed over during calls; a Cluster of three masters with
//! keys over its slots and a node restarted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::redis::{command, Cluster, RedisServer, Reply, Sentinel};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use sidecar::rls::limits::Limits;
use sidecar::rls::store::{Settings, Store, Topology};
use sidecar::rls::{Metrics, Options, Service};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn service(topology: Topology, url: &str, auth: Option<&str>) -> Arc<Service> {
    let s = Settings {
        topology,
        url: url.into(),
        auth: auth.map(str::to_string),
        timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        prefix: "rl:".into(),
        ..Settings::default()
    };
    Arc::new(Service::new(
        Store::new(&s).unwrap(),
        Limits::empty(),
        Options::default(),
        Metrics::new(),
    ))
}

fn request(tenant: &str, per_minute: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "carbon".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "tenant".into(),
                value: tenant.into(),
            }],
            limit: Some(RateLimitOverride {
                requests_per_unit: per_minute,
                unit: 2,
            }),
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    }
}

async fn codes(s: &Service, tenant: &str, per_minute: u32, n: usize) -> Vec<i32> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = s
            .should_rate_limit(&request(tenant, per_minute), None)
            .await
            .unwrap_or_else(|e| panic!("tenant {tenant}, call {i}: {e:?}"));
        out.push(r.overall_code);
    }
    out
}

#[test]
fn a_password_an_acl_user_and_a_database_from_the_url() {
    let rt = runtime();
    let mut server = RedisServer::start_with(&[
        "--requirepass",
        "s3cret",
        "--user",
        "limiter",
        "on",
        ">pw2",
        "~rl:*",
        "+@all",
    ]);
    server.set_auth(None, "s3cret");
    rt.block_on(async {
        // The default user's password, database 3.
        let s = service(
            Topology::Single,
            &format!("redis://:s3cret@{}/3", server.addr()),
            None,
        );
        assert_eq!(codes(&s, "acme", 2, 3).await, vec![OK, OK, OVER]);
        let in_db = |db: &str| {
            let info = server.cmd(&["INFO", "keyspace"]).text();
            info.lines()
                .find(|l| l.starts_with(&format!("db{db}:")))
                .map(str::to_string)
        };
        assert!(
            in_db("3").is_some_and(|l| l.contains("keys=1")),
            "{:?}",
            in_db("3")
        );
        assert_eq!(in_db("0"), None);
        // The ACL user, its password from --redis-auth.
        let s = service(Topology::Single, &server.addr(), Some("limiter:pw2"));
        assert_eq!(codes(&s, "beta", 1, 2).await, vec![OK, OVER]);
        // A wrong password: UNAVAILABLE, not a hang.
        let s = service(
            Topology::Single,
            &format!("redis://:wrong@{}", server.addr()),
            None,
        );
        let e = s
            .should_rate_limit(&request("acme", 2), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    });
}

/// Calls in a loop until `stop`: (when it ended, OK or not, how long it took).
async fn calling(
    s: Arc<Service>,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Result<(), tonic::Code>, Duration)> {
    let mut seen = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let t = Instant::now();
        // Each call its own tenant: never over a limit, always a write.
        let r = s
            .should_rate_limit(
                &request(&format!("t{}", i % 50), 1_000_000),
                Some(Duration::from_millis(200)),
            )
            .await;
        let took = t.elapsed();
        // When it started: a call sent before the master's death and
        // answered just before it does not count as a recovery.
        seen.push((t, r.map(|_| ()).map_err(|e| e.code()), took));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

fn unavailable_calls(s: &Service) -> u64 {
    let mut r = prometheus_client::registry::Registry::default();
    s.metrics().register(&mut r);
    let text = sidecar::metrics::render(&r);
    text.lines()
        .find(|l| l.starts_with(r#"sidecar_rls_calls_total{domain="carbon",code="unavailable"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn sentinel_failover_during_calls_recovers_and_nothing_hangs() {
    let rt = runtime();
    let mut set = Sentinel::start("carbon-rl");
    let url = format!("carbon-rl,{}", set.sentinel_addrs().join(","));
    let s = service(Topology::Sentinel, &url, None);
    rt.block_on(async {
        assert_eq!(codes(&s, "acme", 2, 3).await, vec![OK, OK, OVER]);
    });
    let stop = Arc::new(AtomicBool::new(false));
    let calls = rt.spawn(calling(s.clone(), stop.clone()));
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    let old = set.kill_master();
    let new = set.wait_for_failover(old, Duration::from_secs(30));
    assert_ne!(old, new);
    // The first successful call after the master's death, within a bound
    // (the sentinels need down-after 1 s plus the election; we then need
    // one reconnect).
    let until = Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let ok = rt.block_on(s.should_rate_limit(&request("probe", 1_000_000), None));
        if ok.is_ok() {
            break Instant::now();
        }
        assert!(
            Instant::now() < until,
            "no successful call 20 s after the failover: {ok:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = rt.block_on(calls).unwrap();
    // The end of the first successful call sent after the kill.
    let first_ok = seen
        .iter()
        .filter(|(at, r, _)| *at > killed_at && r.is_ok())
        .map(|(at, _, took)| *at + *took)
        .min()
        .unwrap_or(recovered);
    let failed: Vec<_> = seen.iter().filter(|(_, r, _)| r.is_err()).collect();
    eprintln!(
        "sentinel failover: master {old} killed; {new} promoted; first successful call {:?} after the kill; {} of {} calls in between UNAVAILABLE",
        first_ok - killed_at,
        failed.len(),
        seen.len()
    );
    // Every failure is UNAVAILABLE, and none waited beyond its budget.
    for (_, r, took) in &seen {
        if let Err(c) = r {
            assert_eq!(*c, tonic::Code::Unavailable);
        }
        assert!(*took < Duration::from_secs(2), "a call took {took:?}");
    }
    assert!(
        !failed.is_empty(),
        "the failover went unnoticed: the test did not test it"
    );
    assert!(unavailable_calls(&s) >= failed.len() as u64);
    // The new master counts: a fresh bucket works as before.
    rt.block_on(async {
        assert_eq!(codes(&s, "after", 2, 3).await, vec![OK, OK, OVER]);
    });
    // And the old master, back as a replica, does not take writes: the
    // service stays on the new one.
    set.restart_server(old);
    rt.block_on(async {
        assert_eq!(codes(&s, "later", 1, 2).await, vec![OK, OVER]);
    });
}

fn keys_on(port: u16) -> i64 {
    match command(port, &["DBSIZE"]).unwrap() {
        Reply::Int(n) => n,
        other => panic!("DBSIZE to {port}: {other:?}"),
    }
}

#[test]
fn a_cluster_spreads_the_buckets_over_its_slots_and_survives_a_node_restart() {
    let rt = runtime();
    let mut cluster = Cluster::start(3);
    let s = service(Topology::Cluster, &cluster.nodes().join(","), None);
    rt.block_on(async {
        for t in 0..60 {
            assert_eq!(
                codes(&s, &format!("tenant-{t}"), 2, 3).await,
                vec![OK, OK, OVER],
                "tenant-{t}"
            );
        }
    });
    let per_node: Vec<i64> = cluster.ports().iter().map(|p| keys_on(*p)).collect();
    assert_eq!(
        per_node.iter().sum::<i64>(),
        60,
        "one key per bucket: {per_node:?}"
    );
    assert!(
        per_node.iter().all(|n| *n > 0),
        "keys on every node: {per_node:?}"
    );
    // Restart the node holding tenant-0's bucket (no persistence: its
    // buckets start again); calls meanwhile answer UNAVAILABLE, promptly.
    let victim = cluster
        .ports()
        .iter()
        .position(|p| keys_on(*p) > 0)
        .unwrap();
    cluster.kill_node(victim);
    rt.block_on(async {
        let mut unavailable = 0;
        for t in 0..60 {
            let started = Instant::now();
            match s
                .should_rate_limit(
                    &request(&format!("tenant-{t}"), 2),
                    Some(Duration::from_millis(300)),
                )
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                    unavailable += 1;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "took {:?}",
                started.elapsed()
            );
        }
        assert!(unavailable > 0, "a node was down and every call succeeded");
    });
    cluster.restart_node(victim);
    rt.block_on(async {
        // Back within a bound; then every bucket counts again.
        let until = Instant::now() + Duration::from_secs(20);
        while s
            .should_rate_limit(&request("probe", 100), None)
            .await
            .is_err()
        {
            assert!(Instant::now() < until, "the cluster did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in 0..30 {
            let c = codes(&s, &format!("again-{t}"), 1, 2).await;
            assert_eq!(c, vec![OK, OVER], "again-{t}");
        }
    });
}
