//! Receiving and deleting messages: for consumers, tests and the demo.

use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use aws_sdk_sqs::Client;
use outbox_core::cloudevents::Received;
use outbox_core::{BoxError, InvalidEvent, StoreError};

use crate::delivery::parse_delivery;

/// A received message and the event parsed from its body.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    /// What [`SqsReceiver::delete`] needs once the message is handled.
    pub receipt_handle: String,
    pub body: String,
    /// The X-Ray trace header SQS kept with the message, if any.
    pub trace_header: Option<String>,
    /// The event, or why the body is not one (see [`parse_delivery`]).
    pub event: Result<Received, InvalidEvent>,
}

/// Reads one queue.
#[derive(Debug, Clone)]
pub struct SqsReceiver {
    client: Client,
    queue_url: String,
}

/// Most messages `ReceiveMessage` and `DeleteMessageBatch` handle a call.
const MAX_PER_CALL: usize = 10;
/// Longest long-poll `ReceiveMessage` allows, in seconds.
const MAX_WAIT_SECS: u64 = 20;

impl SqsReceiver {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// Up to `max_messages` (clamped to 1..=10) messages, long-polling up to
    /// `wait` (at most 20 s) when none are there. Received messages stay in
    /// the queue, invisible for its visibility timeout, until deleted.
    pub async fn receive(
        &self,
        max_messages: i32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max_messages.clamp(1, MAX_PER_CALL as i32))
            .wait_time_seconds(wait.as_secs().min(MAX_WAIT_SECS) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::AwsTraceHeader)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("ReceiveMessage", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let body = m.body.unwrap_or_default();
                Delivery {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt_handle: m.receipt_handle.unwrap_or_default(),
                    trace_header: m
                        .attributes
                        .and_then(|mut a| a.remove(&MessageSystemAttributeName::AwsTraceHeader)),
                    event: parse_delivery(&body),
                    body,
                }
            })
            .collect())
    }

    /// Receives and deletes messages until `n` events have arrived or
    /// `timeout` has passed, and returns the events in arrival order.
    /// Bodies that are not events are deleted and skipped with a warning.
    /// For tests and demos that only watch a queue.
    pub async fn collect_events(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = Vec::new();
        while events.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let wait = left.min(Duration::from_secs(1));
            let batch = self.receive(MAX_PER_CALL as i32, wait).await?;
            if batch.is_empty() {
                // An emulator may answer at once instead of long-polling.
                tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                continue;
            }
            self.delete(&batch).await?;
            for delivery in batch {
                match delivery.event {
                    Ok(event) => events.push(event),
                    Err(error) => {
                        tracing::warn!(%error, message_id = %delivery.message_id, "not an event")
                    }
                }
            }
        }
        Ok(events)
    }

    /// Deletes handled messages.
    pub async fn delete(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        let handles: Vec<&str> = deliveries
            .iter()
            .map(|d| d.receipt_handle.as_str())
            .collect();
        self.delete_handles(&handles).await
    }

    /// Deletes messages by receipt handle, ten a call. Fails if any message
    /// could not be deleted (retryable unless SQS blamed the request).
    pub async fn delete_handles(&self, receipt_handles: &[&str]) -> Result<(), StoreError> {
        for chunk in receipt_handles.chunks(MAX_PER_CALL) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, handle)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(*handle)
                        .build()
                        .map_err(|e| StoreError::Config(format!("DeleteMessageBatch: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("DeleteMessageBatch", e))?;
            if !out.failed().is_empty() {
                let reasons: Vec<String> = out
                    .failed()
                    .iter()
                    .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or("")))
                    .collect();
                let error: BoxError = format!(
                    "DeleteMessageBatch failed for {} messages: {}",
                    reasons.len(),
                    reasons.join("; ")
                )
                .into();
                return Err(if out.failed().iter().any(|f| f.sender_fault()) {
                    StoreError::Backend(error)
                } else {
                    StoreError::Unavailable(error)
                });
            }
        }
        Ok(())
    }
}
