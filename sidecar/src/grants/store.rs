//! The grants store: entitlement grants kept in PostgreSQL, the source of
//! truth (issue 17):
//! the table `grants` (holder, resource, action), every change audited in
//! `grants_audit` (actor, operation, before, after, version) in the same
//! transaction, and one version counter (`grants_version`) that every
//! change bumps and announces with `NOTIFY grants_changed, '<schema>:<version>'`,
//! so replicas can reload. Writes are idempotent: putting a grant that is
//! there, or deleting one that is not, changes nothing and audits nothing.
//! Grants are validated ([`entitlements_core::grants::Grant::new`]) before
//! anything is written. Schema: `migrations/0002_grants.sql`, its own
//! migration track (`grants_schema_migrations`); `0003_grants_epoch.sql`
//! adds the epoch (random text, set once) the feed names the versions by.
//! The reads the live state is kept from ([`GrantStore::load_full`],
//! [`GrantStore::catch_up`]) each run in one repeatable-read snapshot.

use crate::usage::pg::{apply_migrations, connect};
use entitlements_core::grants::{Grant, GrantSet, Holder, HolderGrants};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use tokio_postgres::{Client, IsolationLevel, Transaction};

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0002_grants.sql")),
    (2, include_str!("../../migrations/0003_grants_epoch.sql")),
];

/// The channel changes are announced on. Channels are per database, so
/// the payload names the schema too: `<schema>:<version>`
/// ([`notice_version`] reads it).
pub const CHANNEL: &str = "grants_changed";

/// The version a `grants_changed` payload announces for `schema`; `None`
/// for another schema's or a malformed one.
pub fn notice_version(payload: &str, schema: &str) -> Option<i64> {
    let (s, v) = payload.rsplit_once(':')?;
    (s == schema).then(|| v.parse().ok()).flatten()
}

/// One row of the audit.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub id: i64,
    /// Seconds since the epoch.
    pub at: f64,
    pub actor: String,
    pub op: String,
    pub grant: Grant,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub version: i64,
}

pub(crate) fn holder_parts(h: &Holder) -> (&'static str, &str) {
    match h {
        Holder::Tenant(t) => ("tenant", t),
        Holder::Subject(s) => ("subject", s),
    }
}

fn holder_of(kind: &str, name: String) -> Holder {
    if kind == "tenant" {
        Holder::Tenant(name)
    } else {
        Holder::Subject(name)
    }
}

/// A grant as the API and the audit show it.
pub fn grant_json(g: &Grant) -> Value {
    let (kind, name) = holder_parts(&g.holder);
    json!({kind: name, "resource": g.resource, "action": g.action})
}

/// The store: one connection, migrated.
pub struct GrantStore {
    client: Client,
}

fn pg(e: tokio_postgres::Error) -> String {
    format!("grants: postgres: {e}")
}

/// Why a read for the live state gave nothing to put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// PostgreSQL is away or failed: try again later.
    #[error("postgres: {0}")]
    Unavailable(String),
    /// What was read must not be put in force (a row that is not a valid
    /// grant, more grants than the bound).
    #[error("{0}")]
    Invalid(String),
}

fn unavailable(e: tokio_postgres::Error) -> ReadError {
    // The source's own message, without tokio-postgres' "db error: " noise.
    ReadError::Unavailable(match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    })
}

/// Every grant, as [`GrantStore::load_full`] read it.
#[derive(Debug)]
pub struct Full {
    pub epoch: String,
    pub version: i64,
    pub set: GrantSet,
    /// The last changes (version, holder) from `grants_audit`, oldest
    /// first: the change log's seed.
    pub log: Vec<(i64, Holder)>,
}

