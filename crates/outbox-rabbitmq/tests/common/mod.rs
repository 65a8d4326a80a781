//! What the tests share: the broker's address and throwaway queues.

#![allow(dead_code)]

use std::time::Duration;

use futures_util::StreamExt;
use outbox_core::cloudevents::{self, Received};
use outbox_rabbitmq::lapin;
use outbox_rabbitmq::RabbitPublisher;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

/// The broker the tests run against.
pub fn url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}.{}",
        outbox_core::EventId::new().as_uuid().simple()
    )
}

/// A publisher for a fresh auto-delete exchange at `url`.
pub async fn publisher(url: &str, exchange: &str) -> RabbitPublisher {
    let p = RabbitPublisher::new(url, exchange)
        .expect("publisher")
        .exchange_auto_delete(true)
        .source("urn:test:rabbitmq");
    p.check().await.expect("exchange");
    p
}

/// A subscriber: an exclusive queue bound to `exchange` for `keys`.
#[derive(Debug)]
pub struct Subscriber {
    pub connection: Connection,
    pub channel: Channel,
    pub queue: String,
    pub consumer: Consumer,
}

impl Subscriber {
    pub async fn new(exchange: &str, keys: &[&str]) -> Self {
        let connection = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    // Gone with the connection, not with the last consumer.
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        let queue = queue.name().as_str().to_owned();
        for key in keys {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind");
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Self {
            connection,
            channel,
            queue,
            consumer,
        }
    }

    /// Receives until `n` events or `timeout`, acknowledging each.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(delivery)) = next else { break };
            let delivery = delivery.expect("delivery");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            let body = std::str::from_utf8(&delivery.data).expect("utf-8");
            out.push(cloudevents::from_json(body).expect("a CloudEvent"));
        }
        out
    }
}
