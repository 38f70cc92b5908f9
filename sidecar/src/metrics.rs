//! The sidecar's Prometheus metrics, registered in one place
//! ([`Metrics::register`]) and exposed on `/metrics`. Label sets are fixed
//! and resolved once, so the hot path only touches atomics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why messages were not delivered to a client.
#[derive(Clone, Debug)]
pub struct Drops {
    /// Replaced in a client's queue by a newer message of the same channel.
    pub coalesced: Counter,
    /// Dropped from the front of a full queue (`drop_oldest`).
    pub queue_full: Counter,
    /// Discarded when a slow client was disconnected (`close`).
    pub slow_consumer: Counter,
}

/// Why connections were refused or closed by the server.
#[derive(Clone, Debug)]
pub struct Closes {
    pub max_connections: Counter,
    pub slow_consumer: Counter,
    pub protocol_error: Counter,
    pub rate_limited: Counter,
    pub ping_timeout: Counter,
    pub idle: Counter,
    pub shutdown: Counter,
    /// The token's `exp` (plus skew) passed (4001 "token expired").
    pub expired: Counter,
    /// An identity without expiry reached `--max-lifetime` (4001).
    pub lifetime: Counter,
}

/// Fan-out metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_opened: Counter,
    pub closes: Closes,
    pub subscriptions: Gauge,
    pub subscribe_denied: Counter,
    pub client_errors: Counter,
    pub channels: Gauge,
    pub channel_limit: Counter,
    pub published: Counter,
    pub delivered: Counter,
    pub drops: Drops,
    pub queued: Gauge,
    pub latency: Histogram,
    pub bus_connected: Gauge,
    pub bus_reconnects: Counter,
    pub bus_errors: Counter,
    /// `expiring` frames sent.
    pub expiry_warnings: Counter,
    /// Time one connection took to decide its subscriptions again.
    pub reevaluation: Histogram,
    /// Policies put in force (`ok`) or refused (`refused`), by source.
    pub policy_reloads: Family<Vec<(String, String)>, Counter>,
    close_family: Labelled,
    drop_family: Labelled,
    revoked_family: Labelled,
}

type Labelled = Family<Vec<(String, String)>, Counter>;

/// The child of `family` for `key=value` (a clone shares the count).
fn child(family: &Labelled, key: &str, value: &str) -> Counter {
    family
        .get_or_create(&vec![(key.to_string(), value.to_string())])
        .clone()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let close_family = Labelled::default();
        let drop_family = Labelled::default();
        let close = |r| child(&close_family, "reason", r);
        let drop = |r| child(&drop_family, "reason", r);
        Metrics {
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            closes: Closes {
                max_connections: close("max_connections"),
                slow_consumer: close("slow_consumer"),
                protocol_error: close("protocol_error"),
                rate_limited: close("rate_limited"),
                ping_timeout: close("ping_timeout"),
                idle: close("idle"),
                shutdown: close("shutdown"),
                expired: close("token_expired"),
                lifetime: close("lifetime"),
            },
            subscriptions: Gauge::default(),
            subscribe_denied: Counter::default(),
            client_errors: Counter::default(),
            channels: Gauge::default(),
            channel_limit: Counter::default(),
            published: Counter::default(),
            delivered: Counter::default(),
            drops: Drops {
                coalesced: drop("coalesced"),
                queue_full: drop("queue_full"),
                slow_consumer: drop("slow_consumer"),
            },
            queued: Gauge::default(),
            // 50 µs .. ~3.3 s
            latency: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                50e-6, 2.0, 17,
            )),
            bus_connected: Gauge::default(),
            bus_reconnects: Counter::default(),
            bus_errors: Counter::default(),
            expiry_warnings: Counter::default(),
            // 1 µs .. ~65 ms
            reevaluation: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-6, 2.0, 17),
            ),
            policy_reloads: Family::default(),
            close_family,
            drop_family,
            revoked_family: Labelled::default(),
        }
    }

    /// Counts `n` subscriptions ended because rule `rule` now denies them
    /// (rules are the policy's own ids: a bounded set).
    pub fn revoked(&self, rule: &str, n: u64) {
        child(&self.revoked_family, "rule", rule).inc_by(n);
    }

    /// Counts a policy reload from `source` (`file`, `remote`): put in
    /// force or refused.
    pub fn policy_reload(&self, source: &str, ok: bool) {
        self.policy_reloads
            .get_or_create(&vec![
                ("source".to_string(), source.to_string()),
                (
                    "result".to_string(),
                    if ok { "ok" } else { "refused" }.to_string(),
                ),
            ])
            .inc();
    }

    /// Registers every metric under `sidecar_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sidecar");
        r.register(
            "ws_connections",
            "Open WebSocket connections",
            self.connections.clone(),
        );
        r.register(
            "ws_connections_opened",
            "WebSocket connections accepted",
            self.connections_opened.clone(),
        );
        r.register(
            "ws_server_closes",
            "Connections the server closed or refused, by reason",
            self.close_family.clone(),
        );
        r.register(
            "ws_subscriptions",
            "Active subscriptions over all connections",
            self.subscriptions.clone(),
        );
        r.register(
            "ws_subscribe_denied",
            "Subscriptions the entitlements policy refused",
            self.subscribe_denied.clone(),
        );
        r.register(
            "ws_client_errors",
            "Client messages answered with an error frame",
            self.client_errors.clone(),
        );
        r.register(
            "channels",
            "Channels with state (last value, history)",
            self.channels.clone(),
        );
        r.register(
            "channel_limit",
            "Publishes refused because max_channels was reached",
            self.channel_limit.clone(),
        );
        r.register(
            "messages_published",
            "Messages published",
            self.published.clone(),
        );
        r.register(
            "messages_delivered",
            "Messages written to client sockets",
            self.delivered.clone(),
        );
        r.register(
            "messages_dropped",
            "Messages not delivered to a client, by reason",
            self.drop_family.clone(),
        );
        r.register(
            "ws_queued_messages",
            "Messages waiting in client queues",
            self.queued.clone(),
        );
        r.register(
            "publish_to_send_seconds",
            "Time from publish to the message's write to a client socket",
            self.latency.clone(),
        );
        r.register(
            "bus_connected",
            "1 while the bus is connected (always 1 for the embedded bus)",
            self.bus_connected.clone(),
        );
        r.register(
            "bus_reconnects",
            "Times the bus connection was re-established",
            self.bus_reconnects.clone(),
        );
        r.register(
            "bus_errors",
            "Bus publish or subscribe errors",
            self.bus_errors.clone(),
        );
        r.register(
            "ws_expiry_warnings",
            "expiring frames sent to clients whose identity ends soon",
            self.expiry_warnings.clone(),
        );
        r.register(
            "ws_revoked_subscriptions",
            "Live subscriptions ended because a new decision denies them, by rule",
            self.revoked_family.clone(),
        );
        r.register(
            "ws_reevaluation_seconds",
            "Time one connection took to decide its subscriptions again after a change",
            self.reevaluation.clone(),
        );
        r.register(
            "policy_reloads",
            "Policies put in force or refused, by source and result",
            self.policy_reloads.clone(),
        );
    }
}

/// The registry as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
