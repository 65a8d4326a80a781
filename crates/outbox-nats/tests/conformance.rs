//! The NATS publisher passes the publisher suite against the JetStream
//! server on this machine: order kept, duplicates dropped by the server.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use outbox_core::cloudevents::Received;
use outbox_core::Event;
use outbox_nats::{async_nats, NatsPublisher, SubjectTemplate};
use outbox_testkit::PublisherHarness;
use tokio::sync::Mutex;

/// The stream's own limit on a message: the server refuses a larger one
/// that is still below `max_payload`, which the publisher lets through.
const STREAM_MAX_MSG_SIZE: i32 = 4096;

#[derive(Debug)]
pub struct StreamHarness {
    publisher: NatsPublisher,
    reader: consumer::Consumer<consumer::pull::Config>,
    seen: Mutex<Vec<Received>>,
}

impl StreamHarness {
    pub async fn new() -> Self {
        let stream = common::unique("outbox_test");
        let template = SubjectTemplate::parse(&format!("{stream}.{{aggregatetype}}.{{type}}"))
            .expect("template");
        let mut config = common::test_stream();
        config.max_message_size = STREAM_MAX_MSG_SIZE;
        let publisher = NatsPublisher::connect(&common::url(), &stream)
            .await
            .expect("connect")
            .subject(template)
            .stream_config(config)
            .source("urn:test:nats");
        publisher.check().await.expect("stream");
        let js = jetstream::new(publisher.client().clone());
        let reader = common::reader(&js, &stream, Duration::from_secs(30)).await;
        Self {
            publisher,
            reader,
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl PublisherHarness for StreamHarness {
    type Publisher = NatsPublisher;

    fn publisher(&self) -> &NatsPublisher {
        &self.publisher
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut seen = self.seen.lock().await;
        let missing = n.saturating_sub(seen.len());
        let more = common::drain(&self.reader, missing, timeout).await;
        seen.extend(more);
        seen.clone()
    }

    /// Above the stream's `max_msg_size`, below the server's `max_payload`:
    /// the server refuses this one message (JetStream error 10054).
    fn broker_rejected_event(&self) -> Option<Event> {
        Some(
            Event::builder("Order", common::unique("o"), 1, "OrderCreated")
                .payload(&serde_json::json!({ "blob": "x".repeat(STREAM_MAX_MSG_SIZE as usize) }))
                .build()
                .expect("event"),
        )
    }
}

// One stream, one subscriber: JetStream keeps publish order per subject and
// stream; `Nats-Msg-Id` makes the server drop a duplicate.
outbox_testkit::publisher_conformance!(
    StreamHarness::new,
    outbox_testkit::PublisherFeatures::new()
        .ordered(true)
        .broker_dedup(true)
        .max_entry_bytes(1024 * 1024)
);
