//! How events reach the demo's Shipping service: the in-process broker,
//! EventBridge with a rule into an SQS queue (seed 001's shape), a JetStream
//! pull consumer, or a RabbitMQ queue bound to the exchange.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::publishers::{MemoryPublisher, MemorySubscriber};
use outbox_core::{cloudevents, Event, StoreError};
use outbox_eventbridge::EventBridgePublisher;
use outbox_sqs::SqsReceiver;

use crate::CliError;

/// One message as the consumer got it.
#[derive(Debug)]
pub struct Delivery {
    pub id: String,
    pub event: Result<Event, String>,
    /// What acknowledging the message needs.
    receipt: Receipt,
}

/// How a delivery is acknowledged.
#[derive(Debug)]
enum Receipt {
    /// Nothing to acknowledge (the in-process broker).
    None,
    /// An SQS receipt handle: the message is deleted.
    Sqs(String),
    /// A JetStream message: acked.
    Nats(Box<outbox_nats::async_nats::jetstream::Message>),
    /// A RabbitMQ delivery tag: acked on the consumer's channel.
    Rabbit(u64),
}

/// Counts what the broker has sent so far, where it can tell.
pub type SentProbe = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Asks the broker how many messages it still holds for the consumer
/// (waiting, or handed out and not acknowledged).
pub type BacklogProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>> + Send + Sync>;

/// A stream of deliveries for the Shipping service.
pub trait Deliveries: Send + 'static {
    /// Up to `max` deliveries; an empty batch when none came for a while,
    /// `None` once the broker is gone.
    fn next(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<Vec<Delivery>>, StoreError>> + Send;

    /// Acknowledges deliveries whose effects are committed.
    fn ack(&mut self, batch: &[Delivery]) -> impl Future<Output = ()> + Send;

    /// How many messages the broker has sent, if it knows: the demo waits
    /// until the consumer has seen as many.
    fn in_flight_probe(&self) -> Option<SentProbe>;

    /// How many messages the broker still holds for the consumer, if it can
    /// tell: the demo waits until none, and the consumer found nothing more.
    fn backlog_probe(&self) -> Option<BacklogProbe> {
        None
    }
}

/// The in-process broker.
#[derive(Debug)]
pub struct MemoryDeliveries {
    subscriber: MemorySubscriber,
    broker: MemoryPublisher,
}

impl MemoryDeliveries {
    pub fn new(broker: MemoryPublisher, subscriber: MemorySubscriber) -> Self {
        Self { subscriber, broker }
    }
}

impl Deliveries for MemoryDeliveries {
    async fn next(&mut self, max: usize) -> Result<Option<Vec<Delivery>>, StoreError> {
        let Some(first) = self.subscriber.recv().await else {
            return Ok(None);
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.subscriber.try_recv() {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        Ok(Some(
            batch
                .into_iter()
                .map(|d| Delivery {
                    event: cloudevents::from_json(&d.body)
                        .map(|r| r.event)
                        .map_err(|e| e.to_string()),
                    id: d.id.to_string(),
                    receipt: Receipt::None,
                })
                .collect(),
        ))
    }

    async fn ack(&mut self, _: &[Delivery]) {}

    fn in_flight_probe(&self) -> Option<SentProbe> {
        let broker = self.broker.clone();
        Some(Arc::new(move || broker.sent()))
    }
}

/// An SQS queue behind an EventBridge rule.
#[derive(Debug)]
pub struct SqsDeliveries {
    receiver: SqsReceiver,
}

/// Pause after an empty receive. Short polls rather than long polls:
/// moto, the local emulator, answers a waiting receive slowly enough to hold
/// up the PutEvents calls it serves meanwhile (7.3 s instead of 12.4 s for
/// 200 orders, side by side).
const EMPTY_PAUSE: Duration = Duration::from_millis(100);
/// SQS hands out at most 10 messages a receive.
const SQS_MAX_MESSAGES: usize = 10;

impl Deliveries for SqsDeliveries {
    async fn next(&mut self, max: usize) -> Result<Option<Vec<Delivery>>, StoreError> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let want = (max - batch.len()).min(SQS_MAX_MESSAGES) as i32;
            let got = self.receiver.receive(want, Duration::ZERO).await?;
            if got.is_empty() {
                if batch.is_empty() {
                    tokio::time::sleep(EMPTY_PAUSE).await;
                }
                break;
            }
            batch.extend(got.into_iter().map(|d| Delivery {
                id: d.message_id.clone(),
                event: d.event.map(|r| r.event).map_err(|e| e.to_string()),
                receipt: Receipt::Sqs(d.receipt_handle),
            }));
        }
        Ok(Some(batch))
    }

