//! Persistence of usage rollups in PostgreSQL. Batches wait in a bounded
//! queue for one writer task, which takes up to `max_group` of them per
//! transaction (group commit): it inserts their ids into `usage_batches`
//! (`ON CONFLICT DO NOTHING RETURNING`: the ids not seen before), sums the
//! rollups of the new ones and upserts the rows, sorted by key, in one
//! statement per table; then commits and answers each batch. A batch is
//! acknowledged only after its commit, and applied at most once however
//! often it is retried. Schema changes are numbered migrations
//! (`migrations/*.sql`), applied at start under an advisory lock.

use super::rollup::Rollup;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The migrations, in order.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../migrations/0001_usage.sql"))];

const INSERT_BATCHES: &str = "INSERT INTO usage_batches (batch_id, records, metrics) \
     SELECT * FROM unnest($1::text[], $2::int4[], $3::int4[]) \
     ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id";

const UPSERT_USAGE: &str = "INSERT INTO usage_minute AS u (minute, tenant, route, method, \
     status_class, requests, request_bytes, response_bytes, duration_us_sum, duration_us_max) \
     SELECT to_timestamp(m * 60), t, r, me, c, q, qb, rb, ds, dm FROM unnest($1::int8[], \
     $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[], \
     $9::int8[], $10::int8[]) AS x(m, t, r, me, c, q, qb, rb, ds, dm) \
     ON CONFLICT (minute, tenant, route, method, status_class) DO UPDATE SET \
     requests = u.requests + EXCLUDED.requests, \
     request_bytes = u.request_bytes + EXCLUDED.request_bytes, \
     response_bytes = u.response_bytes + EXCLUDED.response_bytes, \
     duration_us_sum = u.duration_us_sum + EXCLUDED.duration_us_sum, \
     duration_us_max = GREATEST(u.duration_us_max, EXCLUDED.duration_us_max)";

const UPSERT_APP: &str = "INSERT INTO app_metric_minute AS a (minute, name, labels, count, sum, \
     min, max) SELECT to_timestamp(m * 60), n, l::jsonb, c, s, mi, ma FROM unnest($1::int8[], \
     $2::text[], $3::text[], $4::int8[], $5::float8[], $6::float8[], $7::float8[]) \
     AS x(m, n, l, c, s, mi, ma) \
     ON CONFLICT (minute, name, labels) DO UPDATE SET count = a.count + EXCLUDED.count, \
     sum = a.sum + EXCLUDED.sum, min = LEAST(a.min, EXCLUDED.min), \
     max = GREATEST(a.max, EXCLUDED.max)";

#[derive(Debug, Clone)]
pub struct PgConfig {
    /// libpq-style connection string (`host=127.0.0.1 user=postgres dbname=test`).
    pub conninfo: String,
    /// Most batches per transaction.
    pub max_group: usize,
    /// Most batches waiting for the writer (beyond: 503).
    pub queue: usize,
}

/// What the writer did, for `/metrics`.
#[derive(Debug, Default)]
pub struct PgStats {
    pub connected: AtomicBool,
    pub transactions: AtomicU64,
    pub batches: AtomicU64,
    pub duplicates: AtomicU64,
    pub rows: AtomicU64,
    pub errors: AtomicU64,
    pub queue_full: AtomicU64,
}

struct Job {
    id: String,
    records: i32,
    metrics: i32,
    rollup: Arc<Rollup>,
    reply: oneshot::Sender<Result<bool, String>>,
}

