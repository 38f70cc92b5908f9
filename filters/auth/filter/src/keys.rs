//! Providers' key sets: inline ones are ready at configure time; remote
//! ones (a JWKS URL, or OIDC discovery naming one) are fetched by one
//! worker at a time and shared with every worker through shared data.
//!
//! Shared data, per provider (`<base>` = `254carbon.auth.jwks|<issuer>`):
//! `<base>` holds the last good JWKS (`u64` fetch time in ns, then the
//! document); `<base>.next` the lease (`u64` time of the next fetch, `u32`
//! failures in a row); `<base>.uri` the `jwks_uri` discovery found
//! (authority, newline, path). A worker whose tick finds the fetch due
//! moves `next` forward with a CAS and fetches; the others see the CAS fail.
//! After a success the next fetch is due after `refresh_interval_s` (or at
//! 90 % of the response's `Cache-Control: max-age`, if sooner); after
//! a failure after `retry_initial_ms`, doubling per failure up to the
//! refresh period. A token naming an unknown `kid` makes the fetch due at
//! once, at most once per `unknown_kid_refetch_s`.

use crate::State;
use auth_core::config::{discovered_jwks_uri, KeySource, Remote};
use auth_core::jwk::JwkSet;
use filter_common::refresh::max_age;
use filter_shell as host;
use proxy_wasm::types::LogLevel;
use std::rc::Rc;

/// One provider's keys on this worker.
#[derive(Default)]
pub struct ProviderKeys {
    pub set: Option<Rc<JwkSet>>,
    /// CAS of the shared JWKS this worker last parsed.
    seen_cas: Option<u32>,
    /// Fetch time (ns) of the set in force.
    fetched_at: u64,
    /// This worker's fetch in flight: token, and whether it is the discovery document.
    pending: Option<(u32, bool)>,
    /// When this worker last asked for a refetch because of an unknown kid (ns).
    kid_refetch_at: u64,
}

const NS: u64 = 1_000_000_000;