    async fn ack(&mut self, batch: &[Delivery]) {
        let handles: Vec<&str> = batch
            .iter()
            .filter_map(|d| match &d.receipt {
                Receipt::Sqs(handle) => Some(handle.as_str()),
                _ => None,
            })
            .collect();
        for chunk in handles.chunks(SQS_MAX_MESSAGES) {
            if let Err(e) = self.receiver.delete_handles(chunk).await {
                // Not deleted means delivered again: the inbox absorbs it.
                tracing::warn!(error = %e, "shipping: cannot delete messages");
            }
        }
    }

    fn in_flight_probe(&self) -> Option<SentProbe> {
        None
    }
}

/// `arn:aws:events:REGION:ACCOUNT:event-bus/BUS` becomes the rule's ARN:
/// `rule/BUS/RULE`, or `rule/RULE` on the default bus.
fn rule_arn(bus_arn: &str, bus: &str, rule: &str) -> String {
    let prefix = bus_arn.split("event-bus/").next().unwrap_or(bus_arn);
    if bus == "default" {
        format!("{prefix}rule/{rule}")
    } else {
        format!("{prefix}rule/{bus}/{rule}")
    }
}

/// Creates (when missing) the bus, a queue named after the outbox table and
/// a rule sending the demo's events into it; returns the publisher and the
/// queue's deliveries.
pub async fn eventbridge_to_sqs(
    bus: &str,
    table: &str,
    source: &str,
) -> Result<(EventBridgePublisher, SqsDeliveries), CliError> {
    let config = outbox_aws::load_config().await;
    let events = aws_sdk_eventbridge::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let setup = |e: StoreError| CliError::Store(e);
    let bus_arn = outbox_eventbridge::setup::ensure_bus(&events, bus)
        .await
        .map_err(setup)?;
    let name = format!("{table}-shipping");
    let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
        .await
        .map_err(setup)?;
    outbox_eventbridge::setup::ensure_rule_to_queue(
        &events,
        bus,
        &name,
        &queue.arn,
        &outbox_eventbridge::setup::source_pattern(source),
    )
    .await
    .map_err(setup)?;
    // Only this rule may send to the queue.
    outbox_sqs::setup::allow_senders(&sqs, &queue, &[&rule_arn(&bus_arn, bus, &name)])
        .await
        .map_err(setup)?;
    let publisher = EventBridgePublisher::new(events, bus).source(source);
    let receiver = SqsReceiver::new(sqs, queue.url);
    Ok((publisher, SqsDeliveries { receiver }))
}

/// The event ids a broker handed the consumer, duplicates once.
#[derive(Debug, Clone, Default)]
pub struct Received {
    ids: Arc<Mutex<HashSet<String>>>,
}

impl Received {
    fn note(&self, batch: &[Delivery]) {
        if let Ok(mut ids) = self.ids.lock() {
            for d in batch {
                ids.insert(match &d.event {
                    Ok(event) => event.id.to_string(),
                    Err(_) => d.id.clone(),
                });
            }
        }
    }

    /// The distinct ids received so far.
    pub fn ids(&self) -> Vec<String> {
        self.ids
            .lock()
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A CloudEvent body as the consumer reads it.
fn parse(body: &[u8]) -> Result<Event, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    cloudevents::from_json(text)
        .map(|r| r.event)
        .map_err(|e| e.to_string())
}

/// How long a receive waits for a first message before it reports none.
const RECEIVE_WAIT: Duration = Duration::from_millis(250);

/// Pause after a JetStream fetch found nothing.
const NATS_EMPTY_PAUSE: Duration = Duration::from_millis(20);

/// A durable JetStream pull consumer on the demo's stream.
#[derive(Debug)]
pub struct NatsDeliveries {
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    received: Received,
}

use outbox_nats::async_nats::jetstream;

impl NatsDeliveries {
    pub fn new(
        consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
        received: Received,
    ) -> Self {
        Self { consumer, received }
    }
}

fn nats_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("JetStream {what}: {e}").into())
}