/// What [`GrantStore::catch_up`] found.
#[derive(Debug)]
pub enum Caught {
    /// Nothing after the caller's version.
    Current { epoch: String, version: i64 },
    /// The changes after the caller's version: each changed holder's
    /// grants now, and the (version, holder) of every change, oldest first.
    Changes {
        epoch: String,
        version: i64,
        log: Vec<(i64, Holder)>,
        holders: Vec<(Holder, HolderGrants)>,
    },
    /// Too many changes, or an audit that does not account for every
    /// version since (pruned, restored): the caller loads everything.
    Gap { epoch: String, version: i64 },
}

/// A row read back as a grant, checked again (a row written around the
/// store is not put in force unchecked).
fn checked(kind: &str, name: String, resource: &str, action: &str) -> Result<Grant, ReadError> {
    let shown = format!("{kind} {name:?}, resource {resource:?}, action {action:?}");
    Grant::new(holder_of(kind, name), resource, action)
        .map_err(|e| ReadError::Invalid(format!("grants row ({shown}): {e}")))
}

/// Opens a repeatable-read, read-only transaction: one snapshot.
async fn snapshot(client: &mut Client) -> Result<Transaction<'_>, ReadError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(unavailable)
}

async fn version_and_epoch(tx: &Transaction<'_>) -> Result<(i64, String), ReadError> {
    let r = tx
        .query_one("SELECT version, epoch FROM grants_version", &[])
        .await
        .map_err(unavailable)?;
    Ok((r.get(0), r.get(1)))
}

impl GrantStore {
    /// Connects and applies the grants migrations.
    pub async fn connect(conninfo: &str) -> Result<GrantStore, String> {
        let mut client = connect(conninfo).await?;
        apply_migrations(&mut client, "grants", 254_000_002, MIGRATIONS).await?;
        Ok(GrantStore { client })
    }

