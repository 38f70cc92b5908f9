//! The sidecar's own token verifier, for in-band `auth` and `refresh`:
//! `auth-core` natively, on the auth filter's configuration JSON (the same
//! providers, issuers, audiences, algorithms, skew, required claims), with
//! the requirement of the filter's route for `GET /ws`.
//!
//! Keys: inline sets are ready at start; each remote provider (a
//! `jwks_uri`, or OIDC discovery naming one) has a fetcher task on
//! [`filter_common::refresh::Schedule`] — refreshed before expiry, backoff
//! after failures, the last good set kept, an unknown `kid` making a fetch
//! due at once at most once per `unknown_kid_refetch_s`, documents bounded
//! by `max_bytes`. A filter fetches through an Envoy cluster; the sidecar
//! connects to the address `--cluster <name>=<host:port>` gives that
//! cluster, else to the request's authority (port 80 if none), over plain
//! HTTP (in a mesh, the sidecar proxy originates TLS).
//!
//! A token waits at most `jwks_wait_ms` for keys it needs. Verified tokens
//! are cached (`cache_max_entries`, re-checked for expiry on every hit).

use auth_core::authenticate::{authenticate, Outcome, Verified};
use auth_core::config::{discovered_jwks_uri, KeySource, Remote, Requirement, Settings};
use auth_core::error::Reason;
use auth_core::jwk::JwkSet;
use bytes::Bytes;
use filter_common::cache::{fast_hasher, BoundedCache, FastHasher};
use filter_common::refresh::{Schedule, Timings};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// What the verifier counts.
#[derive(Debug, Clone, Default)]
pub struct VerifierMetrics {
    /// `sidecar_ws_auth_total{kind="auth|refresh",result="accepted|<reason>"}`
    pub outcomes: Family<Labels, Counter>,
    /// `sidecar_jwks_fetches_total{provider,result="ok|failed"}`
    pub fetches: Family<Labels, Counter>,
    /// `sidecar_identity_proofs_total{endpoint="ws|publish|admin",result}`
    pub proofs: Family<Labels, Counter>,
}

impl VerifierMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sidecar");
        r.register(
            "ws_auth",
            "In-band auth and refresh frames, by kind and result (accepted, or the refusal reason)",
            self.outcomes.clone(),
        );
        r.register(
            "jwks_fetches",
            "Key set (and discovery) fetches of the sidecar's verifier, by provider and result",
            self.fetches.clone(),
        );
        r.register(
            "identity_proofs",
            "Identity of /ws upgrades, publishes and admin calls checked against its token (--identity-proof), \
             by endpoint and result: verified, anonymous, trusted, missing, mismatch, no_verifier, \
             or the token's refusal reason",
            self.proofs.clone(),
        );
    }

    /// Counts one identity proof at `endpoint` ending in `result`.
    pub fn proof(&self, endpoint: &str, result: &str) {
        self.proofs
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("result".into(), result.into()),
            ])
            .inc();
    }

    /// Counts one `kind` (`auth`, `refresh`) ending in `result`.
    pub fn outcome(&self, kind: &str, result: &str) {
        self.outcomes
            .get_or_create(&vec![
                ("kind".into(), kind.into()),
                ("result".into(), result.into()),
            ])
            .inc();
    }

    fn fetch(&self, provider: &str, ok: bool) {
        self.fetches
            .get_or_create(&vec![
                ("provider".into(), provider.into()),
                ("result".into(), if ok { "ok" } else { "failed" }.into()),
            ])
            .inc();
    }
}

/// One provider's keys.
struct Keys {
    set: RwLock<Option<Arc<JwkSet>>>,
    schedule: Mutex<Schedule>,
    /// Bumped after every fetch attempt (success or failure): waiters
    /// look again.
    attempts: watch::Sender<u64>,
    /// Wakes the fetcher for an early refetch.
    wake: Notify,
}

/// A verified token, as the cache keeps it.
#[derive(Debug)]
struct Cached(Verified);

pub struct Verifier {
    settings: Settings,
    requirement: Requirement,
    keys: Vec<Keys>,
    cache: Mutex<BoundedCache<Arc<Cached>, FastHasher>>,
    clusters: HashMap<String, String>,
    clock: crate::access::Clock,
    pub metrics: VerifierMetrics,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("providers", &self.settings.providers.len())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    // Monotonic milliseconds for the schedules (tokio's clock, so paused
    // time moves them in tests).
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
}

