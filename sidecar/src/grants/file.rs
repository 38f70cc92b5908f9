//! The grants file (`--grants-file`), the source when there is no
//! PostgreSQL: `{"grants": [{"tenant": "acme", "resource": "curves:CAISO",
//! "action": "read"}, {"subject": "u1", ...}]}`, every entry checked with
//! [`Grant::new`] (an error names the entry and the field).
//!
//! Read at start (an invalid file is a start error), then again on SIGHUP
//! and whenever its content changes (looked at every `--policy-poll`
//! seconds). A new content is diffed with the grants in force by holder;
//! if something changed it is put in force as the next version, and the
//! changed holders are logged. An invalid file later is refused, logged
//! and counted; the last good grants stay. The epoch is
//! `file-<16 random hex>`, new with each process; the version starts at 1.

use super::live::{Live, Reload};
use entitlements_core::grants::{Grant, GrantSet, Holder};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A fresh file epoch: `file-` and 16 random hex digits.
pub fn random_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys come from the OS's randomness.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("file-{:016x}", h.finish())
}

/// Reads a grants document; at most `max` grants. The error names the
/// entry and the field (`grants[2].action: …`).
pub fn parse(bytes: &[u8], max: usize) -> Result<GrantSet, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(top) = doc else {
        return Err("the document must be an object {\"grants\": [...]}".into());
    };
    if let Some(k) = top.keys().find(|k| *k != "grants") {
        return Err(format!("{k}: unknown field (only \"grants\")"));
    }
    let Some(Value::Array(entries)) = top.get("grants") else {
        return Err("grants: must be an array".into());
    };
    let mut set = GrantSet::new();
    for (i, e) in entries.iter().enumerate() {
        let at = |field: &str, why: &str| format!("grants[{i}].{field}: {why}");
        let Value::Object(o) = e else {
            return Err(format!("grants[{i}]: must be an object"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "tenant" | "subject" | "resource" | "action"))
        {
            return Err(at(k, "unknown field"));
        }
        let text = |field: &str| -> Result<Option<&str>, String> {
            match o.get(field) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(at(field, "must be a string")),
            }
        };
        let holder = match (text("tenant")?, text("subject")?) {
            (Some(t), None) => Holder::Tenant(t.to_string()),
            (None, Some(s)) => Holder::Subject(s.to_string()),
            _ => return Err(at("tenant", "exactly one of tenant and subject")),
        };
        let resource = text("resource")?.ok_or_else(|| at("resource", "missing"))?;
        let action = text("action")?.ok_or_else(|| at("action", "missing"))?;
        let g = Grant::new(holder, resource, action).map_err(|e| at(e.field, &e.reason))?;
        set.insert(&g);
        if set.len() > max {
            return Err(format!(
                "more than {max} grants (--grants-max), at grants[{i}]"
            ));
        }
    }
    Ok(set)
}

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The same bytes as last time.
    Unchanged,
    /// New content, the same grants: nothing to put in force.
    Same,
    /// This version is in force.
    Applied(u64),
    /// Refused (unreadable, invalid); the last good grants stay.
    Refused(String),
}

/// The grants file and what was last seen in it.
pub struct FileGrants {
    path: PathBuf,
    seen: Option<Vec<u8>>,
}