fn base(issuer: &str) -> String {
    format!("254carbon.auth.jwks|{issuer}")
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn now_ns() -> u64 {
    u64::try_from(host::now().as_nanos()).unwrap_or(u64::MAX)
}

/// Keys of inline providers, ready before the first request.
pub fn init(s: &mut State) {
    s.keys = s
        .settings
        .providers
        .iter()
        .map(|p| ProviderKeys {
            set: match &p.keys {
                KeySource::Inline(set) => Some(Rc::new(set.clone())),
                KeySource::Remote(_) => None,
            },
            ..ProviderKeys::default()
        })
        .collect();
}

/// Whether any provider fetches its keys.
pub fn any_remote(s: &State) -> bool {
    s.settings
        .providers
        .iter()
        .any(|p| matches!(p.keys, KeySource::Remote(_)))
}

fn remote(s: &State, p: usize) -> Option<(&Remote, &str)> {
    let prov = s.settings.providers.get(p)?;
    match &prov.keys {
        KeySource::Remote(r) => Some((r, prov.rules.issuer.as_str())),
        KeySource::Inline(_) => None,
    }
}

/// Looks at shared data and starts fetches that are due. Returns the
/// providers whose keys changed on this worker.
pub fn on_tick(s: &mut State) -> Vec<usize> {
    let mut changed = Vec::new();
    for p in 0..s.keys.len() {
        if sync(s, p) {
            changed.push(p);
        }
        maybe_fetch(s, p);
    }
    changed
}

/// Parses the shared JWKS of provider `p` if it changed; true if installed.
fn sync(s: &mut State, p: usize) -> bool {
    let Some((_, issuer)) = remote(s, p) else {
        return false;
    };
    let (value, cas) = host::shared_get(&base(issuer));
    let (Some(value), Some(cas)) = (value, cas) else {
        return false;
    };
    let Some(k) = s.keys.get_mut(p) else {
        return false;
    };
    if k.seen_cas == Some(cas) {
        return false;
    }
    k.seen_cas = Some(cas);
    let fetched_at = u64_at(&value, 0).unwrap_or(0);
    match JwkSet::parse(value.get(8..).unwrap_or(&[]), false) {
        Ok(set) if !set.keys.is_empty() => {
            k.set = Some(Rc::new(set));
            k.fetched_at = fetched_at;
            true
        }
        _ => false,
    }
}

fn lease_key(issuer: &str) -> String {
    format!("{}.next", base(issuer))
}

fn set_lease(issuer: &str, next_at: u64, failures: u32, cas: Option<u32>) -> bool {
    let mut v = next_at.to_le_bytes().to_vec();
    v.extend_from_slice(&failures.to_le_bytes());
    host::shared_set(&lease_key(issuer), &v, cas)
}

/// Starts a fetch of provider `p`'s keys if one is due and no other
/// worker has taken it.
fn maybe_fetch(s: &mut State, p: usize) {
    let Some((r, issuer)) = remote(s, p) else {
        return;
    };
    if s.keys.get(p).is_none_or(|k| k.pending.is_some()) {
        return;
    }
    let key = lease_key(issuer);
    let (mut value, mut cas) = host::shared_get(&key);
    if value.is_none() {
        // An absent key accepts any CAS: create it, then race on a real one.
        set_lease(issuer, 0, 0, None);
        (value, cas) = host::shared_get(&key);
    }
    let v = value.unwrap_or_default();
    let next_at = u64_at(&v, 0).unwrap_or(0);
    let failures = v
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes);
    let now = now_ns();
    if now < next_at || cas.is_none() {
        return;
    }
    // Hold the lease for the fetch's duration (and a second), so a worker
    // that dies mid-fetch does not block the others for long.
    let hold = now + r.timeout_ms * 1_000_000 + NS;
    if !set_lease(issuer, hold, failures, cas) {
        return;
    }
    let r = r.clone();
    let issuer = issuer.to_string();
    let discovered = host::shared_get(&format!("{}.uri", base(&issuer)))
        .0
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once('\n')
                .map(|(a, p)| (a.to_string(), p.to_string()))
        });
    let (authority, path, is_discovery) = match (r.discovery, discovered) {
        (true, None) => (r.authority.clone(), r.path.clone(), true),
        (true, Some((a, path))) => (a, path, false),
        (false, _) => (r.authority.clone(), r.path.clone(), false),
    };
    dispatch(s, p, &r, &issuer, &authority, &path, is_discovery);
}

fn dispatch(
    s: &mut State,
    p: usize,
    r: &Remote,
    issuer: &str,
    authority: &str,
    path: &str,
    discovery: bool,
) {
    let headers = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", authority),
        ("accept", "application/json"),
    ];
    let timeout = std::time::Duration::from_millis(r.timeout_ms);
    match host::http_call(&r.cluster, headers, timeout) {
        Ok(token) => {
            if let Some(k) = s.keys.get_mut(p) {
                k.pending = Some((token, discovery));
            }
        }
        Err(e) => failed(
            s,
            p,
            issuer,
            r,
            &format!("cannot call cluster {:?}: {e:?}", r.cluster),
        ),
    }
}

fn failed(s: &State, p: usize, issuer: &str, r: &Remote, why: &str) {
    host::increment(s.metrics.jwks_fetch_failed, 1);
    let (v, _) = host::shared_get(&lease_key(issuer));
    let failures = v
        .as_deref()
        .and_then(|b| b.get(8..12))
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
        .saturating_add(1);
    let backoff_ms = r
        .retry_initial_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(30))
        .min(r.refresh_s.saturating_mul(1000));
    set_lease(issuer, now_ns() + backoff_ms * 1_000_000, failures, None);
    let name = s.settings.providers.get(p).map_or("?", |p| p.name.as_str());
    host::log(
        LogLevel::Warn,
        &format!("auth: keys of provider {name} not fetched ({why}); retry in {backoff_ms} ms"),
    );
}

