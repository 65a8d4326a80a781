//! Idempotent consumers on Lambda: SQS- and EventBridge-invoked handlers that
//! apply each event once, recording it in a DynamoDB inbox inside the
//! consumer's own `TransactWriteItems`.

use std::future::Future;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use outbox_core::{Event, Inbox, Seen, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, TransactError, Transaction};

/// Why a handler could not apply an event, and whether a redelivery may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    retryable: bool,
}

impl HandlerError {
    /// A failure that may pass on a later delivery (a dependency is down).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure every delivery will meet (the event makes no sense to this
    /// consumer); it ends in the queue's dead-letter queue.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        let retryable = e.is_retryable();
        Self {
            message: e.to_string(),
            retryable,
        }
    }
}

impl From<TransactError> for HandlerError {
    fn from(e: TransactError) -> Self {
        let retryable = e.is_retryable();
        Self {
            message: e.to_string(),
            retryable,
        }
    }
}

/// The consumer's own logic: adds its writes for `event` to `tx`, which
/// commits together with the inbox record, or not at all.
pub trait EventHandler: Send + Sync {
    fn handle(
        &self,
        event: &Event,
        tx: &mut Transaction,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler's writes and the inbox record committed.
    Applied,
    /// Seen before: skipped, acknowledged.
    Duplicate,
    /// Nothing written: the message is redelivered (and, past the queue's
    /// `maxReceiveCount`, moved to its dead-letter queue).
    Failed { reason: String, retryable: bool },
}

impl Outcome {
    fn failed(reason: impl Into<String>, retryable: bool) -> Self {
        Outcome::Failed {
            reason: reason.into(),
            retryable,
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }
}

/// An idempotent consumer named `name`: the inbox partition its records go to.
#[derive(Debug, Clone)]
pub struct IdempotentConsumer<H> {
    name: String,
    inbox: DynamoInbox,
    outbox: Option<DynamoOutbox>,
    handler: H,
}

impl<H: EventHandler> IdempotentConsumer<H> {
    pub fn new(name: impl Into<String>, inbox: DynamoInbox, handler: H) -> Self {
        Self {
            name: name.into(),
            inbox,
            outbox: None,
            handler,
        }
    }

    /// Starts every transaction from `outbox`, so the handler can record
    /// events of its own in the same commit.
    pub fn outbox(mut self, outbox: DynamoOutbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Applies one delivery's body: a CloudEvent, or an EventBridge or SNS
    /// envelope around one. A body that is none of these never will be.
    pub async fn apply_body(&self, body: &str) -> Outcome {
        match outbox_sqs::parse_delivery(body) {
            Ok(received) => self.apply(&received.event).await,
            Err(e) => Outcome::failed(format!("not an outbox event: {e}"), false),
        }
    }

    /// Applies `event` once: the inbox record and the handler's writes
    /// commit together, so a failure leaves no trace and a redelivery
    /// applies it.
    pub async fn apply(&self, event: &Event) -> Outcome {
        let mut tx = match &self.outbox {
            Some(outbox) => outbox.transaction(),
            None => self.inbox.transaction(),
        };
        match self.inbox.record(&mut tx, &self.name, event.id).await {
            Ok(Seen::Duplicate) => return Outcome::Duplicate,
            Ok(Seen::First) => {}
            Err(e) => return Outcome::failed(e.to_string(), e.is_retryable()),
        }
        if let Err(e) = self.handler.handle(event, &mut tx).await {
            return Outcome::failed(e.to_string(), e.is_retryable());
        }
        match tx.commit().await {
            Ok(()) => Outcome::Applied,
            // Another delivery of the same event committed first.
            Err(TransactError::InboxDuplicate { .. }) => Outcome::Duplicate,
            Err(e) => Outcome::failed(e.to_string(), e.is_retryable()),
        }
    }

    /// Handles an SQS-triggered invocation and reports the messages to retry
    /// (the event source mapping needs `ReportBatchItemFailures`). On a FIFO
    /// queue every message after a failure is reported too, unprocessed, so
    /// no message group is applied out of order.
    pub async fn handle_sqs(&self, event: &SqsEvent) -> SqsBatchResponse {
        let mut failures = Vec::new();
        let mut failed_before = false;
        for message in &event.records {
            // An empty identifier makes Lambda retry the whole batch: the
            // safe answer for a message it cannot name.
            let id = message.message_id.clone().unwrap_or_default();
            if failed_before && is_fifo(message) {
                failures.push(id);
                continue;
            }
            let outcome = match message.body.as_deref() {
                Some(body) => self.apply_body(body).await,
                None => Outcome::failed("the message has no body", false),
            };
            if let Outcome::Failed { reason, retryable } = outcome {
                tracing::error!(message_id = %id, %reason, retryable, "consumer: delivery not applied");
                failed_before = true;
                failures.push(id);
            }
        }
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures
            .into_iter()
            .map(|id| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                failure
            })
            .collect();
        response
    }

    /// Handles an EventBridge-invoked event (its `detail` is the CloudEvent).
    /// An error makes Lambda retry the asynchronous invocation.
    pub async fn handle_eventbridge(
        &self,
        event: &serde_json::Value,
    ) -> Result<Outcome, HandlerError> {
        match self.apply_body(&event.to_string()).await {
            Outcome::Failed { reason, retryable } => Err(HandlerError {
                message: reason,
                retryable,
            }),
            other => Ok(other),
        }
    }
}

fn is_fifo(message: &SqsMessage) -> bool {
    message
        .event_source_arn
        .as_deref()
        .is_some_and(|arn| arn.ends_with(".fifo"))
}