/// The handle of the writer task.
#[derive(Debug)]
pub struct Persister {
    tx: mpsc::Sender<Job>,
    pub stats: Arc<PgStats>,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub use crate::pg::connect;

/// Applies the usage migrations not applied yet.
pub async fn migrate(c: &mut Client) -> Result<(), String> {
    apply_migrations(c, "usage", 254_000_001, MIGRATIONS).await
}

/// Applies the migrations of one schema track (`<track>_schema_migrations`
/// records which are in), in order, in one transaction under an advisory
/// lock, so concurrent starts apply each once.
pub async fn apply_migrations(
    c: &mut Client,
    track: &str,
    lock: i64,
    migrations: &[(i32, &str)],
) -> Result<(), String> {
    let e =
        |e: tokio_postgres::Error| format!("postgres migration: {}", crate::pg::error_chain(&e));
    let tx = c.transaction().await.map_err(e)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(e)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {track}_schema_migrations (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(e)?;
    let done: HashSet<i32> = tx
        .query(
            &format!("SELECT version FROM {track}_schema_migrations"),
            &[],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (v, sql) in migrations {
        if done.contains(v) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|err| format!("postgres migration {track} {v}: {err}"))?;
        tx.execute(
            &format!("INSERT INTO {track}_schema_migrations (version) VALUES ($1)"),
            &[v],
        )
        .await
        .map_err(e)?;
        tracing::info!("{track}: applied migration {v}");
    }
    tx.commit().await.map_err(e)
}

impl Persister {
    /// Connects, migrates and starts the writer; fails if PostgreSQL cannot
    /// be reached or migrated now.
    pub async fn start(cfg: PgConfig, shutdown: CancellationToken) -> Result<Persister, String> {
        let mut client = connect(&cfg.conninfo).await?;
        migrate(&mut client).await?;
        let stats = Arc::new(PgStats::default());
        stats.connected.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(writer(Some(client), rx, cfg, stats.clone(), shutdown));
        Ok(Persister { tx, stats })
    }

    /// Writes a batch's rollup; `Ok(true)` if it was new, `Ok(false)` if
    /// its id was applied before, `Err` if it was not written (retry).
    pub async fn write(
        &self,
        id: &str,
        records: usize,
        metrics: usize,
        rollup: Arc<Rollup>,
    ) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id: id.to_string(),
            records: i32::try_from(records).unwrap_or(i32::MAX),
            metrics: i32::try_from(metrics).unwrap_or(i32::MAX),
            rollup,
            reply,
        };
        if self.tx.try_send(job).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return Err("the postgres writer is behind; retry".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the postgres writer stopped".into()))
    }
}

async fn writer(
    mut client: Option<Client>,
    mut rx: mpsc::Receiver<Job>,
    cfg: PgConfig,
    stats: Arc<PgStats>,
    shutdown: CancellationToken,
) {
    let mut last_attempt: Option<Instant> = None;
    loop {
        let first = tokio::select! {
            j = rx.recv() => j,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut group = vec![first];
        while group.len() < cfg.max_group.max(1) {
            match rx.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = None;
            stats.connected.store(false, Ordering::Relaxed);
            // At most one attempt a second; in between batches fail fast.
            if last_attempt.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_attempt = Some(Instant::now());
                match connect(&cfg.conninfo).await {
                    Ok(c) => {
                        tracing::info!("usage: reconnected to postgres");
                        stats.connected.store(true, Ordering::Relaxed);
                        client = Some(c);
                    }
                    Err(e) => tracing::warn!(error = %e, "usage: postgres is unreachable"),
                }
            }
        }
        let result = match client.as_mut() {
            None => Err("postgres is unreachable; retry".to_string()),
            Some(c) => write_group(c, &group).await.map_err(|e| {
                let e = crate::pg::error_chain(&e);
                let ids: Vec<&str> = group.iter().map(|j| j.id.as_str()).collect();
                tracing::warn!(
                    batches = ids.join(",").as_str(),
                    error = %e,
                    "usage: postgres write failed; the batches are answered 503 and resent"
                );
                format!("postgres write failed: {e}")
            }),
        };
        match result {
            Ok((news, rows)) => {
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
                for (job, new) in group.into_iter().zip(news) {
                    if new {
                        stats.batches.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = job.reply.send(Ok(new));
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction for a group; per job whether it was new, and the rows
/// upserted.
async fn write_group(
    c: &mut Client,
    group: &[Job],
) -> Result<(Vec<bool>, usize), tokio_postgres::Error> {
    // The first job of each id speaks for it; later copies are duplicates.
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut ids: Vec<&str> = Vec::new();
    let mut recs: Vec<i32> = Vec::new();
    let mut mets: Vec<i32> = Vec::new();
    for (i, j) in group.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(v) = first.entry(&j.id) {
            v.insert(i);
            ids.push(&j.id);
            recs.push(j.records);
            mets.push(j.metrics);
        }
    }
    let tx = c.transaction().await?;
    let inserted: HashSet<String> = tx
        .query(INSERT_BATCHES, &[&ids, &recs, &mets])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let news: Vec<bool> = group
        .iter()
        .enumerate()
        .map(|(i, j)| first.get(j.id.as_str()) == Some(&i) && inserted.contains(&j.id))
        .collect();
    let merged = Rollup::merge(
        group
            .iter()
            .zip(&news)
            .filter(|(_, n)| **n)
            .map(|(j, _)| &*j.rollup),
    );
    if !merged.usage.is_empty() {
        let u = &merged.usage;
        let minutes: Vec<i64> = u.iter().map(|(k, _)| k.minute).collect();
        let tenants: Vec<&str> = u.iter().map(|(k, _)| k.tenant.as_str()).collect();
        let routes: Vec<&str> = u.iter().map(|(k, _)| k.route.as_str()).collect();
        let methods: Vec<&str> = u.iter().map(|(k, _)| k.method.as_str()).collect();
        let classes: Vec<&str> = u.iter().map(|(k, _)| k.status_class).collect();
        let col = |f: fn(&super::rollup::UsageVal) -> u64| -> Vec<i64> {
            u.iter().map(|(_, v)| i64_of(f(v))).collect()
        };
        let (q, qb, rb, ds, dm) = (
            col(|v| v.requests),
            col(|v| v.request_bytes),
            col(|v| v.response_bytes),
            col(|v| v.duration_us_sum),
            col(|v| v.duration_us_max),
        );
        tx.execute(
            UPSERT_USAGE,
            &[
                &minutes, &tenants, &routes, &methods, &classes, &q, &qb, &rb, &ds, &dm,
            ],
        )
        .await?;
    }
    if !merged.app.is_empty() {
        let a = &merged.app;
        let minutes: Vec<i64> = a.iter().map(|(k, _)| k.minute).collect();
        let names: Vec<&str> = a.iter().map(|(k, _)| k.name.as_str()).collect();
        let labels: Vec<&str> = a.iter().map(|(k, _)| k.labels.as_str()).collect();
        let counts: Vec<i64> = a.iter().map(|(_, v)| i64_of(v.count)).collect();
        let sums: Vec<f64> = a.iter().map(|(_, v)| v.sum).collect();
        let mins: Vec<f64> = a.iter().map(|(_, v)| v.min).collect();
        let maxs: Vec<f64> = a.iter().map(|(_, v)| v.max).collect();
        tx.execute(
            UPSERT_APP,
            &[&minutes, &names, &labels, &counts, &sums, &mins, &maxs],
        )
        .await?;
    }
    tx.commit().await?;
    Ok((news, merged.rows()))
}
