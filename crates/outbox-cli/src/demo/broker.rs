//! How events reach the demo's Shipping service: the in-process broker, or
//! EventBridge with a rule into an SQS queue (seed 001's shape).

use std::future::Future;
use std::sync::Arc;
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
    /// What acknowledging the message needs (an SQS receipt handle).
    receipt: Option<String>,
}

/// Counts what the broker has sent so far, where it can tell.
pub type SentProbe = Arc<dyn Fn() -> u64 + Send + Sync>;

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
                    receipt: None,
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
                receipt: Some(d.receipt_handle),
            }));
        }
        Ok(Some(batch))
    }

    async fn ack(&mut self, batch: &[Delivery]) {
        let handles: Vec<&str> = batch.iter().filter_map(|d| d.receipt.as_deref()).collect();
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
