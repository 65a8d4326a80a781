use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Event, PublishRequest, PublishResult, Publisher};

/// Accepts every event and remembers it, in the order received.
#[derive(Debug, Clone, Default)]
pub struct RecordingPublisher {
    received: Arc<Mutex<Vec<Event>>>,
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
        if let Ok(mut received) = self.received.lock() {
            received.extend(request.events.iter().cloned());
        }
        vec![Ok(()); request.events.len()]
    }
}
