//! The grants in force and their feed (`GET /internal/v1/grants`), against
//! the real PostgreSQL (127.0.0.1:5432, a fresh schema per test): snapshot
//! paging, deltas, 304, epochs, the change log's floor, bad parameters, the
//! token; the grants file; two replicas converging through LISTEN/NOTIFY;
//! PostgreSQL going away (a TCP proxy the test stops) and coming back; the
//! policy document endpoint.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::block_on;

use common::pg::{Schema, PG, PG_ADDR};
use common::proxy::TcpProxy;
use entitlements_core::grants::{Grant, Holder};
use serde_json::{json, Value};
use sidecar::grants::GrantStore;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn secret() -> Vec<(String, String)> {
    vec![("x-admin-secret".to_string(), "s3cret".to_string())]
}

/// PUT or DELETE one grant through the admin API; its answer.
async fn admin(addr: SocketAddr, method: &str, grant: Value) -> (u16, Value) {
    let (st, body) = common::http(
        addr,
        method,
        "/admin/v1/grants",
        &secret(),
        grant.to_string().as_bytes(),
    )
    .await;
    (st, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn put_ok(addr: SocketAddr, grant: Value) -> i64 {
    let (st, v) = admin(addr, "PUT", grant.clone()).await;
    assert_eq!((st, &v["changed"]), (200, &json!(true)), "PUT {grant}: {v}");
    v["version"].as_i64().unwrap()
}

async fn delete_ok(addr: SocketAddr, grant: Value) -> i64 {
    let (st, v) = admin(addr, "DELETE", grant.clone()).await;
    assert_eq!(
        (st, &v["changed"]),
        (200, &json!(true)),
        "DELETE {grant}: {v}"
    );
    v["version"].as_i64().unwrap()
}

fn grant(kind: &str, name: &str, resource: &str, action: &str) -> Value {
    json!({kind: name, "resource": resource, "action": action})
}

/// The feed's answer: status and JSON body (null when empty).
async fn feed_with(addr: SocketAddr, query: &str, headers: &[(String, String)]) -> (u16, Value) {
    let (st, body) = common::http(
        addr,
        "GET",
        &format!("/internal/v1/grants{query}"),
        headers,
        b"",
    )
    .await;
    (st, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn feed(addr: SocketAddr, query: &str) -> (u16, Value) {
    feed_with(addr, query, &[]).await
}

/// Polls the feed (every 10 ms, up to 10 s) until its version is `v`.
async fn until_version(addr: SocketAddr, v: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, body) = feed(addr, "").await;
        if st == 200 && body["version"] == json!(v) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "version {v} within 10 s; last {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Follows `next` from the first page of `query`; every page.
async fn pages(addr: SocketAddr, query: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let first = if query.is_empty() {
        format!("?limit={limit}")
    } else {
        format!("?{query}&limit={limit}")
    };
    let (st, mut page) = feed(addr, &first).await;
    assert_eq!(st, 200, "{page}");
    loop {
        let next = page["next"].clone();
        out.push(page);
        let Some(c) = next.as_str() else { break };
        let (st, p) = feed(addr, &format!("?cursor={c}&limit={limit}")).await;
        assert_eq!(st, 200, "{p}");
        page = p;
    }
    out
}

/// (kind, name, grants) of each holder of a page.
fn holders(page: &Value) -> Vec<(String, String, Value)> {
    page["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let (k, n) = match (h.get("tenant"), h.get("subject")) {
                (Some(t), None) => ("tenant", t),
                (None, Some(s)) => ("subject", s),
                _ => panic!("a holder is a tenant or a subject: {h}"),
            };
            (
                k.to_string(),
                n.as_str().unwrap().to_string(),
                h["grants"].clone(),
            )
        })
        .collect()
}

fn names(page: &Value) -> Vec<String> {
    holders(page)
        .into_iter()
        .map(|(k, n, _)| format!("{k}:{n}"))
        .collect()
}

async fn metrics(addr: SocketAddr) -> String {
    common::http(addr, "GET", "/metrics", &[], b"").await.1
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

async fn readyz(addr: SocketAddr) -> (u16, String) {
    common::http(addr, "GET", "/readyz", &[], b"").await
}

#[test]
fn the_feed_pages_snapshots_answers_deltas_and_304() {
    let db = Schema::new("feed");
    let conninfo = db.conninfo();
    block_on(async {
        let sc = common::start(&["--grants-postgres", &conninfo, "--admin-secret", "s3cret"]).await;
        let a = sc.addr;
        let first = until_version(a, 0).await;
        let epoch = first["epoch"].as_str().unwrap().to_string();
        assert!(epoch.starts_with("pg-"), "{first}");
        assert_eq!(
            first,
            json!({"epoch": epoch, "version": 0, "snapshot": true, "holders": [], "next": null})
        );
        let (st, body) = readyz(a).await;
        assert_eq!(st, 200);
        assert!(body.contains("grants: ok, version 0, 0 grants"), "{body}");

        put_ok(a, grant("subject", "bob", "instruments:*", "*")).await;
        put_ok(a, grant("tenant", "beta", "curves:PJM", "read")).await;
        put_ok(a, grant("tenant", "acme", "curves:CAISO", "read")).await;
        put_ok(a, grant("subject", "al", "curves:ERCOT", "read")).await;
        let v = put_ok(a, grant("tenant", "acme", "curves:ERCOT", "read")).await;
        assert_eq!(v, 5);
        until_version(a, 5).await;

        // Whole holders in order, while a page holds fewer than 2 grants.
        let ps = pages(a, "", 2).await;
        let seen: Vec<Vec<String>> = ps.iter().map(names).collect();
        assert_eq!(
            seen,
            [
                vec!["tenant:acme"],
                vec!["tenant:beta", "subject:al"],
                vec!["subject:bob"]
            ]
        );
        for p in &ps {
            assert_eq!(
                (&p["epoch"], &p["version"], &p["snapshot"]),
                (&json!(epoch), &json!(5), &json!(true))
            );
        }
        assert_eq!(
            holders(&ps[0])[0].2,
            json!([["curves:CAISO", "read"], ["curves:ERCOT", "read"]])
        );
        // A first holder bigger than the limit is still taken whole.
        let ps = pages(a, "", 1).await;
        assert_eq!(ps.len(), 4);
        assert_eq!(holders(&ps[0])[0].2.as_array().unwrap().len(), 2);
        // The default page holds them all.
        let (_, all) = feed(a, "").await;
        assert_eq!(
            names(&all),
            ["tenant:acme", "tenant:beta", "subject:al", "subject:bob"]
        );

        // Nothing new, or the caller ahead: 304 without a body.
        let (st, body) = common::http(
            a,
            "GET",
            &format!("/internal/v1/grants?epoch={epoch}&after=5"),
            &[],
            b"",
        )
        .await;
        assert_eq!((st, body.as_str()), (304, ""));
        assert_eq!(feed(a, &format!("?epoch={epoch}&after=99")).await.0, 304);

        // Deltas: each changed holder with its grants now.
        delete_ok(a, grant("tenant", "acme", "curves:CAISO", "read")).await;
        put_ok(a, grant("tenant", "carol", "curves:*", "read")).await;
        let v = delete_ok(a, grant("subject", "bob", "instruments:*", "*")).await;
        assert_eq!(v, 8);
        until_version(a, 8).await;
        let (st, d) = feed(a, &format!("?epoch={epoch}&after=5")).await;
        assert_eq!(st, 200);
        assert_eq!(
            d,
            json!({"epoch": epoch, "version": 8, "snapshot": false, "next": null, "holders": [
                {"tenant": "acme", "grants": [["curves:ERCOT", "read"]]},
                {"tenant": "carol", "grants": [["curves:*", "read"]]},
                {"subject": "bob", "grants": []}
            ]})
        );
        let (_, d) = feed(a, &format!("?epoch={epoch}&after=6")).await;
        assert_eq!(names(&d), ["tenant:carol", "subject:bob"]);
        // A delta pages too, and each page keeps the answer's version.
        let ps = pages(a, &format!("epoch={epoch}&after=5"), 1).await;
        let seen: Vec<Vec<String>> = ps.iter().map(names).collect();
        assert_eq!(
            seen,
            [
                vec!["tenant:acme"],
                vec!["tenant:carol"],
                vec!["subject:bob"]
            ]
        );
        assert!(ps
            .iter()
            .all(|p| p["snapshot"] == json!(false) && p["version"] == json!(8)));
        // The snapshot lists only holders with grants.
        let (_, s) = feed(a, "").await;
        assert_eq!(
            names(&s),
            ["tenant:acme", "tenant:beta", "tenant:carol", "subject:al"]
        );

        // Another epoch (a caller of another store, or of a file): a snapshot.
        let (st, s) = feed(a, "?epoch=file-0123456789abcdef&after=8").await;
        assert_eq!(
            (st, &s["snapshot"], &s["version"]),
            (200, &json!(true), &json!(8))
        );

        // Bad parameters: 400 naming the field.
        for (q, field) in [
            ("?limit=0", "limit"),
            ("?limit=100001", "limit"),
            ("?limit=ten", "limit"),
            (&format!("?epoch={epoch}&after=-1") as &str, "after"),
            (&format!("?epoch={epoch}") as &str, "after"),
            ("?after=3", "epoch"),
            ("?cursor=bm90IGEgY3Vyc29y", "cursor"),
            ("?cursor=%FF", "cursor"),
        ] {
            let (st, v) = feed(a, q).await;
            assert_eq!(
                (st, &v["error"], &v["field"]),
                (400, &json!("invalid_request"), &json!(field)),
                "{q}: {v}"
            );
        }
        let m = metrics(a).await;
        for line in [
            "sidecar_grants_version 8",
            "sidecar_grants 4",
            "sidecar_grants_holders 4",
            "sidecar_grants_source_up 1",
            "sidecar_grants_feed_total{answer=\"not_modified\"} 2",
            "sidecar_grants_feed_total{answer=\"invalid\"} 8",
        ] {
            assert!(has_line(&m, line), "{line} in\n{m}");
        }
        sc.shutdown.cancel();
    });
}

#[test]
fn a_delta_older_than_the_log_answers_a_snapshot_and_a_restart_keeps_the_epoch() {
    let db = Schema::new("feed_floor");
    let conninfo = db.conninfo();
    block_on(async {
        let args = [
            "--grants-postgres",
            &conninfo,
            "--admin-secret",
            "s3cret",
            "--grants-log",
            "3",
        ];
        let sc = common::start(&args).await;
        let a = sc.addr;
        until_version(a, 0).await;
        for t in ["t1", "t2", "t3"] {
            put_ok(a, grant("tenant", t, "curves:X", "read")).await;
        }
        let epoch = until_version(a, 3).await["epoch"]
            .as_str()
            .unwrap()
            .to_string();
        // A paged delta after 0, its first page taken...
        let (_, p1) = feed(a, &format!("?epoch={epoch}&after=0&limit=1")).await;
        assert_eq!(
            (&p1["snapshot"], names(&p1)),
            (&json!(false), vec!["tenant:t1".to_string()])
        );
        let cursor = p1["next"].as_str().unwrap().to_string();
        // ... then two more changes push versions 1 and 2 out of the log.
        put_ok(a, grant("tenant", "t4", "curves:X", "read")).await;
        put_ok(a, grant("tenant", "t5", "curves:X", "read")).await;
        until_version(a, 5).await;
        let (_, d) = feed(a, &format!("?epoch={epoch}&after=1")).await;
        assert_eq!(
            (&d["snapshot"], d["holders"].as_array().unwrap().len()),
            (&json!(true), 5)
        );
        let (_, d) = feed(a, &format!("?epoch={epoch}&after=2")).await;
        assert_eq!(
            (&d["snapshot"], names(&d)),
            (
                &json!(false),
                vec!["tenant:t3".into(), "tenant:t4".into(), "tenant:t5".into()]
            )
        );
        // The cursor's base fell out of the log: the first page of a snapshot.
        let (_, p2) = feed(a, &format!("?cursor={cursor}&limit=1")).await;
        assert_eq!(
            (&p2["snapshot"], &p2["version"], names(&p2)),
            (&json!(true), &json!(5), vec!["tenant:t1".to_string()])
        );
        assert!(has_line(
            &metrics(a).await,
            "sidecar_grants_log_evicted_total 2"
        ));
        sc.shutdown.cancel();

        // A new process on the same store: the same epoch, the log seeded
        // from the audit, so the caller's delta still works.
        let sc = common::start(&args).await;
        let again = until_version(sc.addr, 5).await;
        assert_eq!(again["epoch"], json!(epoch));
        let (_, d) = feed(sc.addr, &format!("?epoch={epoch}&after=3")).await;
        assert_eq!(
            (&d["snapshot"], names(&d)),
            (&json!(false), vec!["tenant:t4".into(), "tenant:t5".into()])
        );
        let (_, d) = feed(sc.addr, &format!("?epoch={epoch}&after=1")).await;
        assert_eq!(d["snapshot"], json!(true), "before the seeded log");
        sc.shutdown.cancel();
    });
}

#[tokio::test]
async fn without_a_source_the_feed_is_empty_and_the_token_is_required() {
    let sc = common::start(&["--grants-feed-token", "t0k"]).await;
    let a = sc.addr;
    for h in [
        vec![],
        vec![("authorization".to_string(), "Bearer nope".to_string())],
        vec![("authorization".to_string(), "Basic t0k".to_string())],
    ] {
        let (st, v) = feed_with(a, "", &h).await;
        assert_eq!((st, v), (401, json!({"error": "unauthorized"})), "{h:?}");
        let (st, _) = common::http(a, "GET", "/internal/v1/policy", &h, b"").await;
        assert_eq!(st, 401);
    }
    let ok = vec![("authorization".to_string(), "Bearer t0k".to_string())];
    let (st, v) = feed_with(a, "", &ok).await;
    assert_eq!(
        (st, v),
        (
            200,
            json!({"epoch": "none", "version": 0, "snapshot": true, "holders": [], "next": null})
        )
    );
    let (st, _) = feed_with(a, "?epoch=none&after=0", &ok).await;
    assert_eq!(st, 304);

    // The policy in force, as loaded, with its ETag.
    let (st, head, body) = common::http_full(a, "GET", "/internal/v1/policy", &ok, b"").await;
    assert_eq!((st, body.as_str()), (200, common::POLICY));
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .to_string();
    assert!(etag.starts_with('"') && etag.len() == 42, "{etag}");
    let mut cond = ok.clone();
    cond.push(("if-none-match".into(), format!("\"x\", {etag}")));
    let (st, _, body) = common::http_full(a, "GET", "/internal/v1/policy", &cond, b"").await;
    assert_eq!((st, body.as_str()), (304, ""));
    // A new policy document: a new ETag, the old one no longer matches.
    let text = r#"{"rules": [{"id": "open", "effect": "allow", "match": {"channel": "open.>"}}]}"#;
    sc.app.ctx.set_policy_from(
        entitlements_core::policy::Policy::from_json(text.as_bytes()).unwrap(),
        sidecar::session::PolicyDocument::new(text),
    );
    let (st, head, body) = common::http_full(a, "GET", "/internal/v1/policy", &cond, b"").await;
    assert_eq!((st, body.as_str()), (200, text));
    assert!(!head.contains(&etag), "{head}");
    let (st, _) = common::http(a, "POST", "/internal/v1/grants", &ok, b"").await;
    assert_eq!(st, 405);
    sc.shutdown.cancel();
}

struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempFile(
            std::env::temp_dir().join(format!("sidecar-{tag}-{}-{n}.json", std::process::id())),
        )
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Replaces the content at once (a rename, as editors and config
    /// maps do).
    fn write(&self, grants: Value) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, grants.to_string()).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn the_file_source_loads_follows_changes_and_keeps_the_last_good() {
    let f = TempFile::new("grants");
    f.write(json!({"grants": [
        grant("tenant", "acme", "curves:CAISO", "read"),
        grant("subject", "u1", "instruments:*", "*"),
    ]}));
    let sc = common::start(&["--grants-file", f.path(), "--policy-poll", "1"]).await;
    let a = sc.addr;
    let (st, s) = feed(a, "").await;
    assert_eq!(st, 200);
    let epoch = s["epoch"].as_str().unwrap().to_string();
    assert!(epoch.starts_with("file-") && epoch.len() == 21, "{epoch}");
    assert_eq!(
        (&s["version"], names(&s)),
        (&json!(1), vec!["tenant:acme".into(), "subject:u1".into()])
    );

    // A change: the next version, a delta with the changed holders.
    f.write(json!({"grants": [
        grant("subject", "u1", "instruments:*", "*"),
        grant("tenant", "acme", "curves:CAISO", "read"),
        grant("tenant", "acme", "curves:PJM", "read"),
    ]}));
    until_version(a, 2).await;
    let (_, d) = feed(a, &format!("?epoch={epoch}&after=1")).await;
    assert_eq!(
        d["holders"],
        json!([{"tenant": "acme", "grants": [["curves:CAISO", "read"], ["curves:PJM", "read"]]}])
    );

    // An invalid change: refused, counted, said in /readyz; version 2 stays.
    f.write(json!({"grants": [grant("tenant", "acme", "curves:CAISO", "READ")]}));
    common::eventually_async("the invalid file refused", || async {
        has_line(
            &metrics(a).await,
            "sidecar_grants_reloads_total{result=\"invalid\"} 1",
        )
    })
    .await;
    let (st, body) = readyz(a).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("grants: stale for ")
            && body.contains("grants[0].action")
            && body.contains("serving version 2"),
        "{body}"
    );
    let (_, s) = feed(a, "").await;
    assert_eq!(s["version"], json!(2));
    assert_eq!(feed(a, &format!("?epoch={epoch}&after=2")).await.0, 304);

    // The same grants in another order: no new version. Then a removal.
    f.write(json!({"grants": [
        grant("tenant", "acme", "curves:PJM", "read"),
        grant("tenant", "acme", "curves:CAISO", "read"),
        grant("subject", "u1", "instruments:*", "*"),
    ]}));
    common::eventually_async("the file read again", || async {
        readyz(a)
            .await
            .1
            .contains("grants: ok, version 2, 3 grants")
    })
    .await;
    f.write(json!({"grants": [grant("tenant", "acme", "curves:PJM", "read")]}));
    until_version(a, 3).await;
    let (_, d) = feed(a, &format!("?epoch={epoch}&after=2")).await;
    assert_eq!(
        d["holders"],
        json!([{"tenant": "acme", "grants": [["curves:PJM", "read"]]}, {"subject": "u1", "grants": []}])
    );
    sc.shutdown.cancel();

    // Invalid at start: the start fails, naming the file and the entry.
    f.write(json!({"grants": [{"tenant": "acme", "resource": "cur*ves", "action": "read"}]}));
    let config = common::config(&["--grants-file", f.path()]);
    let app = sidecar::app(
        &config,
        entitlements_core::policy::Policy::from_json(common::POLICY.as_bytes()).unwrap(),
    );
    let e = sidecar::start_grants(&app, &config, CancellationToken::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(f.path()) && e.contains("grants[0].resource"),
        "{e}"
    );
    // Both sources: refused by the flags, and by the library.
    use clap::Parser;
    let both = sidecar::config::Config::try_parse_from([
        "sidecar",
        "--policy",
        "p.json",
        "--grants-file",
        "g.json",
        "--grants-postgres",
        PG,
    ]);
    assert!(both
        .unwrap_err()
        .to_string()
        .contains("cannot be used with"));
    let mut config = common::config(&["--grants-file", f.path()]);
    config.grants_postgres = Some(PG.into());
    let e = sidecar::start_grants(&app, &config, CancellationToken::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("exclusive"), "{e}");
}

#[test]
fn two_replicas_converge_within_a_second_of_a_write() {
    let db = Schema::new("feed_replicas");
    let conninfo = db.conninfo();
    block_on(async {
        let args = [
            "--grants-postgres",
            &conninfo,
            "--admin-secret",
            "s3cret",
            "--grants-resync",
            "3600",
        ];
        let one = common::start(&args).await;
        let two = common::start(&args).await;
        until_version(one.addr, 0).await;
        until_version(two.addr, 0).await;
        for (i, (writer, reader)) in [(one.addr, two.addr), (two.addr, one.addr)]
            .into_iter()
            .enumerate()
        {
            let name = format!("t{i}");
            let v = put_ok(writer, grant("tenant", &name, "curves:CAISO", "read")).await;
            let written = Instant::now();
            let s = until_version(reader, v).await;
            let took = written.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "the other replica took {took:?}"
            );
            assert!(names(&s).contains(&format!("tenant:{name}")), "{s}");
            // And the writer learns of its own write the same way.
            until_version(writer, v).await;
        }
        let (a, b) = (feed(one.addr, "").await.1, feed(two.addr, "").await.1);
        assert_eq!(a, b, "the same epoch, version and grants");
        one.shutdown.cancel();
        two.shutdown.cancel();
    });
}

#[test]
fn postgresql_away_keeps_the_last_good_grants_and_catches_up_when_back() {
    let db = Schema::new("feed_away");
    let schema = db.name.clone();
    let direct = db.conninfo();
    block_on(async {
        let proxy = TcpProxy::start(PG_ADDR).await;
        let port = proxy.addr.port();
        let via = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=test connect_timeout=2 \
             options='-c search_path={schema}'"
        );
        let sc = common::start(&["--grants-postgres", &via, "--admin-secret", "s3cret"]).await;
        let a = sc.addr;
        put_ok(a, grant("tenant", "acme", "curves:CAISO", "read")).await;
        let epoch = until_version(a, 1).await["epoch"]
            .as_str()
            .unwrap()
            .to_string();

        proxy.cut();
        common::eventually_async("the sidecar to see PostgreSQL away", || async {
            has_line(&metrics(a).await, "sidecar_grants_source_up 0")
        })
        .await;
        let (st, body) = readyz(a).await;
        assert_eq!(st, 200, "stale grants still serve: {body}");
        assert!(
            body.contains("grants: stale for ") && body.contains("serving version 1"),
            "{body}"
        );
        let (st, v) = admin(a, "PUT", grant("tenant", "beta", "curves:PJM", "read")).await;
        assert_eq!((st, &v["error"]), (503, &json!("grants_unavailable")));
        let (st, s) = feed(a, "").await;
        assert_eq!(
            (st, &s["version"], names(&s)),
            (200, &json!(1), vec!["tenant:acme".to_string()])
        );

        // Writes meanwhile, straight to PostgreSQL.
        let mut store = GrantStore::connect(&direct).await.unwrap();
        let g = |t: &str, r: &str| Grant::new(Holder::Tenant(t.into()), r, "read").unwrap();
        store.put("ops", &g("beta", "curves:PJM")).await.unwrap();
        store
            .delete("ops", &g("acme", "curves:CAISO"))
            .await
            .unwrap();

        let _back = TcpProxy::start_at(proxy.addr, PG_ADDR).await;
        let s = until_version(a, 3).await;
        assert_eq!(s["epoch"], json!(epoch));
        assert_eq!(names(&s), ["tenant:beta"]);
        let (_, d) = feed(a, &format!("?epoch={epoch}&after=1")).await;
        assert_eq!(
            d["holders"],
            json!([{"tenant": "acme", "grants": []}, {"tenant": "beta", "grants": [["curves:PJM", "read"]]}])
        );
        let m = metrics(a).await;
        assert!(has_line(&m, "sidecar_grants_source_up 1"), "{m}");
        assert!(
            !has_line(&m, "sidecar_grants_reloads_total{result=\"failed\"} 0")
                && m.contains("sidecar_grants_reloads_total{result=\"failed\"}"),
            "{m}"
        );
        let (st, body) = readyz(a).await;
        assert_eq!(st, 200);
        assert!(body.contains("grants: ok, version 3, 1 grants"), "{body}");
        // Admin writes work again (the connection is made at the next call).
        put_ok(a, grant("tenant", "gamma", "curves:X", "read")).await;
        until_version(a, 4).await;
        sc.shutdown.cancel();
    });
}

