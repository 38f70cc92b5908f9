//! The Kafka bus: the market-data topics into channels, and Kafka as the
//! bus between replicas, with one numbering on every replica.
//!
//! - **Every replica reads everything.** Each replica follows every
//!   partition of every configured topic itself (assigned partitions, no
//!   consumer group, nothing committed), in offset order per partition.
//! - **Channels** come from a [`Template`] per topic (`{key}`, and
//!   optionally `{topic}` and `{value.<field>}`); what makes no channel is
//!   dropped and counted by reason.
//! - **Numbering.** A message's `seq` is its offset + 1 in its partition,
//!   the same on every replica. A template holds `{key}`, and Kafka keeps a
//!   key's records in one partition, so a channel's numbers are one
//!   partition's offsets: increasing, with gaps (the other channels of the
//!   partition). The epoch is `k` and a hash of the topics and their
//!   partition counts: equal on every replica reading the same topics, so
//!   `since` recovers on any of them; when a topic's partitions change,
//!   keys move to other partitions, the epoch changes, and a client's
//!   `since` gets `recovered: false` and the snapshot.
//!   A record at or below its channel's number (seen again after a
//!   reconnect) is suppressed.
//! - **Snapshot.** At start each partition is read from
//!   `snapshot_messages` before its end (the high watermark then), so the
//!   hub has the last value of each channel those records name, and
//!   history for `since`; the replica is ready once every partition has
//!   reached that mark, or `snapshot_timeout` has passed (then it serves
//!   what it has, and says so in the log).
//! - **Publishing** (`POST /publish/{channel}`) produces to `bus_topic`,
//!   key = the channel, to the partition Kafka's default partitioner
//!   (murmur2) picks for that key; every replica, this one included,
//!   delivers it when it reads it back. The answer carries its `seq`.
//! - **Faults.** The brokers away: `/readyz` 503, publishes 503, the
//!   WebSockets stay up, each partition retries with backoff and resumes at
//!   the next offset it has not delivered.

pub mod template;

use super::{Bus, BusError, Published};
use crate::fanout::{Hub, PublishError};
use bytes::Bytes;
use entitlements_core::channel::Subject;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
pub use template::{Refusal, Template};
use tokio_util::sync::CancellationToken;

/// How the sidecar uses Kafka.
#[derive(Clone)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// The topics read, each with its channel template.
    pub topics: Vec<(String, Template)>,
    /// Where publishes go (read back with the template `{key}` unless
    /// `topics` names it); `None`: publishing is refused.
    pub bus_topic: Option<String>,
    pub client_id: String,
    /// TLS to the brokers, trusting the CA certificates of this PEM file.
    pub tls_ca_file: Option<String>,
    pub sasl: Option<SaslConfig>,
    /// Records read back per partition at start.
    pub snapshot_messages: u64,
    /// Longest wait for the snapshot before serving without it complete.
    pub snapshot_timeout: Duration,
    /// Bound of one broker call (connect, metadata, offsets, produce).
    pub timeout: Duration,
    /// Most bytes one fetch asks for.
    pub fetch_max_bytes: i32,
    /// How long a fetch waits at the broker for new records.
    pub fetch_wait: Duration,
    /// How often partition counts are checked.
    pub metadata_interval: Duration,
    /// Largest record value published (`--max-publish-bytes`); larger ones
    /// are dropped as `too_large`.
    pub max_value_bytes: usize,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field(
                "topics",
                &self
                    .topics
                    .iter()
                    .map(|(t, m)| format!("{t}={}", m.as_str()))
                    .collect::<Vec<_>>(),
            )
            .field("bus_topic", &self.bus_topic)
            .field("client_id", &self.client_id)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("sasl", &self.sasl.as_ref().map(|_| "<redacted>"))
            .field("snapshot_messages", &self.snapshot_messages)
            .field("snapshot_timeout", &self.snapshot_timeout)
            .finish_non_exhaustive()
    }
}

