//! What the tests share: the server's address and throwaway streams.

#![allow(dead_code)]

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use outbox_core::cloudevents::{self, Received};
use outbox_nats::async_nats;

/// The NATS server the tests run against.
pub fn url() -> String {
    std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A name no other test uses, valid as a stream name and a subject token.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        outbox_core::EventId::new().as_uuid().simple()
    )
}

/// A stream config for tests: in memory, gone after ten minutes.
pub fn test_stream() -> stream::Config {
    stream::Config {
        storage: stream::StorageType::Memory,
        max_age: Duration::from_secs(600),
        ..Default::default()
    }
}

/// A pull consumer reading `stream` from its start.
pub async fn reader(
    js: &jetstream::Context,
    stream: &str,
    ack_wait: Duration,
) -> consumer::Consumer<consumer::pull::Config> {
    js.get_stream(stream)
        .await
        .expect("stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some(unique("reader")),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            inactive_threshold: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("consumer")
}

/// Reads until `n` messages or `timeout`, acknowledging each.
pub async fn drain(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    n: usize,
    timeout: Duration,
) -> Vec<Received> {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut batch = consumer
            .fetch()
            .max_messages(n - out.len())
            .expires(left.min(Duration::from_millis(500)))
            .messages()
            .await
            .expect("fetch");
        while let Some(message) = batch.next().await {
            let message = message.expect("message");
            message.ack().await.expect("ack");
            let body = std::str::from_utf8(&message.payload).expect("utf-8");
            out.push(cloudevents::from_json(body).expect("a CloudEvent"));
        }
    }
    out
}