#[test]
fn never_loaded_is_not_ready() {
    block_on(async {
        let down = "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2";
        let sc = common::start(&["--grants-postgres", down]).await;
        common::eventually_async("the failure reported", || async {
            readyz(sc.addr)
                .await
                .1
                .contains("grants: not loaded (postgres: ")
        })
        .await;
        let (st, body) = readyz(sc.addr).await;
        assert_eq!(st, 503, "{body}");
        assert!(body.starts_with("not ready\nbus: ok\n"), "{body}");
        let (st, v) = feed(sc.addr, "").await;
        assert_eq!((st, &v["error"]), (503, &json!("grants_unavailable")));
        sc.shutdown.cancel();
    });
}

/// Channels by grant only: `pricing.curves.<market>.>` for a caller whose
/// tenant or self holds `curves:<market>` `read`.
const GRANT_POLICY: &str = r#"{"rules": [
  {"id": "curves-by-grant", "effect": "allow",
   "match": {"channel": "pricing.curves.{market}.>"},
   "when": [{"grant": {"resource": "curves:{market}", "action": "read"}}]},
  {"id": "publishers", "effect": "allow",
   "match": {"channel": ">", "actions": ["publish"]},
   "when": [{"attr": "roles", "op": "contains", "value": "publisher"}]}
]}"#;

