//! TLS to PostgreSQL against a server of the test's own (TLS only, its
//! certificate for `localhost` from a CA generated here): every sslmode,
//! a wrong CA, a wrong host name, both connection-string forms, and the
//! usage writer and the grants store working through `verify-full`.

mod common;

use common::block_on;

use common::pg_tls::TlsPostgres;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Whether the connection of `c` is encrypted, as the server sees it.
async fn encrypted(c: &tokio_postgres::Client) -> bool {
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[test]
fn every_sslmode_against_a_server_with_a_generated_ca() {
    let pg = TlsPostgres::start();
    let (ca, other) = (
        pg.ca.display().to_string(),
        pg.other_ca.display().to_string(),
    );
    let local = pg.conninfo("localhost");
    let ip = pg.conninfo("127.0.0.1");
    block_on(async {
        for ok in [
            format!("{local} sslmode=verify-full sslrootcert={ca}"),
            format!("{ip} sslmode=verify-ca sslrootcert='{ca}'"),
            format!("{ip} sslmode=require"),
            format!("{ip} sslmode=require sslrootcert={ca}"),
            format!("{ip} sslmode=prefer"),
            // libpq's default is prefer.
            ip.clone(),
            format!(
                "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
                pg.port,
                filter_common::form::encode(&ca)
            ),
        ] {
            let c = sidecar::pg::connect(&ok)
                .await
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(encrypted(&c).await, "{ok}: not encrypted");
        }
        for (bad, why) in [
            // The chain does not lead to the CA named.
            (
                format!("{local} sslmode=verify-full sslrootcert={other}"),
                "UnknownIssuer",
            ),
            (
                format!("{ip} sslmode=verify-ca sslrootcert={other}"),
                "UnknownIssuer",
            ),
            (
                format!("{ip} sslmode=require sslrootcert={other}"),
                "UnknownIssuer",
            ),
            // The certificate names localhost, not 127.0.0.1.
            (
                format!("{ip} sslmode=verify-full sslrootcert={ca}"),
                "certificate not valid for name \"127.0.0.1\"",
            ),
            // The server takes TLS only.
            (format!("{ip} sslmode=disable"), "no encryption"),
        ] {
            let e = match sidecar::pg::connect(&bad).await {
                Ok(_) => panic!("{bad}: connected"),
                Err(e) => e,
            };
            assert!(e.contains(why), "{bad}: {e}");
        }
    });
}

#[test]
fn the_usage_writer_and_the_grants_store_go_through_verify_full() {
    let pg = TlsPostgres::start();
    let conninfo = format!(
        "{} sslmode=verify-full sslrootcert={} application_name=tls-e2e",
        pg.conninfo("localhost"),
        pg.ca.display()
    );
    block_on(async {
        // Usage: a batch committed over TLS.
        let cfg = common::config(&["--usage-postgres", &conninfo]);
        let policy =
            entitlements_core::policy::Policy::from_json(common::POLICY.as_bytes()).unwrap();
        let shutdown = CancellationToken::new();
        let app = sidecar::app_with_bus(&cfg, policy, shutdown.clone())
            .await
            .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(sidecar::server::serve(l, app, shutdown.clone()));
        let batch = json!({"batch": "tls-1", "records": [
            {"tenant": "acme", "subject": "s", "route": "/a", "method": "GET", "status": 200,
             "request_bytes": 10, "response_bytes": 100, "duration_us": 5, "time_ms": 1_795_000_020_000u64}
        ]});
        let (status, body) =
            common::http(addr, "POST", "/v1/usage", &[], batch.to_string().as_bytes()).await;
        assert_eq!(status, 200, "{body}");
        let c = sidecar::pg::connect(&conninfo).await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM usage_batches WHERE batch_id = 'tls-1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        // Every connection of the sidecar's is encrypted.
        let plain: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = 'tls-e2e' AND NOT s.ssl",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(plain, 0);
        shutdown.cancel();

        // Grants: a write through the admin API, in force, over TLS.
        let sc = common::start(&["--grants-postgres", &conninfo, "--admin-secret", "s3cret"]).await;
        let g = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"});
        let h = [("x-admin-secret".to_string(), "s3cret".to_string())];
        let mut answer = (0, String::new());
        // The first call connects; the sync task loads in the meantime.
        for _ in 0..50 {
            answer = common::http(
                sc.addr,
                "PUT",
                "/admin/v1/grants",
                &h,
                g.to_string().as_bytes(),
            )
            .await;
            if answer.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v: serde_json::Value = serde_json::from_str(&answer.1).unwrap();
        assert_eq!(
            (answer.0, &v["in_force"]),
            (200, &json!(true)),
            "{}",
            answer.1
        );
        sc.shutdown.cancel();
    });
}

#[test]
fn a_bad_sslmode_or_ca_file_stops_the_start_naming_it() {
    block_on(async {
        let cfg = common::config(&["--usage-postgres", "host=127.0.0.1 sslmode=verify"]);
        let policy =
            entitlements_core::policy::Policy::from_json(common::POLICY.as_bytes()).unwrap();
        let e = sidecar::app_with_bus(&cfg, policy, CancellationToken::new())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("usage: --usage-postgres: sslmode: \"verify\""),
            "{e}"
        );

        let cfg = common::config(&[
            "--grants-postgres",
            "host=127.0.0.1 sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
        ]);
        let policy =
            entitlements_core::policy::Policy::from_json(common::POLICY.as_bytes()).unwrap();
        let app = sidecar::app(&cfg, policy);
        let e = sidecar::start_grants(&app, &cfg, CancellationToken::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("grants --grants-postgres: sslrootcert: /nonexistent/ca.pem: "),
            "{e}"
        );
    });
}
