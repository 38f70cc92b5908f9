//! The hub: channel state (sequence number, last value, bounded history),
//! the subscription index, and each client's bounded outbox with its
//! slow-consumer policy.
//!
//! Publishing and subscribing are serialized by one lock, so a client sees
//! a channel's messages in sequence order and a subscription's snapshot is
//! exactly what precedes the first message it then receives. Delivery under
//! the lock only appends a shared frame to each subscriber's outbox and
//! wakes its connection task: a slow client costs the publisher nothing
//! more than a fast one, and never blocks it.

use crate::metrics::Metrics;
use crate::protocol::{self, Current, Id, Since};
use crate::usage::agg::StreamUsage;
use crate::ws::Violation;
use bytes::Bytes;
use entitlements_core::channel::{Pattern, Subject};
use indexmap::IndexMap;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What happens when a client's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowPolicy {
    /// While the client's socket is full, keep only the newest message per
    /// channel in its queue (a newer curve replaces the older one still
    /// waiting); when the queue is full of distinct channels, drop the
    /// oldest. Right for prices.
    Coalesce,
    /// Drop the oldest queued message.
    DropOldest,
    /// Disconnect the client (close 1008 "slow consumer").
    Close,
}

/// Bounds and policies of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most channels with state; a publish to a new channel beyond it is refused.
    pub max_channels: usize,
    /// Messages kept per channel for `since` (0: no replay).
    pub history_messages: usize,
    /// Age after which history is dropped (zero: no age bound).
    pub history_ttl: Duration,
    /// Most current values sent in one `subscribed`.
    pub max_snapshot: usize,
    /// Messages a client's queue holds before the slow policy applies.
    pub queue_capacity: usize,
    pub slow_policy: SlowPolicy,
    /// Writer tasks that write published messages to sockets.
    pub writers: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_channels: 100_000,
            history_messages: 100,
            history_ttl: Duration::from_secs(300),
            max_snapshot: 1000,
            queue_capacity: 256,
            slow_policy: SlowPolicy::Coalesce,
            writers: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        }
    }
}

/// A frame waiting to be written to a client.
#[derive(Debug, Clone)]
pub struct Out {
    pub frame: Bytes,
    /// The channel of a published message (`None` for replies), for coalescing.
    channel: Option<Arc<str>>,
    /// When the message was published (`None` for replies), for the latency metric.
    pub published: Option<Instant>,
}

impl Out {
    pub fn reply(frame: Bytes) -> Out {
        Out {
            frame,
            channel: None,
            published: None,
        }
    }
}

#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<Out>,
    /// Bytes of the first frame already written.
    offset: usize,
    /// Set once the client must be disconnected: the close frame is the
    /// last thing queued, nothing is queued after it.
    closing: Option<Violation>,
    /// The close frame is out.
    close_sent: bool,
    /// The socket failed; nothing more can be written.
    broken: bool,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued is written.
    All,
    /// The socket is full: the connection task waits until it is writable.
    Blocked,
    /// The socket failed.
    Broken,
}

/// A connected client as the hub sees it: its outbox, its socket once the
/// connection task has started, and the wake-up of that task.
///
/// Frames are written by whoever has them first, under the outbox lock
/// (which also keeps a frame's bytes together): a writer task of the hub
/// right after a publish, or the connection task for its replies and once
/// a full socket drains. Waking a task per client and message would cost
/// more than the write itself.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    outbox: Mutex<Outbox>,
    socket: OnceLock<Arc<TcpStream>>,
    notify: Notify,
    /// The last publish delivered, so a message matching several of the
    /// client's subscriptions is delivered once.
    stamp: AtomicU64,
    /// Mirrors `Outbox::closing`, readable without the lock.
    close_requested: AtomicBool,
    /// The socket would block: the connection task writes when it can.
    blocked: AtomicBool,
    /// In a writer's list already.
    scheduled: AtomicBool,
    /// The tenant's streaming usage, counting messages delivered.
    usage: OnceLock<Arc<StreamUsage>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub const SLOW_CONSUMER: Violation = Violation {
    code: crate::ws::close::POLICY_VIOLATION,
    reason: "slow consumer",
};

const MAX_SLICES: usize = 64;

impl Client {
    /// Counts the messages delivered to this client in `u`.
    pub fn count_for(&self, u: Arc<StreamUsage>) {
        let _ = self.usage.set(u);
    }

    /// Hands the client its socket: from now on frames go out directly.
    pub fn attach(&self, socket: Arc<TcpStream>) {
        let _ = self.socket.set(socket);
    }

