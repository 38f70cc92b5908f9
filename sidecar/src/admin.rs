//! The admin API for grants (issue 17), under `/admin/v1/`, reached through
//! the gateway (the policy admits only callers with the role
//! `access-admin`). The sidecar checks again: a caller needs the identity
//! headers of the gateway's auth filter with that role — proven by the
//! token they came from, which the gateway forwards on `/admin/`
//! (`--identity-proof`, `crate::proof`) — or the admin secret
//! (`--admin-secret`, header `x-admin-secret`).
//!
//! - `PUT /admin/v1/grants` `{"tenant"|"subject": …, "resource": …,
//!   "action": …}`: idempotent, 200 `{"grant": …, "changed": bool,
//!   "version": n|null, "in_force": bool}`. A change is answered once
//!   this replica's grants in force (and so its feed) hold it, or after
//!   [`IN_FORCE_WAIT`] with `"in_force": false`; other replicas follow
//!   through the same NOTIFY.
//! - `DELETE /admin/v1/grants` with the same body: idempotent, likewise.
//! - `GET /admin/v1/grants?tenant=acme` (or `subject=`): `{"grants": […]}`.
//! - `GET /admin/v1/audit?since=<epoch s>&after=<id>&limit=<n ≤ 1000>`:
//!   `{"audit": […], "next": <last id>}`.
//!
//! Bad input is 400 naming the field; nothing is written unless all of it
//! is valid. With PostgreSQL away every call is 503 (`Retry-After: 1`) and
//! nothing is lost: a write either committed (and was audited) or did not
//! happen; the connection is made again on the next call.

use crate::grants::{grant_json, GrantStore};
use crate::server::{error, json, read_body, App, Body};
use entitlements_core::grants::{Grant, Holder};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

/// The role that may use the admin API.
pub const ADMIN_ROLE: &str = "access-admin";
/// The header carrying the admin secret.
pub const SECRET_HEADER: &str = "x-admin-secret";
/// Largest request body.
const MAX_BODY: usize = 4096;
/// Longest a write waits for this replica's grants in force to hold it.
pub const IN_FORCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this replica's grants in force reach `version` within
/// [`IN_FORCE_WAIT`] (read-your-writes for a caller that asks the feed or
/// opens a stream right after the admin call).
async fn in_force(live: &crate::grants::Live, version: i64) -> bool {
    let want = u64::try_from(version).unwrap_or(u64::MAX);
    let mut rx = live.watch();
    let reached = matches!(
        tokio::time::timeout(IN_FORCE_WAIT, rx.wait_for(|s| s.version >= want)).await,
        Ok(Ok(_))
    );
    reached
}

/// The admin API's state: where the grants are, and the secret.
pub struct Admin {
    conninfo: String,
    secret: Option<String>,
    store: Mutex<Option<GrantStore>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    tenant: Option<String>,
    subject: Option<String>,
    resource: String,
    action: String,
}

fn unavailable(why: &str) -> Response<Body> {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "grants_unavailable", why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

fn bad(field: &str, why: impl std::fmt::Display) -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "field": field, "message": format!("{field}: {why}")}),
    )
}

/// Compares in time independent of where the first difference is.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The grant of a body, or the field and what is wrong with it.
fn parse_grant(body: &[u8]) -> Result<Grant, (&'static str, String)> {
    let b: GrantBody = serde_json::from_slice(body).map_err(|e| ("body", e.to_string()))?;
    let holder = match (b.tenant, b.subject) {
        (Some(t), None) => Holder::Tenant(t),
        (None, Some(s)) => Holder::Subject(s),
        _ => return Err(("tenant", "exactly one of tenant and subject".into())),
    };
    Grant::new(holder, &b.resource, &b.action).map_err(|e| (e.field, e.reason))
}

fn query_value(req: &Request<Incoming>, name: &str) -> Option<String> {
    filter_common::form::query_value(req.uri().query()?, name)
}

impl Admin {
    pub fn new(conninfo: String, secret: Option<String>) -> Admin {
        Admin {
            conninfo,
            secret: secret.filter(|s| !s.is_empty()),
            store: Mutex::new(None),
        }
    }

    /// Whether the call carries the admin secret.
    fn has_secret(&self, req: &Request<Incoming>) -> bool {
        matches!((&self.secret, req.headers().get(SECRET_HEADER)),
            (Some(want), Some(got)) if same(want.as_bytes(), got.as_bytes()))
    }

