//! The usage filter's metrics (`wasmcustom.usage.*` in Envoy). Names:
//! `usage.<what>`, counters in the plural of what they count.

use filter_common::host::{Host, Metric};

pub const RECORDS: &str = "usage.records";
pub const ENQUEUE_FAILED: &str = "usage.enqueue_failed";
pub const BATCHES_SENT: &str = "usage.batches_sent";
pub const RECORDS_SENT: &str = "usage.records_sent";
pub const BATCH_FAILURES: &str = "usage.batch_failures";
pub const RECORDS_DROPPED: &str = "usage.records_dropped";
pub const RECORDS_REJECTED: &str = "usage.records_rejected";

pub struct Metrics {
    pub records: Metric,
    pub enqueue_failed: Metric,
    pub batches_sent: Metric,
    pub records_sent: Metric,
    pub batch_failures: Metric,
    pub records_dropped: Metric,
    pub records_rejected: Metric,
}

impl Metrics {
    pub fn define<H: Host>(h: &H) -> Metrics {
        Metrics {
            records: h.counter(RECORDS),
            enqueue_failed: h.counter(ENQUEUE_FAILED),
            batches_sent: h.counter(BATCHES_SENT),
            records_sent: h.counter(RECORDS_SENT),
            batch_failures: h.counter(BATCH_FAILURES),
            records_dropped: h.counter(RECORDS_DROPPED),
            records_rejected: h.counter(RECORDS_REJECTED),
        }
    }
}
