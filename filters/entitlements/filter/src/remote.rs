//! The remote policy source: fetched with `If-None-Match` by one worker at
//! a time and shared with the others through shared data.
//!
//! Shared-data keys (per VM id): `<shared_key>` holds the last good policy
//! (`u32` etag length, etag, document); `<shared_key>.next` holds the time
//! (ns since the epoch, `u64` LE) of the next fetch: a worker whose tick
//! finds it due moves it forward with a CAS and fetches; the others see the
//! CAS fail and wait. A fetched document is compiled before it is shared,
//! so what is shared is always valid; a failed, refused or invalid fetch
//! keeps the last good policy and is tried again after `retry_interval_ms`.

use crate::config::Remote;
use crate::State;
use entitlements_core::policy::Policy;
use filter_shell as host;
use proxy_wasm::types::LogLevel;
use std::time::Duration;

#[derive(Default)]
pub struct RemoteState {
    /// Token of this worker's fetch in flight.
    pending: Option<u32>,
    /// CAS of the shared policy this worker last compiled.
    seen_cas: Option<u32>,
    /// ETag of that policy.
    etag: Option<String>,
}

/// How often a worker looks at shared data and the fetch lease.
pub fn tick_period(r: &Remote) -> Duration {
    Duration::from_secs(1).min(r.refresh).min(r.retry)
}

fn next_key(r: &Remote) -> String {
    format!("{}.next", r.shared_key)
}

pub fn on_tick(s: &mut State) {
    sync(s);
    maybe_fetch(s);
}

/// Compiles the shared policy if it changed since this worker last looked.
fn sync(s: &mut State) {
    let Some(r) = &s.settings.remote else { return };
    let (value, cas) = host::shared_get(&r.shared_key);
    let (Some(value), Some(cas)) = (value, cas) else {
        return;
    };
    if s.remote.seen_cas == Some(cas) {
        return;
    }
    s.remote.seen_cas = Some(cas);
    let Some((etag, doc)) = decode(&value) else {
        host::increment(s.metrics.policy_invalid, 1);
        host::log(
            LogLevel::Error,
            "entitlements: shared policy entry is malformed",
        );
        return;
    };
    match Policy::from_json(doc) {
        Ok(p) => {
            s.remote.etag = etag;
            host::increment(s.metrics.policy_reloads, 1);
            host::log(
                LogLevel::Info,
                &format!("entitlements: policy updated, {} rules", p.len()),
            );
            s.install(p);
        }
        Err(e) => {
            host::increment(s.metrics.policy_invalid, 1);
            host::log(
                LogLevel::Error,
                &format!("entitlements: shared policy: {e}"),
            );
        }
    }
}

/// Takes the lease and fetches, if a fetch is due.
fn maybe_fetch(s: &mut State) {
    let Some(r) = &s.settings.remote else { return };
    if s.remote.pending.is_some() {
        return;
    }
    let key = next_key(r);
    let (mut value, mut cas) = host::shared_get(&key);
    if value.is_none() {
        // An absent key accepts any CAS: create it, then race on a real CAS.
        host::shared_set(&key, &0u64.to_le_bytes(), None);
        (value, cas) = host::shared_get(&key);
    }
    let next_at = value.as_deref().and_then(read_u64).unwrap_or(0);
    let now = nanos(host::now());
    if now < next_at || cas.is_none() {
        return;
    }
    if !host::shared_set(
        &key,
        &(now.saturating_add(nanos(r.refresh))).to_le_bytes(),
        cas,
    ) {
        return; // another worker took it
    }
    let mut headers = vec![
        (":method", "GET"),
        (":path", r.path.as_str()),
        (":authority", r.authority.as_str()),
        ("accept", "application/json"),
    ];
    if let Some(etag) = &s.remote.etag {
        headers.push(("if-none-match", etag.as_str()));
    }
    match host::http_call(&r.cluster, headers, r.timeout) {
        Ok(token) => s.remote.pending = Some(token),
        Err(e) => {
            let msg = format!("cannot call cluster {:?}: {e:?}", r.cluster);
            failed(s, &msg);
        }
    }
}

/// The answer to this worker's fetch.
pub fn on_response(s: &mut State, token: u32, body_size: usize) {
    if s.remote.pending != Some(token) {
        return;
    }
    s.remote.pending = None;
    let Some(r) = &s.settings.remote else { return };
    let status = host::call_response_header(":status").and_then(|v| v.parse::<u16>().ok());
    match status {
        Some(200) => {
            if body_size > r.max_bytes {
                let msg = format!(
                    "policy is {body_size} bytes, more than remote.max_bytes {}",
                    r.max_bytes
                );
                return invalid(s, &msg);
            }
            let doc = host::call_response_body(body_size);
            if let Err(e) = Policy::from_json(&doc) {
                return invalid(s, &e.to_string());
            }
            let etag = host::call_response_header("etag");
            let shared_key = r.shared_key.clone();
            host::shared_set(&shared_key, &encode(etag.as_deref(), &doc), None);
            host::increment(s.metrics.policy_fetches, 1);
            sync(s);
        }
        Some(304) => host::increment(s.metrics.policy_not_modified, 1),
        Some(code) => failed(s, &format!("status {code}")),
        None => failed(s, "no response (reset, timeout or connection failure)"),
    }
}

fn invalid(s: &mut State, why: &str) {
    host::increment(s.metrics.policy_invalid, 1);
    host::log(
        LogLevel::Error,
        &format!("entitlements: fetched policy refused, keeping the last good one: {why}"),
    );
    retry_later(s);
}

fn failed(s: &mut State, why: &str) {
    host::increment(s.metrics.policy_fetch_failed, 1);
    host::log(
        LogLevel::Warn,
        &format!("entitlements: policy fetch failed, keeping the last good one: {why}"),
    );
    retry_later(s);
}

fn retry_later(s: &State) {
    if let Some(r) = &s.settings.remote {
        let at = nanos(host::now()).saturating_add(nanos(r.retry));
        host::shared_set(&next_key(r), &at.to_le_bytes(), None);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn encode(etag: Option<&str>, doc: &[u8]) -> Vec<u8> {
    let etag = etag.unwrap_or("").as_bytes();
    let mut v = Vec::with_capacity(4 + etag.len() + doc.len());
    v.extend_from_slice(&u32::try_from(etag.len()).unwrap_or(0).to_le_bytes());
    if u32::try_from(etag.len()).is_ok() {
        v.extend_from_slice(etag);
    }
    v.extend_from_slice(doc);
    v
}

fn decode(v: &[u8]) -> Option<(Option<String>, &[u8])> {
    let len = u32::from_le_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let etag = v.get(4..4 + len)?;
    let doc = v.get(4 + len..)?;
    let etag = (!etag.is_empty()).then(|| String::from_utf8_lossy(etag).into_owned());
    Some((etag, doc))
}
