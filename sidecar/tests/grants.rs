//! The grants store against the real PostgreSQL (127.0.0.1:5432): idempotent
//! writes, the audit with actor, before and after, one holder's list, a
//! snapshot load, NOTIFY at commit, bad input refused before any write.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::block_on;

use common::pg::Schema;
use entitlements_core::grants::{Caller, Grant, Grants, Holder};
use futures_util::{stream, StreamExt};
use serde_json::json;
use sidecar::grants::{notice_version, GrantStore, CHANNEL};
use std::time::Duration;

fn tenant(t: &str, r: &str, a: &str) -> Grant {
    Grant::new(Holder::Tenant(t.into()), r, a).unwrap()
}

#[test]
fn writes_are_idempotent_audited_and_read_back() {
    let db = Schema::new("grants");
    let conninfo = db.conninfo();
    block_on(async {
        let mut s = GrantStore::connect(&conninfo).await.unwrap();
        let g = tenant("acme", "curves:CAISO", "read");
        assert_eq!(s.put("sales-1", &g).await.unwrap(), Some(1));
        assert_eq!(s.put("sales-1", &g).await.unwrap(), None, "already there");
        let bob = Grant::new(Holder::Subject("bob".into()), "instruments:*", "*").unwrap();
        assert_eq!(s.put("sales-2", &bob).await.unwrap(), Some(2));
        assert_eq!(s.list(&g.holder).await.unwrap(), std::slice::from_ref(&g));
        let (v, set) = s.load().await.unwrap();
        assert_eq!((v, set.len()), (2, 2));
        let acme = Caller {
            tenant: Some("acme"),
            subject: Some("alice"),
        };
        assert!(set.holds(acme, "curves:CAISO", "read"));
        assert_eq!(s.delete("support-1", &g).await.unwrap(), Some(3));
        assert_eq!(
            s.delete("support-1", &g).await.unwrap(),
            None,
            "already gone"
        );
        assert!(s.list(&g.holder).await.unwrap().is_empty());
        let audit = s.audit(0, 0.0, 100).await.unwrap();
        let seen: Vec<_> = audit
            .iter()
            .map(|r| (r.actor.as_str(), r.op.as_str(), r.version))
            .collect();
        assert_eq!(
            seen,
            [
                ("sales-1", "put", 1),
                ("sales-2", "put", 2),
                ("support-1", "delete", 3)
            ]
        );
        let grant = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"});
        assert_eq!(
            (&audit[0].before, &audit[0].after),
            (&None, &Some(grant.clone()))
        );
        assert_eq!((&audit[2].before, &audit[2].after), (&Some(grant), &None));
        assert_eq!(audit[2].grant, g);
        assert_eq!(
            s.audit(audit[1].id, 0.0, 100).await.unwrap().len(),
            1,
            "after an id"
        );
        // A second start finds the schema migrated.
        let mut again = GrantStore::connect(&conninfo).await.unwrap();
        assert_eq!(again.load().await.unwrap().0, 3);
    });
}

#[test]
fn a_change_is_announced_at_commit_with_its_version() {
    let db = Schema::new("grants_notify");
    let conninfo = db.conninfo();
    let db_name = db.name.clone();
    block_on(async {
        let mut s = GrantStore::connect(&conninfo).await.unwrap();
        let (listener, mut conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let schema = db_name.clone();
        let mut messages = stream::poll_fn(move |cx| conn.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                // Channels are per database: other tests' schemas announce too.
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    if let Some(v) = notice_version(n.payload(), &schema) {
                        let _ = tx.send((n.channel().to_string(), v));
                    }
                }
            }
        });
        listener
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .unwrap();
        s.put("a", &tenant("acme", "curves:CAISO", "read"))
            .await
            .unwrap();
        s.put("a", &tenant("acme", "curves:CAISO", "read"))
            .await
            .unwrap(); // no change, no announcement
        s.delete("a", &tenant("acme", "curves:CAISO", "read"))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a notification within 5 s")
                .unwrap();
            got.push(n);
        }
        assert_eq!(got, [(CHANNEL.to_string(), 1), (CHANNEL.to_string(), 2)]);
        let more = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(
            !matches!(more, Ok(Some(_))),
            "nothing for the idempotent put: {more:?}"
        );
        drop(listener);
    });
}

#[test]
fn bad_grants_are_refused_before_anything_is_written() {
    for (holder, resource, action, field) in [
        (Holder::Tenant(String::new()), "curves:X", "read", "tenant"),
        (Holder::Tenant("acme".into()), "cur*ves", "read", "resource"),
        (Holder::Subject("bob".into()), "curves:X", "Read", "action"),
    ] {
        assert_eq!(
            Grant::new(holder, resource, action).unwrap_err().field,
            field
        );
    }
    // The database enforces the holder kinds as well.
    let db = Schema::new("grants_check");
    let conninfo = db.conninfo();
    block_on(async {
        let _store = GrantStore::connect(&conninfo).await.unwrap();
        let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let e = c
            .batch_execute(
                "INSERT INTO grants (holder_kind, holder, resource, action, created_by) \
                 VALUES ('team', 'x', 'r', 'read', 't')",
            )
            .await
            .unwrap_err();
        let why = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(why.contains("check constraint"), "{why}");
    });
    assert_eq!(db.int("SELECT count(*) FROM grants"), 0);
}

// ---------------------------------------------------------------- admin API

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    who: &[(String, String)],
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let raw = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, text) = common::http(addr, method, path, who, &raw).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

fn admin(sub: &str) -> Vec<(String, String)> {
    common::identity(sub, "viewer,access-admin", &[])
}