impl Deliveries for NatsDeliveries {
    async fn next(&mut self, max: usize) -> Result<Option<Vec<Delivery>>, StoreError> {
        use futures_util::StreamExt;
        // What is there now (the fetch does not wait); a pause when nothing is.
        let mut messages = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| nats_error("fetch", e))?;
        let mut batch = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| nats_error("fetch", e))?;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(outbox_nats::MSG_ID_HEADER))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            batch.push(Delivery {
                id,
                event: parse(&message.payload),
                receipt: Receipt::Nats(Box::new(message)),
            });
        }
        if batch.is_empty() {
            tokio::time::sleep(NATS_EMPTY_PAUSE).await;
        }
        self.received.note(&batch);
        Ok(Some(batch))
    }

    async fn ack(&mut self, batch: &[Delivery]) {
        for delivery in batch {
            if let Receipt::Nats(message) = &delivery.receipt {
                // Confirmed by the server, so the backlog probe sees it; a
                // lost ack means a redelivery, which the inbox absorbs.
                if let Err(e) = message.double_ack().await {
                    tracing::warn!(error = %e, "shipping: cannot ack a JetStream message");
                }
            }
        }
    }

    fn in_flight_probe(&self) -> Option<SentProbe> {
        None
    }

    fn backlog_probe(&self) -> Option<BacklogProbe> {
        let consumer = self.consumer.clone();
        Some(Arc::new(move || {
            let mut consumer = consumer.clone();
            Box::pin(async move {
                let info = consumer
                    .info()
                    .await
                    .map_err(|e| nats_error("consumer info", e))?;
                Ok(info.num_pending + info.num_ack_pending as u64)
            })
        }))
    }
}

use outbox_rabbitmq::lapin;

/// A RabbitMQ queue bound to the demo's exchange, consumed with manual acks.
pub struct RabbitDeliveries {
    channel: lapin::Channel,
    queue: String,
    consumer: lapin::Consumer,
    received: Received,
}

impl std::fmt::Debug for RabbitDeliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDeliveries")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// Deliveries RabbitMQ hands the consumer ahead of its acks.
const RABBIT_PREFETCH: u16 = 200;

pub fn rabbit_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("RabbitMQ {what}: {e}").into())
}

impl RabbitDeliveries {
    /// Consumes `queue` on `channel` (a channel of its own).
    pub async fn new(
        channel: lapin::Channel,
        queue: &str,
        received: Received,
    ) -> Result<Self, StoreError> {
        use lapin::options::{BasicConsumeOptions, BasicQosOptions};
        channel
            .basic_qos(RABBIT_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| rabbit_error("basic.qos", e))?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "shipping".into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(|e| rabbit_error("basic.consume", e))?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            consumer,
            received,
        })
    }
}

impl Deliveries for RabbitDeliveries {
    async fn next(&mut self, max: usize) -> Result<Option<Vec<Delivery>>, StoreError> {
        use futures_util::{FutureExt, StreamExt};
        let first = match tokio::time::timeout(RECEIVE_WAIT, self.consumer.next()).await {
            Err(_) => return Ok(Some(Vec::new())),
            Ok(None) => return Ok(None),
            Ok(Some(d)) => d.map_err(|e| rabbit_error("delivery", e))?,
        };
        let mut got = vec![first];
        // Whatever else has arrived already.
        while got.len() < max {
            match self.consumer.next().now_or_never() {
                Some(Some(d)) => got.push(d.map_err(|e| rabbit_error("delivery", e))?),
                _ => break,
            }
        }
        let batch: Vec<Delivery> = got
            .into_iter()
            .map(|d| Delivery {
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                event: parse(&d.data),
                receipt: Receipt::Rabbit(d.delivery_tag),
            })
            .collect();
        self.received.note(&batch);
        Ok(Some(batch))
    }

    async fn ack(&mut self, batch: &[Delivery]) {
        use lapin::options::BasicAckOptions;
        // One ack for the batch: tags grow on a channel, `multiple` covers
        // every earlier one.
        let last = batch
            .iter()
            .filter_map(|d| match d.receipt {
                Receipt::Rabbit(tag) => Some(tag),
                _ => None,
            })
            .max();
        if let Some(tag) = last {
            if let Err(e) = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
            {
                tracing::warn!(error = %e, "shipping: cannot ack RabbitMQ deliveries");
            }
        }
    }

    fn in_flight_probe(&self) -> Option<SentProbe> {
        None
    }

    fn backlog_probe(&self) -> Option<BacklogProbe> {
        // Messages ready in the queue; those handed out and not yet taken
        // by the consumer are covered by its idle check.
        let channel = self.channel.clone();
        let queue = self.queue.clone();
        Some(Arc::new(move || {
            let channel = channel.clone();
            let queue = queue.clone();
            Box::pin(async move { rabbit_ready(&channel, &queue).await })
        }))
    }
}

/// Messages waiting in `queue` (not handed out to a consumer).
pub async fn rabbit_ready(channel: &lapin::Channel, queue: &str) -> Result<u64, StoreError> {
    use lapin::options::QueueDeclareOptions;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map_err(|e| rabbit_error("queue.declare (passive)", e))?;
    Ok(u64::from(declared.message_count()))
}
