use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Event, PublishError, PublishRequest, PublishResult, Publisher};

/// Accepts every event and remembers it, in the order received.
#[derive(Debug, Clone, Default)]
pub struct RecordingPublisher {
    received: Arc<Mutex<Vec<Event>>>,
    /// While set, every call fails as a target that is down, with this reason.
    down: Arc<Mutex<Option<String>>>,
    calls_while_down: Arc<std::sync::atomic::AtomicU64>,
    latency: Duration,
    max_batch: Option<usize>,
}

impl RecordingPublisher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits this long in every call, like a broker across a network.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn with_max_batch_size(mut self, n: usize) -> Self {
        self.max_batch = Some(n);
        self
    }

    /// From now on every call fails as an unreachable broker would
    /// ([`PublishError::unavailable`]), until [`RecordingPublisher::come_back`].
    pub fn go_down(&self, reason: &str) {
        if let Ok(mut down) = self.down.lock() {
            *down = Some(reason.to_owned());
        }
    }

    pub fn come_back(&self) {
        if let Ok(mut down) = self.down.lock() {
            *down = None;
        }
    }

    /// Calls refused while down: the relay's probes.
    pub fn calls_while_down(&self) -> u64 {
        self.calls_while_down
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn received(&self) -> Vec<Event> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// `(aggregate_id, version)` of everything received, in order.
    pub fn versions(&self) -> Vec<(String, u64)> {
        self.received()
            .into_iter()
            .map(|e| (e.aggregate_id, e.aggregate_version))
            .collect()
    }
}

impl Publisher for RecordingPublisher {
    fn max_batch_size(&self) -> usize {
        self.max_batch.unwrap_or(100)
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let down = self.down.lock().ok().and_then(|d| d.clone());
        if let Some(reason) = down {
            self.calls_while_down
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return vec![Err(PublishError::unavailable(reason)); request.events.len()];
        }
        if let Ok(mut received) = self.received.lock() {
            received.extend(request.events.iter().cloned());
        }
        vec![Ok(()); request.events.len()]
    }
}