#[test]
fn the_admin_api_writes_lists_and_audits_with_the_callers_subject() {
    let db = Schema::new("grants_api");
    let conninfo = db.conninfo();
    block_on(async {
        let sc = common::start(&["--grants-postgres", &conninfo, "--admin-secret", "s3cret"]).await;
        let a = sc.addr;
        let g = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"});
        let (st, v) = call(a, "PUT", "/admin/v1/grants", &admin("sales-1"), g.clone()).await;
        assert_eq!(
            (st, &v["changed"], &v["version"]),
            (200, &json!(true), &json!(1)),
            "{v}"
        );
        assert_eq!(v["grant"], g);
        // Read-your-writes: answered once this replica's feed has it.
        assert_eq!(v["in_force"], json!(true), "{v}");
        let (st, feed) = call(a, "GET", "/internal/v1/grants", &[], json!(null)).await;
        assert_eq!((st, &feed["version"]), (200, &json!(1)), "{feed}");
        let (st, v) = call(a, "PUT", "/admin/v1/grants", &admin("sales-1"), g.clone()).await;
        assert_eq!(
            (st, &v["changed"], &v["version"]),
            (200, &json!(false), &json!(null))
        );
        let secret = vec![("x-admin-secret".to_string(), "s3cret".to_string())];
        let bob = json!({"subject": "bob", "resource": "instruments:*", "action": "*"});
        assert_eq!(
            call(a, "PUT", "/admin/v1/grants", &secret, bob).await.0,
            200
        );
        let (st, v) = call(
            a,
            "GET",
            "/admin/v1/grants?tenant=acme",
            &admin("x"),
            json!(null),
        )
        .await;
        assert_eq!((st, v), (200, json!({"grants": [g]})));
        let (st, v) = call(
            a,
            "DELETE",
            "/admin/v1/grants",
            &admin("support-1"),
            g.clone(),
        )
        .await;
        assert_eq!(
            (st, &v["changed"], &v["version"]),
            (200, &json!(true), &json!(3))
        );
        let (st, v) = call(
            a,
            "GET",
            "/admin/v1/audit?since=0",
            &admin("x"),
            json!(null),
        )
        .await;
        assert_eq!(st, 200);
        let rows = v["audit"].as_array().unwrap();
        let who: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r["actor"].as_str().unwrap(), r["op"].as_str().unwrap()))
            .collect();
        assert_eq!(
            who,
            [
                ("sales-1", "put"),
                ("admin-secret", "put"),
                ("support-1", "delete")
            ]
        );
        assert_eq!((&rows[2]["before"], &rows[2]["after"]), (&g, &json!(null)));
        let next = v["next"].as_i64().unwrap();
        let later = format!("/admin/v1/audit?after={next}");
        let (_, v) = call(a, "GET", &later, &admin("x"), json!(null)).await;
        assert_eq!(v["audit"], json!([]), "nothing after the last id");
        sc.shutdown.cancel();
    });
}

#[test]
fn the_admin_api_refuses_bad_input_and_callers_without_the_role() {
    let db = Schema::new("grants_api_bad");
    let conninfo = db.conninfo();
    block_on(async {
        let sc = common::start(&["--grants-postgres", &conninfo, "--admin-secret", "s3cret"]).await;
        let a = sc.addr;
        let g = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"});
        for who in [
            common::identity("mallory", "viewer", &[]),
            vec![("x-admin-secret".to_string(), "wrong".to_string())],
            Vec::new(),
        ] {
            let (st, v) = call(a, "PUT", "/admin/v1/grants", &who, g.clone()).await;
            assert_eq!((st, &v["error"]), (403, &json!("forbidden")), "{who:?}");
        }
        for (body, field) in [
            (json!({"resource": "curves:X", "action": "read"}), "tenant"),
            (
                json!({"tenant": "a", "subject": "b", "resource": "c", "action": "read"}),
                "tenant",
            ),
            (
                json!({"tenant": "acme", "resource": "cur*", "action": "read"}),
                "resource",
            ),
            (
                json!({"tenant": "acme", "resource": "curves:X", "action": "READ"}),
                "action",
            ),
            (
                json!({"tenant": "acme", "resource": "c", "action": "read", "x": 1}),
                "body",
            ),
        ] {
            let (st, v) = call(a, "PUT", "/admin/v1/grants", &admin("a"), body.clone()).await;
            assert_eq!((st, &v["field"]), (400, &json!(field)), "{body}: {v}");
        }
        let (st, v) = call(a, "GET", "/admin/v1/grants", &admin("a"), json!(null)).await;
        assert_eq!((st, &v["field"]), (400, &json!("tenant")));
        let (st, _) = call(a, "POST", "/admin/v1/grants", &admin("a"), g.clone()).await;
        assert_eq!(st, 405);
        let (st, v) = call(
            a,
            "GET",
            "/admin/v1/grants?tenant=acme",
            &admin("a"),
            json!(null),
        )
        .await;
        assert_eq!((st, v), (200, json!({"grants": []})));
        sc.shutdown.cancel();
    });
    assert_eq!(
        db.int("SELECT count(*) FROM grants_audit"),
        0,
        "nothing written"
    );
}

#[test]
fn without_postgresql_writes_are_503_and_nothing_is_half_applied() {
    block_on(async {
        let down = "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2";
        let sc = common::start(&["--grants-postgres", down]).await;
        let g = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"});
        let (st, v) = call(sc.addr, "PUT", "/admin/v1/grants", &admin("a"), g).await;
        assert_eq!((st, &v["error"]), (503, &json!("grants_unavailable")));
        sc.shutdown.cancel();
        let sc = common::start(&[]).await;
        let (st, v) = call(sc.addr, "GET", "/admin/v1/audit", &admin("a"), json!(null)).await;
        assert_eq!(
            (st, &v["error"]),
            (503, &json!("grants_unavailable")),
            "not configured"
        );
        sc.shutdown.cancel();
    });
}
