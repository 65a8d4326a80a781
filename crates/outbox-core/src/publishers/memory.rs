use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::cloudevents;
use crate::error::PublishError;
use crate::event::EventId;
use crate::publish::{PublishRequest, PublishResult, Publisher, DEFAULT_SOURCE};

/// A message as an in-process broker hands it to its subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: EventId,
    /// The structured-mode CloudEvent.
    pub body: String,
}

/// An in-process, unbounded, first-in first-out broker with one subscriber.
///
/// It has at-least-once semantics like a real broker: every accepted message
/// is delivered, and a message published twice is delivered twice.
pub fn memory_broker(source: impl Into<String>) -> (MemoryPublisher, MemorySubscriber) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(AtomicU64::new(0));
    (
        MemoryPublisher {
            tx,
            source: source.into(),
            sent: stats.clone(),
        },
        MemorySubscriber { rx, sent: stats },
    )
}

#[derive(Debug, Clone)]
pub struct MemoryPublisher {
    tx: mpsc::UnboundedSender<Delivery>,
    source: String,
    sent: Arc<AtomicU64>,
}

impl MemoryPublisher {
    /// Messages accepted so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Default for MemoryPublisher {
    fn default() -> Self {
        memory_broker(DEFAULT_SOURCE).0
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let mut results = Vec::with_capacity(request.events.len());
        for event in request.events {
            let body = cloudevents::to_json(event, &self.source);
            match self.tx.send(Delivery { id: event.id, body }) {
                Ok(()) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    results.push(Ok(()));
                }
                Err(_) => results.push(Err(PublishError::transient("subscriber is gone"))),
            }
        }
        results
    }
}

#[derive(Debug)]
pub struct MemorySubscriber {
    rx: mpsc::UnboundedReceiver<Delivery>,
    sent: Arc<AtomicU64>,
}

impl MemorySubscriber {
    /// The next message; `None` once every publisher is dropped and the queue is empty.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// A message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Messages waiting to be received.
    pub fn backlog(&self) -> usize {
        self.rx.len()
    }

    /// Messages accepted by the publishers so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}
