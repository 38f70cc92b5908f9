//! The entitlements filter as a [`Filter`], second in the chain after
//! auth. It reads the identity auth verified (the `x-auth-*` headers),
//! normalises the path, asks the policy engine ([`crate::policy`]) and
//! answers 403 `{"error":"forbidden","rule":"<id>"}` on deny.
//!
//! Per worker VM: the compiled policy, a bounded decision cache, decoded
//! identities and the metric ids. With a remote policy source
//! ([`filter_common::remote`]) one worker at a time fetches it, stores it
//! in shared data, and every worker compiles what it finds there; a
//! failed or invalid fetch keeps the last good policy.

pub mod config;
pub mod grants;

use crate::cache::{BoundedCache, DecisionCache};
use crate::identity::{decode_claims, Identity};
use crate::metrics::Metrics;
use crate::path::normalize;
use crate::policy::{Decider, HttpRequest, IdentityKey, Policy, Request, Verdict};
use base64::Engine as _;
use config::Settings;
use filter_common::config::ConfigError;
use filter_common::filter::{Filter, Flow};
use filter_common::host::{Host, Level, Map};
use filter_common::remote::{Check, Event, Remote};
use grants::{Change, Feed, FeedEvent};
use std::rc::Rc;
use std::time::Duration;

/// base64url, padded or not (RFC 7515 says unpadded; be lenient).
const BASE64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// What every stream of a VM shares.
pub struct Entitlements {
    settings: Settings,
    /// The policy in force, and its version (grows with every swap; the
    /// caches belong to one version).
    policy: Option<Rc<Policy>>,
    version: u64,
    cache: DecisionCache,
    /// Decoded identities by their raw headers, each with an id that is
    /// never reused (decision keys carry the id).
    identities: BoundedCache<(u64, Rc<Identity>)>,
    next_identity: u64,
    id_key: Vec<u8>,
    metrics: Metrics,
    /// Reused buffer for cache keys.
    key: Vec<u8>,
    remote: Option<Remote>,
    /// The grants feed (`grants`).
    feed: Option<Feed>,
}

/// The identity headers as received.
struct RawIdentity<'h> {
    subject: Option<&'h str>,
    issuer: Option<&'h str>,
    tenant: Option<&'h str>,
    roles: Option<&'h str>,
    claims: Option<&'h str>,
}

impl RawIdentity<'_> {
    fn key(&self) -> IdentityKey<'_> {
        IdentityKey {
            subject: self.subject,
            issuer: self.issuer,
            tenant: self.tenant,
            roles: self.roles,
            claims: self.claims,
        }
    }

    /// The identity the engine evaluates; the claims decoded only if the
    /// policy reads them. `Err` names what was malformed.
    fn decode(&self, policy: &Policy, max_claims: usize) -> Result<Identity, &'static str> {
        let claims = match (self.claims, policy.uses_claims()) {
            (Some(c), true) => {
                if c.len() > max_claims {
                    return Err("claims header too large");
                }
                let raw = BASE64URL
                    .decode(c.trim())
                    .map_err(|_| "claims header is not base64url")?;
                decode_claims(&raw, policy.claim_roots())
                    .map_err(|_| "claims header is not a JSON object")?
            }
            _ => serde_json::Value::Null,
        };
        Ok(Identity {
            subject: self.subject.map(str::to_string),
            issuer: self.issuer.map(str::to_string),
            tenant: self.tenant.map(str::to_string),
            roles: self.roles.map(Identity::parse_roles).unwrap_or_default(),
            claims,
        })
    }
}

fn forbidden<H: Host>(h: &H, rule: &str) {
    let body = serde_json::json!({"error": "forbidden", "rule": rule}).to_string();
    h.reply_json(403, &[], &body);
}

impl Entitlements {
    /// Puts a compiled policy in force.
    fn install<H: Host>(&mut self, h: &H, policy: Policy) {
        self.version += 1;
        self.metrics.define_rules(h, &policy);
        self.policy = Some(Rc::new(policy));
    }

    /// Compiles the shared policy if another worker (or this one) stored a
    /// new one.
    fn sync<H: Host>(&mut self, h: &H) {
        let Some(doc) = self.remote.as_mut().and_then(|r| r.sync(h)) else {
            return;
        };
        match Policy::from_json(&doc.body) {
            Ok(p) => {
                h.increment(self.metrics.policy_reloads, 1);
                h.log(
                    Level::Info,
                    &format!("entitlements: policy updated, {} rules", p.len()),
                );
                self.install(h, p);
            }
            Err(e) => {
                h.increment(self.metrics.policy_invalid, 1);
                h.log(Level::Error, &format!("entitlements: shared policy: {e}"));
            }
        }
    }

