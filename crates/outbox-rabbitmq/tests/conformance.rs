//! The RabbitMQ publisher passes the publisher suite against the broker on
//! this machine, with one queue bound to the exchange.

mod common;

use std::time::Duration;

use outbox_core::cloudevents::Received;
use outbox_core::Event;
use outbox_rabbitmq::RabbitPublisher;
use outbox_testkit::PublisherHarness;
use tokio::sync::Mutex;

/// The event types the suite publishes; the queue is bound to these only.
const BOUND: [&str; 2] = ["OrderCreated", "OrderUpdated"];

/// A smaller limit than the broker's, so the oversized case stays small.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;

#[derive(Debug)]
pub struct ExchangeHarness {
    publisher: RabbitPublisher,
    subscriber: Mutex<common::Subscriber>,
    seen: Mutex<Vec<Received>>,
}

impl ExchangeHarness {
    pub async fn new() -> Self {
        let exchange = common::unique("outbox.test");
        let publisher = common::publisher(&common::url(), &exchange)
            .await
            .max_message_bytes(MAX_MESSAGE_BYTES);
        let subscriber = common::Subscriber::new(&exchange, &BOUND).await;
        Self {
            publisher,
            subscriber: Mutex::new(subscriber),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl PublisherHarness for ExchangeHarness {
    type Publisher = RabbitPublisher;

    fn publisher(&self) -> &RabbitPublisher {
        &self.publisher
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut seen = self.seen.lock().await;
        let missing = n.saturating_sub(seen.len());
        let more = self.subscriber.lock().await.collect(missing, timeout).await;
        seen.extend(more);
        seen.clone()
    }

    /// No queue is bound for its routing key: the broker returns the
    /// mandatory message, and the publisher fails that one event for good.
    fn broker_rejected_event(&self) -> Option<Event> {
        Some(outbox_testkit::order_event(
            &common::unique("o"),
            1,
            "OrderUnroutable",
        ))
    }
}

// One channel, one queue: RabbitMQ keeps publish order.
outbox_testkit::publisher_conformance!(
    ExchangeHarness::new,
    outbox_testkit::PublisherFeatures::new()
        .ordered(true)
        .max_entry_bytes(MAX_MESSAGE_BYTES)
);
