//! The rate limit service's buckets in Redis, through the `redis` crate:
//! one server, a master found through Sentinel, or a Cluster.
//!
//! Each bucket is one key (so in a Cluster one slot), updated by one Lua
//! script ([`GCRA_BATCH`], atomic in Redis, one round trip). The script is sent by
//! its SHA1 (`EVALSHA`) and loaded again when a server answers `NOSCRIPT`
//! (a restarted or failed-over server).
//!
//! Connections are multiplexed: concurrent calls share a connection and
//! are pipelined on it. On a single server or a Sentinel master, hits are
//! also batched: each connection has one script call in flight, and the
//! hits that arrive meanwhile go together in its next one ([`GCRA_BATCH`]);
//! a lone hit is sent by its caller directly. A single server or a Sentinel master is reached
//! through `--redis-connections` of them, used in turn. A connection that
//! fails (I/O, timeout, `READONLY` from a demoted master) is dropped; the
//! next call connects again, at most every [`RECONNECT_BACKOFF`] per
//! connection, asking the sentinels for the master each time, so a failover
//! is followed as soon as the sentinels have promoted a replica. Calls
//! meanwhile fail at once (the service answers `UNAVAILABLE`). A Cluster
//! connection follows slot moves and node restarts itself.

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, Script, TlsMode};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedMutexGuard};

/// GCRA over each key of the call, in order: a key holds its bucket's
/// theoretical arrival time (µs, Redis' own clock, so replicas need not
/// agree on time). KEYS[i] with ARGV[3i-2..3i]: the emission interval
/// (µs), the burst (the limit), the hits (negative: given back). Each key's
/// answer is its own array: {admitted, remaining, µs until the bucket is
/// full again, µs until one more request is admitted}, or `{message}` when
/// that key failed (a key of another type, say), so one bad bucket does
/// not fail the others. One `TIME` for all of them. A Cluster's calls
/// carry one key (one slot).
const GCRA_BATCH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, interval, burst, hits)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local window = interval * burst
  local new_tat = tat + interval * hits
  if new_tat < now then new_tat = now end
  local ahead = new_tat - now
  if ahead <= window then
    if hits ~= 0 then
      if ahead > 0 then
        redis.call('SET', key, new_tat, 'PX', math.ceil(ahead / 1000) + 1)
      else
        redis.call('DEL', key)
      end
    end
    local wait = 0
    if ahead + interval > window then wait = ahead + interval - window end
    return {1, math.floor((window - ahead) / interval), ahead, wait}
  end
  local full = tat - now
  return {0, math.floor((window - full) / interval), full, ahead - window}
end
local out = {}
for i = 1, #KEYS do
  local ok, r = pcall(gcra, KEYS[i], tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]),
    tonumber(ARGV[3 * i]))
  if ok then
    out[i] = r
  elseif type(r) == 'table' and r.err then
    out[i] = {tostring(r.err)}
  else
    out[i] = {tostring(r)}
  end
end
return out
"#;

/// Least time between two connection attempts of one connection slot.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// Where the buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// One server (`--redis redis://host:6379/0`).
    Single,
    /// A master found through Sentinel (`--redis 'mymaster,sentinel-0:26379,sentinel-1:26379'`).
    Sentinel,
    /// A Redis Cluster (`--redis 'node-0:6379,node-1:6379'`, seed nodes).
    Cluster,
}