    /// Takes a new version of the grants in force, dropping the decisions
    /// it may change: every one for a new generation, else those of the
    /// callers whose tenant or subject it changed (their identities get
    /// new ids, so their cached decisions are never found again).
    fn sync_grants<H: Host>(&mut self, h: &H) {
        let Some(feed) = self.feed.as_mut() else {
            return;
        };
        match feed.sync(h) {
            Change::Nothing => {}
            Change::All { overflow } => {
                if overflow {
                    h.increment(self.metrics.grants.log_overflow, 1);
                }
                self.version += 1;
            }
            Change::Holders(keys) => {
                let changed = |kind: &str, name: &Option<String>| {
                    name.as_deref()
                        .is_some_and(|n| keys.iter().any(|k| k.strip_prefix(kind) == Some(n)))
                };
                self.identities
                    .retain(|(_, id)| !changed("t/", &id.tenant) && !changed("s/", &id.subject));
            }
        }
    }

    fn report_feed<H: Host>(&self, h: &H, e: FeedEvent) {
        let m = &self.metrics.grants;
        match e {
            FeedEvent::Applied {
                snapshot,
                holders,
                done,
                version,
                grants,
            } => {
                h.increment(m.pages, 1);
                if done {
                    h.increment(if snapshot { m.snapshots } else { m.deltas }, 1);
                    h.record(m.version, version);
                    h.record(m.in_force, grants);
                    h.log(
                        if snapshot { Level::Info } else { Level::Debug },
                        &format!(
                            "entitlements: grants version {version} in force ({}, {holders} holders on the last page, {grants} grants)",
                            if snapshot { "snapshot" } else { "delta" }
                        ),
                    );
                }
            }
            FeedEvent::NotModified => h.increment(m.not_modified, 1),
            FeedEvent::Failed { why, retry_in_ms } => {
                h.increment(m.fetch_failed, 1);
                h.log(
                    Level::Warn,
                    &format!("entitlements: grants fetch failed, keeping the grants in force, again in {retry_in_ms} ms: {why}"),
                );
            }
            FeedEvent::Refused { why, retry_in_ms } => {
                h.increment(m.invalid, 1);
                h.log(
                    Level::Error,
                    &format!("entitlements: grants page refused, keeping the grants in force, again in {retry_in_ms} ms: {why}"),
                );
            }
        }
    }

    fn report_fetch<H: Host>(&self, h: &H, e: Event) {
        let m = &self.metrics;
        match e {
            Event::Stored => h.increment(m.policy_fetches, 1),
            Event::NotModified => h.increment(m.policy_not_modified, 1),
            Event::Followed => {}
            Event::Failed { why, .. } => {
                h.increment(m.policy_fetch_failed, 1);
                h.log(
                    Level::Warn,
                    &format!("entitlements: policy fetch failed, keeping the last good one: {why}"),
                );
            }
            Event::Refused { why, .. } => {
                h.increment(m.policy_invalid, 1);
                h.log(
                    Level::Error,
                    &format!(
                        "entitlements: fetched policy refused, keeping the last good one: {why}"
                    ),
                );
            }
        }
    }

    /// Counts and logs a decision.
    fn report<H: Host>(
        &self,
        h: &H,
        policy: &Policy,
        v: Verdict,
        request: (&str, &str, Option<&str>),
    ) {
        let (method, path, subject) = request;
        let m = &self.metrics;
        h.increment(m.rule(v.rule.slot(policy.len())), 1);
        h.increment(if v.allowed { m.allowed } else { m.denied }, 1);
        let who = subject.unwrap_or("-");
        if !v.allowed {
            h.log(
                Level::Debug,
                &format!(
                    "entitlements: denied by {}: {method} {path} subject={who}",
                    policy.rule_id(v.rule)
                ),
            );
        }
        if let Some(d) = v.shadow_denied {
            h.increment(m.shadow_denied, 1);
            let rule = if matches!(d, Decider::Default) {
                "default"
            } else {
                policy.rule_id(d)
            };
            h.log(
                Level::Info,
                &format!("entitlements: shadow deny by {rule}: {method} {path} subject={who}"),
            );
        }
    }

    /// 503 with `Retry-After: 1`, counted: what the filter needs is not in yet.
    fn unavailable<H: Host>(&self, h: &H, body: &str) -> Flow {
        h.increment(self.metrics.unavailable, 1);
        h.reply_json(503, &[("retry-after", "1")], body);
        Flow::Pause
    }

    fn invalid_path<H: Host>(&self, h: &H, why: &str) -> Flow {
        h.increment(self.metrics.invalid_path, 1);
        h.log(Level::Debug, &format!("entitlements: invalid path: {why}"));
        let body = serde_json::json!({"error": "invalid_path", "message": why}).to_string();
        h.reply_json(400, &[], &body);
        Flow::Pause
    }

