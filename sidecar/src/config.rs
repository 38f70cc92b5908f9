//! The sidecar's settings, from flags or the environment (one typed layer,
//! clap with `env`): every flag `--foo-bar` is also `SIDECAR_FOO_BAR`.

use crate::fanout::{HubConfig, SlowPolicy};
use crate::server::{FrontConfig, IdentityHeaders};
use crate::session::SessionConfig;
use crate::usage::agg::Limits;
use crate::usage::pg::PgConfig;
use crate::usage::UsageConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which bus carries publishes between replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// In-process only: one replica.
    Memory,
    /// NATS: every replica subscribes to `<nats-prefix>.>`.
    Nats,
    /// Kafka: the `--kafka-topic`s in, publishes to `--kafka-bus-topic`;
    /// sequence numbers from the offsets, alike on every replica.
    Kafka,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sidecar",
    version,
    about = "254Carbon access sidecar: WebSocket fan-out, publish, metrics"
)]
pub struct Config {
    /// Address to listen on (loopback or pod-local: identity headers are trusted).
    #[arg(long, env = "SIDECAR_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Share the listening port with other sidecar processes (SO_REUSEPORT;
    /// the kernel spreads connections between them). Replicas on one host
    /// need `--bus nats` to share publishes.
    #[arg(long, env = "SIDECAR_REUSE_PORT")]
    pub reuse_port: bool,
    /// What is logged: an env-filter directive (`RUST_LOG` syntax, e.g.
    /// `info` or `sidecar=debug,async_nats=warn`). Unset: `RUST_LOG`, else
    /// `info`.
    #[arg(long, env = "SIDECAR_LOG")]
    pub log: Option<String>,
    /// How log lines are written: `text` (human-readable) or `json` (one
    /// object per line: timestamp, level, target, message, fields).
    #[arg(long, env = "SIDECAR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::logging::LogFormat,
    /// The entitlements policy (JSON, the entitlements filter's format); its
    /// channel rules decide subscriptions and publishes.
    #[arg(long, env = "SIDECAR_POLICY")]
    pub policy: PathBuf,
    /// The auth filter's configuration (the same JSON): the sidecar then
    /// verifies tokens itself, for in-band `auth` (a connection that
    /// arrives without identity) and `refresh`.
    #[arg(long, env = "SIDECAR_AUTH_CONFIG")]
    pub auth_config: Option<PathBuf>,
    /// Where the sidecar reaches an Envoy cluster the auth configuration
    /// names (JWKS, OIDC discovery): `name=host:port`, repeated (or
    /// comma-separated in the environment). Unnamed clusters: the fetch's
    /// authority.
    #[arg(long = "cluster", env = "SIDECAR_CLUSTERS", value_delimiter = ',', value_parser = parse_cluster)]
    pub clusters: Vec<(String, String)>,
    /// Seconds a connection without identity has to send `auth` (then 4001).
    #[arg(long, env = "SIDECAR_AUTH_TIMEOUT", default_value_t = 10)]
    pub auth_timeout: u64,
    /// Seconds between looks at the policy file (a changed file is
    /// reloaded; SIGHUP reloads at once). 0: only on SIGHUP.
    #[arg(long, env = "SIDECAR_POLICY_POLL", default_value_t = 2)]
    pub policy_poll: u64,
    /// What proves the `x-auth-*` headers of `/ws`, `/publish/` and `/admin/`:
    /// `token` (the bearer token they came from, which the auth filter
    /// forwards on those routes, verified with `--auth-config` and compared
    /// header by header; without `--auth-config` identity headers are
    /// refused) or `none` (trusted as they come: only where nothing but
    /// the gateway's proxies can reach the sidecar).
    #[arg(
        long,
        env = "SIDECAR_IDENTITY_PROOF",
        value_enum,
        default_value = "token"
    )]
    pub identity_proof: crate::proof::IdentityProof,
    /// Fetch the policy from this `http://host[:port]/path` (the
    /// entitlements filter's remote policy endpoint) instead of watching
    /// the file, which serves until the first fetch.
    #[arg(long, env = "SIDECAR_POLICY_URL")]
    pub policy_url: Option<String>,
    /// Seconds between conditional fetches of `--policy-url`.
    #[arg(long, env = "SIDECAR_POLICY_REFRESH", default_value_t = 30)]
    pub policy_refresh: u64,
    /// Seconds before the first retry of a failed fetch (doubling up to
    /// `--policy-refresh`).
    #[arg(long, env = "SIDECAR_POLICY_RETRY", default_value_t = 5)]
    pub policy_retry: u64,

    /// Most open WebSocket connections (beyond: close 1013).
    #[arg(long, env = "SIDECAR_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Most subscriptions per connection.
    #[arg(long, env = "SIDECAR_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,
    /// Largest client message in bytes (beyond: close 1009).
    #[arg(long, env = "SIDECAR_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub max_message_bytes: usize,
    /// Seconds between server pings; a ping unanswered by the next one closes the connection.
    #[arg(long, env = "SIDECAR_PING_INTERVAL", default_value_t = 25)]
    pub ping_interval: u64,
    /// Seconds without a message either way before a connection is closed (0: never).
    #[arg(long, env = "SIDECAR_IDLE_TIMEOUT", default_value_t = 600)]
    pub idle_timeout: u64,
    /// Client messages per second per connection, on average.
    #[arg(long, env = "SIDECAR_CLIENT_RATE", default_value_t = 20.0)]
    pub client_rate: f64,
    /// Client messages per connection in a burst (beyond the rate: close 1008).
    #[arg(long, env = "SIDECAR_CLIENT_BURST", default_value_t = 100.0)]
    pub client_burst: f64,

    /// Messages a client's queue holds before the slow-consumer policy applies.
    #[arg(long, env = "SIDECAR_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// What to do with a client whose queue is full.
    #[arg(
        long,
        env = "SIDECAR_SLOW_POLICY",
        value_enum,
        default_value = "coalesce"
    )]
    pub slow_policy: SlowPolicy,
    /// Writer tasks writing published messages to sockets (0: one per core, at most 8).
    #[arg(long, env = "SIDECAR_WRITERS", default_value_t = 0)]
    pub writers: usize,
    /// Most channels with state (last value, history).
    #[arg(long, env = "SIDECAR_MAX_CHANNELS", default_value_t = 100_000)]
    pub max_channels: usize,
    /// Messages kept per channel for replay after a reconnect (0: none).
    #[arg(long, env = "SIDECAR_HISTORY_MESSAGES", default_value_t = 100)]
    pub history_messages: usize,
    /// Seconds a message stays replayable (0: no age bound).
    #[arg(long, env = "SIDECAR_HISTORY_SECONDS", default_value_t = 300)]
    pub history_seconds: u64,
    /// Most current values in one `subscribed` frame.
    #[arg(long, env = "SIDECAR_MAX_SNAPSHOT", default_value_t = 1000)]
    pub max_snapshot: usize,
    /// Largest `POST /publish` body in bytes.
    #[arg(long, env = "SIDECAR_MAX_PUBLISH_BYTES", default_value_t = 65_536)]
    pub max_publish_bytes: usize,
    /// Seconds shutdown waits for connections to close.
    #[arg(long, env = "SIDECAR_DRAIN_TIMEOUT", default_value_t = 10)]
    pub drain_timeout: u64,
    /// Seconds over which shutdown spreads the WebSockets' closes (1001),
    /// so that their clients reconnect elsewhere gradually; 0: all at
    /// once. Keep it below --drain-timeout (the rest is for the last
    /// closes to finish); beyond, the drain timeout cuts it short.
    #[arg(long, env = "SIDECAR_CLOSE_SPREAD", default_value_t = 0)]
    pub close_spread: u64,

    /// The bus between replicas.
    #[arg(long, env = "SIDECAR_BUS", value_enum, default_value = "memory")]
    pub bus: BusKind,
    /// NATS server for `--bus nats`.
    #[arg(
        long,
        env = "SIDECAR_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Subject prefix on NATS: channel `c` travels as `<prefix>.c`.
    #[arg(long, env = "SIDECAR_NATS_PREFIX", default_value = "carbon.live")]
    pub nats_prefix: String,

    /// Kafka bootstrap brokers for `--bus kafka`, `host:port`, repeated or
    /// comma-separated.
    #[arg(
        long = "kafka-brokers",
        env = "SIDECAR_KAFKA_BROKERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_brokers: Vec<String>,
    /// A topic read into channels, `topic=template` (the template names the
    /// channel from `{key}`, and optionally `{topic}` and
    /// `{value.<field>}`), repeated or separated by `;` in the environment.
    #[arg(long = "kafka-topic", env = "SIDECAR_KAFKA_TOPICS", value_delimiter = ';', value_parser = crate::bus::kafka::parse_topic)]
    pub kafka_topics: Vec<(String, crate::bus::kafka::Template)>,
    /// Where `POST /publish` produces (key: the channel); read back as
    /// channel `{key}` unless a `--kafka-topic` maps it. Unset: publishing
    /// answers 503.
    #[arg(long, env = "SIDECAR_KAFKA_BUS_TOPIC")]
    pub kafka_bus_topic: Option<String>,
    /// The client id the brokers see (quotas, logs). No consumer group is
    /// used: every replica reads every partition.
    #[arg(
        long,
        env = "SIDECAR_KAFKA_CLIENT_ID",
        default_value = "254carbon-sidecar"
    )]
    pub kafka_client_id: String,
    /// TLS to the brokers, trusting the CA certificates of this PEM file.
    #[arg(long, env = "SIDECAR_KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<String>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with
    /// `--kafka-sasl-username` and `SIDECAR_KAFKA_SASL_PASSWORD`).
    #[arg(long, env = "SIDECAR_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(long, env = "SIDECAR_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// Best from the environment (a flag shows in `ps`).
    #[arg(long, env = "SIDECAR_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// Records read back from the end of each partition at start, so the
    /// hub has the channels' last values (and history for `since`) before
    /// the replica is ready. 0: start at the end.
    #[arg(long, env = "SIDECAR_KAFKA_SNAPSHOT_MESSAGES", default_value_t = 1000)]
    pub kafka_snapshot_messages: u64,
    /// Seconds the start-up snapshot may take; then the replica serves with
    /// what it has loaded.
    #[arg(long, env = "SIDECAR_KAFKA_SNAPSHOT_TIMEOUT", default_value_t = 30)]
    pub kafka_snapshot_timeout: u64,
    /// Milliseconds one broker call (connect, metadata, offsets, produce) may take.
    #[arg(long, env = "SIDECAR_KAFKA_TIMEOUT_MS", default_value_t = 5000)]
    pub kafka_timeout_ms: u64,
    /// Most bytes one fetch of one partition asks for.
    #[arg(
        long,
        env = "SIDECAR_KAFKA_FETCH_MAX_BYTES",
        default_value_t = 1_048_576
    )]
    pub kafka_fetch_max_bytes: i32,
    /// Milliseconds a fetch waits at the broker for new records.
    #[arg(long, env = "SIDECAR_KAFKA_FETCH_WAIT_MS", default_value_t = 500)]
    pub kafka_fetch_wait_ms: u64,
    /// Seconds between checks of the topics' partition counts.
    #[arg(long, env = "SIDECAR_KAFKA_METADATA_INTERVAL", default_value_t = 30)]
    pub kafka_metadata_interval: u64,

    /// Identity header names (DESIGN.md's defaults).
    #[arg(long, env = "SIDECAR_SUBJECT_HEADER", default_value = "x-auth-subject")]
    pub subject_header: String,
    #[arg(long, env = "SIDECAR_ISSUER_HEADER", default_value = "x-auth-issuer")]
    pub issuer_header: String,
    #[arg(long, env = "SIDECAR_TENANT_HEADER", default_value = "x-auth-tenant")]
    pub tenant_header: String,
    #[arg(long, env = "SIDECAR_ROLES_HEADER", default_value = "x-auth-roles")]
    pub roles_header: String,
    #[arg(long, env = "SIDECAR_CLAIMS_HEADER", default_value = "x-auth-claims")]
    pub claims_header: String,
    #[arg(long, env = "SIDECAR_EXPIRES_HEADER", default_value = "x-auth-expires")]
    pub expires_header: String,
    /// Seconds of tolerance after a token's `exp` before its stream closes
    /// (the auth filter's `clock_skew_s`).
    #[arg(long, env = "SIDECAR_CLOCK_SKEW", default_value_t = 60)]
    pub clock_skew: u64,
    /// Seconds before an identity's end at which the client is sent
    /// `expiring` (time to refresh).
    #[arg(long, env = "SIDECAR_EXPIRY_WARNING", default_value_t = 30)]
    pub expiry_warning: u64,
    /// Longest life, in seconds, of an identity without an expiry (no
    /// `x-auth-expires`, a token without `exp`); then the connection closes
    /// 4001 unless refreshed. 0: unbounded.
    #[arg(long, env = "SIDECAR_MAX_LIFETIME", default_value_t = 86_400)]
    pub max_lifetime: u64,

    /// Also serve the Envoy rate limit service (gRPC, h2c, with
    /// `grpc.health.v1`) on this address.
    #[arg(long, env = "SIDECAR_RLS_LISTEN")]
    pub rls_listen: Option<SocketAddr>,
    /// The rate limit service's limits: a file, or a directory of `*.yaml`
    /// files, in envoyproxy/ratelimit's format (one domain per file).
    /// Watched (`--rls-config-poll`, SIGHUP); a bad file is refused and the
    /// last good configuration stays. Without it only descriptors with a
    /// `limit` override (what our ratelimit filter sends) are limited.
    #[arg(long, env = "SIDECAR_RLS_CONFIG")]
    pub rls_config: Option<PathBuf>,
    /// Seconds between checks of `--rls-config` for changes. 0: only on SIGHUP.
    #[arg(long, env = "SIDECAR_RLS_CONFIG_POLL", default_value_t = 10)]
    pub rls_config_poll: u64,
    /// Rate limit headers the service asks Envoy to add to responses:
    /// none, draft (`RateLimit-Limit`/`-Remaining`/`-Reset`), x-ratelimit
    /// (`X-RateLimit-*`), both.
    #[arg(
        long,
        env = "SIDECAR_RLS_RESPONSE_HEADERS",
        value_enum,
        default_value = "none"
    )]
    pub rls_response_headers: crate::rls::ResponseHeaders,
    /// A hit leaving less than 1 - this share of the limit counts as near_limit.
    #[arg(long, env = "SIDECAR_RLS_NEAR_LIMIT_RATIO", default_value_t = 0.8)]
    pub rls_near_limit_ratio: f64,
    /// Distinct domains and descriptor keys in the rate limit metrics
    /// (beyond: counted as `_other`).
    #[arg(long, env = "SIDECAR_RLS_MAX_METRIC_LABELS", default_value_t = 1000)]
    pub rls_max_metric_labels: usize,
    /// Largest `ShouldRateLimit` request, bytes.
    #[arg(long, env = "SIDECAR_RLS_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub rls_max_message_bytes: usize,
    /// Concurrent calls per HTTP/2 connection to the rate limit service.
    #[arg(
        long,
        env = "SIDECAR_RLS_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub rls_max_concurrent_streams: u32,
    /// Where the rate limit buckets live: single, sentinel, cluster.
    #[arg(long, env = "SIDECAR_REDIS_TYPE", value_enum, default_value = "single")]
    pub redis_type: crate::rls::store::Topology,
    /// Redis for the rate limit service. single: `host:port` or a
    /// `redis://[user:password@]host:port[/db]` / `rediss://` URL;
    /// sentinel: the master's name, then the sentinels
    /// (`mymaster,sentinel-0:26379,sentinel-1:26379`); cluster: seed
    /// nodes (`node-0:6379,node-1:6379`).
    #[arg(long, env = "SIDECAR_REDIS", default_value = "127.0.0.1:6379")]
    pub redis: String,
    /// `password` or `user:password` for the Redis data nodes when their
    /// URL has none (with Sentinel: the master's; the sentinels' own go in
    /// their URLs).
    #[arg(long, env = "SIDECAR_REDIS_AUTH", hide_env_values = true)]
    pub redis_auth: Option<String>,
    /// Sentinel: reach the master with TLS.
    #[arg(long, env = "SIDECAR_REDIS_TLS")]
    pub redis_tls: bool,
    /// Sentinel: the master's database.
    #[arg(long, env = "SIDECAR_REDIS_DB", default_value_t = 0)]
    pub redis_db: i64,
    /// PEM file of the roots that `rediss://` servers are checked against
    /// (default: the system's).
    #[arg(long, env = "SIDECAR_REDIS_CA")]
    pub redis_ca: Option<String>,
    /// Multiplexed Redis connections of the rate limit service (calls are
    /// pipelined on each; a Cluster uses one per node).
    #[arg(long, env = "SIDECAR_REDIS_CONNECTIONS", default_value_t = 2)]
    pub redis_connections: usize,
    /// Most rate limit hits one Redis script call carries: hits waiting for
    /// a connection go together in its next call (1: one call per hit; a
    /// Cluster always goes one by one).
    #[arg(long, env = "SIDECAR_REDIS_BATCH", default_value_t = 64)]
    pub redis_batch: usize,
    /// Most rate limit hits waiting per Redis connection; beyond, a call
    /// answers UNAVAILABLE at once (`sidecar_rls_redis_errors_total{kind="queue_full"}`).
    #[arg(long, env = "SIDECAR_REDIS_QUEUE", default_value_t = 4096)]
    pub redis_queue: usize,
    /// Longest wait, in milliseconds, for a Redis reply (a caller's shorter
    /// `grpc-timeout` wins) and for a connection.
    #[arg(long, env = "SIDECAR_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,
    /// Key prefix of the rate limit buckets in Redis.
    #[arg(long, env = "SIDECAR_REDIS_PREFIX", default_value = "rl:")]
    pub redis_prefix: String,

    /// Shared secret for `POST /v1/usage` (header `x-usage-secret`); without
    /// it only loopback peers may post usage.
    #[arg(long, env = "SIDECAR_USAGE_SECRET", hide_env_values = true)]
    pub usage_secret: Option<String>,
    /// Largest usage batch in bytes (beyond: 413).
    #[arg(long, env = "SIDECAR_USAGE_MAX_BATCH_BYTES", default_value_t = 8 << 20)]
    pub usage_max_batch_bytes: usize,
    /// Tenants with their own usage series; the rest count as `other`.
    #[arg(long, env = "SIDECAR_USAGE_MAX_TENANTS", default_value_t = 1000)]
    pub usage_max_tenants: usize,
    /// Routes with their own usage series; the rest count as `other`.
    #[arg(long, env = "SIDECAR_USAGE_MAX_ROUTES", default_value_t = 500)]
    pub usage_max_routes: usize,
    /// Application metric series (name and labels); beyond: `app_other`.
    #[arg(long, env = "SIDECAR_USAGE_MAX_APP_SERIES", default_value_t = 10_000)]
    pub usage_max_app_series: usize,
    /// Batch ids remembered to ignore a resent batch (without PostgreSQL).
    #[arg(long, env = "SIDECAR_USAGE_DEDUP_BATCHES", default_value_t = 100_000)]
    pub usage_dedup_batches: usize,
    /// Minutes of per-minute rollups kept in memory (`GET /v1/usage/rollups`).
    #[arg(long, env = "SIDECAR_USAGE_ROLLUP_MINUTES", default_value_t = 120)]
    pub usage_rollup_minutes: u64,
    /// Most rollup rows in memory; beyond, new rows fold into `other`.
    #[arg(long, env = "SIDECAR_USAGE_MAX_ROLLUP_ROWS", default_value_t = 200_000)]
    pub usage_max_rollup_rows: usize,
    /// PostgreSQL for billing rollups (libpq key=value or URL); when set,
    /// a batch is acknowledged once its rollups are committed.
    #[arg(long, env = "SIDECAR_USAGE_POSTGRES", hide_env_values = true)]
    pub usage_postgres: Option<String>,
    /// Most batches per PostgreSQL transaction.
    #[arg(long, env = "SIDECAR_USAGE_PG_GROUP", default_value_t = 64)]
    pub usage_pg_group: usize,
    /// Batches waiting for the PostgreSQL writer (beyond: 503, retried).
    #[arg(long, env = "SIDECAR_USAGE_PG_QUEUE", default_value_t = 1024)]
    pub usage_pg_queue: usize,
    /// PostgreSQL of the entitlement grants (libpq key=value or URL): the
    /// admin API (`/admin/v1/`) reads and writes them there, and the
    /// grants in force follow it (LISTEN/NOTIFY, a resync every
    /// `--grants-resync` seconds). Without it the admin API answers 503.
    /// Not with `--grants-file`.
    #[arg(long, env = "SIDECAR_GRANTS_POSTGRES", hide_env_values = true)]
    pub grants_postgres: Option<String>,
    /// The grants from a file when there is no PostgreSQL: JSON
    /// `{"grants": [{"tenant"|"subject": …, "resource": …, "action": …}]}`,
    /// read at start (invalid: the sidecar does not start), on SIGHUP and
    /// when its content changes (every `--policy-poll` seconds); an
    /// invalid change is refused and the last good grants stay. Setting
    /// both this and `--grants-postgres` is a start error.
    #[arg(long, env = "SIDECAR_GRANTS_FILE", conflicts_with = "grants_postgres")]
    pub grants_file: Option<PathBuf>,
    /// Seconds between catch-ups from PostgreSQL when no notice came (a
    /// lost NOTIFY is healed within this).
    #[arg(long, env = "SIDECAR_GRANTS_RESYNC", default_value_t = 30)]
    pub grants_resync: u64,
    /// Changes (version, holder) kept for the grants feed's deltas; a
    /// caller older than the oldest kept gets a snapshot.
    #[arg(long, env = "SIDECAR_GRANTS_LOG", default_value_t = 100_000)]
    pub grants_log: usize,
    /// Most grants held in memory; a load or catch-up beyond is refused
    /// and the last good grants stay.
    #[arg(long, env = "SIDECAR_GRANTS_MAX", default_value_t = 2_000_000)]
    pub grants_max: usize,
    /// A bearer token the internal endpoints (`/internal/v1/grants`,
    /// `/internal/v1/policy`) require in `authorization: Bearer <token>`;
    /// empty: none.
    #[arg(long, env = "SIDECAR_GRANTS_FEED_TOKEN", hide_env_values = true)]
    pub grants_feed_token: Option<String>,
    /// A secret that admits admin calls without the `access-admin` role
    /// (header `x-admin-secret`); empty: none.
    #[arg(long, env = "SIDECAR_ADMIN_SECRET", hide_env_values = true)]
    pub admin_secret: Option<String>,
}