    /// Waits until the client needs its connection task (blocked socket,
    /// close request, failure) since the last wait.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether the socket is full and the connection task must wait for it.
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// The close the client is getting, and whether its frame is out.
    pub fn closing(&self) -> (Option<Violation>, bool) {
        let o = lock(&self.outbox);
        (o.closing, o.close_sent)
    }

    /// Writes what is queued as far as the socket takes it. From a hub
    /// writer (`from_writer`), a blocked client is left to its task.
    pub fn flush(&self, metrics: &Metrics, from_writer: bool) -> Flushed {
        let Some(sock) = self.socket.get() else {
            return Flushed::All;
        };
        let mut o = lock(&self.outbox);
        if o.broken {
            return Flushed::Broken;
        }
        if from_writer && self.blocked() {
            return Flushed::Blocked;
        }
        let r = write_out(&mut o, sock, metrics, self.usage.get().map(|u| &u.messages));
        drop(o);
        match r {
            Flushed::All => self.blocked.store(false, Ordering::Relaxed),
            Flushed::Blocked | Flushed::Broken => {
                let was = self.blocked.swap(true, Ordering::Relaxed);
                if !was || r == Flushed::Broken {
                    self.notify.notify_one();
                }
            }
        }
        r
    }

    /// Queues a reply (subscribed, error, pong, ping): never dropped, but a
    /// client that lets replies pile up beyond twice the queue capacity is
    /// a slow consumer and disconnected. The caller flushes.
    pub fn reply(&self, frame: Bytes, hub: &Hub) {
        let mut o = lock(&self.outbox);
        if o.closing.is_some() {
            return;
        }
        if o.queue.len() >= 2 * hub.cfg.queue_capacity.max(16) {
            self.disconnect(&mut o, hub);
        } else {
            o.queue.push_back(Out::reply(frame));
            hub.metrics.queued.inc();
        }
    }

    fn disconnect(&self, o: &mut Outbox, hub: &Hub) {
        hub.metrics.closes.slow_consumer.inc();
        self.shut(o, SLOW_CONSUMER, &hub.metrics);
    }

    /// Drops what is queued (but a frame partly written) and queues the
    /// close frame.
    fn shut(&self, o: &mut Outbox, v: Violation, m: &Metrics) {
        let keep = usize::from(o.offset > 0).min(o.queue.len());
        let dropped: Vec<Out> = o.queue.drain(keep..).collect();
        let messages = dropped.iter().filter(|d| d.channel.is_some()).count();
        if v == SLOW_CONSUMER {
            m.drops.slow_consumer.inc_by(messages as u64);
        }
        m.queued.dec_by(dropped.len() as i64);
        o.queue
            .push_back(Out::reply(crate::ws::close_frame(v.code, v.reason)));
        m.queued.inc();
        o.closing = Some(v);
        self.close_requested.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Closes the connection with `v` after what was already queued (shutdown,
    /// limits, the client's own close). The caller flushes.
    pub fn close(&self, v: Violation, m: &Metrics) {
        let mut o = lock(&self.outbox);
        if o.closing.is_none() {
            o.queue
                .push_back(Out::reply(crate::ws::close_frame(v.code, v.reason)));
            m.queued.inc();
            o.closing = Some(v);
            self.close_requested.store(true, Ordering::Relaxed);
        }
        drop(o);
        self.notify.notify_one();
    }

    /// Closes at once, dropping what is queued (protocol violations).
    pub fn abort(&self, v: Violation, m: &Metrics) {
        let mut o = lock(&self.outbox);
        if o.closing.is_none() {
            self.shut(&mut o, v, m);
        }
    }

    /// Queues a published message under the slow policy; true when the
    /// client needs a flush.
    fn deliver(&self, out: &Out, hub: &Hub) -> bool {
        let mut o = lock(&self.outbox);
        if o.closing.is_some() {
            return false;
        }
        let cap = hub.cfg.queue_capacity.max(1);
        let m = &hub.metrics;
        // A frame partly written stays as it is.
        let first = usize::from(o.offset > 0);
        match hub.cfg.slow_policy {
            SlowPolicy::Coalesce => {
                // Only a client whose socket is full is behind: one that
                // keeps up loses nothing to a writer that is a little late.
                let behind = self.blocked();
                let same = o.queue.iter_mut().skip(first).filter(|_| behind).find(|q| {
                    match (&q.channel, &out.channel) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
                });
                if let Some(q) = same {
                    // Keeps its place (and its publish time: the latency
                    // is that of the oldest value it stands for).
                    q.frame = out.frame.clone();
                    m.drops.coalesced.inc();
                } else {
                    if o.queue.len() >= cap {
                        drop_oldest_message(&mut o, m);
                    }
                    o.queue.push_back(out.clone());
                    m.queued.inc();
                }
            }
            SlowPolicy::DropOldest => {
                if o.queue.len() >= cap {
                    drop_oldest_message(&mut o, m);
                }
                o.queue.push_back(out.clone());
                m.queued.inc();
            }
            SlowPolicy::Close => {
                if o.queue.len() >= cap {
                    self.disconnect(&mut o, hub);
                    return true;
                }
                o.queue.push_back(out.clone());
                m.queued.inc();
            }
        }
        !self.blocked()
    }

    #[cfg(test)]
    pub(crate) fn set_blocked(&self, b: bool) {
        self.blocked.store(b, Ordering::Relaxed);
    }

    /// Whether the client is to be disconnected.
    pub fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Relaxed)
    }

