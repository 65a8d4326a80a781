//! The consumer side: apply each delivered event once, with the inbox in
//! the consumer's own transaction, and acknowledge only after that.

use std::future::Future;
use std::ops::DerefMut;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use outbox_core::cloudevents::Received;
use outbox_core::{BoxError, Inbox, Seen, StoreError};

use crate::error::RabbitError;

/// Applies delivered events once: the inbox records the event id in the
/// transaction the consumer's own change is made in.
///
/// For each delivery, [`handle`](Self::handle) parses the CloudEvent, begins
/// a transaction with `begin`, records the event in the inbox, and calls
/// `apply(tx, event, seen)`. `apply` makes its change when `seen` is
/// [`Seen::First`] and commits `tx` (on [`Seen::Duplicate`] it just returns;
/// dropping the transaction rolls it back). The delivery is acknowledged
/// only after `apply` succeeded; on failure it is requeued (RabbitMQ hands
/// it out again at once: bound the redeliveries with a quorum queue's
/// `x-delivery-limit`). A body that is not an event is rejected without
/// requeue: it goes to the queue's dead-letter exchange, if it has one.
///
/// ```no_run
/// # async fn run(outbox: outbox_sqlite::SqliteOutbox, delivery: lapin::message::Delivery) -> Result<(), outbox_rabbitmq::RabbitError> {
/// use outbox_core::Seen;
/// let consumer = outbox_rabbitmq::InboxConsumer::new("shipping", outbox_sqlite::SqliteInbox);
/// consumer
///     .handle(&delivery, || outbox.begin(), |mut tx, received, seen| async move {
///         if seen == Seen::First {
///             sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
///                 .bind(&received.event.aggregate_id)
///                 .execute(&mut *tx)
///                 .await?;
///         }
///         tx.commit().await?;
///         Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct InboxConsumer<I> {
    name: String,
    inbox: I,
}

impl<I: Inbox> InboxConsumer<I> {
    /// A consumer named `name`: the inbox keeps its records under that name.
    pub fn new(name: impl Into<String>, inbox: I) -> Self {
        Self {
            name: name.into(),
            inbox,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies one message body without acknowledging anything: parse,
    /// begin, record in the inbox, `apply`.
    pub async fn apply<Tx, B, BF, F, FF, E>(
        &self,
        body: &[u8],
        begin: B,
        apply: F,
    ) -> Result<Seen, RabbitError>
    where
        B: FnOnce() -> BF,
        BF: Future<Output = Result<Tx, StoreError>>,
        Tx: DerefMut<Target = I::Connection>,
        F: FnOnce(Tx, Received, Seen) -> FF,
        FF: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        outbox_core::inbox::apply_once(&self.inbox, &self.name, body, begin, apply)
            .await
            .map_err(Into::into)
    }

    /// Applies a delivery once (see the type's docs) and answers the
    /// broker: ack after success, nack with requeue after a failure, reject
    /// without requeue for a body that is not an event.
    pub async fn handle<Tx, B, BF, F, FF, E>(
        &self,
        delivery: &Delivery,
        begin: B,
        apply: F,
    ) -> Result<Seen, RabbitError>
    where
        B: FnOnce() -> BF,
        BF: Future<Output = Result<Tx, StoreError>>,
        Tx: DerefMut<Target = I::Connection>,
        F: FnOnce(Tx, Received, Seen) -> FF,
        FF: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        match self.apply(&delivery.data, begin, apply).await {
            Ok(seen) => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| RabbitError::Ack(Box::new(e)))?;
                Ok(seen)
            }
            Err(err @ RabbitError::Malformed(_)) => {
                tracing::warn!(consumer = %self.name, error = %err, "rejecting a message that is not an event");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .map_err(|e| RabbitError::Ack(Box::new(e)))?;
                Err(err)
            }
            Err(err) => {
                // Best effort: a lost channel requeues the delivery anyway.
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if let Err(nack) = delivery.nack(requeue).await {
                    tracing::warn!(consumer = %self.name, error = %nack, "nack failed");
                }
                Err(err)
            }
        }
    }
}
