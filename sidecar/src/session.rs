//! One WebSocket connection, in one task: reads and answers client
//! messages, checks each subscription against the entitlements policy
//! and the grants in force (and again when either changes),
//! writes what the hub queued, pings, and closes with a code and a reason
//! when the client breaks the protocol or a limit.
//!
//! The task owns the socket and uses readiness (`readable`/`writable` with
//! non-blocking reads and vectored writes), so a client that stops reading
//! never stops the task from seeing a close request, and an idle
//! connection holds no buffers.

use crate::access::{Access, Bound, Clock};
use crate::fanout::{Client, Flushed, Hub};
use crate::metrics::Metrics;
use crate::protocol::{self, ClientMessage, Id};
use crate::verifier::Verifier;
use crate::ws::{self, close, Incoming, Parser, Violation};
use auth_core::authenticate::Verified;
use auth_core::error::Reason;
use entitlements_core::channel::Pattern;
use entitlements_core::grants::{GrantSet, Holder};
use entitlements_core::identity::decode_claims;
use entitlements_core::identity::Identity;
use entitlements_core::policy::{ChannelAction, Decision, Policy, Request};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Largest client message (and frame), in bytes; beyond it close 1009.
    pub max_message_bytes: usize,
    /// The server pings this often; a client that has not answered the
    /// previous ping by then is closed (1008 "ping timeout").
    pub ping_interval: Duration,
    /// A connection with no message either way for this long is closed
    /// (1000 "idle timeout"); zero turns it off. Pings do not count.
    pub idle_timeout: Duration,
    /// Client messages per second allowed on average ...
    pub client_rate: f64,
    /// ... and in a burst; beyond, close 1008 "too many messages".
    pub client_burst: f64,
    /// How long a closing connection waits for its last writes and the
    /// client's close frame before the socket is dropped.
    pub close_timeout: Duration,
    /// On shutdown, connections close at points spread evenly over this
    /// window (each at its own offset), so their clients reconnect to the
    /// other replicas over that time rather than all at once; zero closes
    /// them all at once.
    pub close_spread: Duration,
    /// Tolerance after a token's `exp` before the connection closes.
    pub clock_skew: Duration,
    /// How long before an identity's end the client gets `expiring`.
    pub expiry_warning: Duration,
    /// Longest life of an identity without an expiry; zero: unbounded.
    pub max_lifetime: Duration,
    /// How long a connection without identity has to send `auth`.
    pub auth_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_subscriptions: 100,
            max_message_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(600),
            client_rate: 20.0,
            client_burst: 100.0,
            close_timeout: Duration::from_secs(5),
            close_spread: Duration::ZERO,
            clock_skew: Duration::from_secs(60),
            expiry_warning: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(86_400),
            auth_timeout: Duration::from_secs(10),
        }
    }
}

/// The policy document in force as it was loaded (the bytes of the file
/// or the remote answer), for `GET /internal/v1/policy`.
#[derive(Debug, Clone)]
pub struct PolicyDocument {
    pub bytes: bytes::Bytes,
    /// A strong validator: the SHA-1 of the bytes, in hex, quoted.
    pub etag: String,
}