impl Config {
    /// This configuration with its secrets replaced by `<redacted>`: the
    /// usage secret, the feed token, the admin secret, and the passwords
    /// (and URL user info) of the PostgreSQL, Redis, NATS and policy
    /// addresses. What startup logs.
    pub fn redacted(&self) -> Config {
        let secret = |s: &Option<String>| s.as_ref().map(|_| REDACTED.to_string());
        let mut c = self.clone();
        c.usage_secret = secret(&self.usage_secret);
        c.grants_feed_token = secret(&self.grants_feed_token);
        c.admin_secret = secret(&self.admin_secret);
        c.usage_postgres = self
            .usage_postgres
            .as_deref()
            .map(crate::pg::redact_conninfo);
        c.grants_postgres = self
            .grants_postgres
            .as_deref()
            .map(crate::pg::redact_conninfo);
        c.redis = self
            .redis
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
        c.redis_auth = secret(&self.redis_auth);
        c.nats_url = redact_url(&self.nats_url);
        c.kafka_sasl_password = secret(&self.kafka_sasl_password);
        c.policy_url = self.policy_url.as_deref().map(redact_url);
        c
    }

    /// The Kafka settings of `--bus kafka`.
    pub fn kafka(&self) -> Result<crate::bus::kafka::KafkaSettings, String> {
        let sasl = match (&self.kafka_sasl_mechanism, &self.kafka_sasl_username) {
            (None, None) => None,
            (Some(m), Some(u)) => Some(crate::bus::kafka::sasl(
                m,
                u,
                self.kafka_sasl_password.as_deref().unwrap_or(""),
            )?),
            (Some(_), None) => {
                return Err("--kafka-sasl-mechanism needs --kafka-sasl-username".into())
            }
            (None, Some(_)) => {
                return Err("--kafka-sasl-username needs --kafka-sasl-mechanism".into())
            }
        };
        if self.kafka_fetch_max_bytes < 1024 {
            return Err("--kafka-fetch-max-bytes: at least 1024".into());
        }
        Ok(crate::bus::kafka::KafkaSettings {
            brokers: self
                .kafka_brokers
                .iter()
                .map(|b| b.trim().to_string())
                .filter(|b| !b.is_empty())
                .collect(),
            topics: self.kafka_topics.clone(),
            bus_topic: self.kafka_bus_topic.clone().filter(|t| !t.is_empty()),
            client_id: self.kafka_client_id.clone(),
            tls_ca_file: self.kafka_ca_file.clone(),
            sasl,
            snapshot_messages: self.kafka_snapshot_messages,
            snapshot_timeout: Duration::from_secs(self.kafka_snapshot_timeout),
            timeout: Duration::from_millis(self.kafka_timeout_ms.max(100)),
            fetch_max_bytes: self.kafka_fetch_max_bytes,
            fetch_wait: Duration::from_millis(self.kafka_fetch_wait_ms.clamp(10, 30_000)),
            metadata_interval: Duration::from_secs(self.kafka_metadata_interval.max(1)),
            max_value_bytes: self.max_publish_bytes,
        })
    }

