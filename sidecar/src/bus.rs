//! Where published messages travel before the hub fans them out.
//!
//! A [`Bus`] takes a publish and makes it reach the hub of every replica:
//! the embedded [`MemoryBus`] (one replica) hands it straight to this
//! process's hub; a shared bus (NATS; a Kafka consumer fits the same shape:
//! a task that maps `(topic, key)` to a channel and calls [`Hub::publish`])
//! sends it out and a background task feeds what arrives into the hub;
//! Kafka ([`kafka`]) also brings the market-data topics in, and numbers
//! messages by their offsets so that every replica numbers them alike.

pub mod kafka;
pub mod nats;

use crate::fanout::{Hub, PublishError};
use bytes::Bytes;
use entitlements_core::channel::Subject;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Why a publish did not go out.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    Hub(#[from] PublishError),
    /// The bus's settings are wrong (the flag named).
    #[error("{0}")]
    Config(String),
    /// The shared bus is unreachable or refused the message.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// The result of a publish: the sequence number when the hub assigned it
/// right away (embedded bus), `None` when it will on delivery.
pub type Published<'a> = Pin<Box<dyn Future<Output = Result<Option<u64>, BusError>> + Send + 'a>>;

pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Publishes `data` (JSON, already checked) to `channel` on every replica.
    fn publish<'a>(&'a self, channel: &'a Subject, data: Bytes) -> Published<'a>;
    /// Whether publishes can go out now (for `/readyz`).
    fn ready(&self) -> bool;
    /// The verdict and the `/readyz` line saying why.
    fn readiness(&self) -> (bool, String) {
        if self.ready() {
            (true, "bus: ok".into())
        } else {
            (false, "bus: not connected".into())
        }
    }
}

/// The embedded bus: this process only.
#[derive(Debug)]
pub struct MemoryBus {
    hub: Arc<Hub>,
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>) -> MemoryBus {
        hub.metrics.bus_connected.set(1);
        MemoryBus { hub }
    }
}

impl Bus for MemoryBus {
    fn publish<'a>(&'a self, channel: &'a Subject, data: Bytes) -> Published<'a> {
        let r = self
            .hub
            .publish(channel, data)
            .map(Some)
            .map_err(BusError::from);
        Box::pin(std::future::ready(r))
    }

    fn ready(&self) -> bool {
        true
    }
}
