//! Providers' key sets on one worker: inline ones are ready at configure
//! time; remote ones (a JWKS URL, or OIDC discovery naming one) are
//! [`Remote`] documents under `254carbon.auth.jwks|<issuer>`: refreshed
//! after `refresh_interval_s` (or at 90 % of `Cache-Control: max-age`, if
//! sooner), after a failure after `retry_initial_ms` doubling up to the
//! refresh period, and at once (at most once per `unknown_kid_refetch_s`)
//! when a token names a `kid` the set lacks.

use crate::config::{discovered_jwks_uri, KeySource, Settings};
use crate::jwk::JwkSet;
use crate::metrics::Metrics;
use filter_common::host::{Host, Level};
use filter_common::refresh::Timings;
use filter_common::remote::{Check, Event, Remote, Source};
use std::rc::Rc;
use std::time::Duration;

/// One provider's keys on this worker.
pub struct ProviderKeys {
    pub set: Option<Rc<JwkSet>>,
    remote: Option<Remote>,
}

fn name(s: &Settings, p: usize) -> &str {
    s.providers.get(p).map_or("?", |p| p.name.as_str())
}

impl ProviderKeys {
    pub fn for_providers(s: &Settings) -> Vec<ProviderKeys> {
        s.providers
            .iter()
            .map(|p| match &p.keys {
                KeySource::Inline(set) => ProviderKeys {
                    set: Some(Rc::new(set.clone())),
                    remote: None,
                },
                KeySource::Remote(r) => {
                    let refresh_ms = r.refresh_s.saturating_mul(1000);
                    ProviderKeys {
                        set: None,
                        remote: Some(Remote::new(Source {
                            cluster: r.cluster.clone(),
                            authority: r.authority.clone(),
                            path: r.path.clone(),
                            timeout: Duration::from_millis(r.timeout_ms),
                            timings: Timings {
                                refresh_ms,
                                retry_initial_ms: r.retry_initial_ms,
                                retry_max_ms: refresh_ms,
                                min_refetch_ms: r.unknown_kid_refetch_s.saturating_mul(1000),
                            },
                            max_bytes: r.max_bytes,
                            max_bytes_field: "max_bytes".into(),
                            key: format!("254carbon.auth.jwks|{}", p.rules.issuer),
                            follow: r.discovery,
                        })),
                    }
                }
            })
            .collect()
    }

    pub fn remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Parses the shared key set if it changed; true if installed.
    pub fn sync<H: Host>(&mut self, h: &H, s: &Settings, p: usize) -> bool {
        let Some(doc) = self.remote.as_mut().and_then(|r| r.sync(h)) else {
            return false;
        };
        match JwkSet::parse(&doc.body, false) {
            Ok(set) if !set.keys.is_empty() => {
                self.set = Some(Rc::new(set));
                true
            }
            _ => {
                h.log(
                    Level::Warn,
                    &format!("auth: shared keys of provider {} unusable", name(s, p)),
                );
                false
            }
        }
    }

    /// Starts a fetch if one is due.
    pub fn poll<H: Host>(&mut self, h: &H, s: &Settings, m: &Metrics, p: usize) {
        if let Some(e) = self.remote.as_mut().and_then(|r| r.poll(h)) {
            report(h, s, m, p, e);
        }
    }

    /// The answer to a callout: `None` if not this provider's, else
    /// whether its keys changed.
    pub fn on_response<H: Host>(
        &mut self,
        h: &H,
        s: &Settings,
        m: &Metrics,
        p: usize,
        token: u32,
        body_size: usize,
    ) -> Option<bool> {
        let issuer = s.providers.get(p).map_or("", |p| p.rules.issuer.as_str());
        let check = |body: &[u8], first: bool| {
            if first {
                return match discovered_jwks_uri(body) {
                    Some((authority, path)) => Check::Follow { authority, path },
                    None => Check::Refuse("discovery document has no usable jwks_uri".into()),
                };
            }
            match JwkSet::parse(body, false) {
                Ok(set) if !set.keys.is_empty() => {
                    if !set.skipped.is_empty() {
                        h.log(
                            Level::Info,
                            &format!(
                                "auth: keys skipped for {issuer}: {}",
                                set.skipped.join("; ")
                            ),
                        );
                    }
                    Check::Keep
                }
                Ok(set) => Check::Refuse(format!("no usable key ({})", set.skipped.join("; "))),
                Err(e) => Check::Refuse(e),
            }
        };
        let e = self
            .remote
            .as_mut()?
            .on_response(h, token, body_size, check)?;
        let stored = e == Event::Stored;
        report(h, s, m, p, e);
        Some(stored && self.sync(h, s, p))
    }

    /// A token named a `kid` the set lacks: true if a fetch is coming.
    pub fn refetch_now<H: Host>(&mut self, h: &H) -> bool {
        self.remote.as_mut().is_some_and(|r| r.refetch_now(h))
    }
}

fn report<H: Host>(h: &H, s: &Settings, m: &Metrics, p: usize, e: Event) {
    match e {
        Event::Stored | Event::NotModified => h.increment(m.jwks_fetch_success, 1),
        Event::Followed => {}
        Event::Failed { why, retry_in_ms } | Event::Refused { why, retry_in_ms } => {
            h.increment(m.jwks_fetch_failed, 1);
            h.log(
                Level::Warn,
                &format!(
                    "auth: keys of provider {} not fetched ({why}); retry in {retry_in_ms} ms",
                    name(s, p)
                ),
            );
        }
    }
}