    pub fn hub(&self) -> HubConfig {
        HubConfig {
            max_channels: self.max_channels,
            history_messages: self.history_messages,
            history_ttl: Duration::from_secs(self.history_seconds),
            max_snapshot: self.max_snapshot,
            queue_capacity: self.queue_capacity,
            slow_policy: self.slow_policy,
            writers: if self.writers == 0 {
                HubConfig::default().writers
            } else {
                self.writers
            },
        }
    }

    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            max_subscriptions: self.max_subscriptions,
            max_message_bytes: self.max_message_bytes,
            ping_interval: Duration::from_secs(self.ping_interval.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout),
            client_rate: self.client_rate,
            client_burst: self.client_burst.max(1.0),
            close_timeout: Duration::from_secs(5),
            close_spread: Duration::from_secs(self.close_spread),
            clock_skew: Duration::from_secs(self.clock_skew),
            expiry_warning: Duration::from_secs(self.expiry_warning),
            max_lifetime: Duration::from_secs(self.max_lifetime),
            auth_timeout: Duration::from_secs(self.auth_timeout.max(1)),
        }
    }

    /// How the rate limit service reaches Redis.
    pub fn redis(&self) -> crate::rls::store::Settings {
        crate::rls::store::Settings {
            topology: self.redis_type,
            url: self.redis.clone(),
            auth: self.redis_auth.clone(),
            sentinel_master_tls: self.redis_tls,
            sentinel_master_db: self.redis_db,
            ca_file: self.redis_ca.clone(),
            connections: self.redis_connections.max(1),
            batch: self.redis_batch.max(1),
            queue: self.redis_queue.max(1),
            connect_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            prefix: self.redis_prefix.clone(),
        }
    }

    /// How the rate limit service decides.
    pub fn rls(&self) -> crate::rls::Options {
        crate::rls::Options {
            response_headers: self.rls_response_headers,
            near_limit_ratio: self.rls_near_limit_ratio.clamp(0.0, 1.0),
            max_metric_labels: self.rls_max_metric_labels,
            max_message_bytes: self.rls_max_message_bytes.max(1024),
            max_concurrent_streams: self.rls_max_concurrent_streams.max(1),
            drain: Duration::from_secs(self.drain_timeout.max(1)),
            ..crate::rls::Options::default()
        }
    }

    pub fn usage(&self) -> UsageConfig {
        UsageConfig {
            secret: self.usage_secret.clone().filter(|s| !s.is_empty()),
            max_batch_bytes: self.usage_max_batch_bytes,
            limits: Limits {
                max_tenants: self.usage_max_tenants,
                max_routes: self.usage_max_routes,
                max_app_series: self.usage_max_app_series,
            },
            dedup_batches: self.usage_dedup_batches,
            rollup_minutes: self.usage_rollup_minutes,
            max_rollup_rows: self.usage_max_rollup_rows,
            postgres: self.usage_postgres.clone().map(|conninfo| PgConfig {
                conninfo,
                max_group: self.usage_pg_group.max(1),
                queue: self.usage_pg_queue.max(1),
            }),
        }
    }

    pub fn grants(&self) -> crate::grants::LiveConfig {
        crate::grants::LiveConfig {
            log: self.grants_log,
            max: self.grants_max,
        }
    }

    /// Where the grants come from (both set: the first source named).
    pub fn grants_source(&self) -> crate::grants::SourceKind {
        use crate::grants::SourceKind;
        match (&self.grants_postgres, &self.grants_file) {
            (Some(_), _) => SourceKind::Postgres,
            (None, Some(_)) => SourceKind::File,
            (None, None) => SourceKind::None,
        }
    }

    pub fn front(&self) -> FrontConfig {
        FrontConfig {
            max_connections: self.max_connections,
            max_publish_bytes: self.max_publish_bytes,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            identity_proof: self.identity_proof,
            identity: IdentityHeaders {
                subject: self.subject_header.to_ascii_lowercase(),
                issuer: self.issuer_header.to_ascii_lowercase(),
                tenant: self.tenant_header.to_ascii_lowercase(),
                roles: self.roles_header.to_ascii_lowercase(),
                claims: self.claims_header.to_ascii_lowercase(),
                expires: self.expires_header.to_ascii_lowercase(),
            },
        }
    }
}