/// How to reach Redis.
#[derive(Clone)]
pub struct Settings {
    pub topology: Topology,
    /// `--redis`, as described for each [`Topology`]. Entries are
    /// `host:port` or `redis://` / `rediss://` URLs (user, password,
    /// database).
    pub url: String,
    /// `--redis-auth`: `password` or `user:password` for the data nodes
    /// when their URL has none (for Sentinel: the master's).
    pub auth: Option<String>,
    /// `--redis-tls`: the master found through Sentinel is reached with TLS.
    pub sentinel_master_tls: bool,
    /// `--redis-db`: the master's database (Sentinel).
    pub sentinel_master_db: i64,
    /// `--redis-ca`: PEM roots for `rediss://` instead of the system's.
    pub ca_file: Option<String>,
    pub connections: usize,
    /// `--redis-batch`: most hits one script call carries (1: one call per
    /// hit). Hits waiting for a connection go together in its next call.
    pub batch: usize,
    /// `--redis-queue`: most hits waiting per connection; beyond, a hit
    /// fails at once (`queue_full`).
    pub queue: usize,
    pub connect_timeout: Duration,
    /// Longest wait for one reply.
    pub timeout: Duration,
    pub prefix: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            topology: Topology::Single,
            url: "127.0.0.1:6379".into(),
            auth: None,
            sentinel_master_tls: false,
            sentinel_master_db: 0,
            ca_file: None,
            connections: 2,
            batch: 64,
            queue: 4096,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            prefix: "rl:".into(),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("topology", &self.topology)
            .field("url", &crate::config::redact_url(&self.url))
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("connections", &self.connections)
            .field("batch", &self.batch)
            .field("queue", &self.queue)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A failed Redis call, as the log and the gRPC status show it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis {what}: {reason}")]
    Redis { what: String, reason: String },
    #[error("redis: not connected ({0}); reconnecting")]
    Reconnecting(String),
    #[error("redis: no reply within {0:?}")]
    Timeout(Duration),
    #[error("redis: the script answered {0}")]
    Reply(String),
    #[error("redis: {0} hits already wait for this connection (--redis-queue)")]
    QueueFull(usize),
}

impl StoreError {
    /// The metric label of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Redis { .. } => "error",
            StoreError::Reconnecting(_) => "not_connected",
            StoreError::Timeout(_) => "timeout",
            StoreError::Reply(_) => "bad_reply",
            StoreError::QueueFull(_) => "queue_full",
        }
    }
}

/// What one bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub admitted: bool,
    /// Requests left now (after this hit when admitted).
    pub remaining: u32,
    /// Until the bucket is full again.
    pub until_full: Duration,
    /// Until one more request would be admitted (zero when it would now).
    pub until_next: Duration,
}

