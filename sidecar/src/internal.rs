//! The internal endpoints the entitlements filters read through
//! `proxy_http_call` to the sidecar's cluster (the gateway never routes
//! `/internal/`), behind the optional bearer token `--grants-feed-token`:
//!
//! - `GET /internal/v1/grants`: the grants feed (the README's "Grants
//!   feed"; answers cut by [`crate::grants::feed`]).
//! - `GET /internal/v1/policy`: the policy document in force as it was
//!   loaded, with a strong `ETag` (`If-None-Match` → 304).

use crate::grants::feed::{self, Answer, FeedRequest};
use crate::grants::live::FeedAnswer;
use crate::server::{error, json, App, Body};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};

fn no_store(r: &mut Response<Body>) {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

/// Whether the caller shows the token (always, without one).
fn authorized(req: &Request<Incoming>, app: &App) -> bool {
    let Some(want) = &app.feed_token else {
        return true;
    };
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    got.is_some_and(|t| crate::admin::same(t.as_bytes(), want.as_bytes()))
}

fn unauthorized() -> Response<Body> {
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "unauthorized"}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// `/internal/…`.
pub fn route(req: Request<Incoming>, app: &App) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/internal/v1/grants") => grants(&req, app),
        (&Method::GET, "/internal/v1/policy") => policy(&req, app),
        (_, "/internal/v1/grants" | "/internal/v1/policy") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

fn grants(req: &Request<Incoming>, app: &App) -> Response<Body> {
    let live = &app.grants;
    let m = &live.metrics;
    if !authorized(req, app) {
        m.feed(FeedAnswer::Invalid);
        return unauthorized();
    }
    let parsed = match FeedRequest::parse(req.uri().query()) {
        Ok(r) => r,
        Err(e) => {
            m.feed(FeedAnswer::Invalid);
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_request", "field": e.field,
                                   "message": e.to_string()}),
            );
        }
    };
    let mut r = match feed::answer(live, &parsed) {
        Answer::NotModified => {
            m.feed(FeedAnswer::NotModified);
            empty(StatusCode::NOT_MODIFIED)
        }
        Answer::Unavailable => {
            m.feed(FeedAnswer::Unavailable);
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "grants_unavailable",
                "no grants loaded yet",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Answer::Page(p) => {
            m.feed(if p.snapshot {
                FeedAnswer::Snapshot
            } else {
                FeedAnswer::Delta
            });
            let mut r = Response::new(Full::new(Bytes::from(p.to_json())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
    };
    no_store(&mut r);
    r
}

/// Whether `If-None-Match` names `etag` (weak comparison, RFC 9110
/// §13.1.2; `*` matches any).
fn none_match(req: &Request<Incoming>, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || bare(t) == etag)
}

fn policy(req: &Request<Incoming>, app: &App) -> Response<Body> {
    if !authorized(req, app) {
        return unauthorized();
    }
    let Some(doc) = app.ctx.policy_document() else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "policy_unavailable",
            "the policy in force was not loaded from a document",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    let mut r = if none_match(req, &doc.etag) {
        empty(StatusCode::NOT_MODIFIED)
    } else {
        let mut r = Response::new(Full::new(doc.bytes.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    };
    if let Ok(v) = header::HeaderValue::from_str(&doc.etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    no_store(&mut r);
    r
}