fn parse_cluster(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, addr)) if !name.is_empty() && addr.contains(':') => {
            Ok((name.to_string(), addr.to_string()))
        }
        _ => Err(format!("{s:?}: expected name=host:port")),
    }
}

pub(crate) const REDACTED: &str = "<redacted>";

/// A URL with the user info of its authority (`user:password@`) replaced;
/// anything that is not `scheme://…` stays.
pub(crate) fn redact_url(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else {
        return s.to_string();
    };
    let end = s[start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| start + i);
    match s[start..end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &s[..start], &s[start + at..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn url_user_info_is_redacted() {
        assert_eq!(
            redact_url("nats://u:p@nats:4222"),
            "nats://<redacted>@nats:4222"
        );
        assert_eq!(redact_url("nats://nats:4222"), "nats://nats:4222");
        assert_eq!(redact_url("127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(
            redact_url("http://cfg/policy?next=a@b"),
            "http://cfg/policy?next=a@b"
        );
    }

    #[test]
    fn the_redacted_configuration_holds_no_secret() {
        let c = Config::parse_from([
            "sidecar",
            "--policy=p.json",
            "--usage-secret=SECRET1",
            "--grants-feed-token=SECRET2",
            "--admin-secret=SECRET3",
            "--usage-postgres=host=db password=SECRET4",
            "--grants-postgres=postgresql://u:SECRET5@db/x",
            "--nats-url=nats://u:SECRET6@nats:4222",
            "--redis=redis://:SECRET7@redis:6379",
            "--redis-auth=SECRET9",
            "--policy-url=http://u:SECRET8@cfg/policy",
        ]);
        let shown = format!("{:?}", c.redacted());
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("p.json"), "{shown}");
    }
}