    /// The actor of a call with these (proven) identity headers; `None`:
    /// refused.
    fn actor(h: &hyper::header::HeaderMap, app: &App) -> Option<String> {
        let names = &app.cfg.identity;
        let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let admin =
            text(&names.roles).is_some_and(|r| r.split(',').any(|x| x.trim() == ADMIN_ROLE));
        match (text(&names.subject), admin) {
            (Some(sub), true) if !sub.is_empty() => Some(sub.to_string()),
            _ => None,
        }
    }
}

/// Runs `f` on the store, connecting first if needed; a failure drops
/// the connection (the next call makes a new one) and answers 503.
async fn with_store<T>(
    admin: &Admin,
    f: impl AsyncFnOnce(&mut GrantStore) -> Result<T, String>,
) -> Result<T, Response<Body>> {
    let mut guard = admin.store.lock().await;
    if guard.is_none() {
        match GrantStore::connect(&admin.conninfo).await {
            Ok(s) => *guard = Some(s),
            Err(e) => {
                tracing::warn!("admin: {e}");
                return Err(unavailable("the grants store is unavailable"));
            }
        }
    }
    let Some(store) = guard.as_mut() else {
        return Err(unavailable("the grants store is unavailable"));
    };
    match f(store).await {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::warn!("admin: {e}");
            *guard = None;
            Err(unavailable("the grants store is unavailable"))
        }
    }
}

/// `/admin/…`.
pub async fn route(req: Request<Incoming>, app: &App) -> Response<Body> {
    let Some(admin) = app.admin.clone() else {
        return unavailable("no grants store is configured (--grants-postgres)");
    };
    let actor = if admin.has_secret(&req) {
        Some("admin-secret".to_string())
    } else {
        // The identity headers only with their token (`--identity-proof`).
        match crate::proof::check(app, "admin", req.headers(), req.uri().query()).await {
            Ok(proven) => Admin::actor(proven.as_ref().unwrap_or(req.headers()), app),
            Err(r) => {
                return error(StatusCode::UNAUTHORIZED, r.error, r.message);
            }
        }
    };
    let Some(actor) = actor else {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the admin API needs the role {ADMIN_ROLE} or the admin secret"),
        );
    };
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (m @ (Method::PUT | Method::DELETE), "/admin/v1/grants") => {
            let body = match read_body(req, MAX_BODY, "a grant").await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let g = match parse_grant(&body) {
                Ok(g) => g,
                Err((field, why)) => return bad(field, why),
            };
            let put = m == Method::PUT;
            let done = with_store(&admin, async |s: &mut GrantStore| {
                if put {
                    s.put(&actor, &g).await
                } else {
                    s.delete(&actor, &g).await
                }
            })
            .await;
            match done {
                Ok(v) => {
                    let applied = match v {
                        Some(v) => in_force(&app.grants, v).await,
                        None => true,
                    };
                    json(
                        StatusCode::OK,
                        json!({"grant": grant_json(&g), "changed": v.is_some(), "version": v,
                               "in_force": applied}),
                    )
                }
                Err(r) => r,
            }
        }
        (Method::GET, "/admin/v1/grants") => {
            let holder = match (query_value(&req, "tenant"), query_value(&req, "subject")) {
                (Some(t), None) => Holder::Tenant(t),
                (None, Some(s)) => Holder::Subject(s),
                _ => return bad("tenant", "exactly one of tenant and subject"),
            };
            match with_store(&admin, async |s: &mut GrantStore| s.list(&holder).await).await {
                Ok(gs) => json(
                    StatusCode::OK,
                    json!({"grants": gs.iter().map(grant_json).collect::<Vec<_>>()}),
                ),
                Err(r) => r,
            }
        }
        (Method::GET, "/admin/v1/audit") => {
            let num = |name: &str, default: f64| match query_value(&req, name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or(()),
            };
            let (Ok(since), Ok(after), Ok(limit)) =
                (num("since", 0.0), num("after", 0.0), num("limit", 100.0))
            else {
                return bad("since", "since, after and limit are non-negative numbers");
            };
            let limit = (limit as i64).clamp(1, 1000);
            let rows = with_store(&admin, async |s: &mut GrantStore| {
                s.audit(after as i64, since, limit).await
            })
            .await;
            match rows {
                Ok(rows) => {
                    let next = rows.last().map_or(after as i64, |r| r.id);
                    let audit: Vec<_> = rows
                        .iter()
                        .map(|r| {
                            json!({"id": r.id, "at": r.at, "actor": r.actor, "op": r.op,
                                   "grant": grant_json(&r.grant), "before": r.before,
                                   "after": r.after, "version": r.version})
                        })
                        .collect();
                    json(StatusCode::OK, json!({"audit": audit, "next": next}))
                }
                Err(r) => r,
            }
        }
        (_, "/admin/v1/grants" | "/admin/v1/audit") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}