impl PolicyDocument {
    pub fn new(bytes: impl Into<bytes::Bytes>) -> PolicyDocument {
        use sha1::Digest;
        let bytes = bytes.into();
        let digest = sha1::Sha1::digest(&bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        PolicyDocument {
            bytes,
            etag: format!("\"{hex}\""),
        }
    }
}

/// What decides subscriptions: the policy and the grants in force. A
/// change of either is a new `Rules` (the other shared).
#[derive(Clone)]
pub struct Rules {
    pub policy: Arc<Policy>,
    pub grants: Arc<GrantSet>,
}

impl Rules {
    /// Decides a request with these grants.
    pub fn evaluate(&self, identity: &Identity, request: &Request<'_>) -> Decision<'_> {
        self.policy.explain(
            self.policy
                .decide_granted(identity, request, self.grants.as_ref()),
        )
    }
}

/// What the sessions share.
pub struct Context {
    pub hub: Arc<Hub>,
    /// The policy and the grants in force.
    rules: watch::Sender<Arc<Rules>>,
    /// What the sessions watch, each one of these (by its client id): a
    /// new policy or new grants reach them wave after wave, the
    /// propagating task yielding between waves, so that ten thousand
    /// sessions re-evaluating at once do not queue ahead of everything
    /// else on the runtime (a publish arriving meanwhile waits for one
    /// wave, not for all).
    waves: Vec<watch::Sender<Arc<Rules>>>,
    /// Bumped by every `set_policy` and `set_grants`; a propagation that
    /// saw it move goes round again.
    generation: std::sync::atomic::AtomicU64,
    propagating: std::sync::atomic::AtomicBool,
    pub cfg: SessionConfig,
    pub clock: Clock,
    /// Verifies in-band `auth` and `refresh` tokens (`--auth-config`);
    /// without it, those frames are refused.
    pub verifier: Option<Arc<Verifier>>,
    /// The document of the policy in force, when it was loaded from bytes.
    document: std::sync::RwLock<Option<Arc<PolicyDocument>>>,
}

impl Context {
    pub fn new(hub: Arc<Hub>, policy: Policy, cfg: SessionConfig) -> Context {
        let rules = Arc::new(Rules {
            policy: Arc::new(policy),
            grants: Arc::new(GrantSet::new()),
        });
        Context {
            hub,
            waves: (0..WAVES)
                .map(|_| watch::Sender::new(rules.clone()))
                .collect(),
            rules: watch::Sender::new(rules),
            generation: Default::default(),
            propagating: Default::default(),
            cfg,
            clock: Clock::new(),
            verifier: None,
            document: std::sync::RwLock::new(None),
        }
    }

    /// The document of the policy in force, if it came from bytes.
    pub fn policy_document(&self) -> Option<Arc<PolicyDocument>> {
        self.document
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the document `policy` was compiled from (without changing
    /// the policy in force: at start, with [`Context::new`]'s policy).
    pub fn set_policy_document(&self, doc: PolicyDocument) {
        *self.document.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(doc));
    }

    /// Puts `policy`, compiled from `doc`, in force (see [`Context::set_policy`]).
    pub fn set_policy_from(self: &Arc<Self>, policy: Policy, doc: PolicyDocument) {
        self.set_policy_document(doc);
        self.set_policy(policy);
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.rules.borrow().policy.clone()
    }

    /// The policy and the grants in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.borrow().clone()
    }

    /// Puts `policy` in force: every live session re-evaluates its
    /// subscriptions against it.
    pub fn set_policy(self: &Arc<Self>, policy: Policy) {
        let policy = Arc::new(policy);
        self.rules.send_modify(|r| {
            *r = Arc::new(Rules {
                policy,
                grants: r.grants.clone(),
            })
        });
        self.propagate_rules();
    }

    /// Puts `grants` in force: every live session whose identity's grants
    /// changed decides its subscriptions again, when the policy asks for
    /// grants (otherwise they are only kept for the next decision).
    pub fn set_grants(self: &Arc<Self>, grants: Arc<GrantSet>) {
        let mut asks = false;
        self.rules.send_modify(|r| {
            asks = r.policy.uses_grants();
            *r = Arc::new(Rules {
                policy: r.policy.clone(),
                grants,
            })
        });
        if asks {
            self.propagate_rules();
        }
    }

    /// Hands the rules in force on to the sessions, wave by wave.
    fn propagate_rules(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.propagating.swap(true, Ordering::AcqRel) {
            // The running propagation sees the new generation.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let ctx = self.clone();
                rt.spawn(async move { ctx.propagate().await });
            }
            Err(_) => {
                for w in &self.waves {
                    w.send_replace(self.rules());
                }
                self.propagating.store(false, Ordering::Release);
            }
        }
    }

    /// Hands the policy in force to every wave, yielding between them,
    /// until a round ends with no newer policy (a burst of changes
    /// coalesces: a wave gets the newest there is when its turn comes).
    async fn propagate(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let seen = self.generation.load(Ordering::Acquire);
            for w in &self.waves {
                let p = self.rules();
                if !Arc::ptr_eq(&w.borrow(), &p) {
                    w.send_replace(p);
                    tokio::task::yield_now().await;
                }
            }
            self.propagating.store(false, Ordering::Release);
            if self.generation.load(Ordering::Acquire) == seen
                || self.propagating.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
    }