/// SASL settings as the flags give them: `PLAIN`, `SCRAM-SHA-256` or
/// `SCRAM-SHA-512`, with a user name and password.
pub fn sasl(mechanism: &str, username: &str, password: &str) -> Result<SaslConfig, String> {
    let c = Credentials::new(username.to_string(), password.to_string());
    match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" => Ok(SaslConfig::Plain(c)),
        "SCRAM-SHA-256" => Ok(SaslConfig::ScramSha256(c)),
        "SCRAM-SHA-512" => Ok(SaslConfig::ScramSha512(c)),
        other => Err(format!(
            "--kafka-sasl-mechanism: {other:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
        )),
    }
}

/// Parses `topic=template`.
pub fn parse_topic(s: &str) -> Result<(String, Template), String> {
    let (topic, template) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected topic=template, e.g. 254carbon.pricing.curve.updates.v1=pricing.curves.{{key}}"))?;
    let topic = topic.trim();
    if !valid_topic(topic) {
        return Err(format!(
            "{topic:?} is not a Kafka topic name (1–249 of a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok((topic.to_string(), Template::parse(template.trim())?))
}

/// Kafka's rule for topic names.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), which its default
/// partitioner uses for keyed records: `(murmur2(key) & 0x7fffffff) % n`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let seed: u32 = 0x9747_b28c;
    let len = data.len() as u32;
    let mut h = seed ^ len;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives `key` among `n`.
pub fn partition_for(key: &[u8], n: usize) -> i32 {
    let n = n.max(1) as u32;
    ((murmur2(key) as u32 & 0x7fff_ffff) % n) as i32
}

/// The epoch of a layout (topic → partition count): `k` and 16 hex digits
/// of FNV-1a over `topic:count;` in topic order. The same on every
/// replica and every restart while the layout stays.
pub fn epoch_of(layout: &BTreeMap<String, usize>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (t, n) in layout {
        for b in t
            .bytes()
            .chain(*b":")
            .chain(n.to_string().bytes())
            .chain(*b";")
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("k{h:016x}")
}

/// The Kafka bus's metrics (`sidecar_kafka_*`).
#[derive(Debug, Clone, Default)]
pub struct KafkaMetrics {
    pub connected: Gauge,
    pub consumed: Family<Vec<(String, String)>, Counter>,
    pub produced: Counter,
    pub dropped: Family<Vec<(String, String)>, Counter>,
    pub errors: Family<Vec<(String, String)>, Counter>,
    pub lag: Family<Vec<(String, String)>, Gauge>,
    pub partitions: Family<Vec<(String, String)>, Gauge>,
    pub snapshot_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub snapshot_messages: Gauge,
    pub epoch_changes: Counter,
}

impl KafkaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sidecar");
        r.register(
            "kafka_connected",
            "1 while every partition and the metadata answer (the brokers are reachable)",
            self.connected.clone(),
        );
        r.register(
            "kafka_consumed",
            "Records read from Kafka and published to their channel, by topic",
            self.consumed.clone(),
        );
        r.register(
            "kafka_produced",
            "Publishes produced to the bus topic",
            self.produced.clone(),
        );
        r.register(
            "kafka_dropped",
            "Records not published, by reason: no_key, key_not_utf8, no_value, not_json, no_field, \
             invalid_channel, too_large, duplicate, channel_conflict, channel_limit, out_of_range \
             (records removed by retention before they were read)",
            self.dropped.clone(),
        );
        r.register(
            "kafka_errors",
            "Failed broker calls, by operation: connect, metadata, offsets, fetch, produce",
            self.errors.clone(),
        );
        r.register(
            "kafka_lag",
            "Records between the next one to read and the partition's high watermark, by topic and partition",
            self.lag.clone(),
        );
        r.register(
            "kafka_partitions",
            "Partitions of each topic read",
            self.partitions.clone(),
        );
        r.register(
            "kafka_snapshot_seconds",
            "Time the start-up snapshot took to load (0 until loaded)",
            self.snapshot_seconds.clone(),
        );
        r.register(
            "kafka_snapshot_messages",
            "Records read while loading the start-up snapshot",
            self.snapshot_messages.clone(),
        );
        r.register(
            "kafka_epoch_changes",
            "Times the topics' partition counts changed, and with them the epoch",
            self.epoch_changes.clone(),
        );
    }

    fn drop(&self, reason: &str) {
        self.drop_n(reason, 1);
    }

    fn drop_n(&self, reason: &str, n: u64) {
        self.dropped
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc_by(n);
    }

    fn error(&self, op: &str) {
        self.errors
            .get_or_create(&vec![("op".into(), op.into())])
            .inc();
    }
}

#[derive(Debug, Default)]
struct State {
    /// Partition counts of the topics found (the layout).
    layout: BTreeMap<String, usize>,
    /// Configured topics the brokers do not have.
    missing: Vec<String>,
    /// The last error of the metadata or connect calls.
    problem: Option<String>,
    producers: HashMap<i32, Arc<PartitionClient>>,
}

/// The Kafka bus (see the module's documentation).
pub struct KafkaBus {
    settings: KafkaSettings,
    /// Topic index → (name, template), the bus topic included.
    topics: Vec<(String, Template)>,
    hub: Arc<Hub>,
    pub metrics: KafkaMetrics,
    client: tokio::sync::OnceCell<Arc<Client>>,
    state: Mutex<State>,
    metadata_ok: AtomicBool,
    /// Partitions whose last broker call failed.
    failing: AtomicUsize,
    /// Partitions still reading their snapshot.
    loading: AtomicUsize,
    /// The first layout is known and every partition of it has started.
    started: AtomicBool,
    snapshot_done: AtomicBool,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Backoff before retry `attempt` (0-based): 100 ms doubling to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)).min(5_000))
}