    fn invalid_identity<H: Host>(&self, h: &H, why: &str) -> Flow {
        h.increment(self.metrics.invalid_identity, 1);
        h.log(
            Level::Warn,
            &format!("entitlements: invalid identity headers: {why}"),
        );
        forbidden(h, "invalid_identity");
        Flow::Pause
    }

    /// The caller, decoded once and kept (bounded) under an id, so that
    /// decision keys stay short and a decision miss does not decode again.
    /// `Err`: what was malformed.
    fn identity(
        &mut self,
        policy: &Policy,
        raw: &RawIdentity<'_>,
    ) -> Result<(u64, Rc<Identity>, bool), &'static str> {
        self.id_key.clear();
        policy.identity_key(&mut self.id_key, &raw.key());
        let s = &self.settings;
        let interned = s.identity_entries > 0 && self.id_key.len() <= s.cache_key_bytes;
        let known = if interned {
            self.identities.lookup(self.version, &self.id_key)
        } else {
            Err(None)
        };
        match known {
            Ok((id, identity)) => Ok((id, identity, interned)),
            Err(miss) => {
                let identity = Rc::new(raw.decode(policy, s.max_claims_bytes)?);
                self.next_identity += 1;
                if let Some(miss) = miss {
                    let value = (self.next_identity, identity.clone());
                    self.identities.insert(miss, &self.id_key, value);
                }
                Ok((self.next_identity, identity, interned))
            }
        }
    }

    /// Decides with the caller's grants (if the policy asks for them).
    fn decide_now<H: Host>(
        &mut self,
        h: &H,
        policy: &Policy,
        request: &Request<'_>,
        identity: &Identity,
    ) -> Verdict {
        match self.feed.as_mut() {
            Some(feed) if policy.uses_grants() => {
                let grants =
                    feed.caller(h, identity.tenant.as_deref(), identity.subject.as_deref());
                let v = policy.decide_granted(identity, request, &grants);
                self.metrics.grants.cache.flush(h, feed.cache_stats());
                v
            }
            _ => policy.decide(identity, request),
        }
    }

    /// Decides through the decision cache (if on). With grants, only
    /// decisions for interned identities are cached: a change of a
    /// holder's grants retires those identities' ids.
    fn decide<H: Host>(
        &mut self,
        h: &H,
        policy: &Policy,
        request: HttpRequest<'_>,
        id: (u64, &Identity, bool),
    ) -> Verdict {
        let (id, identity, interned) = id;
        let cached = self.settings.cache_entries > 0
            && (interned || self.feed.is_none() || !policy.uses_grants());
        if cached {
            policy.http_request_key(&mut self.key, &request);
            if interned {
                self.key.extend_from_slice(&id.to_le_bytes());
            } else {
                self.key.extend_from_slice(&self.id_key);
            }
        }
        let hit = if cached {
            self.cache.lookup(self.version, &self.key)
        } else {
            Err(None)
        };
        match hit {
            Ok(v) => v,
            Err(miss) => {
                let v = self.decide_now(h, policy, &Request::Http(request), identity);
                if let Some(miss) = miss {
                    self.cache.insert(miss, &self.key, v);
                }
                v
            }
        }
    }
}

impl Filter for Entitlements {
    const NAME: &'static str = "entitlements";
    type Stream = ();

    fn configure<H: Host>(h: &H, config: &[u8]) -> Result<Entitlements, ConfigError> {
        let mut settings = Settings::from_json(config)?;
        let policy = settings.policy.take();
        let mut e = Entitlements {
            policy: None,
            version: 0,
            cache: DecisionCache::new(settings.cache_entries, settings.cache_key_bytes),
            identities: BoundedCache::new(settings.identity_entries, settings.cache_key_bytes),
            next_identity: 0,
            id_key: Vec::with_capacity(512),
            metrics: Metrics::define(h),
            key: Vec::with_capacity(256),
            remote: settings.remote.clone().map(Remote::new),
            feed: settings.grants.clone().map(Feed::new),
            settings,
        };
        if let Some(p) = policy {
            e.install(h, p);
        }
        Ok(e)
    }

    /// How often a worker looks at shared data and the fetch lease.
    fn tick_period(&self) -> Option<Duration> {
        let remote = self.remote.as_ref().map(|r| r.source.timings);
        let feed = self.feed.as_ref().map(|f| f.source.timings);
        let ms = [remote, feed]
            .into_iter()
            .flatten()
            .map(|t| t.refresh_ms.min(t.retry_initial_ms))
            .min()?;
        Some(Duration::from_millis(ms.min(1000)))
    }

    fn describe(&self) -> String {
        format!(
            "configured, {} rules{}{}",
            self.policy.as_ref().map_or(0, |p| p.len()),
            if self.remote.is_some() {
                ", remote source on"
            } else {
                ""
            },
            if self.feed.is_some() {
                ", grants feed on"
            } else {
                ""
            }
        )
    }

