//! The entitlements filter in the host emulator (two worker VMs, as Envoy
//! loads it) reading grants from a real sidecar's feed, with the grants in
//! the real PostgreSQL (127.0.0.1:5432, a fresh schema) and changed through
//! the admin API: the first snapshot, a grant and a revoke arriving as
//! deltas, and what the workers decide meanwhile.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::pg::Schema;
use serde_json::json;
use std::time::Duration;
use wasm_host::{Chain, Host, Message, PluginConfig};

fn status(host: &Host, chain: &Chain, tenant: &str, market: &str) -> u16 {
    let s = host.stream(chain);
    let path = format!("/api/v1/curves/{market}/latest");
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", &path),
            (":authority", "api"),
            ("x-auth-subject", "someone"),
            ("x-auth-tenant", tenant),
        ],
        true,
    );
    s.response().and_then(|r| r.status()).unwrap_or(0)
}

/// Ticks (a second each) until `f` holds, at most `n` of them; each tick's
/// callouts to the sidecar are answered before the next.
fn ticks_until(host: &Host, n: usize, mut f: impl FnMut() -> bool) -> usize {
    for i in 0..n {
        if f() {
            return i;
        }
        host.advance(Duration::from_secs(1));
        assert!(host.wait_for_callouts(Duration::from_secs(10)));
    }
    panic!("not after {n} ticks: {}", host.stats_text());
}

#[test]
fn the_filter_takes_grants_and_revokes_from_the_sidecar_within_a_tick() {
    let db = Schema::new("feedfilter");
    let conninfo = db.conninfo();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sc = rt.block_on(common::start(&[
        "--grants-postgres",
        &conninfo,
        "--admin-secret",
        "s3cret",
    ]));
    let admin = |method: &str, tenant: &str, market: &str| {
        let body =
            json!({"tenant": tenant, "resource": format!("curves:{market}"), "action": "read"});
        let (st, answer) = rt.block_on(common::http(
            sc.addr,
            method,
            "/admin/v1/grants",
            &[("x-admin-secret".into(), "s3cret".into())],
            body.to_string().as_bytes(),
        ));
        assert_eq!(st, 200, "{method} {body}: {answer}");
    };
    admin("PUT", "acme", "CAISO");

    let host = Host::builder().workers(2).build();
    host.add_http_cluster("sidecar", sc.addr);
    let plugin = host
        .load(
            PluginConfig::new(wasm_host::wasm_path("entitlements"))
                .name("entitlements")
                .root_id("entitlements")
                .vm_id("entitlements")
                .config_json(&json!({
                    "policy": {"default": "deny", "rules": [{
                        "id": "curves-granted", "effect": "allow",
                        "match": {"path": {"template": "/api/v1/curves/{market}/**"}},
                        "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]}]},
                    "grants": {"cluster": "sidecar", "authority": "sidecar", "page_grants": 1}
                })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let chain = host.chain(&[&plugin]).with_upstream(|_| Message {
        headers: vec![(":status".into(), b"200".to_vec())].into(),
        body: Vec::new(),
        trailers: None,
    });
    assert_eq!(
        status(&host, &chain, "acme", "CAISO"),
        503,
        "not loaded yet"
    );
    ticks_until(&host, 5, || {
        host.counter("wasmcustom.entitlements.grants.snapshots") == 1
    });
    // Both workers (streams go to them in turn) decide with it.
    for _ in 0..4 {
        assert_eq!(status(&host, &chain, "acme", "CAISO"), 200);
        assert_eq!(status(&host, &chain, "acme", "PJM"), 403);
        assert_eq!(status(&host, &chain, "beta", "CAISO"), 403);
    }

    // A grant: one delta, not another snapshot; in force after the tick
    // that fetched it.
    admin("PUT", "beta", "CAISO");
    admin("PUT", "beta", "PJM");
    let n = ticks_until(&host, 10, || {
        (0..2).all(|_| status(&host, &chain, "beta", "PJM") == 200)
    });
    assert!(n <= 3, "{n} ticks");
    assert_eq!(status(&host, &chain, "beta", "CAISO"), 200);
    assert_eq!(host.counter("wasmcustom.entitlements.grants.snapshots"), 1);
    assert!(host.counter("wasmcustom.entitlements.grants.deltas") >= 1);
    assert_eq!(host.counter("wasmcustom.entitlements.grants.in_force"), 3);

    // A revoke: both workers deny again, the cached decisions retired.
    admin("DELETE", "acme", "CAISO");
    let n = ticks_until(&host, 10, || {
        (0..2).all(|_| status(&host, &chain, "acme", "CAISO") == 403)
    });
    assert!(n <= 3, "{n} ticks");
    assert_eq!(status(&host, &chain, "beta", "CAISO"), 200);
    assert_eq!(host.counter("wasmcustom.entitlements.grants.in_force"), 2);
    // Nothing new: 304s.
    let before = host.counter("wasmcustom.entitlements.grants.not_modified");
    ticks_until(&host, 5, || {
        host.counter("wasmcustom.entitlements.grants.not_modified") >= before + 2
    });
    assert_eq!(host.counter("wasmcustom.entitlements.grants.invalid"), 0);
    sc.shutdown.cancel();
}