    /// Frames queued now (for tests and the bench).
    pub fn queued(&self) -> usize {
        lock(&self.outbox).queue.len()
    }

    /// Takes every queued frame off (for tests without a socket).
    pub fn drain(&self, metrics: &Metrics) -> Vec<Out> {
        let mut o = lock(&self.outbox);
        metrics.queued.dec_by(o.queue.len() as i64);
        o.offset = 0;
        o.queue.drain(..).collect()
    }
}

/// Writes queued frames until done or the socket is full.
fn write_out(
    o: &mut Outbox,
    sock: &TcpStream,
    m: &Metrics,
    tenant_messages: Option<&AtomicU64>,
) -> Flushed {
    let mut delivered = 0u64;
    let r = write_frames(o, sock, m, &mut delivered);
    if let (Some(t), true) = (tenant_messages, delivered > 0) {
        t.fetch_add(delivered, Ordering::Relaxed);
    }
    r
}

fn write_frames(o: &mut Outbox, sock: &TcpStream, m: &Metrics, delivered: &mut u64) -> Flushed {
    while !o.queue.is_empty() {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        for (i, f) in o.queue.iter().take(MAX_SLICES).enumerate() {
            let from = if i == 0 { o.offset } else { 0 };
            slices[i] = std::io::IoSlice::new(f.frame.get(from..).unwrap_or(&[]));
            n += 1;
        }
        let r = if n == 1 {
            sock.try_write(&slices[0])
        } else {
            sock.try_write_vectored(&slices[..n])
        };
        let mut written = match r {
            Ok(0) => {
                o.broken = true;
                return Flushed::Broken;
            }
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Flushed::Blocked,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                o.broken = true;
                return Flushed::Broken;
            }
        };
        while written > 0 {
            let Some(front) = o.queue.front() else { break };
            let left = front.frame.len() - o.offset;
            if written < left {
                o.offset += written;
                break;
            }
            written -= left;
            o.offset = 0;
            if let Some(done) = o.queue.pop_front() {
                m.queued.dec();
                if let Some(at) = done.published {
                    m.delivered.inc();
                    *delivered += 1;
                    m.latency.observe(at.elapsed().as_secs_f64());
                }
                if o.closing.is_some() && o.queue.is_empty() {
                    o.close_sent = true;
                }
            }
        }
    }
    Flushed::All
}

fn drop_oldest_message(o: &mut Outbox, m: &Metrics) {
    let first = usize::from(o.offset > 0);
    if let Some(i) = o.queue.iter().skip(first).position(|q| q.channel.is_some()) {
        o.queue.remove(i + first);
        m.drops.queue_full.inc();
        m.queued.dec();
    }
}

/// One of the hub's writer tasks: writes the clients a publish touched.
#[derive(Debug, Default)]
struct Shard {
    dirty: Mutex<Vec<Arc<Client>>>,
    notify: Notify,
}

#[derive(Debug)]
struct Past {
    seq: u64,
    /// The channel's sequence number before this message: `seq - 1` when
    /// the hub numbers, the previous offset's when a source does (Kafka:
    /// other channels' messages sit in between).
    prev: u64,
    at: Instant,
    frame: Bytes,
}

