//! The SQS event source mapping: receives up to `BatchSize` messages,
//! invokes the function with the Lambda SQS event, deletes the messages it
//! did not report failed. Failed messages stay in the queue, come back after
//! the visibility timeout, and SQS moves them to the dead-letter queue after
//! `maxReceiveCount` receives (the queue's redrive policy).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use serde::Serialize;
use serde_json::json;

use crate::esm::{queue_verdict, QueueMapping, Verdict};
use crate::runtime::Function;

/// Pause after a receive that found nothing. Short polls: moto answers a
/// waiting receive slowly enough to hold up the PutEvents calls it serves
/// meanwhile.
const EMPTY_POLL: Duration = Duration::from_millis(100);
/// SQS's most messages a receive and a delete batch.
const SQS_MAX: usize = 10;

/// What the mapping did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueStats {
    pub messages: u64,
    pub invocations: u64,
    pub function_errors: u64,
    pub partial_failures: u64,
    /// Messages received more than once (after a failure or a lost delete).
    pub redeliveries: u64,
    /// Messages deleted after the function handled them.
    pub deleted: u64,
}

/// Per event id, how many deliveries the function acknowledged, and the
/// order in which each order's versions were acknowledged.
#[derive(Debug, Default, Clone)]
pub struct Delivered {
    /// Deliveries handed to the function, failed invocations included.
    pub handed: HashMap<String, u64>,
    /// Deliveries the function acknowledged.
    pub count: HashMap<String, u64>,
    pub versions: HashMap<String, Vec<u64>>,
}

#[derive(Debug)]
struct Shared {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    queue_arn: String,
    region: String,
    function: Arc<Function>,
    mapping: QueueMapping,
    stats: Mutex<QueueStats>,
    delivered: Mutex<Delivered>,
}

#[derive(Debug, Clone)]
pub struct QueuePoller {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QueuePoller {
    pub fn new(
        sqs: aws_sdk_sqs::Client,
        queue_url: String,
        queue_arn: String,
        function: Arc<Function>,
        mapping: QueueMapping,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                sqs,
                queue_url,
                queue_arn,
                region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned()),
                function,
                mapping,
                stats: Mutex::new(QueueStats::default()),
                delivered: Mutex::new(Delivered::default()),
            }),
        }
    }

    pub fn stats(&self) -> QueueStats {
        lock(&self.shared.stats).clone()
    }

    pub fn delivered(&self) -> Delivered {
        lock(&self.shared.delivered).clone()
    }

    /// Runs until aborted.
    pub async fn run(self) {
        loop {
            match self.poll_once().await {
                Ok(0) => tokio::time::sleep(EMPTY_POLL).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "queue mapping: receive failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn receive(&self, max: usize) -> Result<Vec<aws_sdk_sqs::types::Message>, String> {
        let out = self
            .shared
            .sqs
            .receive_message()
            .queue_url(&self.shared.queue_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, SQS_MAX)).unwrap_or(10))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .wait_time_seconds(0)
            .send()
            .await
            .map_err(|e| outbox_aws::describe(&e))?;
        Ok(out.messages.unwrap_or_default())
    }

    /// One receive, invoke and delete; returns how many messages came.
    async fn poll_once(&self) -> Result<usize, String> {
        let mapping = &self.shared.mapping;
        let mut messages = self.receive(mapping.batch_size).await?;
        if messages.is_empty() {
            return Ok(0);
        }
        // With a batching window, gather more until the batch is full or
        // the window closes.
        if !mapping.batching_window.is_zero() {
            let until = tokio::time::Instant::now() + mapping.batching_window;
            while messages.len() < mapping.batch_size && tokio::time::Instant::now() < until {
                let more = self
                    .receive(mapping.batch_size.saturating_sub(messages.len()))
                    .await?;
                if more.is_empty() {
                    tokio::time::sleep(EMPTY_POLL).await;
                }
                messages.extend(more);
            }
        }
        let count = messages.len();
        let ids: Vec<String> = messages
            .iter()
            .map(|m| m.message_id().unwrap_or_default().to_owned())
            .collect();
        let redelivered = messages
            .iter()
            .filter(|m| {
                m.attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse::<u64>().ok())
                    .is_some_and(|c| c > 1)
            })
            .count() as u64;
        let event = json!({
            "Records": messages
                .iter()
                .map(|m| crate::events::sqs_record_json(m, &self.shared.queue_arn, &self.shared.region))
                .collect::<Vec<_>>()
        });
        self.note_handed(&messages);
        let answer = self.shared.function.invoke(&event).await;
        let verdict = match &answer {
            Ok(response) => queue_verdict(&ids, response, mapping.report_batch_item_failures),
            Err(e) => {
                tracing::info!(error = %e, "queue mapping: function error; the batch returns after the visibility timeout");
                Verdict::AllFailed
            }
        };
        let failed: Vec<usize> = match &verdict {
            Verdict::AllDone => Vec::new(),
            Verdict::Failed(f) => f.clone(),
            Verdict::RetryFrom(i) => (*i..count).collect(),
            Verdict::AllFailed => (0..count).collect(),
        };
        {
            let mut stats = lock(&self.shared.stats);
            stats.messages = stats.messages.saturating_add(count as u64);
            stats.invocations = stats.invocations.saturating_add(1);
            stats.redeliveries = stats.redeliveries.saturating_add(redelivered);
            if answer.is_err() {
                stats.function_errors = stats.function_errors.saturating_add(1);
            } else if !failed.is_empty() {
                stats.partial_failures = stats.partial_failures.saturating_add(1);
            }
        }
        let done: Vec<&aws_sdk_sqs::types::Message> = messages
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(i))
            .map(|(_, m)| m)
            .collect();
        self.note_delivered(&done);
        self.delete(&done).await;
        Ok(count)
    }

    fn note_handed(&self, messages: &[aws_sdk_sqs::types::Message]) {
        let mut delivered = lock(&self.shared.delivered);
        for m in messages {
            let Some(body) = m.body() else { continue };
            if let Ok(received) = outbox_sqs::parse_delivery(body) {
                let n = delivered
                    .handed
                    .entry(received.event.id.to_string())
                    .or_insert(0);
                *n = n.saturating_add(1);
            }
        }
    }

    fn note_delivered(&self, done: &[&aws_sdk_sqs::types::Message]) {
        let mut delivered = lock(&self.shared.delivered);
        for m in done {
            let Some(body) = m.body() else { continue };
            if let Ok(received) = outbox_sqs::parse_delivery(body) {
                let event = received.event;
                let n = delivered.count.entry(event.id.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                delivered
                    .versions
                    .entry(event.aggregate_id.clone())
                    .or_default()
                    .push(event.aggregate_version);
            }
        }
    }

    async fn delete(&self, done: &[&aws_sdk_sqs::types::Message]) {
        for chunk in done.chunks(SQS_MAX) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .ok()
                })
                .collect();
            match self
                .shared
                .sqs
                .delete_message_batch()
                .queue_url(&self.shared.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    let deleted = out.successful().len() as u64;
                    let mut stats = lock(&self.shared.stats);
                    stats.deleted = stats.deleted.saturating_add(deleted);
                }
                // Not deleted means delivered again; the inbox absorbs it.
                Err(e) => {
                    tracing::warn!(error = %outbox_aws::describe(&e), "queue mapping: DeleteMessageBatch failed")
                }
            }
        }
    }
}
