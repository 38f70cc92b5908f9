//! Entitlement grants kept in PostgreSQL, the source of truth (issue 17):
//! the table `grants` (holder, resource, action), every change audited in
//! `grants_audit` (actor, operation, before, after, version) in the same
//! transaction, and one version counter (`grants_version`) that every
//! change bumps and announces with `NOTIFY grants_changed, '<schema>:<version>'`,
//! so replicas can reload. Writes are idempotent: putting a grant that is
//! there, or deleting one that is not, changes nothing and audits nothing.
//! Grants are validated ([`entitlements_core::grants::Grant::new`]) before
//! anything is written. Schema: `migrations/0002_grants.sql`, its own
//! migration track (`grants_schema_migrations`).

use crate::usage::pg::{apply_migrations, connect};
use entitlements_core::grants::{Grant, GrantSet, Holder};
use serde_json::{json, Value};
use tokio_postgres::Client;

const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0002_grants.sql"))];

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

fn holder_parts(h: &Holder) -> (&'static str, &str) {
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

impl GrantStore {
    /// Connects and applies the grants migrations.
    pub async fn connect(conninfo: &str) -> Result<GrantStore, String> {
        let mut client = connect(conninfo).await?;
        apply_migrations(&mut client, "grants", 254_000_002, MIGRATIONS).await?;
        Ok(GrantStore { client })
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