/// The answer to one of this worker's fetches. Returns the provider whose
/// keys changed, if any.
pub fn on_response(s: &mut State, token: u32, body_size: usize) -> Option<usize> {
    let p = s
        .keys
        .iter()
        .position(|k| k.pending.is_some_and(|(t, _)| t == token))?;
    let discovery = s.keys.get_mut(p)?.pending.take().is_some_and(|(_, d)| d);
    let (r, issuer) = remote(s, p).map(|(r, i)| (r.clone(), i.to_string()))?;
    let status = host::call_response_header(":status").and_then(|v| v.parse::<u16>().ok());
    match status {
        Some(200) if body_size <= r.max_bytes => {}
        Some(200) => {
            failed(
                s,
                p,
                &issuer,
                &r,
                &format!(
                    "document is {body_size} bytes, more than max_bytes {}",
                    r.max_bytes
                ),
            );
            return None;
        }
        Some(code) => {
            failed(s, p, &issuer, &r, &format!("status {code}"));
            return None;
        }
        None => {
            failed(
                s,
                p,
                &issuer,
                &r,
                "no response (reset, timeout or connection failure)",
            );
            return None;
        }
    }
    let body = host::call_response_body(body_size);
    if discovery {
        let Some((authority, path)) = discovered_jwks_uri(&body) else {
            failed(
                s,
                p,
                &issuer,
                &r,
                "discovery document has no usable jwks_uri",
            );
            return None;
        };
        host::shared_set(
            &format!("{}.uri", base(&issuer)),
            format!("{authority}\n{path}").as_bytes(),
            None,
        );
        dispatch(s, p, &r, &issuer, &authority, &path, false);
        return None;
    }
    match JwkSet::parse(&body, false) {
        Ok(set) if !set.keys.is_empty() => {
            if !set.skipped.is_empty() {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "auth: keys skipped for {issuer}: {}",
                        set.skipped.join("; ")
                    ),
                );
            }
            let mut v = now_ns().to_le_bytes().to_vec();
            v.extend_from_slice(&body);
            host::shared_set(&base(&issuer), &v, None);
            // Refresh before the document expires: at 90 % of its max-age
            // when that is sooner than the configured interval.
            let refresh_ns = host::call_response_header("cache-control")
                .and_then(|cc| max_age(&cc))
                .map_or(r.refresh_s * NS, |age| {
                    (age.saturating_mul(NS) / 10 * 9).clamp(NS, r.refresh_s * NS)
                });
            set_lease(&issuer, now_ns() + refresh_ns, 0, None);
            host::increment(s.metrics.jwks_fetch_success, 1);
            sync(s, p).then_some(p)
        }
        Ok(set) => {
            failed(
                s,
                p,
                &issuer,
                &r,
                &format!("no usable key ({})", set.skipped.join("; ")),
            );
            None
        }
        Err(e) => {
            failed(s, p, &issuer, &r, &e);
            None
        }
    }
}

/// A token named a `kid` the set lacks: make a fetch due now, unless the
/// set in force is younger than `unknown_kid_refetch_s` (then the kid is
/// just unknown). True if a fetch is coming.
pub fn refetch_for_unknown_kid(s: &mut State, p: usize) -> bool {
    let Some((r, issuer)) = remote(s, p).map(|(r, i)| (r.clone(), i.to_string())) else {
        return false;
    };
    let Some(k) = s.keys.get_mut(p) else {
        return false;
    };
    if k.pending.is_some() {
        return true;
    }
    let now = now_ns();
    let window = r.unknown_kid_refetch_s * NS;
    // The newest fetch of any worker counts, not only the set this one has.
    let shared_fetched = host::shared_get(&base(&issuer))
        .0
        .and_then(|v| u64_at(&v, 0))
        .unwrap_or(0);
    let fetched = k.fetched_at.max(shared_fetched);
    if now.saturating_sub(fetched) < window || now.saturating_sub(k.kid_refetch_at) < window {
        return false;
    }
    k.kid_refetch_at = now;
    set_lease(&issuer, 0, 0, None)
}