    fn on_tick<H: Host>(&mut self, h: &H) {
        self.sync(h);
        if let Some(e) = self.remote.as_mut().and_then(|r| r.poll(h)) {
            self.report_fetch(h, e);
        }
        self.sync_grants(h);
        if let Some(e) = self.feed.as_mut().and_then(|f| f.poll(h)) {
            self.report_feed(h, e);
        }
    }

    fn on_http_call_response<H: Host>(&mut self, h: &H, token: u32, body_size: usize) {
        if let Some(e) = self
            .feed
            .as_mut()
            .and_then(|f| f.on_response(h, token, body_size))
        {
            let applied = matches!(e, FeedEvent::Applied { done: true, .. });
            self.report_feed(h, e);
            if applied {
                self.sync_grants(h);
            }
            return;
        }
        let Some(r) = self.remote.as_mut() else {
            return;
        };
        let check = |doc: &[u8], _: bool| match Policy::from_json(doc) {
            Ok(_) => Check::Keep,
            Err(e) => Check::Refuse(e.to_string()),
        };
        if let Some(e) = r.on_response(h, token, body_size, check) {
            let stored = e == Event::Stored;
            self.report_fetch(h, e);
            if stored {
                self.sync(h);
            }
        }
    }

    fn unconfigured<H: Host>(h: &H) -> Flow {
        forbidden(h, "default");
        Flow::Pause
    }

    fn on_request_headers<H: Host>(&mut self, h: &H, _stream: &mut (), _id: u32) -> Flow {
        let Some(policy) = self.policy.clone() else {
            return self.unavailable(
                h,
                r#"{"error":"unavailable","message":"entitlements policy not loaded yet"}"#,
            );
        };
        if policy.uses_grants() && self.feed.as_ref().is_some_and(|f| !f.ready()) {
            // Until the first version of the grants is in, the workers
            // look at every request (the fetcher's answer may be in).
            self.sync_grants(h);
            if self.feed.as_ref().is_some_and(|f| !f.ready()) {
                return self.unavailable(
                    h,
                    r#"{"error":"unavailable","message":"entitlements grants not loaded yet"}"#,
                );
            }
        }

        // The request, with the path normalised.
        let headers = h.request_headers();
        let method = headers.text(":method").unwrap_or_default();
        let authority = headers.text(":authority").unwrap_or_default();
        let Some(raw_path) = headers.text(":path") else {
            return self.invalid_path(h, "path is missing or not UTF-8");
        };
        let target = match normalize(raw_path, &self.settings.path) {
            Ok(t) => t,
            Err(e) => return self.invalid_path(h, &e.to_string()),
        };
        if self.settings.rewrite_path {
            let unchanged = match &target.query {
                None => raw_path == target.path,
                Some(q) => {
                    raw_path.len() == target.path.len() + 1 + q.len()
                        && raw_path.starts_with(target.path.as_str())
                }
            };
            if !unchanged {
                h.set_header(Map::RequestHeaders, ":path", &target.to_string());
            }
        }
        let mut read_headers = Vec::with_capacity(policy.headers_read().len());
        for name in policy.headers_read() {
            if let Some(v) = headers.text(name) {
                read_headers.push((name.clone(), v.to_string()));
            }
        }
        let request = HttpRequest {
            method,
            host: authority,
            path: &target.path,
            query: target.query.as_deref(),
            headers: &read_headers,
        };

        // The identity, as auth set it.
        let n = &self.settings.headers;
        let raw = match (
            headers.get(&n.subject),
            headers.get(&n.issuer),
            headers.get(&n.tenant),
            headers.get(&n.roles),
            headers.get(&n.claims),
        ) {
            (Ok(subject), Ok(issuer), Ok(tenant), Ok(roles), Ok(claims)) => RawIdentity {
                subject,
                issuer,
                tenant,
                roles,
                claims,
            },
            _ => return self.invalid_identity(h, "an identity header is not UTF-8"),
        };
        let (id, identity, interned) = match self.identity(&policy, &raw) {
            Ok(i) => i,
            Err(why) => return self.invalid_identity(h, why),
        };
        let verdict = self.decide(h, &policy, request, (id, &identity, interned));
        self.metrics
            .identity_cache
            .flush(h, self.identities.stats());
        self.metrics.cache.flush(h, self.cache.stats());
        self.report(h, &policy, verdict, (method, &target.path, raw.subject));
        if verdict.allowed {
            Flow::Continue
        } else {
            forbidden(h, policy.rule_id(verdict.rule));
            Flow::Pause
        }
    }
}

#[cfg(test)]
#[path = "filter/tests.rs"]
mod tests;
