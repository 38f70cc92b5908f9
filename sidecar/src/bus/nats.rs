//! The NATS bus: several sidecar replicas share one stream of publishes.
//!
//! Channel `c` travels as subject `<prefix>.c`. Every replica subscribes to
//! `<prefix>.>` and hands what arrives to its own hub, which assigns the
//! sequence numbers (so they are per replica; a client moving to another
//! replica sees another epoch and gets the snapshot instead of a replay).
//! async-nats reconnects by itself and resubscribes; the connection state
//! is in `sidecar_bus_connected`, every reconnect in `sidecar_bus_reconnects`.

use super::{Bus, BusError, Published};
use crate::fanout::Hub;
use bytes::Bytes;
use entitlements_core::channel::Subject;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
    connected: Arc<AtomicBool>,
    hub: Arc<Hub>,
}

impl NatsBus {
    /// Connects (waiting for the first connection at most `timeout`),
    /// subscribes to `<prefix>.>` and starts feeding the hub until
    /// `shutdown`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        hub: Arc<Hub>,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<NatsBus>, BusError> {
        let connected = Arc::new(AtomicBool::new(false));
        let (flag, metrics) = (connected.clone(), hub.metrics.clone());
        let shown = Arc::new(crate::config::redact_url(url));
        let seen_first = Arc::new(AtomicBool::new(false));
        let options = async_nats::ConnectOptions::new()
            .name("254carbon-sidecar")
            .connection_timeout(timeout)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).clamp(100, 2000))
            })
            .event_callback(move |event| {
                let (flag, metrics, seen_first, url) = (
                    flag.clone(),
                    metrics.clone(),
                    seen_first.clone(),
                    shown.clone(),
                );
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            flag.store(true, Ordering::Relaxed);
                            metrics.bus_connected.set(1);
                            if seen_first.swap(true, Ordering::Relaxed) {
                                metrics.bus_reconnects.inc();
                            }
                            tracing::info!(url = %url, "nats: connected");
                        }
                        async_nats::Event::Disconnected => {
                            flag.store(false, Ordering::Relaxed);
                            metrics.bus_connected.set(0);
                            tracing::warn!(url = %url, "nats: disconnected, reconnecting");
                        }
                        other => {
                            metrics.bus_errors.inc();
                            tracing::warn!(url = %url, event = %other, "nats: {other}");
                        }
                    }
                }
            });
        let client = tokio::time::timeout(timeout, options.connect(url))
            .await
            .map_err(|_| BusError::Unavailable(format!("{url}: no connection within {timeout:?}")))?
            .map_err(|e| BusError::Unavailable(format!("{url}: {e}")))?;
        // The callback may not have run yet for the first connection.
        connected.store(true, Ordering::Relaxed);
        hub.metrics.bus_connected.set(1);
        let mut sub = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| BusError::Unavailable(format!("subscribe {prefix}.>: {e}")))?;
        // A replica serves only once the server holds its subscription:
        // before that, what other replicas publish would not reach it.
        confirm_subscribed(&client, timeout)
            .await
            .map_err(|e| BusError::Unavailable(format!("subscribe {prefix}.>: {e}")))?;
        let bus = Arc::new(NatsBus {
            client,
            prefix: prefix.to_string(),
            connected,
            hub: hub.clone(),
        });
        let strip = format!("{prefix}.");
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let name = msg.subject.as_str().strip_prefix(&strip).unwrap_or("");
                let Ok(channel) = Subject::parse(name) else {
                    hub.metrics.bus_errors.inc();
                    if let Some(more) = DROPS_LOG.allow() {
                        tracing::warn!(
                            subject = msg.subject.as_str(),
                            dropped_since_last_line = more,
                            "nats: the subject is not a channel; dropped"
                        );
                    }
                    continue;
                };
                // Other producers may share the subjects: only JSON values pass.
                if serde_json::from_slice::<&serde_json::value::RawValue>(&msg.payload).is_err() {
                    hub.metrics.bus_errors.inc();
                    if let Some(more) = DROPS_LOG.allow() {
                        tracing::warn!(
                            channel = name,
                            dropped_since_last_line = more,
                            "nats: the message is not JSON; dropped"
                        );
                    }
                    continue;
                }
                if let Err(e) = hub.publish(&channel, msg.payload) {
                    if let Some(more) = DROPS_LOG.allow() {
                        tracing::warn!(
                            channel = name,
                            error = %e,
                            dropped_since_last_line = more,
                            "nats: a message not delivered"
                        );
                    }
                }
            }
            let _ = sub.unsubscribe().await;
        });
        Ok(bus)
    }
}

/// Dropped messages from the bus: a line at most every 10 s.
static DROPS_LOG: crate::logging::Throttle = crate::logging::Throttle::new(10);
/// Waits until the server has processed every subscription sent so far.
///
/// `flush` only puts `SUB` on the wire: the server reads each connection on
/// its own, so a message published on another connection right after can
/// still be routed before it has read ours, and is then lost to this
/// replica (seen in tests on a loaded machine, a few milliseconds after the
/// flush). The server handles one connection's operations in order, so a
/// message to a private inbox, sent after `SUB` and received back, proves
/// the subscription is in place.
///
/// On one server that is the whole guarantee; in a NATS cluster interest
/// reaches the other servers asynchronously, which no client can wait for.
async fn confirm_subscribed(client: &async_nats::Client, timeout: Duration) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, probe.next()).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err("the connection closed before the server answered".into()),
        Err(_) => return Err(format!("the server did not answer within {timeout:?}")),
    }
    probe.unsubscribe().await.map_err(|e| e.to_string())
}

impl Bus for NatsBus {
    fn publish<'a>(&'a self, channel: &'a Subject, data: Bytes) -> Published<'a> {
        Box::pin(async move {
            if !self.connected.load(Ordering::Relaxed) {
                self.hub.metrics.bus_errors.inc();
                return Err(BusError::Unavailable("NATS is not connected".into()));
            }
            self.client
                .publish(format!("{}.{}", self.prefix, channel.as_str()), data)
                .await
                .map_err(|e| {
                    self.hub.metrics.bus_errors.inc();
                    BusError::Unavailable(e.to_string())
                })?;
            Ok(None)
        })
    }

    fn ready(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}
