//! A fresh PostgreSQL schema per test on the loopback server
//! (`127.0.0.1:5432`, trust auth, database `test`), dropped at the end.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

pub const PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
/// Its address, for a [`super::proxy::TcpProxy`] in front of it.
pub const PG_ADDR: &str = "127.0.0.1:5432";

/// A fresh schema for one test, dropped at the end.
pub struct Schema {
    pub name: String,
    rt: tokio::runtime::Runtime,
}

impl Schema {
    pub fn new(tag: &str) -> Schema {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "test_{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Schema { name, rt };
        s.exec(&format!(
            "DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
            s.name
        ));
        s
    }

    pub fn conninfo(&self) -> String {
        format!("{PG} options='-c search_path={}'", self.name)
    }

    pub fn client(&self) -> tokio_postgres::Client {
        self.rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to PostgreSQL ({PG}): {e}"));
            tokio::spawn(conn);
            c
        })
    }

    pub fn exec(&self, sql: &str) {
        let c = self.client();
        self.rt
            .block_on(c.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {}", sidecar::pg::error_chain(&e)));
    }

    pub fn int(&self, sql: &str) -> i64 {
        let c = self.client();
        self.rt
            .block_on(c.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get::<_, Option<i64>>(0)
            .unwrap_or(0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.exec(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}