#[test]
fn a_subscription_allowed_by_a_grant_ends_when_the_grant_is_deleted() {
    let db = Schema::new("feed_sessions");
    let conninfo = db.conninfo();
    block_on(async {
        let sc = common::start(&["--grants-postgres", &conninfo, "--admin-secret", "s3cret"]).await;
        let a = sc.addr;
        sc.app.ctx.set_policy(
            entitlements_core::policy::Policy::from_json(GRANT_POLICY.as_bytes()).unwrap(),
        );
        until_version(a, 0).await;
        let caiso = grant("tenant", "acme", "curves:CAISO", "read");
        put_ok(a, caiso.clone()).await;
        put_ok(a, grant("subject", "bob", "curves:PJM", "read")).await;
        until_version(a, 2).await;
        let ctx = sc.app.ctx.clone();
        common::eventually("the sessions' grants", || ctx.rules().grants.len() == 2).await;

        // alice of acme: CAISO by her tenant's grant, not PJM (bob's).
        let mut alice = common::connect(a, &common::identity("alice", "trader", &[])).await;
        common::send(
            &mut alice,
            json!({"type": "subscribe", "id": 1, "channels": ["pricing.curves.CAISO.>", "pricing.curves.PJM.>"]}),
        )
        .await;
        let mut got = vec![
            common::recv(&mut alice).await,
            common::recv(&mut alice).await,
        ];
        got.sort_by_key(|v| v["type"].as_str().unwrap_or("").to_string());
        assert_eq!(
            (&got[0]["type"], &got[0]["code"], &got[0]["channel"]),
            (
                &json!("error"),
                &json!("forbidden"),
                &json!("pricing.curves.PJM.>")
            ),
            "{got:?}"
        );
        assert_eq!(
            (&got[1]["type"], &got[1]["channels"]),
            (&json!("subscribed"), &json!(["pricing.curves.CAISO.>"])),
            "{got:?}"
        );
        let mut bob = common::connect(a, &common::identity("bob", "trader", &[])).await;
        common::send(
            &mut bob,
            json!({"type": "subscribe", "channels": ["pricing.curves.PJM.>", "pricing.curves.CAISO.>"]}),
        )
        .await;
        let v = common::recv(&mut bob).await;
        assert_eq!(v["type"], "subscribed", "{v}");
        common::publish_ok(a, "pricing.curves.CAISO.DEC26", json!(1)).await;
        assert_eq!(common::recv(&mut alice).await["data"], json!(1));
        assert_eq!(common::recv(&mut bob).await["data"], json!(1));

        // Another holder's change decides nothing for alice; the deletion
        // of her tenant's grant ends her subscription, and bob's CAISO
        // (he is of acme too), not his PJM.
        put_ok(a, grant("tenant", "other", "curves:CAISO", "read")).await;
        delete_ok(a, caiso.clone()).await;
        let revoked = json!({"type": "unsubscribed", "channels": ["pricing.curves.CAISO.>"],
                             "reason": "revoked", "rule": "default"});
        assert_eq!(common::recv(&mut alice).await, revoked);
        assert_eq!(common::recv(&mut bob).await, revoked);
        common::publish_ok(a, "pricing.curves.CAISO.DEC26", json!(2)).await;
        common::publish_ok(a, "pricing.curves.PJM.DEC26", json!(3)).await;
        let v = common::recv(&mut bob).await;
        assert_eq!(
            (&v["channel"], &v["data"]),
            (&json!("pricing.curves.PJM.DEC26"), &json!(3))
        );
        // The connection stays; nothing more of CAISO reached alice.
        common::send(&mut alice, json!({"type": "ping", "id": 9})).await;
        assert_eq!(
            common::recv(&mut alice).await,
            json!({"type": "pong", "id": 9})
        );
        let m = metrics(a).await;
        assert!(
            has_line(
                &m,
                "sidecar_ws_revoked_subscriptions_total{rule=\"default\"} 2"
            ),
            "{m}"
        );
        // Granted again: a new subscribe is allowed at once.
        put_ok(a, caiso).await;
        common::eventually("the sessions' grants", || ctx.rules().grants.len() == 3).await;
        common::send(
            &mut alice,
            json!({"type": "subscribe", "channels": ["pricing.curves.CAISO.>"]}),
        )
        .await;
        let v = common::recv(&mut alice).await;
        assert_eq!(v["type"], "subscribed", "{v}");
        sc.shutdown.cancel();
    });
}