impl Verifier {
    /// Compiles the auth filter's configuration; `clusters` maps Envoy
    /// cluster names to `host:port`.
    pub fn from_json(
        config: &[u8],
        clusters: HashMap<String, String>,
        clock: crate::access::Clock,
    ) -> Result<Verifier, String> {
        let settings = Settings::from_json(config).map_err(|e| e.to_string())?;
        let requirement = settings.requirement("GET", "/ws").clone();
        let keys = settings
            .providers
            .iter()
            .map(|p| {
                let (set, timings) = match &p.keys {
                    KeySource::Inline(set) => (
                        Some(Arc::new(set.clone())),
                        Timings {
                            refresh_ms: u64::MAX,
                            retry_initial_ms: u64::MAX,
                            retry_max_ms: u64::MAX,
                            min_refetch_ms: u64::MAX,
                        },
                    ),
                    KeySource::Remote(r) => (
                        None,
                        Timings {
                            refresh_ms: r.refresh_s.saturating_mul(1000),
                            retry_initial_ms: r.retry_initial_ms,
                            retry_max_ms: r.refresh_s.saturating_mul(1000),
                            min_refetch_ms: r.unknown_kid_refetch_s.saturating_mul(1000),
                        },
                    ),
                };
                Keys {
                    set: RwLock::new(set),
                    schedule: Mutex::new(Schedule::new(timings)),
                    attempts: watch::Sender::new(0),
                    wake: Notify::new(),
                }
            })
            .collect();
        let cache = BoundedCache::with_hasher(
            settings.cache_max_entries,
            settings.max_token_bytes,
            fast_hasher(),
        );
        Ok(Verifier {
            settings,
            requirement,
            keys,
            cache: Mutex::new(cache),
            clusters,
            clock,
            metrics: VerifierMetrics::default(),
        })
    }

    /// The clock skew of the provider whose issuer is `iss`, seconds.
    pub fn skew_for(&self, iss: &str) -> Option<u64> {
        self.settings
            .providers
            .iter()
            .find(|p| p.rules.issuer == iss)
            .map(|p| p.rules.clock_skew)
    }