#[derive(Debug)]
struct Channel {
    name: Arc<str>,
    seq: u64,
    last: Bytes,
    history: VecDeque<Past>,
    /// Where a source-numbered channel's messages come from (its
    /// partition); `None` while the hub numbers it.
    origin: Option<u32>,
    /// Set by a new epoch: what came before it is gone, so the channel's
    /// next message follows nothing a client can have seen.
    renumbered: bool,
}

type Subscribers = IndexMap<u64, Arc<Client>>;

#[derive(Debug)]
struct Wild {
    pattern: Pattern,
    subs: Subscribers,
}

#[derive(Debug, Default)]
struct Inner {
    channels: HashMap<Arc<str>, Channel>,
    exact: HashMap<Arc<str>, Subscribers>,
    wild: Vec<Wild>,
    stamp: u64,
    epoch: Arc<str>,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("channel limit of {0} reached")]
    ChannelLimit(usize),
    /// A source-numbered message at or below the channel's sequence
    /// number: delivered already.
    #[error("sequence number {seq} is not after the channel's {last}")]
    Duplicate { seq: u64, last: u64 },
    /// A source-numbered message from another origin than the channel's
    /// (two topics' templates make the same channel): numbers from two
    /// partitions cannot be one sequence.
    #[error("the channel is fed from another partition")]
    Conflict,
}

/// The channels, their subscribers and the outboxes.
#[derive(Debug)]
pub struct Hub {
    pub cfg: HubConfig,
    pub metrics: Metrics,
    inner: Mutex<Inner>,
    next_client: AtomicU64,
    shards: Vec<Shard>,
    writing: AtomicBool,
}

impl Hub {
    pub fn new(cfg: HubConfig, metrics: Metrics) -> Hub {
        use std::hash::{BuildHasher, RandomState};
        let epoch = format!(
            "{:016x}",
            RandomState::new().hash_one(std::time::SystemTime::now())
        );
        Hub {
            metrics,
            shards: (0..cfg.writers.max(1)).map(|_| Shard::default()).collect(),
            cfg,
            inner: Mutex::new(Inner {
                epoch: epoch.into(),
                ..Inner::default()
            }),
            next_client: AtomicU64::new(1),
            writing: AtomicBool::new(false),
        }
    }