    fn watch_policy(&self, client: u64) -> watch::Receiver<Arc<Rules>> {
        let i = (client as usize) % self.waves.len().max(1);
        match self.waves.get(i) {
            Some(w) => w.subscribe(),
            None => self.rules.subscribe(),
        }
    }
}

/// How many waves a policy change reaches the sessions in.
const WAVES: usize = 64;

/// Closes for an identity that is no longer valid.
pub const TOKEN_EXPIRED: Violation = Violation {
    code: close::TOKEN_INVALID,
    reason: "token expired",
};
pub const LIFETIME_EXCEEDED: Violation = Violation {
    code: close::TOKEN_INVALID,
    reason: "lifetime exceeded",
};
pub const AUTH_TIMEOUT: Violation = Violation {
    code: close::TOKEN_INVALID,
    reason: "authentication timeout",
};
pub const IDENTITY_CHANGED: Violation = Violation {
    code: close::IDENTITY_CHANGED,
    reason: "identity changed",
};

/// The close for a token that failed: 4001 with the reason's kind (never
/// internals such as a `kid` or an issuer).
fn refused(r: &Reason) -> Violation {
    let reason = match r {
        Reason::Expired => "token expired",
        Reason::NotYetValid => "invalid token: not yet valid",
        Reason::Malformed(_) => "invalid token: malformed",
        Reason::TooLarge { .. } => "invalid token: too large",
        Reason::Algorithm(_) => "invalid token: algorithm not accepted",
        Reason::UnknownKey { .. } => "invalid token: unknown key",
        Reason::BadSignature => "invalid token: bad signature",
        Reason::UnknownIssuer(_) => "invalid token: issuer not accepted",
        Reason::Audience => "invalid token: audience not accepted",
        Reason::NoExpiry => "invalid token: no expiry",
        Reason::Lifetime(_) => "invalid token: lifetime not accepted",
        Reason::Claim(_) => "invalid token: claim not accepted",
        Reason::JwksUnavailable(_) => "invalid token: keys unavailable",
        Reason::Missing | Reason::Conflicting(..) => "invalid token",
    };
    Violation {
        code: close::TOKEN_INVALID,
        reason,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthKind {
    Auth,
    Refresh,
}

impl AuthKind {
    fn name(self) -> &'static str {
        match self {
            AuthKind::Auth => "auth",
            AuthKind::Refresh => "refresh",
        }
    }
}

type Verifying =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Verified, Reason>> + Send>>;

/// An `auth` or `refresh` being verified (it may wait for keys).
struct Pending {
    kind: AuthKind,
    id: Option<Id>,
    verifying: Verifying,
}

pub const SHUTTING_DOWN: Violation = Violation {
    code: close::GOING_AWAY,
    reason: "server shutting down",
};

const READ_CHUNK: usize = 8192;

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Session<'a> {
    ctx: &'a Context,
    metrics: &'a Metrics,
    client: Arc<Client>,
    access: Access,
    /// The policy and grants this session's subscriptions were decided by.
    rules: Arc<Rules>,
    policy_rx: watch::Receiver<Arc<Rules>>,
    /// When the identity stops being valid, and why.
    valid_until: Option<(Instant, Bound)>,
    /// When to send `expiring` (once per identity).
    warn_at: Option<Instant>,
    /// False until an in-band `auth` succeeds (a connection that arrived
    /// without identity while a verifier is configured).
    authenticated: bool,
    /// When a connection without identity is closed if it has not
    /// authenticated.
    auth_deadline: Option<Instant>,
    pending: Option<Pending>,
    parser: Parser,
    subs: Vec<Pattern>,
    /// The client sent its close frame, hung up, or broke the protocol (so
    /// its close is not waited for).
    peer_closed: bool,
    awaiting_pong: bool,
    last_activity: Instant,
    bucket: Bucket,
}

/// The outcome of the pending verification (never for `None`; the
/// caller's guard keeps that branch off).
async fn verified(p: &mut Option<Pending>) -> (AuthKind, Option<Id>, Result<Verified, Reason>) {
    match p {
        Some(p) => {
            let r = p.verifying.as_mut().await;
            (p.kind, p.id.clone(), r)
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `at` (forever for `None`; the caller's guard keeps that
/// branch off).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Serves one upgraded connection until it closes. `leftover` holds bytes
/// the HTTP layer read past the upgrade request. `needs_auth`: the
/// connection arrived without identity and must send `auth` first.
pub async fn run(
    stream: TcpStream,
    leftover: Vec<u8>,
    access: Access,
    needs_auth: bool,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    usage: Option<Arc<crate::usage::agg::StreamUsage>>,
) {
    let metrics = &ctx.hub.metrics;
    let now = Instant::now();
    let stream = Arc::new(stream);
    let client = ctx.hub.client();
    let mut policy_rx = ctx.watch_policy(client.id);
    // The newest policy, even while its wave is still to be handed it
    // (that hand-over then decides again with the same policy).
    policy_rx.borrow_and_update();
    let rules = ctx.rules();
    let mut s = Session {
        ctx: &ctx,
        metrics,
        client,
        access,
        rules,
        policy_rx,
        valid_until: None,
        warn_at: None,
        authenticated: !needs_auth,
        auth_deadline: needs_auth.then(|| now + ctx.cfg.auth_timeout),
        pending: None,
        parser: Parser::new(ctx.cfg.max_message_bytes),
        subs: Vec::new(),
        peer_closed: false,
        awaiting_pong: false,
        last_activity: now,
        bucket: Bucket {
            tokens: ctx.cfg.client_burst,
            at: now,
        },
    };
    if !needs_auth {
        s.set_deadlines();
    }
    s.client.attach(stream.clone());
    if let Some(u) = usage {
        s.client.count_for(u);
    }
    if !leftover.is_empty() {
        s.input(&leftover);
    }
    drop(leftover);
    s.serve(&stream, &shutdown).await;
    s.unsubscribe_all();
    // Whatever is still queued is not going out.
    s.client.drain(metrics);
}

/// A connection's place in the shutdown's close window, in [0, 1): its id
/// scrambled (Fibonacci hashing), so consecutive ids land far apart and
/// the closes spread evenly whatever order the connections came in.
fn spread_share(id: u64) -> f64 {
    let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    // 53 bits: exact in an f64.
    h as f64 / (1u64 << 53) as f64
}

impl Session<'_> {
    async fn serve(&mut self, stream: &TcpStream, shutdown: &CancellationToken) {
        let period = self.ctx.cfg.ping_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut close_deadline: Option<Instant> = None;
        let mut shutting_down = false;
        // When this connection closes for the shutdown (its share of
        // `close_spread`).
        let mut shutdown_at: Option<Instant> = None;
        loop {
            if self.flush() == Flushed::Broken {
                return;
            }
            if self.client.close_requested() {
                let (_, sent) = self.client.closing();
                if sent && self.peer_closed {
                    return;
                }
                // Once a close is due, the connection gets `close_timeout`
                // to flush and hear back, whether or not the client reads.
                if close_deadline.is_none() {
                    close_deadline = Some(Instant::now() + self.ctx.cfg.close_timeout);
                    self.unsubscribe_all();
                }
            }
            let deadline = close_deadline.unwrap_or_else(|| Instant::now() + period * 4);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    let offset = self.ctx.cfg.close_spread.mul_f64(spread_share(self.client.id));
                    shutdown_at = Some(Instant::now() + offset);
                }
                _ = sleep_until_some(shutdown_at), if shutdown_at.is_some() && close_deadline.is_none() => {
                    shutdown_at = None;
                    self.metrics.closes.shutdown.inc();
                    self.client.close(SHUTTING_DOWN, self.metrics);
                }
                r = stream.readable(), if !self.peer_closed => {
                    if r.is_err() || !self.read(stream) {
                        return;
                    }
                }
                r = stream.writable(), if self.client.blocked() => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = self.client.notified() => {}
                r = self.policy_rx.changed(), if close_deadline.is_none() => {
                    if r.is_ok() {
                        self.reevaluate();
                    }
                }
                _ = sleep_until_some(self.warn_at), if self.warn_at.is_some() && close_deadline.is_none() => {
                    self.warn();
                }
                _ = sleep_until_some(self.valid_until.map(|v| v.0)), if self.valid_until.is_some() && close_deadline.is_none() => {
                    self.expire();
                }
                (kind, id, r) = verified(&mut self.pending), if self.pending.is_some() => {
                    self.pending = None;
                    self.on_verified(kind, id.as_ref(), r);
                }
                _ = sleep_until_some(self.auth_deadline), if self.auth_deadline.is_some() && close_deadline.is_none() => {
                    self.auth_deadline = None;
                    if let Some(v) = &self.ctx.verifier {
                        v.metrics.outcome("auth", "timeout");
                    }
                    self.client.abort(AUTH_TIMEOUT, self.metrics);
                }
                _ = tick.tick() => self.tick(),
                _ = tokio::time::sleep_until(deadline), if close_deadline.is_some() => return,
            }
        }
    }

    /// The timers of the identity in force: its end, and the warning
    /// `expiry_warning` before it.
    fn set_deadlines(&mut self) {
        let clock = &self.ctx.clock;
        self.valid_until = self
            .access
            .valid_until
            .map(|(at, why)| (clock.instant_at(at), why));
        self.warn_at = self.valid_until.map(|(at, _)| {
            at.checked_sub(self.ctx.cfg.expiry_warning)
                .unwrap_or_else(Instant::now)
        });
    }

    /// Tells the client how long its identity has left.
    fn warn(&mut self) {
        self.warn_at = None;
        let Some((at, _)) = self.valid_until else {
            return;
        };
        let left = at.saturating_duration_since(Instant::now());
        // Whole seconds, rounded up: "in 0" only at the very end.
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        self.metrics.expiry_warnings.inc();
        self.client.reply(protocol::expiring(secs), &self.ctx.hub);
    }

    /// The identity is no longer valid: nothing more is delivered, what is
    /// queued is dropped, and the connection closes with 4001.
    fn expire(&mut self) {
        let why = self.valid_until.take().map(|v| v.1);
        self.warn_at = None;
        self.unsubscribe_all();
        let v = match why {
            Some(Bound::Lifetime) => {
                self.metrics.closes.lifetime.inc();
                LIFETIME_EXCEEDED
            }
            _ => {
                self.metrics.closes.expired.inc();
                TOKEN_EXPIRED
            }
        };
        self.client.abort(v, self.metrics);
    }

    /// Decides every subscription again (the policy, the caller's grants
    /// or the identity changed): what is no longer allowed ends with `unsubscribed`
    /// (`reason: revoked`, the deciding rule), and nothing of it is
    /// delivered after that frame.
    fn reevaluate(&mut self) {
        if self.take_rules() {
            self.decide_again();
        }
    }

    /// Takes the rules in force; whether the subscriptions need deciding
    /// again (not when only other callers' grants changed).
    fn take_rules(&mut self) -> bool {
        // The newest rules, which may be ahead of what the wave handed on.
        self.policy_rx.borrow_and_update();
        let rules = self.ctx.rules();
        if Arc::ptr_eq(&rules, &self.rules) {
            return true;
        }
        let new = &rules.policy;
        let old = &self.rules.policy;
        let same_policy = Arc::ptr_eq(new, old);
        if !same_policy
            && (new.claim_roots() != old.claim_roots() || new.uses_claims() != old.uses_claims())
        {
            // A policy that reads other claims needs them decoded again.
            self.access.identity.claims = match (&self.access.payload, new.uses_claims()) {
                (Some(raw), true) => {
                    decode_claims(raw, new.claim_roots()).unwrap_or(serde_json::Value::Null)
                }
                _ => serde_json::Value::Null,
            };
        }
        // Only the grants changed: nothing to decide unless this caller's
        // (its tenant's or its own) did.
        let unchanged = same_policy && {
            let id = &self.access.identity;
            let holders = [
                id.tenant.clone().map(Holder::Tenant),
                id.subject.clone().map(Holder::Subject),
            ];
            holders.iter().flatten().all(|h| {
                match (self.rules.grants.holder(h), rules.grants.holder(h)) {
                    (None, None) => true,
                    (Some(a), Some(b)) => crate::grants::live::same_grants(a, b),
                    _ => false,
                }
            })
        };
        self.rules = rules;
        !unchanged
    }

    /// Decides every subscription with the policy and identity in force.
    fn decide_again(&mut self) {
        let started = std::time::Instant::now();
        let mut revoked: Vec<(String, Vec<Pattern>)> = Vec::new();
        let mut kept = Vec::with_capacity(self.subs.len());
        for p in std::mem::take(&mut self.subs) {
            let d = self.rules.evaluate(
                &self.access.identity,
                &Request::Channel {
                    pattern: &p,
                    action: ChannelAction::Subscribe,
                },
            );
            if d.allowed {
                kept.push(p);
            } else {
                match revoked.iter_mut().find(|(rule, _)| *rule == d.rule) {
                    Some((_, list)) => list.push(p),
                    None => revoked.push((d.rule.to_string(), vec![p])),
                }
            }
        }
        self.subs = kept;
        for (rule, patterns) in revoked {
            self.metrics.revoked(&rule, patterns.len() as u64);
            // Once out of the index no publish reaches this client through
            // these patterns; what was queued before goes out before the frame.
            self.ctx.hub.unsubscribe(self.client.id, &patterns);
            let names: Vec<String> = patterns.iter().map(|p| p.as_str().to_string()).collect();
            self.client
                .reply(protocol::revoked(&names, &rule), &self.ctx.hub);
        }
        self.metrics
            .reevaluation
            .observe(started.elapsed().as_secs_f64());
    }

    fn flush(&self) -> Flushed {
        self.client.flush(self.metrics, false)
    }

    fn unsubscribe_all(&mut self) {
        if !self.subs.is_empty() {
            self.ctx.hub.unsubscribe(self.client.id, &self.subs);
            self.subs.clear();
        }
    }

    /// Closes at once for a broken protocol or limit: what is queued is
    /// dropped, the close frame goes out, the client is not waited for.
    fn violation(&mut self, v: Violation) {
        if v.code == close::PROTOCOL_ERROR
            || v.code == close::INVALID_PAYLOAD
            || v.code == close::TOO_BIG
            || v.code == close::UNSUPPORTED_DATA
        {
            self.metrics.closes.protocol_error.inc();
        }
        // RFC 6455 §7.1.7: after a violation, hang up once the close is out.
        self.peer_closed = true;
        self.client.abort(v, self.metrics);
    }

    /// Reads what is there; false when the connection is over.
    fn read(&mut self, stream: &TcpStream) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => {
                    self.peer_closed = true;
                    return false;
                }
                Ok(n) => {
                    self.input(&buf[..n]);
                    if self.peer_closed || n < buf.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    fn input(&mut self, data: &[u8]) {
        let mut parser = std::mem::replace(&mut self.parser, Parser::new(0));
        let r = parser.feed(data, |m| self.on_message(m));
        self.parser = parser;
        if let Err(v) = r {
            self.violation(v);
        }
    }

    fn on_message(&mut self, m: Incoming) -> Result<(), Violation> {
        if self.client.close_requested() {
            // After our close frame only the client's close matters.
            if matches!(m, Incoming::Close(_)) {
                self.peer_closed = true;
            }
            return Ok(());
        }
        match m {
            Incoming::Pong => {
                self.awaiting_pong = false;
                Ok(())
            }
            Incoming::Ping(payload) => {
                self.spend()?;
                self.client.reply(ws::pong(&payload), &self.ctx.hub);
                Ok(())
            }
            Incoming::Close(code) => {
                self.peer_closed = true;
                let code = match code {
                    Some((c, _)) if c != close::NORMAL && c != close::GOING_AWAY => close::NORMAL,
                    Some((c, _)) => c,
                    None => close::NORMAL,
                };
                self.client
                    .close(Violation { code, reason: "" }, self.metrics);
                Ok(())
            }
            Incoming::Binary(_) => Err(Violation {
                code: close::UNSUPPORTED_DATA,
                reason: "binary messages are not supported",
            }),
            Incoming::Text(text) => {
                self.spend()?;
                self.last_activity = Instant::now();
                self.on_text(&text);
                Ok(())
            }
        }
    }

    /// Takes a token from the client's message budget.
    fn spend(&mut self) -> Result<(), Violation> {
        let now = Instant::now();
        let cfg = &self.ctx.cfg;
        let b = &mut self.bucket;
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * cfg.client_rate).min(cfg.client_burst);
        b.at = now;
        if b.tokens < 1.0 {
            self.metrics.closes.rate_limited.inc();
            return Err(Violation {
                code: close::POLICY_VIOLATION,
                reason: "too many messages",
            });
        }
        b.tokens -= 1.0;
        Ok(())
    }

    fn error(&self, id: Option<&Id>, code: &str, message: &str, channel: Option<&str>) {
        self.metrics.client_errors.inc();
        self.client
            .reply(protocol::error(id, code, message, channel), &self.ctx.hub);
    }

    fn on_text(&mut self, text: &[u8]) {
        let msg = match protocol::parse(text) {
            Ok(m) => m,
            Err(r) => return self.error(r.id.as_ref(), r.code, &r.message, None),
        };
        if !self.authenticated {
            match msg {
                ClientMessage::Auth { .. } | ClientMessage::Ping { .. } => {}
                ClientMessage::Subscribe { id, .. }
                | ClientMessage::Unsubscribe { id, .. }
                | ClientMessage::Refresh { id, .. } => {
                    return self.error(
                        id.as_ref(),
                        "unauthenticated",
                        "send {\"type\":\"auth\",\"token\":\"<jwt>\"} first",
                        None,
                    )
                }
            }
        }
        match msg {
            ClientMessage::Auth { id, token } => self.start_verify(AuthKind::Auth, id, token),
            ClientMessage::Refresh { id, token } => self.start_verify(AuthKind::Refresh, id, token),
            ClientMessage::Ping { id } => self
                .client
                .reply(protocol::pong(id.as_ref()), &self.ctx.hub),
            ClientMessage::Subscribe {
                id,
                channels,
                since,
            } => self.subscribe(id.as_ref(), &channels, since.as_ref()),
            ClientMessage::Unsubscribe { id, channels } => {
                let mut gone = Vec::new();
                for name in &channels {
                    match Pattern::parse(name) {
                        Ok(p) => {
                            if let Some(i) = self.subs.iter().position(|s| *s == p) {
                                gone.push(self.subs.swap_remove(i));
                            }
                        }
                        Err(e) => {
                            self.error(id.as_ref(), "invalid_channel", &e.to_string(), Some(name))
                        }
                    }
                }
                self.ctx.hub.unsubscribe(self.client.id, &gone);
                let names: Vec<String> = gone.iter().map(|p| p.as_str().to_string()).collect();
                self.client
                    .reply(protocol::unsubscribed(id.as_ref(), &names), &self.ctx.hub);
            }
        }
    }

    /// Starts verifying an `auth` or `refresh` token.
    fn start_verify(&mut self, kind: AuthKind, id: Option<Id>, token: String) {
        let Some(verifier) = self.ctx.verifier.clone() else {
            return self.error(
                id.as_ref(),
                "unsupported",
                "this server does not verify tokens in-band",
                None,
            );
        };
        if kind == AuthKind::Auth && self.authenticated {
            return self.error(id.as_ref(), "bad_request", "already authenticated", None);
        }
        if self.pending.is_some() {
            return self.error(
                id.as_ref(),
                "bad_request",
                "an auth or refresh is being verified",
                None,
            );
        }
        let verifying: Verifying = Box::pin(async move { verifier.verify(&token).await });
        self.pending = Some(Pending {
            kind,
            id,
            verifying,
        });
    }

    /// An `auth` or `refresh` verified (or not).
    fn on_verified(&mut self, kind: AuthKind, id: Option<&Id>, r: Result<Verified, Reason>) {
        if self.client.close_requested() {
            return;
        }
        let metrics = self.ctx.verifier.as_ref().map(|v| v.metrics.clone());
        let count = |result: &str| {
            if let Some(m) = &metrics {
                m.outcome(kind.name(), result);
            }
        };
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                count(e.code());
                tracing::info!("ws: {} refused: {e}", kind.name());
                self.unsubscribe_all();
                self.client.abort(refused(&e), self.metrics);
                return;
            }
        };
        let access = self.access_of(&v);
        if kind == AuthKind::Refresh
            && (access.identity.subject != self.access.identity.subject
                || access.identity.issuer != self.access.identity.issuer)
        {
            count("identity_changed");
            self.unsubscribe_all();
            self.client.abort(IDENTITY_CHANGED, self.metrics);
            return;
        }
        count("accepted");
        self.access = access;
        self.authenticated = true;
        self.auth_deadline = None;
        self.set_deadlines();
        let frame = match kind {
            AuthKind::Auth => "authenticated",
            AuthKind::Refresh => "refreshed",
        };
        self.client.reply(
            protocol::identity_accepted(frame, id, self.access.expires),
            &self.ctx.hub,
        );
        if kind == AuthKind::Refresh {
            // The new claims decide every subscription at once, by the
            // rules in force.
            self.take_rules();
            self.decide_again();
        }
    }