    /// The compiled configuration.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts a fetcher for every remote provider, until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        for (i, p) in self.settings.providers.iter().enumerate() {
            if let KeySource::Remote(r) = &p.keys {
                let (v, r, stop) = (self.clone(), r.clone(), shutdown.clone());
                tokio::spawn(async move { v.fetcher(i, r, stop).await });
            }
        }
    }

    fn set(&self, p: usize) -> Option<Arc<JwkSet>> {
        self.keys
            .get(p)
            .and_then(|k| k.set.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Verifies `token` for `/ws`: the verified token, or why not.
    pub async fn verify(&self, token: &str) -> Result<Verified, Reason> {
        let now = self.clock.now_secs();
        if let Some(hit) = lock(&self.cache).get(1, token.as_bytes()) {
            return auth_core::claims::ClaimRules::check_window(hit.0.window, now)
                .map(|()| hit.0.clone());
        }
        let mut waited = false;
        loop {
            let sets: Vec<Option<Arc<JwkSet>>> =
                (0..self.keys.len()).map(|p| self.set(p)).collect();
            let outcome = authenticate(
                &self.settings,
                &self.requirement,
                token,
                |p| sets.get(p).and_then(|s| s.as_deref()),
                self.clock.now_secs(),
            );
            match outcome {
                Outcome::Verified(v) => {
                    lock(&self.cache).put(1, token.as_bytes(), Arc::new(Cached((*v).clone())));
                    return Ok(*v);
                }
                Outcome::Denied(r) => return Err(r),
                Outcome::NeedKeys { provider, kid, alg } => {
                    if waited || !self.wait_for_keys(provider, kid.is_some()).await {
                        return Err(Outcome::keys_unavailable(
                            &self.settings,
                            provider,
                            kid,
                            alg,
                        ));
                    }
                    waited = true;
                }
            }
        }
    }

    /// Waits (at most `jwks_wait_ms`) for the next fetch of provider `p`'s
    /// keys; `unknown_kid`: ask for one now if the rate limit allows.
    /// False when no fetch is coming or none completed in time.
    async fn wait_for_keys(&self, p: usize, unknown_kid: bool) -> bool {
        let Some(k) = self.keys.get(p) else {
            return false;
        };
        let remote = matches!(
            self.settings.providers.get(p).map(|p| &p.keys),
            Some(KeySource::Remote(_))
        );
        if !remote {
            return false;
        }
        let mut rx = k.attempts.subscribe();
        rx.borrow_and_update();
        if unknown_kid {
            if !lock(&k.schedule).refetch_now(now_ms()) {
                return false;
            }
            k.wake.notify_one();
        }
        let wait = Duration::from_millis(self.settings.jwks_wait_ms);
        matches!(tokio::time::timeout(wait, rx.changed()).await, Ok(Ok(())))
    }

    async fn fetcher(self: Arc<Self>, p: usize, r: Remote, shutdown: CancellationToken) {
        let Some(k) = self.keys.get(p) else { return };
        let name = self
            .settings
            .providers
            .get(p)
            .map_or(String::new(), |p| p.name.clone());
        let issuer = self
            .settings
            .providers
            .get(p)
            .map_or(String::new(), |p| p.rules.issuer.clone());
        // The jwks_uri discovery found: (authority, path).
        let mut discovered: Option<(String, String)> = None;
        loop {
            let next = lock(&k.schedule).next_at();
            let wait = Duration::from_millis(next.saturating_sub(now_ms()));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = k.wake.notified() => {}
            }
            if !lock(&k.schedule).due(now_ms()) {
                continue;
            }
            let result = self.fetch(&r, &issuer, &mut discovered).await;
            let now = now_ms();
            match result {
                Ok((set, max_age_s)) => {
                    if !set.skipped.is_empty() {
                        tracing::info!(
                            "verifier: keys skipped for {issuer}: {}",
                            set.skipped.join("; ")
                        );
                    }
                    *k.set.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
                    lock(&k.schedule).succeeded(now, max_age_s);
                    self.metrics.fetch(&name, true);
                }
                Err(why) => {
                    let delay = lock(&k.schedule).failed(now);
                    self.metrics.fetch(&name, false);
                    tracing::warn!(
                        "verifier: keys of provider {name} not fetched ({why}); retry in {delay} ms"
                    );
                }
            }
            k.attempts.send_modify(|n| *n += 1);
        }
    }

    /// One fetch of a provider's key set (through discovery first, once).
    async fn fetch(
        &self,
        r: &Remote,
        issuer: &str,
        discovered: &mut Option<(String, String)>,
    ) -> Result<(JwkSet, Option<u64>), String> {
        if r.discovery && discovered.is_none() {
            let (_, body) = self.get(r, &r.authority, &r.path).await?;
            *discovered = Some(
                discovered_jwks_uri(&body)
                    .ok_or_else(|| "discovery document has no usable jwks_uri".to_string())?,
            );
        }
        let (authority, path) = match discovered {
            Some((a, p)) => (a.clone(), p.clone()),
            None => (r.authority.clone(), r.path.clone()),
        };
        let (max_age_s, body) = self.get(r, &authority, &path).await?;
        let set = JwkSet::parse(&body, false)?;
        if set.keys.is_empty() {
            return Err(format!(
                "no usable key for {issuer} ({})",
                set.skipped.join("; ")
            ));
        }
        Ok((set, max_age_s))
    }

    /// `GET path` with `authority`, to the cluster's address: the
    /// `max-age` of the answer and its body.
    async fn get(
        &self,
        r: &Remote,
        authority: &str,
        path: &str,
    ) -> Result<(Option<u64>, Bytes), String> {
        let addr = match self.clusters.get(&r.cluster) {
            Some(a) => a.clone(),
            None if authority.contains(':') => authority.to_string(),
            None => format!("{authority}:80"),
        };
        let timeout = Duration::from_millis(r.timeout_ms);
        let f = crate::fetch::get(&addr, authority, path, None, timeout, r.max_bytes).await?;
        if f.status != 200 {
            return Err(format!("{addr}{path}: status {}", f.status));
        }
        Ok((f.max_age, f.body))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