enum Resolver {
    Node(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

#[derive(Clone)]
enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

#[derive(Default)]
struct Connecting {
    /// A connect task runs.
    running: bool,
    /// When the last attempt failed, and why.
    failed: Option<(Instant, String)>,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Conn>>,
    state: Mutex<Connecting>,
    /// Woken when a connect task ends.
    done: tokio::sync::Notify,
}

/// How to make a connection; shared with the connect tasks.
struct Connector {
    resolver: Option<Resolver>,
    cluster: Option<redis::cluster::ClusterClient>,
    conn_config: AsyncConnectionConfig,
    /// Bound on one attempt (Sentinel lookup, connect, handshake).
    bound: Duration,
    describe: String,
}

/// The connections, shared with the connect and batch tasks.
struct Shared {
    connector: Arc<Connector>,
    slots: Arc<Vec<Slot>>,
    timeout: Duration,
    /// [`GCRA_BATCH`].
    script: Script,
}

/// One hit waiting for its connection's next script call.
struct Job {
    key: String,
    args: [i64; 3],
    reply: oneshot::Sender<Result<[i64; 4], StoreError>>,
}

/// One connection's waiting hits and its one call in flight.
#[derive(Default)]
struct Lane {
    waiting: Mutex<VecDeque<Job>>,
    /// Held by whoever sends this connection's script call.
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// The buckets.
pub struct Store {
    shared: Arc<Shared>,
    next: AtomicUsize,
    prefix: String,
    /// Per connection slot, the hits waiting for its next script call;
    /// empty for a Cluster, whose calls go one by one (the keys of one
    /// call must share a slot).
    lanes: Vec<Arc<Lane>>,
    batch: usize,
    queue: usize,
}

fn with_scheme(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("redis://{s}")
    }
}

fn split_auth(auth: &str) -> (Option<&str>, &str) {
    match auth.split_once(':') {
        Some((user, pass)) => (Some(user), pass),
        None => (None, auth),
    }
}

fn info(entry: &str, auth: Option<&str>) -> Result<redis::ConnectionInfo, String> {
    let url = with_scheme(entry.trim());
    let mut info = url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("{}: {e}", crate::config::redact_url(&url)))?;
    if let Some(auth) = auth {
        if info.redis_settings().password().is_none() {
            let (user, pass) = split_auth(auth);
            let mut r = info.redis_settings().clone().set_password(pass);
            if let Some(u) = user {
                r = r.set_username(u);
            }
            info = info.set_redis_settings(r);
        }
    }
    Ok(info)
}

impl Store {
    /// Checks the settings; connects on the first call.
    pub fn new(s: &Settings) -> Result<Store, String> {
        let certs = match &s.ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(
                    std::fs::read(path).map_err(|e| format!("--redis-ca {path}: {e}"))?,
                ),
            }),
            None => None,
        };
        let entries: Vec<&str> = s
            .url
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let auth = s.auth.as_deref().filter(|a| !a.is_empty());
        let (resolver, cluster, describe) = match s.topology {
            Topology::Single => {
                let [one] = entries[..] else {
                    return Err(format!(
                        "--redis: one server for --redis-type single, got {}",
                        entries.len()
                    ));
                };
                let i = info(one, auth)?;
                let describe = i.addr().to_string();
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(i, c),
                    None => redis::Client::open(i),
                }
                .map_err(|e| format!("--redis: {e}"))?;
                (Some(Resolver::Node(client)), None, describe)
            }
            Topology::Sentinel => {
                let Some((master, sentinels)) = entries.split_first() else {
                    return Err(
                        "--redis: for --redis-type sentinel: 'master-name,sentinel:port,...'"
                            .into(),
                    );
                };
                if sentinels.is_empty() || master.contains(':') {
                    return Err(format!(
                        "--redis: for --redis-type sentinel the master's name comes first, then the sentinels: 'mymaster,sentinel-0:26379,...' (got {:?})",
                        crate::config::redact_url(&s.url)
                    ));
                }
                let infos = sentinels
                    .iter()
                    .map(|e| info(e, None))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut r = redis::RedisConnectionInfo::default().set_db(s.sentinel_master_db);
                if let Some(a) = auth {
                    let (user, pass) = split_auth(a);
                    r = r.set_password(pass);
                    if let Some(u) = user {
                        r = r.set_username(u);
                    }
                }
                let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(r);
                if s.sentinel_master_tls {
                    node = node.set_tls_mode(TlsMode::Secure);
                }
                let describe = format!("master {master} via {} sentinels", infos.len());
                let client =
                    SentinelClient::build(infos, *master, Some(node), SentinelServerType::Master)
                        .map_err(|e| format!("--redis: {e}"))?;
                (
                    Some(Resolver::Sentinel(tokio::sync::Mutex::new(client))),
                    None,
                    describe,
                )
            }
            Topology::Cluster => {
                if entries.is_empty() {
                    return Err("--redis: for --redis-type cluster: at least one node".into());
                }
                let infos = entries
                    .iter()
                    .map(|e| info(e, auth))
                    .collect::<Result<Vec<_>, _>>()?;
                let describe = format!("cluster of {} seed nodes", infos.len());
                let mut b = redis::cluster::ClusterClientBuilder::new(infos)
                    .connection_timeout(s.connect_timeout)
                    .response_timeout(s.timeout);
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                let client = b.build().map_err(|e| format!("--redis: {e}"))?;
                (None, Some(client), describe)
            }
        };
        let n = if s.topology == Topology::Cluster {
            1
        } else {
            s.connections.max(1)
        };
        let batched = s.topology != Topology::Cluster && s.batch > 1;
        Ok(Store {
            shared: Arc::new(Shared {
                connector: Arc::new(Connector {
                    resolver,
                    cluster,
                    // No response timeout here: each call has its own budget
                    // (`run`), and a connection that misses one is dropped.
                    conn_config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(s.connect_timeout))
                        .set_response_timeout(None),
                    // The Sentinel lookup, the connect, the handshake.
                    bound: s.connect_timeout * 3,
                    describe,
                }),
                slots: Arc::new((0..n).map(|_| Slot::default()).collect()),
                timeout: s.timeout,
                script: Script::new(GCRA_BATCH),
            }),
            next: AtomicUsize::new(0),
            prefix: s.prefix.clone(),
            lanes: if batched {
                (0..n).map(|_| Arc::new(Lane::default())).collect()
            } else {
                Vec::new()
            },
            batch: s.batch.max(1),
            queue: s.queue.max(1),
        })
    }

    /// What the store is connected to, for logs.
    pub fn describe(&self) -> &str {
        &self.shared.connector.describe
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The longest wait for one reply.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Runs `script` (EVALSHA, loading it on NOSCRIPT) on one key, within
    /// `budget` (at most the reply timeout), on a connection of its own
    /// (not batched).
    pub async fn run(
        &self,
        script: &Script,
        key: &str,
        args: &[i64],
        budget: Option<Duration>,
    ) -> Result<redis::Value, StoreError> {
        let sh = &self.shared;
        let budget = budget.map_or(sh.timeout, |b| b.min(sh.timeout));
        let i = self.next_slot();
        let started = Instant::now();
        let conn = sh.conn(i, budget).await?;
        let budget = budget.saturating_sub(started.elapsed());
        let mut inv = script.key(key);
        for a in args {
            inv.arg(*a);
        }
        let call = async {
            match conn {
                Conn::Node(mut c) => inv.invoke_async::<redis::Value>(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async::<redis::Value>(&mut c).await,
            }
        };
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                sh.drop_conn(i, &e);
                Err(StoreError::Redis {
                    what: "script".into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                sh.forget(i);
                Err(StoreError::Timeout(budget))
            }
        }
    }

    fn next_slot(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.shared.slots.len().max(1)
    }

    /// `hits` on the bucket `key` of `requests` per `per`.
    pub async fn hit(
        &self,
        key: &str,
        requests: u32,
        per: Duration,
        hits: i64,
        budget: Option<Duration>,
    ) -> Result<Hit, StoreError> {
        let per_us = u64::try_from(per.as_micros()).unwrap_or(u64::MAX);
        let interval =
            i64::try_from((per_us / u64::from(requests.max(1))).max(1)).unwrap_or(i64::MAX);
        let args = [interval, i64::from(requests), hits];
        let [admitted, remaining, full, next] = if self.lanes.is_empty() {
            match self.run(&self.shared.script, key, &args, budget).await? {
                redis::Value::Array(items) if items.len() == 1 => four(&items[0])?,
                other => return Err(StoreError::Reply(format!("{other:?}"))),
            }
        } else {
            self.queued(key, args, budget).await?
        };
        let us = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
        Ok(Hit {
            admitted: admitted == 1 && requests > 0,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            until_full: us(full),
            until_next: us(next),
        })
    }

    /// A hit through its connection's lane: it waits with the others for
    /// the connection's next script call. A caller that finds the
    /// connection idle sends the call: alone (nothing else waits), itself,
    /// without a task hop; with others, from a task, so that its own
    /// deadline cannot cut the others' call short. Whoever ends a call
    /// looks again and sends what has gathered meanwhile.
    async fn queued(
        &self,
        key: &str,
        args: [i64; 3],
        budget: Option<Duration>,
    ) -> Result<[i64; 4], StoreError> {
        let budget = budget.map_or(self.shared.timeout, |b| b.min(self.shared.timeout));
        let i = self.next_slot();
        let Some(lane) = self.lanes.get(i) else {
            return Err(StoreError::Reconnecting("no connection slot".into()));
        };
        let (reply, mut answer) = oneshot::channel();
        {
            let mut w = lock(&lane.waiting);
            if w.len() >= self.queue {
                return Err(StoreError::QueueFull(self.queue));
            }
            w.push_back(Job {
                key: key.to_string(),
                args,
                reply,
            });
        }
        let work = async {
            if let Ok(busy) = lane.busy.clone().try_lock_owned() {
                if let Ok(r) = answer.try_recv() {
                    // Sent with others' in the meantime.
                    drop(busy);
                    kick(lane, &self.shared, i, self.batch);
                    return r;
                }
                let jobs = take(lane, self.batch);
                if jobs.len() == 1 {
                    // Only this hit: sent here. Should this caller go
                    // (its deadline), the guard hands the lane on.
                    let mut guard = Handoff {
                        lane: lane.clone(),
                        shared: self.shared.clone(),
                        i,
                        max: self.batch,
                        busy: Some(busy),
                    };
                    let answers = self.shared.run_batch(i, &jobs).await;
                    hand_out(jobs, answers);
                    guard.release();
                } else if !jobs.is_empty() {
                    tokio::spawn(drain(
                        lane.clone(),
                        self.shared.clone(),
                        i,
                        self.batch,
                        busy,
                        jobs,
                    ));
                } else {
                    drop(busy);
                    kick(lane, &self.shared, i, self.batch);
                }
            }
            (&mut answer)
                .await
                .unwrap_or_else(|_| Err(StoreError::Reconnecting("the call was dropped".into())))
        };
        tokio::time::timeout(budget, work)
            .await
            .unwrap_or(Err(StoreError::Timeout(budget)))
    }

    /// One round trip to Redis (`PING`), for the health status.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let sh = &self.shared;
        let i = self.next_slot();
        let conn = sh.conn(i, sh.timeout).await?;
        let cmd = redis::cmd("PING");
        let call = async {
            match conn {
                Conn::Node(mut c) => c.req_packed_command(&cmd).await,
                Conn::Cluster(mut c) => c.req_packed_command(&cmd).await,
            }
        };
        match tokio::time::timeout(sh.timeout, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                sh.drop_conn(i, &e);
                Err(StoreError::Redis {
                    what: "PING".into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => Err(StoreError::Timeout(sh.timeout)),
        }
    }
}

/// The four numbers of one GCRA answer.
fn four(reply: &redis::Value) -> Result<[i64; 4], StoreError> {
    let bad = || StoreError::Reply(format!("{reply:?}"));
    let redis::Value::Array(items) = reply else {
        return Err(bad());
    };
    if let [redis::Value::BulkString(m)] = &items[..] {
        // The batch script's answer for a key that failed.
        return Err(StoreError::Redis {
            what: "script".into(),
            reason: String::from_utf8_lossy(m).into_owned(),
        });
    }
    let mut out = [0i64; 4];
    if items.len() != out.len() {
        return Err(bad());
    }
    for (o, v) in out.iter_mut().zip(items) {
        let redis::Value::Int(n) = v else {
            return Err(bad());
        };
        *o = *n;
    }
    Ok(out)
}

/// Up to `max` waiting hits of `lane` whose callers still wait.
fn take(lane: &Lane, max: usize) -> Vec<Job> {
    let mut w = lock(&lane.waiting);
    let mut jobs = Vec::with_capacity(max.min(w.len()));
    while jobs.len() < max {
        let Some(j) = w.pop_front() else { break };
        // Callers that gave up (their deadline passed) are not counted.
        if !j.reply.is_closed() {
            jobs.push(j);
        }
    }
    jobs
}

/// Gives each caller its answer.
fn hand_out(jobs: Vec<Job>, answers: Result<Vec<Result<[i64; 4], StoreError>>, StoreError>) {
    match answers {
        Ok(answers) => {
            for (j, a) in jobs.into_iter().zip(answers) {
                let _ = j.reply.send(a);
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
    }
}

/// After a call: when hits wait and nobody sends them, a task does.
fn kick(lane: &Arc<Lane>, shared: &Arc<Shared>, i: usize, max: usize) {
    if lock(&lane.waiting).is_empty() {
        return;
    }
    let Ok(busy) = lane.busy.clone().try_lock_owned() else {
        // Whoever holds it looks again when done.
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let jobs = take(lane, max);
    rt.spawn(drain(lane.clone(), shared.clone(), i, max, busy, jobs));
}

/// Sends `jobs`, then what gathered meanwhile, until nothing waits.
async fn drain(
    lane: Arc<Lane>,
    shared: Arc<Shared>,
    i: usize,
    max: usize,
    busy: OwnedMutexGuard<()>,
    mut jobs: Vec<Job>,
) {
    loop {
        if !jobs.is_empty() {
            let answers = shared.run_batch(i, &jobs).await;
            hand_out(std::mem::take(&mut jobs), answers);
        }
        jobs = take(&lane, max);
        if jobs.is_empty() {
            break;
        }
    }
    drop(busy);
    // A hit that came between the last look and the release.
    kick(&lane, &shared, i, max);
}

/// The lane of a caller that sends its own hit: released when done or when
/// the caller goes, and then handed on to what waits.
struct Handoff {
    lane: Arc<Lane>,
    shared: Arc<Shared>,
    i: usize,
    max: usize,
    busy: Option<OwnedMutexGuard<()>>,
}

impl Handoff {
    fn release(&mut self) {
        if let Some(busy) = self.busy.take() {
            drop(busy);
            kick(&self.lane, &self.shared, self.i, self.max);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.release();
    }
}

impl Shared {
    /// A connection of slot `i`: the open one, or the one a connect task
    /// makes within `budget`. The task is not bound to the caller: a
    /// connect slower than the callers' budgets still completes for the
    /// next ones. After a failed attempt, calls fail at once for
    /// [`RECONNECT_BACKOFF`].
    async fn conn(&self, i: usize, budget: Duration) -> Result<Conn, StoreError> {
        let Some(slot) = self.slots.get(i) else {
            return Err(StoreError::Reconnecting("no connection slot".into()));
        };
        if let Some(c) = lock(&slot.conn).clone() {
            return Ok(c);
        }
        let done = slot.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        {
            let mut st = lock(&slot.state);
            if let Some(c) = lock(&slot.conn).clone() {
                return Ok(c);
            }
            if !st.running {
                if let Some((at, why)) = &st.failed {
                    if at.elapsed() < RECONNECT_BACKOFF {
                        return Err(StoreError::Reconnecting(why.clone()));
                    }
                }
                st.running = true;
                let (connector, slots) = (self.connector.clone(), self.slots.clone());
                tokio::spawn(async move { connect_slot(connector, slots, i).await });
            }
        }
        if tokio::time::timeout(budget, done).await.is_err() {
            return Err(StoreError::Timeout(budget));
        }
        if let Some(c) = lock(&slot.conn).clone() {
            return Ok(c);
        }
        let why = lock(&slot.state)
            .failed
            .as_ref()
            .map_or_else(|| "connecting".to_string(), |(_, w)| w.clone());
        Err(StoreError::Reconnecting(why))
    }

    /// Forgets slot `i`'s connection after an error that means it is no
    /// longer good (not for Cluster connections, which recover themselves).
    fn drop_conn(&self, i: usize, e: &RedisError) {
        let broken = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
        if broken {
            self.forget(i);
        }
    }

    /// Forgets slot `i`'s connection (a Node's; a Cluster connection
    /// recovers itself).
    fn forget(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            let mut c = lock(&slot.conn);
            if matches!(*c, Some(Conn::Node(_))) {
                *c = None;
            }
        }
    }

    /// One [`GCRA_BATCH`] call for `jobs` on slot `i`'s connection, within
    /// the reply timeout.
    async fn run_batch(
        &self,
        i: usize,
        jobs: &[Job],
    ) -> Result<Vec<Result<[i64; 4], StoreError>>, StoreError> {
        let started = Instant::now();
        let conn = self.conn(i, self.timeout).await?;
        let budget = self.timeout.saturating_sub(started.elapsed());
        let mut inv = self.script.prepare_invoke();
        for j in jobs {
            inv.key(j.key.as_str());
            for a in j.args {
                inv.arg(a);
            }
        }
        let Conn::Node(mut c) = conn else {
            return Err(StoreError::Reconnecting(
                "a Cluster connection in a batch".into(),
            ));
        };
        match tokio::time::timeout(budget, inv.invoke_async::<redis::Value>(&mut c)).await {
            Ok(Ok(redis::Value::Array(items))) if items.len() == jobs.len() => {
                Ok(items.iter().map(four).collect())
            }
            Ok(Ok(other)) => Err(StoreError::Reply(format!("{other:?}"))),
            Ok(Err(e)) => {
                self.drop_conn(i, &e);
                Err(StoreError::Redis {
                    what: "script".into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                self.forget(i);
                Err(StoreError::Timeout(budget))
            }
        }
    }
}

impl Connector {
    async fn connect(&self) -> Result<Conn, RedisError> {
        if let Some(c) = &self.cluster {
            return c.get_async_connection().await.map(Conn::Cluster);
        }
        let client = match &self.resolver {
            Some(Resolver::Node(c)) => c.clone(),
            Some(Resolver::Sentinel(s)) => s.lock().await.async_get_client().await?,
            None => {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "no Redis configured",
                )))
            }
        };
        client
            .get_multiplexed_async_connection_with_config(&self.conn_config)
            .await
            .map(Conn::Node)
    }
}

/// One connection attempt for slot `i`; wakes the callers waiting for it.
async fn connect_slot(connector: Arc<Connector>, slots: Arc<Vec<Slot>>, i: usize) {
    let outcome = match tokio::time::timeout(connector.bound, connector.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {}: {e}", connector.describe)),
        Err(_) => Err(format!(
            "connect to {}: no answer within {:?}",
            connector.describe, connector.bound
        )),
    };
    let Some(slot) = slots.get(i) else { return };
    let failed = match outcome {
        Ok(c) => {
            *lock(&slot.conn) = Some(c);
            None
        }
        Err(why) => Some((Instant::now(), why)),
    };
    {
        let mut st = lock(&slot.state);
        st.running = false;
        st.failed = failed;
    }
    slot.done.notify_waiters();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