    /// The identity a verified token stands for, as the auth filter's
    /// headers would have described it.
    fn access_of(&self, v: &Verified) -> Access {
        let o = self
            .ctx
            .verifier
            .as_ref()
            .map(|x| x.settings().output.clone())
            .unwrap_or_default();
        let header = |name: &str| {
            v.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, val)| val.clone())
        };
        let payload = serde_json::to_vec(&v.claims).ok().map(bytes::Bytes::from);
        let policy = &self.rules.policy;
        let claims = match (&payload, policy.uses_claims()) {
            (Some(raw), true) => {
                decode_claims(raw, policy.claim_roots()).unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        };
        let identity = entitlements_core::identity::Identity {
            subject: header(&o.subject_header),
            issuer: header(&o.issuer_header),
            tenant: header(&o.tenant_header),
            roles: header(&o.roles_header)
                .map(|r| entitlements_core::identity::Identity::parse_roles(&r))
                .unwrap_or_default(),
            claims,
        };
        Access::new(
            identity,
            payload,
            v.expires,
            Duration::from_secs(v.skew),
            self.ctx.cfg.max_lifetime,
            self.ctx.clock.now_secs(),
        )
    }

    fn subscribe(&mut self, id: Option<&Id>, channels: &[String], since: Option<&protocol::Since>) {
        if self.policy_rx.has_changed().unwrap_or(false)
            || !Arc::ptr_eq(&self.ctx.rules(), &self.rules)
        {
            // Decide new subscriptions and old ones by the same rules, the
            // ones in force (ahead of this connection's wave).
            self.reevaluate();
        }
        let mut granted: Vec<Pattern> = Vec::new();
        let mut added = 0;
        for name in channels {
            let p = match Pattern::parse(name) {
                Ok(p) => p,
                Err(e) => {
                    self.error(id, "invalid_channel", &e.to_string(), Some(name));
                    continue;
                }
            };
            if granted.contains(&p) {
                continue;
            }
            let new = !self.subs.contains(&p);
            if new && self.subs.len() + added >= self.ctx.cfg.max_subscriptions {
                self.error(
                    id,
                    "too_many_subscriptions",
                    &format!(
                        "a connection may hold at most {} subscriptions",
                        self.ctx.cfg.max_subscriptions
                    ),
                    Some(name),
                );
                continue;
            }
            let d = self.rules.evaluate(
                &self.access.identity,
                &Request::Channel {
                    pattern: &p,
                    action: ChannelAction::Subscribe,
                },
            );
            if !d.allowed {
                self.metrics.subscribe_denied.inc();
                self.error(
                    id,
                    "forbidden",
                    &format!("not entitled to {name} (rule {})", d.rule),
                    Some(name),
                );
                continue;
            }
            if new {
                added += 1;
            }
            granted.push(p);
        }
        if granted.is_empty() {
            return;
        }
        self.ctx.hub.subscribe(&self.client, id, &granted, since);
        for p in granted {
            if !self.subs.contains(&p) {
                self.subs.push(p);
            }
        }
    }

    fn tick(&mut self) {
        if self.client.close_requested() {
            return;
        }
        let cfg = &self.ctx.cfg;
        if self.awaiting_pong {
            self.metrics.closes.ping_timeout.inc();
            self.client.close(
                Violation {
                    code: close::POLICY_VIOLATION,
                    reason: "ping timeout",
                },
                self.metrics,
            );
            return;
        }
        if !cfg.idle_timeout.is_zero() && self.last_activity.elapsed() >= cfg.idle_timeout {
            self.metrics.closes.idle.inc();
            self.client.close(
                Violation {
                    code: close::NORMAL,
                    reason: "idle timeout",
                },
                self.metrics,
            );
            return;
        }
        self.awaiting_pong = true;
        self.client.reply(ws::ping(b""), &self.ctx.hub);
    }
}