impl FileGrants {
    /// Reads the file and puts its grants in force as version 1 of a new
    /// epoch; an error names what is wrong (the caller names the file).
    pub fn start(path: &Path, live: &Live) -> Result<FileGrants, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let set = parse(&bytes, live.config().max)?;
        let n = set.len();
        live.install(&random_epoch(), 1, set, Vec::new(), 1)
            .map_err(|e| e.to_string())?;
        live.source_ok();
        live.metrics.reload(Reload::Ok);
        tracing::info!("grants {}: version 1, {n} grants", path.display());
        Ok(FileGrants {
            path: path.to_path_buf(),
            seen: Some(bytes),
        })
    }

    /// Reads the file again and puts a changed content in force.
    pub fn check(&mut self, live: &Live) -> Outcome {
        let name = self.path.display().to_string();
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                // Missing for a moment while being replaced, perhaps:
                // counted and logged once per state.
                let why = format!("file {name}: {e}");
                if self.seen.as_deref() != Some(&[]) {
                    self.seen = Some(Vec::new());
                    live.metrics.reload(Reload::Failed);
                }
                live.source_failed(&why, true);
                return Outcome::Refused(why);
            }
        };
        if self.seen.as_deref() == Some(&bytes[..]) {
            return Outcome::Unchanged;
        }
        let refuse = |why: String| {
            live.metrics.reload(Reload::Invalid);
            live.source_failed(&why, false);
            Outcome::Refused(why)
        };
        let set = match parse(&bytes, live.config().max) {
            Ok(s) => s,
            Err(e) => {
                self.seen = Some(bytes);
                return refuse(format!("file {name}: refused ({e})"));
            }
        };
        self.seen = Some(bytes);
        let changes = live.diff(&set);
        if changes.is_empty() {
            live.source_ok();
            live.metrics.reload(Reload::Ok);
            return Outcome::Same;
        }
        let version = live.snapshot().version + 1;
        let holders: Vec<String> = changes.iter().map(|(h, _)| shown(h)).collect();
        let log = changes.iter().map(|(h, _)| (version, h.clone())).collect();
        match live.apply(version, changes, log) {
            Ok(()) => {
                live.source_ok();
                live.metrics.reload(Reload::Ok);
                tracing::info!(
                    "grants {name}: version {version}, {} grants; changed: {}",
                    set.len(),
                    holders.join(", ")
                );
                Outcome::Applied(version)
            }
            Err(e) => refuse(format!("file {name}: refused ({e})")),
        }
    }
}

/// A holder as the log shows it.
pub fn shown(h: &Holder) -> String {
    match h {
        Holder::Tenant(t) => format!("tenant {t:?}"),
        Holder::Subject(s) => format!("subject {s:?}"),
    }
}

/// Watches the file until `shutdown`: on SIGHUP and every `poll` (zero:
/// only on SIGHUP).
pub async fn watch(
    mut source: FileGrants,
    live: Arc<Live>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    crate::reload::on_hup_or_every("grants", poll, shutdown, || {
        source.check(&live);
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_entry_and_the_field() {
        let e = |doc: &str| parse(doc.as_bytes(), 10).unwrap_err();
        assert_eq!(
            e(
                r#"{"grants": [{"tenant": "a", "resource": "r", "action": "read"},
                            {"tenant": "a", "resource": "r", "action": "Read"}]}"#
            ),
            "grants[1].action: \"Read\" is not a lower-case word or `*`"
        );
        assert!(e(r#"{"grants": [{"resource": "r", "action": "read"}]}"#)
            .starts_with("grants[0].tenant: exactly one"));
        assert!(e(r#"{"grants": [{"tenant": "a", "resource": "r"}]}"#)
            .starts_with("grants[0].action: missing"));
        assert!(
            e(r#"{"grants": [{"tenant": "a", "resource": 1, "action": "read"}]}"#)
                .starts_with("grants[0].resource: must be a string")
        );
        assert!(e(r#"{"grants": [], "x": 1}"#).starts_with("x: unknown field"));
        assert!(
            e(r#"{"grants": [{"tenant": "a", "resource": "r", "action": "read", "y": 1}]}"#)
                .starts_with("grants[0].y: unknown field")
        );
        assert!(e("[").starts_with("not JSON"));
        let many = format!(
            "{{\"grants\": [{}]}}",
            (0..11)
                .map(|i| format!(
                    "{{\"subject\": \"s{i}\", \"resource\": \"r\", \"action\": \"read\"}}"
                ))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(e(&many).contains("--grants-max"));
        let ok = parse(
            br#"{"grants": [{"subject": "u1", "resource": "instruments:*", "action": "*"}]}"#,
            10,
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert!(random_epoch().starts_with("file-") && random_epoch().len() == 21);
    }
}