/// rustls settings trusting the CA certificates of `path`.
fn tls_config(path: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::pg::pem_roots(path).map_err(|e| format!("--kafka-ca-file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("--kafka-ca-file: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl KafkaBus {
    /// Checks the settings and starts following the brokers (in the
    /// background: an unreachable broker is not a start error, `/readyz`
    /// says so) until `shutdown`.
    pub fn start(
        settings: KafkaSettings,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> Result<Arc<KafkaBus>, BusError> {
        if settings.brokers.is_empty() {
            return Err(BusError::Config("--kafka-brokers: none given".into()));
        }
        let tls = match &settings.tls_ca_file {
            Some(p) => Some(tls_config(p).map_err(BusError::Config)?),
            None => None,
        };
        let mut topics = settings.topics.clone();
        for (i, (t, _)) in topics.iter().enumerate() {
            if topics[..i].iter().any(|(u, _)| u == t) {
                return Err(BusError::Config(format!(
                    "--kafka-topic: {t} is given twice"
                )));
            }
        }
        if let Some(b) = &settings.bus_topic {
            if !valid_topic(b) {
                return Err(BusError::Config(format!(
                    "--kafka-bus-topic: {b:?} is not a Kafka topic name"
                )));
            }
            if !topics.iter().any(|(t, _)| t == b) {
                let identity = Template::parse("{key}").map_err(BusError::Config)?;
                topics.push((b.clone(), identity));
            }
        }
        if topics.is_empty() {
            return Err(BusError::Config(
                "--bus kafka needs --kafka-topic or --kafka-bus-topic".into(),
            ));
        }
        hub.metrics.bus_connected.set(0);
        let bus = Arc::new(KafkaBus {
            settings,
            topics,
            hub,
            metrics: KafkaMetrics::default(),
            client: tokio::sync::OnceCell::new(),
            state: Mutex::new(State::default()),
            metadata_ok: AtomicBool::new(false),
            failing: AtomicUsize::new(0),
            loading: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            snapshot_done: AtomicBool::new(false),
        });
        tokio::spawn(bus.clone().supervise(tls, shutdown));
        Ok(bus)
    }

    fn builder(&self, tls: Option<Arc<rustls::ClientConfig>>) -> ClientBuilder {
        let mut b = ClientBuilder::new(self.settings.brokers.clone())
            .client_id(self.settings.client_id.as_str())
            .backoff_config(rskafka::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
                // Calls give up after this and the caller retries: the
                // state stays visible instead of hiding in a retry loop.
                deadline: Some(self.settings.timeout),
            });
        if let Some(t) = tls {
            b = b.tls_config(t);
        }
        if let Some(s) = &self.settings.sasl {
            b = b.sasl_config(s.clone());
        }
        b
    }

    fn set_connected(&self) {
        let up = self.client.initialized()
            && self.metadata_ok.load(Ordering::Relaxed)
            && self.failing.load(Ordering::Relaxed) == 0;
        self.metrics.connected.set(i64::from(up));
        self.hub.metrics.bus_connected.set(i64::from(up));
    }

    /// Connects, then checks the layout every `metadata_interval` and
    /// follows each partition it finds.
    async fn supervise(
        self: Arc<Self>,
        tls: Option<Arc<rustls::ClientConfig>>,
        shutdown: CancellationToken,
    ) {
        let brokers = self.settings.brokers.join(",");
        let mut attempt = 0;
        let client = loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(self.settings.timeout, self.builder(tls.clone()).build()) => r,
            };
            let e = match r {
                Ok(Ok(c)) => break Arc::new(c),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.settings.timeout),
            };
            self.metrics.error("connect");
            if let Some(more) = ERRORS_LOG.allow() {
                tracing::warn!(brokers = %brokers, error = %e, failures_since_last_line = more, "kafka: cannot connect; retrying");
            }
            lock(&self.state).problem = Some(format!("cannot connect to {brokers}: {e}"));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff(attempt)) => {}
            }
            attempt += 1;
        };
        let _ = self.client.set(client.clone());
        tracing::info!(brokers = %brokers, "kafka: connected");
        let t0 = Instant::now();
        let mut followed: HashMap<(usize, i32), ()> = HashMap::new();
        let mut first = true;
        let mut attempt = 0;
        loop {
            match tokio::time::timeout(self.settings.timeout, client.list_topics()).await {
                Ok(Ok(found)) => {
                    attempt = 0;
                    let mut layout = BTreeMap::new();
                    let mut missing = Vec::new();
                    for (name, _) in &self.topics {
                        match found.iter().find(|t| &t.name == name) {
                            Some(t) if !t.partitions.is_empty() => {
                                layout.insert(name.clone(), t.partitions.len());
                            }
                            _ => missing.push(name.clone()),
                        }
                    }
                    let mut starts = Vec::new();
                    for (i, (name, _)) in self.topics.iter().enumerate() {
                        let Some(t) = found.iter().find(|t| &t.name == name) else {
                            continue;
                        };
                        self.metrics
                            .partitions
                            .get_or_create(&vec![("topic".into(), name.clone())])
                            .set(t.partitions.len() as i64);
                        for &p in &t.partitions {
                            if followed.insert((i, p), ()).is_none() {
                                starts.push((i, p));
                            }
                        }
                    }
                    let changed = {
                        let mut st = lock(&self.state);
                        let changed = st.layout != layout;
                        if changed {
                            st.producers.clear();
                        }
                        st.layout = layout.clone();
                        st.missing = missing.clone();
                        st.problem = None;
                        changed
                    };
                    if changed && !layout.is_empty() {
                        let epoch = epoch_of(&layout);
                        if !first {
                            self.metrics.epoch_changes.inc();
                            tracing::warn!(epoch = %epoch, "kafka: the topics' partitions changed: a new epoch");
                        }
                        self.hub.set_epoch(&epoch);
                    }
                    if !missing.is_empty() {
                        if let Some(more) = ERRORS_LOG.allow() {
                            tracing::warn!(topics = ?missing, failures_since_last_line = more, "kafka: topics not found");
                        }
                    }
                    for (i, p) in starts {
                        // At start: the snapshot; a partition added later
                        // is new, read from its beginning.
                        let snapshot = first;
                        if snapshot {
                            self.loading.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::spawn(self.clone().follow(
                            client.clone(),
                            i,
                            p,
                            snapshot,
                            t0,
                            shutdown.clone(),
                        ));
                    }
                    if first && missing.is_empty() {
                        first = false;
                        self.started.store(true, Ordering::SeqCst);
                        if self.loading.load(Ordering::SeqCst) == 0 {
                            self.snapshot_loaded(t0);
                        }
                        self.spawn_snapshot_deadline(t0, shutdown.clone());
                    }
                    self.metadata_ok.store(true, Ordering::Relaxed);
                }
                r => {
                    let e = match r {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", self.settings.timeout),
                    };
                    self.metrics.error("metadata");
                    self.metadata_ok.store(false, Ordering::Relaxed);
                    lock(&self.state).problem = Some(format!("metadata: {e}"));
                    if let Some(more) = ERRORS_LOG.allow() {
                        tracing::warn!(error = %e, failures_since_last_line = more, "kafka: metadata failed; retrying");
                    }
                    attempt += 1;
                }
            }
            self.set_connected();
            let wait = if attempt > 0 {
                backoff(attempt - 1)
            } else if first {
                // Topics missing at start: look again soon.
                Duration::from_millis(500).min(self.settings.metadata_interval)
            } else {
                self.settings.metadata_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn spawn_snapshot_deadline(self: &Arc<Self>, t0: Instant, shutdown: CancellationToken) {
        let bus = self.clone();
        tokio::spawn(async move {
            let left = bus.settings.snapshot_timeout.saturating_sub(t0.elapsed());
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(left) => {
                    if !bus.snapshot_done.load(Ordering::Relaxed) {
                        tracing::warn!(
                            partitions_loading = bus.loading.load(Ordering::Relaxed),
                            timeout = ?bus.settings.snapshot_timeout,
                            "kafka: the snapshot did not load in time; serving what is loaded"
                        );
                        bus.snapshot_loaded(t0);
                    }
                }
            }
        });
    }

    fn snapshot_loaded(&self, t0: Instant) {
        if !self.snapshot_done.swap(true, Ordering::Relaxed) {
            let s = t0.elapsed().as_secs_f64();
            self.metrics.snapshot_seconds.set(s);
            tracing::info!(
                seconds = s,
                messages = self.metrics.snapshot_messages.get(),
                channels = self.hub.channel_count(),
                "kafka: snapshot loaded"
            );
        }
    }

    fn partition_loaded(&self, t0: Instant) {
        if self.loading.fetch_sub(1, Ordering::SeqCst) == 1 && self.started.load(Ordering::SeqCst) {
            self.snapshot_loaded(t0);
        }
    }

    /// Follows partition `p` of topic `i`: reads in offset order and
    /// publishes to the hub, until `shutdown`.
    async fn follow(
        self: Arc<Self>,
        client: Arc<Client>,
        i: usize,
        p: i32,
        mut snapshot: bool,
        t0: Instant,
        shutdown: CancellationToken,
    ) {
        let Some((topic, template)) = self.topics.get(i) else {
            return;
        };
        let origin = (i as u32) << 20 | (p as u32 & 0xf_ffff);
        let lag = self
            .metrics
            .lag
            .get_or_create(&vec![
                ("topic".into(), topic.clone()),
                ("partition".into(), p.to_string()),
            ])
            .clone();
        let consumed = self
            .metrics
            .consumed
            .get_or_create(&vec![("topic".into(), topic.clone())])
            .clone();
        let mut failing = false;
        let mut attempt = 0u32;
        let wait_ms = i32::try_from(self.settings.fetch_wait.as_millis()).unwrap_or(i32::MAX);
        let call = self.settings.timeout + self.settings.fetch_wait;
        // Where to start, the mark the snapshot is loaded at.
        let mut next: Option<i64> = None;
        let mut target = 0i64;
        // Numbers up to this were not read here (before where reading
        // began, or removed by retention before it got there).
        let mut floor = 0u64;
        let mut pc: Option<PartitionClient> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let step: Result<(), (&str, String)> = async {
                let part = match &pc {
                    Some(c) => c,
                    None => {
                        let c = tokio::time::timeout(
                            self.settings.timeout,
                            client.partition_client(topic.as_str(), p, UnknownTopicHandling::Retry),
                        )
                        .await
                        .map_err(|_| ("metadata", "no answer".to_string()))?
                        .map_err(|e| ("metadata", e.to_string()))?;
                        pc.insert(c)
                    }
                };
                let at = match next {
                    Some(n) => n,
                    None => {
                        let offset = |at| {
                            tokio::time::timeout(self.settings.timeout, part.get_offset(at))
                        };
                        let low = offset(OffsetAt::Earliest)
                            .await
                            .map_err(|_| ("offsets", "no answer".to_string()))?
                            .map_err(|e| ("offsets", e.to_string()))?;
                        let high = offset(OffsetAt::Latest)
                            .await
                            .map_err(|_| ("offsets", "no answer".to_string()))?
                            .map_err(|e| ("offsets", e.to_string()))?;
                        let back = i64::try_from(self.settings.snapshot_messages).unwrap_or(i64::MAX);
                        let start = if snapshot {
                            high.saturating_sub(back).max(low)
                        } else {
                            low
                        };
                        target = high;
                        floor = u64::try_from(start).unwrap_or(0);
                        *next.insert(start)
                    }
                };
                if snapshot && at >= target {
                    snapshot = false;
                    self.partition_loaded(t0);
                }
                let fetched = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = tokio::time::timeout(call, part.fetch_records(at, 1..self.settings.fetch_max_bytes, wait_ms)) => r,
                };
                let (records, high) = match fetched {
                    Err(_) => {
                        // The connection may be half open: a new one next time.
                        pc = None;
                        return Err(("fetch", "no answer".to_string()));
                    }
                    Ok(Ok(r)) => r,
                    Ok(Err(KafkaError::ServerError {
                        protocol_error: ProtocolError::OffsetOutOfRange,
                        ..
                    })) => {
                        // Retention removed what was not read yet (or the
                        // log was truncated): go on from the oldest kept.
                        let low = tokio::time::timeout(self.settings.timeout, part.get_offset(OffsetAt::Earliest))
                            .await
                            .map_err(|_| ("offsets", "no answer".to_string()))?
                            .map_err(|e| ("offsets", e.to_string()))?;
                        if low > at {
                            self.metrics.drop_n("out_of_range", (low - at) as u64);
                            floor = floor.max(u64::try_from(low).unwrap_or(0));
                            next = Some(low);
                        } else {
                            let high = tokio::time::timeout(self.settings.timeout, part.get_offset(OffsetAt::Latest))
                                .await
                                .map_err(|_| ("offsets", "no answer".to_string()))?
                                .map_err(|e| ("offsets", e.to_string()))?;
                            tracing::error!(topic = %topic, partition = p, next = at, high, "kafka: the partition's log is shorter than what was read (re-created?); following its end");
                            floor = u64::try_from(high).unwrap_or(0);
                            next = Some(high);
                        }
                        return Ok(());
                    }
                    Ok(Err(e)) => return Err(("fetch", e.to_string())),
                };
                let mut n = at;
                let mut in_snapshot = 0u64;
                for r in records {
                    if r.offset < n {
                        self.metrics.drop("duplicate");
                        continue;
                    }
                    // Offsets are ≥ 0 and < i64::MAX from a broker that
                    // keeps the protocol; one that does not is not followed.
                    let (Some(after), Ok(offset)) = (r.offset.checked_add(1), u64::try_from(r.offset)) else {
                        return Err(("fetch", format!("offset {} out of range", r.offset)));
                    };
                    n = after;
                    if snapshot {
                        in_snapshot += 1;
                    }
                    let seq = offset + 1;
                    match template.map(topic, r.record.key.as_deref(), r.record.value.as_deref()) {
                        Err(why) => {
                            self.metrics.drop(why.as_str());
                            if let Some(more) = DROPS_LOG.allow() {
                                tracing::warn!(topic = %topic, partition = p, offset = r.offset, reason = why.as_str(), dropped_since_last_line = more, "kafka: a record makes no channel message; dropped");
                            }
                        }
                        Ok((_, data)) if data.len() > self.settings.max_value_bytes => {
                            self.metrics.drop("too_large");
                            if let Some(more) = DROPS_LOG.allow() {
                                tracing::warn!(topic = %topic, partition = p, offset = r.offset, bytes = data.len(), max = self.settings.max_value_bytes, dropped_since_last_line = more, "kafka: a record's value is larger than --max-publish-bytes; dropped");
                            }
                        }
                        Ok((channel, data)) => match self.hub.publish_at(&channel, data, seq, origin, floor) {
                            Ok(_) => {
                                consumed.inc();
                            }
                            Err(PublishError::Duplicate { .. }) => self.metrics.drop("duplicate"),
                            Err(PublishError::Conflict) => {
                                self.metrics.drop("channel_conflict");
                                if let Some(more) = DROPS_LOG.allow() {
                                    tracing::warn!(topic = %topic, partition = p, channel = channel.as_str(), dropped_since_last_line = more, "kafka: the channel is fed from another partition (two templates make it); dropped");
                                }
                            }
                            Err(PublishError::ChannelLimit(_)) => self.metrics.drop("channel_limit"),
                        },
                    }
                }
                self.metrics.snapshot_messages.inc_by(in_snapshot as i64);
                next = Some(n);
                lag.set(high.saturating_sub(n).max(0));
                if n == at && high > at {
                    // Nothing readable below the high watermark: only
                    // transaction markers there (rskafka skips them). The
                    // broker answers such fetches at once; do not spin.
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(self.settings.fetch_wait) => {}
                    }
                }
                Ok(())
            }
            .await;
            match step {
                Ok(()) => {
                    attempt = 0;
                    if failing {
                        failing = false;
                        self.failing.fetch_sub(1, Ordering::Relaxed);
                        self.set_connected();
                        tracing::info!(topic = %topic, partition = p, "kafka: the partition answers again");
                    }
                }
                Err((op, e)) => {
                    self.metrics.error(op);
                    if !failing {
                        failing = true;
                        self.failing.fetch_add(1, Ordering::Relaxed);
                        self.set_connected();
                    }
                    if let Some(more) = ERRORS_LOG.allow() {
                        tracing::warn!(topic = %topic, partition = p, op, error = %e, failures_since_last_line = more, "kafka: a call failed; retrying");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// The producer of partition `p` of the bus topic.
    async fn producer(
        &self,
        client: &Client,
        topic: &str,
        p: i32,
    ) -> Result<Arc<PartitionClient>, String> {
        if let Some(c) = lock(&self.state).producers.get(&p) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(
            self.settings.timeout,
            client.partition_client(topic, p, UnknownTopicHandling::Error),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.settings.timeout))?
        .map_err(|e| e.to_string())?;
        let c = Arc::new(c);
        lock(&self.state).producers.insert(p, c.clone());
        Ok(c)
    }

    /// The readiness line and verdict.
    fn status(&self) -> (bool, String) {
        let st = lock(&self.state);
        if !self.client.initialized() {
            let why = st.problem.clone().unwrap_or_else(|| "connecting".into());
            return (false, format!("bus: kafka not connected ({why})"));
        }
        if !self.metadata_ok.load(Ordering::Relaxed) {
            let why = st.problem.clone().unwrap_or_default();
            return (false, format!("bus: kafka not connected ({why})"));
        }
        if !st.missing.is_empty() {
            return (
                false,
                format!("bus: kafka topics not found: {}", st.missing.join(", ")),
            );
        }
        let failing = self.failing.load(Ordering::Relaxed);
        if failing > 0 {
            return (
                false,
                format!("bus: kafka not connected ({failing} partitions failing)"),
            );
        }
        if !self.snapshot_done.load(Ordering::Relaxed) {
            return (
                false,
                format!(
                    "bus: kafka loading the snapshot ({} partitions to go)",
                    self.loading.load(Ordering::Relaxed)
                ),
            );
        }
        (true, "bus: ok (kafka)".into())
    }
}

impl Bus for KafkaBus {
    fn publish<'a>(&'a self, channel: &'a Subject, data: Bytes) -> Published<'a> {
        Box::pin(async move {
            let fail = |e: String| {
                self.metrics.error("produce");
                self.hub.metrics.bus_errors.inc();
                BusError::Unavailable(e)
            };
            let Some(topic) = &self.settings.bus_topic else {
                return Err(BusError::Unavailable(
                    "publishing needs --kafka-bus-topic".into(),
                ));
            };
            let Some(client) = self.client.get() else {
                return Err(fail("Kafka is not connected".into()));
            };
            let n = lock(&self.state).layout.get(topic).copied();
            let Some(n) = n else {
                return Err(fail(format!("the bus topic {topic} was not found")));
            };
            let key = channel.as_str().as_bytes();
            let p = partition_for(key, n);
            let producer = self.producer(client, topic, p).await.map_err(&fail)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let record = Record {
                key: Some(key.to_vec()),
                value: Some(data.to_vec()),
                headers: BTreeMap::new(),
                timestamp: rskafka::chrono::DateTime::from_timestamp_millis(now)
                    .unwrap_or_default(),
            };
            let offsets = tokio::time::timeout(
                self.settings.timeout,
                producer.produce(vec![record], Compression::NoCompression),
            )
            .await
            .map_err(|_| {
                // The connection may be half open: a new one next time.
                lock(&self.state).producers.remove(&p);
                fail(format!("no answer within {:?}", self.settings.timeout))
            })?
            .map_err(|e| {
                // The leader may have moved: look it up again next time.
                lock(&self.state).producers.remove(&p);
                fail(e.to_string())
            })?;
            self.metrics.produced.inc();
            Ok(offsets.first().map(|&o| o as u64 + 1))
        })
    }

    fn ready(&self) -> bool {
        self.status().0
    }

    fn readiness(&self) -> (bool, String) {
        self.status()
    }
}

/// Failed broker calls: a line at most every 10 s.
static ERRORS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);
/// Dropped records: a line at most every 10 s.
static DROPS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_kafkas() {
        // Kafka's UtilsTest.testMurmur2.
        for (key, want) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()), want, "{key}");
        }
        assert!((0..3).contains(&partition_for(b"pricing.curves.EU-ETS.DEC26", 3)));
        assert_eq!(partition_for(b"x", 1), 0);
    }

    #[test]
    fn the_epoch_follows_the_layout_only() {
        let a: BTreeMap<String, usize> = [("t1".to_string(), 3), ("t2".to_string(), 1)].into();
        let b: BTreeMap<String, usize> = [("t2".to_string(), 1), ("t1".to_string(), 3)].into();
        let c: BTreeMap<String, usize> = [("t1".to_string(), 4), ("t2".to_string(), 1)].into();
        assert_eq!(epoch_of(&a), epoch_of(&b));
        assert_ne!(epoch_of(&a), epoch_of(&c));
        assert_eq!(epoch_of(&a).len(), 17);
        assert!(epoch_of(&a).starts_with('k'));
    }

    #[test]
    fn topics_and_sasl_settings_are_checked() {
        let (t, m) =
            parse_topic("254carbon.pricing.curve.updates.v1=pricing.curves.{key}").unwrap();
        assert_eq!(t, "254carbon.pricing.curve.updates.v1");
        assert_eq!(m.as_str(), "pricing.curves.{key}");
        assert!(parse_topic("no-template")
            .unwrap_err()
            .contains("topic=template"));
        assert!(parse_topic("bad topic=a.{key}")
            .unwrap_err()
            .contains("not a Kafka topic"));
        assert!(parse_topic("t=a.b").unwrap_err().contains("no {key}"));
        assert!(sasl("scram-sha-512", "u", "p").is_ok());
        assert!(sasl("GSSAPI", "u", "p")
            .unwrap_err()
            .contains("--kafka-sasl-mechanism"));
        assert!(valid_topic("a_b-c.d"));
        assert!(!valid_topic(".."));
        assert!(!valid_topic(&"a".repeat(250)));
    }
}