    /// Starts the writer tasks (once), until `shutdown`.
    pub fn start_writers(self: &Arc<Hub>, shutdown: tokio_util::sync::CancellationToken) {
        if self.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        for i in 0..self.shards.len() {
            let (hub, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let Some(shard) = hub.shards.get(i) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = shard.notify.notified() => {}
                    }
                    let batch = std::mem::take(&mut *lock(&shard.dirty));
                    for c in batch {
                        c.scheduled.store(false, Ordering::Release);
                        c.flush(&hub.metrics, true);
                    }
                }
            });
        }
    }

    /// What the sequence numbers belong to: random per process when the
    /// hub numbers them (it changes when the sidecar restarts), set by a
    /// source that numbers them itself ([`Hub::set_epoch`]). Sequence
    /// numbers of another epoch mean nothing here.
    pub fn epoch(&self) -> Arc<str> {
        lock(&self.inner).epoch.clone()
    }

    /// Puts a new epoch in force (a source's numbering changed, e.g. a
    /// topic's partitions): every channel's history is dropped and its
    /// sequence number and origin reset, the last values stay (with
    /// sequence number 0 until the next message). Nothing happens when the
    /// epoch is the same.
    pub fn set_epoch(&self, epoch: &str) {
        let mut inner = lock(&self.inner);
        if &*inner.epoch == epoch {
            return;
        }
        inner.epoch = epoch.into();
        for ch in inner.channels.values_mut() {
            ch.seq = 0;
            ch.origin = None;
            ch.history.clear();
            ch.renumbered = true;
        }
    }

    /// A new client with an empty outbox.
    pub fn client(&self) -> Arc<Client> {
        Arc::new(Client {
            id: self.next_client.fetch_add(1, Ordering::Relaxed),
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            socket: OnceLock::new(),
            stamp: AtomicU64::new(0),
            close_requested: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            scheduled: AtomicBool::new(false),
            usage: OnceLock::new(),
        })
    }

    /// Publishes `data` (a JSON value, checked by the caller) to `channel`:
    /// the next sequence number, the new last value, and a copy of one
    /// shared frame in every subscriber's outbox. Returns the sequence number.
    pub fn publish(&self, channel: &Subject, data: Bytes) -> Result<u64, PublishError> {
        self.put(channel, data, None)
    }

    /// Publishes a message a source has numbered (`seq`, from `origin`):
    /// refused as [`PublishError::Duplicate`] unless `seq` is after the
    /// channel's, as [`PublishError::Conflict`] when the channel already
    /// takes its numbers from another origin. Otherwise as [`Hub::publish`].
    ///
    /// `floor`: the origin's numbers up to `floor` were not all read here
    /// (this hub started reading after them). A channel's first message
    /// follows `floor`, so `since` replays it only to a client that has
    /// seen at least that far; a client that saw less may have missed one
    /// of the channel's messages in between, and is told it did not recover.
    pub fn publish_at(
        &self,
        channel: &Subject,
        data: Bytes,
        seq: u64,
        origin: u32,
        floor: u64,
    ) -> Result<u64, PublishError> {
        self.put(channel, data, Some((seq, origin, floor)))
    }

    fn put(
        &self,
        channel: &Subject,
        data: Bytes,
        numbered: Option<(u64, u32, u64)>,
    ) -> Result<u64, PublishError> {
        let now = Instant::now();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let name = channel.as_str();
        if !inner.channels.contains_key(name) {
            if inner.channels.len() >= self.cfg.max_channels {
                self.metrics.channel_limit.inc();
                return Err(PublishError::ChannelLimit(self.cfg.max_channels));
            }
            let key: Arc<str> = name.into();
            inner.channels.insert(
                key.clone(),
                Channel {
                    name: key,
                    seq: 0,
                    last: Bytes::new(),
                    history: VecDeque::new(),
                    origin: None,
                    renumbered: false,
                },
            );
            self.metrics.channels.inc();
        }
        let Some(ch) = inner.channels.get_mut(name) else {
            return Err(PublishError::ChannelLimit(self.cfg.max_channels));
        };
        let mut prev = ch.seq;
        let seq = match numbered {
            None => prev + 1,
            Some((seq, origin, floor)) => {
                if ch.origin.is_some_and(|o| o != origin) {
                    return Err(PublishError::Conflict);
                }
                if seq <= prev {
                    return Err(PublishError::Duplicate { seq, last: prev });
                }
                if ch.seq == 0 {
                    // The first message here: it follows where this hub
                    // began reading, or nothing at all after a new epoch.
                    prev = if ch.renumbered { u64::MAX } else { floor };
                }
                ch.renumbered = false;
                ch.origin = Some(origin);
                seq
            }
        };
        ch.seq = seq;
        let frame = protocol::message(name, seq, &data);
        ch.last = data;
        if self.cfg.history_messages > 0 {
            if ch.history.len() >= self.cfg.history_messages {
                ch.history.pop_front();
            }
            ch.history.push_back(Past {
                seq,
                prev,
                at: now,
                frame: frame.clone(),
            });
        }
        let out = Out {
            frame,
            channel: Some(ch.name.clone()),
            published: Some(now),
        };
        inner.stamp += 1;
        let stamp = inner.stamp;
        let writing = self.writing.load(Ordering::Relaxed);
        let mut touched = 0u64;
        let mut send = |subs: &Subscribers| {
            for c in subs.values() {
                if c.stamp.swap(stamp, Ordering::Relaxed) != stamp
                    && c.deliver(&out, self)
                    && writing
                    && !c.scheduled.swap(true, Ordering::AcqRel)
                {
                    let i = (c.id as usize) % self.shards.len();
                    if let Some(shard) = self.shards.get(i) {
                        lock(&shard.dirty).push(c.clone());
                        touched |= 1 << (i % 64);
                    }
                }
            }
        };
        if let Some(subs) = inner.exact.get(name) {
            send(subs);
        }
        for w in &inner.wild {
            if w.pattern.matches(channel) {
                send(&w.subs);
            }
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if touched & (1 << (i % 64)) != 0 {
                shard.notify.notify_one();
            }
        }
        self.metrics.published.inc();
        Ok(seq)
    }

    /// Drops history older than the TTL (called periodically).
    pub fn expire_history(&self) {
        if self.cfg.history_ttl.is_zero() {
            return;
        }
        let Some(cutoff) = Instant::now().checked_sub(self.cfg.history_ttl) else {
            return;
        };
        let mut inner = lock(&self.inner);
        for ch in inner.channels.values_mut() {
            while ch.history.front().is_some_and(|p| p.at < cutoff) {
                ch.history.pop_front();
            }
        }
    }

    /// Subscribes `client` to `patterns` (already entitled and not yet
    /// subscribed) and queues `subscribed` with the current values, then
    /// the messages missed since `since` when they can all be replayed.
    pub fn subscribe(
        &self,
        client: &Arc<Client>,
        id: Option<&Id>,
        patterns: &[Pattern],
        since: Option<&Since>,
    ) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        for p in patterns {
            let subs = if p.is_concrete() {
                inner.exact.entry(p.as_str().into()).or_default()
            } else {
                match inner.wild.iter().position(|w| w.pattern == *p) {
                    Some(i) => &mut inner.wild[i].subs,
                    None => {
                        inner.wild.push(Wild {
                            pattern: p.clone(),
                            subs: Subscribers::default(),
                        });
                        let last = inner.wild.len() - 1;
                        &mut inner.wild[last].subs
                    }
                }
            };
            if subs.insert(client.id, client.clone()).is_none() {
                self.metrics.subscriptions.inc();
            }
        }
        let covered =
            |name: &str| Subject::parse(name).is_ok_and(|s| patterns.iter().any(|p| p.matches(&s)));
        // Replay when every channel the client names is covered and its
        // history reaches back far enough.
        let mut replay: Vec<Bytes> = Vec::new();
        let mut recovered = None;
        let mut skip: Vec<&str> = Vec::new();
        if let Some(since) = since {
            let mut ok = since.epoch.as_str() == &*inner.epoch;
            for (name, &seen) in &since.seq {
                if !ok {
                    break;
                }
                if !covered(name) {
                    ok = false;
                    break;
                }
                let Some(ch) = inner.channels.get(name.as_str()) else {
                    // Nothing was published there yet in this epoch.
                    ok = seen == 0;
                    continue;
                };
                if seen > ch.seq {
                    ok = false;
                } else if seen < ch.seq {
                    // Complete when the oldest message kept follows one the
                    // client has seen.
                    match ch.history.front() {
                        Some(first) if first.prev <= seen => replay.extend(
                            ch.history
                                .iter()
                                .filter(|p| p.seq > seen)
                                .map(|p| p.frame.clone()),
                        ),
                        _ => ok = false,
                    }
                }
                skip.push(name.as_str());
            }
            if !ok {
                replay.clear();
                skip.clear();
            }
            recovered = Some(ok);
        }
        let mut snapshot = Vec::new();
        'patterns: for p in patterns {
            if p.is_concrete() {
                if let Some(ch) = inner.channels.get(p.as_str()) {
                    let dup = snapshot.iter().any(|c: &Current| c.channel == ch.name);
                    if !dup && !skip.contains(&p.as_str()) && snapshot.len() < self.cfg.max_snapshot
                    {
                        snapshot.push(current(ch));
                    }
                }
                continue;
            }
            for ch in inner.channels.values() {
                if snapshot.len() >= self.cfg.max_snapshot {
                    break 'patterns;
                }
                let dup = snapshot.iter().any(|c: &Current| c.channel == ch.name);
                if !dup
                    && !skip.contains(&&*ch.name)
                    && Subject::parse(&ch.name).is_ok_and(|s| p.matches(&s))
                {
                    snapshot.push(current(ch));
                }
            }
        }
        let names: Vec<String> = patterns.iter().map(|p| p.as_str().to_string()).collect();
        client.reply(
            protocol::subscribed(id, &inner.epoch, &names, &snapshot, recovered),
            self,
        );
        for f in replay {
            client.reply(f, self);
        }
    }

    /// Removes `client`'s subscriptions to `patterns`.
    pub fn unsubscribe(&self, client: u64, patterns: &[Pattern]) {
        let mut inner = lock(&self.inner);
        for p in patterns {
            let removed = if p.is_concrete() {
                let r = inner
                    .exact
                    .get_mut(p.as_str())
                    .and_then(|s| s.swap_remove(&client));
                if inner.exact.get(p.as_str()).is_some_and(|s| s.is_empty()) {
                    inner.exact.remove(p.as_str());
                }
                r
            } else {
                let i = inner.wild.iter().position(|w| w.pattern == *p);
                let r = i.and_then(|i| inner.wild[i].subs.swap_remove(&client));
                inner.wild.retain(|w| !w.subs.is_empty());
                r
            };
            if removed.is_some() {
                self.metrics.subscriptions.dec();
            }
        }
    }

    /// Channels with state now.
    pub fn channel_count(&self) -> usize {
        lock(&self.inner).channels.len()
    }
}

fn current(ch: &Channel) -> Current {
    Current {
        channel: ch.name.clone(),
        seq: ch.seq,
        data: ch.last.clone(),
    }
}

#[cfg(test)]
mod tests;