    /// Connects, applies the migrations and listens on [`CHANNEL`]: the
    /// receiver gets the version of every notice for this connection's
    /// schema (`current_schema()`), and closes when the connection ends.
    pub async fn connect_listening(
        conninfo: &str,
    ) -> Result<(GrantStore, tokio::sync::mpsc::UnboundedReceiver<i64>), ReadError> {
        let target = crate::pg::Target::parse(conninfo).map_err(ReadError::Invalid)?;
        let (client, mut conn) = target.connect().await.map_err(ReadError::Unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let schema = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let seen = schema.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let v = seen.get().and_then(|s| notice_version(n.payload(), s));
                        if let Some(v) = v {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(
                            error = %crate::pg::error_chain(&e),
                            "grants: the postgres listening connection failed"
                        );
                        return;
                    }
                }
            }
        });
        let mut client = client;
        apply_migrations(&mut client, "grants", 254_000_002, MIGRATIONS)
            .await
            .map_err(ReadError::Unavailable)?;
        let name: String = client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        let _ = schema.set(name);
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(unavailable)?;
        Ok((GrantStore { client }, rx))
    }

    /// Every grant (refused beyond `max`), its version and epoch, and the
    /// last `log` changes of the audit, in one snapshot.
    pub async fn load_full(&mut self, log: usize, max: usize) -> Result<Full, ReadError> {
        let tx = snapshot(&mut self.client).await?;
        let (version, epoch) = version_and_epoch(&tx).await?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM grants", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        if usize::try_from(count).unwrap_or(usize::MAX) > max {
            return Err(ReadError::Invalid(format!(
                "{count} grants exceed --grants-max ({max})"
            )));
        }
        let rows = tx
            .query_raw(
                "SELECT holder_kind, holder, resource, action FROM grants",
                std::iter::empty::<&str>(),
            )
            .await
            .map_err(unavailable)?;
        futures_util::pin_mut!(rows);
        let mut set = GrantSet::new();
        while let Some(r) = rows.next().await {
            let r = r.map_err(unavailable)?;
            set.insert(&checked(r.get(0), r.get(1), r.get(2), r.get(3))?);
        }
        let n = i64::try_from(log).unwrap_or(i64::MAX);
        let mut changes: Vec<(i64, Holder)> = tx
            .query(
                "SELECT version, holder_kind, holder FROM grants_audit \
                 ORDER BY version DESC, id DESC LIMIT $1",
                &[&n],
            )
            .await
            .map_err(unavailable)?
            .iter()
            .map(|r| (r.get(0), holder_of(r.get(1), r.get(2))))
            .collect();
        changes.reverse();
        tx.commit().await.map_err(unavailable)?;
        Ok(Full {
            epoch,
            version,
            set,
            log: changes,
        })
    }

    /// The changes after version `mine`, in one snapshot: the holders the
    /// audit names with a version in (`mine`, current] and their grants
    /// now; [`Caught::Gap`] beyond `most` changes.
    pub async fn catch_up(&mut self, mine: i64, most: usize) -> Result<Caught, ReadError> {
        let tx = snapshot(&mut self.client).await?;
        let (version, epoch) = version_and_epoch(&tx).await?;
        if version == mine {
            tx.commit().await.map_err(unavailable)?;
            return Ok(Caught::Current { epoch, version });
        }
        if version < mine {
            return Ok(Caught::Gap { epoch, version });
        }
        let limit = i64::try_from(most).unwrap_or(i64::MAX - 1) + 1;
        let log: Vec<(i64, Holder)> = tx
            .query(
                "SELECT version, holder_kind, holder FROM grants_audit \
                 WHERE version > $1 AND version <= $2 ORDER BY version, id LIMIT $3",
                &[&mine, &version, &limit],
            )
            .await
            .map_err(unavailable)?
            .iter()
            .map(|r| (r.get(0), holder_of(r.get(1), r.get(2))))
            .collect();
        let mut versions: Vec<i64> = log.iter().map(|(v, _)| *v).collect();
        versions.dedup();
        let complete = i64::try_from(versions.len()).ok() == Some(version - mine);
        if log.len() > most || !complete {
            return Ok(Caught::Gap { epoch, version });
        }
        let mut grants: HashMap<Holder, HolderGrants> = HashMap::new();
        for (_, h) in &log {
            grants.entry(h.clone()).or_default();
        }
        let (kinds, names): (Vec<&str>, Vec<&str>) = grants.keys().map(holder_parts).unzip();
        let rows = tx
            .query(
                "SELECT g.holder_kind, g.holder, g.resource, g.action FROM grants g \
                 JOIN unnest($1::text[], $2::text[]) AS h(kind, name) \
                 ON g.holder_kind = h.kind AND g.holder = h.name",
                &[&kinds, &names],
            )
            .await
            .map_err(unavailable)?;
        for r in &rows {
            let g = checked(r.get(0), r.get(1), r.get(2), r.get(3))?;
            grants
                .entry(g.holder.clone())
                .or_default()
                .insert(&g.resource, &g.action);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Caught::Changes {
            epoch,
            version,
            log,
            holders: grants.into_iter().collect(),
        })
    }

    /// Adds a grant. `Ok(Some(version))` if it is new (audited, announced),
    /// `Ok(None)` if it was there.
    pub async fn put(&mut self, actor: &str, g: &Grant) -> Result<Option<i64>, String> {
        let (kind, holder) = holder_parts(&g.holder);
        let tx = self.client.transaction().await.map_err(pg)?;
        let added = tx
            .query_opt(
                "INSERT INTO grants (holder_kind, holder, resource, action, created_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                &[&kind, &holder, &g.resource, &g.action, &actor],
            )
            .await
            .map_err(pg)?
            .is_some();
        if !added {
            return Ok(None);
        }
        let v = Self::changed(&tx, actor, "put", g, None, Some(grant_json(g))).await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(v))
    }

    /// Removes a grant. `Ok(Some(version))` if it was there (audited,
    /// announced), `Ok(None)` if not.
    pub async fn delete(&mut self, actor: &str, g: &Grant) -> Result<Option<i64>, String> {
        let (kind, holder) = holder_parts(&g.holder);
        let tx = self.client.transaction().await.map_err(pg)?;
        let removed = tx
            .query_opt(
                "DELETE FROM grants WHERE holder_kind = $1 AND holder = $2 AND resource = $3 \
                 AND action = $4 RETURNING 1",
                &[&kind, &holder, &g.resource, &g.action],
            )
            .await
            .map_err(pg)?
            .is_some();
        if !removed {
            return Ok(None);
        }
        let v = Self::changed(&tx, actor, "delete", g, Some(grant_json(g)), None).await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(v))
    }

    /// Bumps the version, writes the audit row and queues the NOTIFY (sent
    /// at commit, so a listener never hears of a change it cannot read).
    async fn changed(
        tx: &tokio_postgres::Transaction<'_>,
        actor: &str,
        op: &str,
        g: &Grant,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<i64, String> {
        let (kind, holder) = holder_parts(&g.holder);
        let v: i64 = tx
            .query_one(
                "UPDATE grants_version SET version = version + 1 RETURNING version",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        tx.execute(
            "INSERT INTO grants_audit (actor, op, holder_kind, holder, resource, action, \
             before, after, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &actor,
                &op,
                &kind,
                &holder,
                &g.resource,
                &g.action,
                &before,
                &after,
                &v,
            ],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "SELECT pg_notify($1, current_schema() || ':' || $2)",
            &[&CHANNEL, &v.to_string()],
        )
        .await
        .map_err(pg)?;
        Ok(v)
    }

    /// One holder's grants, sorted.
    pub async fn list(&self, holder: &Holder) -> Result<Vec<Grant>, String> {
        let (kind, name) = holder_parts(holder);
        let rows = self
            .client
            .query(
                "SELECT resource, action FROM grants WHERE holder_kind = $1 AND holder = $2 \
                 ORDER BY resource, action",
                &[&kind, &name],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| Grant {
                holder: holder.clone(),
                resource: r.get(0),
                action: r.get(1),
            })
            .collect())
    }

    /// The audit rows after `after_id` and at or after `since` (seconds
    /// since the epoch), oldest first, at most `limit`.
    pub async fn audit(
        &self,
        after_id: i64,
        since: f64,
        limit: i64,
    ) -> Result<Vec<AuditRow>, String> {
        let rows = self
            .client
            .query(
                "SELECT id, extract(epoch FROM at)::float8, actor, op, holder_kind, holder, \
                 resource, action, before, after, version FROM grants_audit WHERE id > $1 \
                 AND at >= to_timestamp($2) ORDER BY id LIMIT $3",
                &[&after_id, &since, &limit],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                at: r.get(1),
                actor: r.get(2),
                op: r.get(3),
                grant: Grant {
                    holder: holder_of(r.get(4), r.get(5)),
                    resource: r.get(6),
                    action: r.get(7),
                },
                before: r.get(8),
                after: r.get(9),
                version: r.get(10),
            })
            .collect())
    }

    /// Every grant and the version they are, read in one snapshot.
    pub async fn load(&mut self) -> Result<(i64, GrantSet), String> {
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let v: i64 = tx
            .query_one("SELECT version FROM grants_version", &[])
            .await
            .map_err(pg)?
            .get(0);
        let rows = tx
            .query(
                "SELECT holder_kind, holder, resource, action FROM grants",
                &[],
            )
            .await
            .map_err(pg)?;
        let set = rows
            .iter()
            .map(|r| Grant {
                holder: holder_of(r.get(0), r.get(1)),
                resource: r.get(2),
                action: r.get(3),
            })
            .collect();
        tx.commit().await.map_err(pg)?;
        Ok((v, set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_is_read_for_its_schema_only() {
        assert_eq!(notice_version("public:7", "public"), Some(7));
        assert_eq!(notice_version("a:b:7", "a:b"), Some(7));
        assert_eq!(notice_version("other:7", "public"), None);
        assert_eq!(notice_version("public:x", "public"), None);
        assert_eq!(notice_version("7", "public"), None);
    }
}
