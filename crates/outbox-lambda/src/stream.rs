//! The `PublishEvents` handler: relays the events of a DynamoDB stream batch
//! and answers with a partial batch response.
//!
//! Lambda resumes a stream batch from the lowest sequence number reported
//! failed, so the handler reports exactly one record, the first one not
//! fully handled, and never publishes a record of an aggregate after one of
//! that aggregate that failed. Other aggregates keep flowing.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use outbox_core::{
    Disposition, Event, PublishError, PublishRequest, PublishResult, Publisher, RetryPolicy,
    StoreError,
};
use outbox_dynamodb::{decode_lambda_record, Change, DecodeError, LambdaStreamEvent};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::dead_letter::DeadLetterSink;

/// How hard one invocation tries before handing a record back to Lambda.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerConfig {
    /// Retries of an event after a transient failure, within one invocation.
    pub entry_retries: u32,
    /// Wait before the first retry; doubled for each next one, with jitter.
    pub retry_backoff: Duration,
    /// Longest wait before a retry. A broker asking to wait longer gets the
    /// record back to Lambda instead of a blocked invocation.
    pub max_retry_backoff: Duration,
    /// Publish calls in flight at once.
    pub publish_concurrency: usize,
    /// Longest wait for one publish call; a slower call counts as a transient
    /// failure of all its entries.
    pub publish_timeout: Duration,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            entry_retries: 3,
            retry_backoff: Duration::from_millis(50),
            max_retry_backoff: Duration::from_secs(2),
            publish_concurrency: 4,
            publish_timeout: Duration::from_secs(10),
        }
    }
}

impl HandlerConfig {
    pub fn entry_retries(mut self, n: u32) -> Self {
        self.entry_retries = n;
        self
    }

    pub fn retry_backoff(mut self, first: Duration) -> Self {
        self.retry_backoff = first;
        self
    }

    pub fn max_retry_backoff(mut self, max: Duration) -> Self {
        self.max_retry_backoff = max;
        self
    }

    pub fn publish_concurrency(mut self, n: usize) -> Self {
        self.publish_concurrency = n;
        self
    }

    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.publish_concurrency == 0 {
            return Err("publish_concurrency must be at least 1".into());
        }
        if self.publish_timeout.is_zero() {
            return Err("publish_timeout must be greater than zero".into());
        }
        if self.retry_backoff > self.max_retry_backoff {
            return Err("retry_backoff must not exceed max_retry_backoff".into());
        }
        Ok(())
    }

    fn backoff(&self, failures: u32) -> Duration {
        RetryPolicy {
            initial: self.retry_backoff,
            multiplier: 2.0,
            max_delay: self.max_retry_backoff,
            jitter: 0.5,
            max_attempts: self.entry_retries.saturating_add(1),
        }
        .backoff(failures)
    }
}

/// The partial batch response of a stream event source mapping with
/// `ReportBatchItemFailures`: `{"batchItemFailures":[{"itemIdentifier":"<SequenceNumber>"}]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamBatchResponse {
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<BatchItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemFailure {
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

impl StreamBatchResponse {
    /// Everything was handled: Lambda moves past the batch.
    pub fn success() -> Self {
        Self::default()
    }

    /// Lambda retries from this sequence number onward. An empty identifier
    /// makes Lambda retry the whole batch.
    pub fn retry_from(sequence_number: impl Into<String>) -> Self {
        Self {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: sequence_number.into(),
            }],
        }
    }

    /// The sequence number Lambda will retry from, if any.
    pub fn retry_sequence_number(&self) -> Option<&str> {
        self.batch_item_failures
            .first()
            .map(|f| f.item_identifier.as_str())
    }

    pub fn is_success(&self) -> bool {
        self.batch_item_failures.is_empty()
    }
}

impl From<StreamBatchResponse> for aws_lambda_events::event::streams::DynamoDbEventResponse {
    fn from(response: StreamBatchResponse) -> Self {
        use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;
        let mut out = Self::default();
        for failure in response.batch_item_failures {
            let mut item = DynamoDbBatchItemFailure::default();
            item.item_identifier = Some(failure.item_identifier);
            out.batch_item_failures.push(item);
        }
        out
    }
}

/// What one invocation did, for logs and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationReport {
    pub response: StreamBatchResponse,
    pub records: usize,
    /// REMOVE, TTL deletions and other records without events.
    pub ignored: usize,
    /// Undecodable records kept in the dead-letter sink.
    pub malformed: usize,
    pub published: usize,
    /// Events refused for good and kept in the dead-letter sink.
    pub dead_lettered: usize,
    /// Publish attempts repeated after a transient failure.
    pub retries: usize,
    /// Records not fully handled (failed or held back behind a failure);
    /// Lambda hands them over again.
    pub unfinished: usize,
}

/// The `PublishEvents` Lambda handler, callable without the Lambda runtime.
#[derive(Debug)]
pub struct StreamRelayHandler<P, D> {
    publisher: P,
    dead_letters: D,
    config: HandlerConfig,
}

/// A record's progress through the invocation.
#[derive(Debug)]
struct RecordState {
    sequence_number: Option<String>,
    /// Events not yet published or dead-lettered.
    remaining: usize,
    failed: bool,
}

#[derive(Debug)]
struct Pending {
    record: usize,
    event: Event,
    /// Failed attempts so far in this invocation.
    failures: u32,
}

#[derive(Debug, Default)]
struct AggregateQueue {
    queue: VecDeque<Pending>,
    /// Its head is being published or dead-lettered.
    busy: bool,
    /// Something failed for good: the rest waits for Lambda's retry.
    blocked: bool,
    not_before: Option<Instant>,
}

impl AggregateQueue {
    fn ready(&self, now: Instant) -> bool {
        !self.busy
            && !self.blocked
            && !self.queue.is_empty()
            && self.not_before.is_none_or(|t| t <= now)
    }

    fn waiting_until(&self) -> Option<Instant> {
        if self.busy || self.blocked || self.queue.is_empty() {
            return None;
        }
        self.not_before
    }
}

enum Task<'a> {
    Publish {
        events: Vec<Event>,
        tickets: Vec<(usize, usize, u32)>,
    },
    DeadLetterEvents {
        dead: Vec<(Event, u32, String)>,
        tickets: Vec<(usize, usize)>,
    },
    DeadLetterRecord {
        record: usize,
        sequence_number: String,
        raw: &'a str,
        error: String,
    },
}

enum Done {
    Published {
        events: Vec<Event>,
        tickets: Vec<(usize, usize, u32)>,
        results: Vec<PublishResult>,
    },
    EventsDeadLettered {
        tickets: Vec<(usize, usize)>,
        result: Result<(), StoreError>,
    },
    RecordDeadLettered {
        record: usize,
        result: Result<(), StoreError>,
    },
}

impl<P: Publisher, D: DeadLetterSink> StreamRelayHandler<P, D> {
    pub fn new(publisher: P, dead_letters: D) -> Self {
        Self {
            publisher,
            dead_letters,
            config: HandlerConfig::default(),
        }
    }

    pub fn config(mut self, config: HandlerConfig) -> Self {
        self.config = config;
        self
    }

    pub fn handler_config(&self) -> &HandlerConfig {
        &self.config
    }

    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    pub fn dead_letters(&self) -> &D {
        &self.dead_letters
    }

    /// Handles one Lambda DynamoDB stream event.
    pub async fn handle(&self, event: &LambdaStreamEvent) -> StreamBatchResponse {
        self.process(event).await.response
    }

    /// Parses and handles a Lambda DynamoDB stream event given as JSON. An
    /// event that is not a stream event at all is an error: no record can be
    /// named, so the invocation should fail as a whole.
    pub async fn handle_json(&self, json: &str) -> Result<StreamBatchResponse, DecodeError> {
        let event = LambdaStreamEvent::from_json(json)?;
        Ok(self.handle(&event).await)
    }

    /// Handles one event and says what happened.
    pub async fn process(&self, event: &LambdaStreamEvent) -> InvocationReport {
        let mut report = InvocationReport {
            records: event.records.len(),
            ..InvocationReport::default()
        };
        let mut records = Vec::with_capacity(event.records.len());
        let mut aggregates: Vec<AggregateQueue> = Vec::new();
        let mut aggregate_index: HashMap<(String, String), usize> = HashMap::new();
        let mut tasks = FuturesUnordered::new();

        for (position, raw) in event.records.iter().enumerate() {
            match decode_lambda_record(raw) {
                Ok(record) => match record.change {
                    Change::Ignored { .. } => {
                        report.ignored += 1;
                        records.push(RecordState {
                            sequence_number: Some(record.sequence_number),
                            remaining: 0,
                            failed: false,
                        });
                    }
                    Change::Events(item) => {
                        let key = (item.aggregate_type, item.aggregate_id);
                        let next = aggregates.len();
                        let aggregate = *aggregate_index.entry(key).or_insert(next);
                        if aggregate == next {
                            aggregates.push(AggregateQueue::default());
                        }
                        records.push(RecordState {
                            sequence_number: Some(record.sequence_number),
                            remaining: item.events.len(),
                            failed: false,
                        });
                        aggregates[aggregate]
                            .queue
                            .extend(item.events.into_iter().map(|event| Pending {
                                record: position,
                                event,
                                failures: 0,
                            }));
                    }
                },
                Err(error) => {
                    report.malformed += 1;
                    tracing::warn!(%error, "stream relay: dead-lettering a malformed record");
                    let sequence_number = error
                        .sequence_number
                        .clone()
                        .unwrap_or_else(|| stand_in_sequence_number(raw.get()));
                    records.push(RecordState {
                        sequence_number: error.sequence_number.clone(),
                        remaining: 0,
                        failed: false,
                    });
                    tasks.push(self.run(Task::DeadLetterRecord {
                        record: position,
                        sequence_number,
                        raw: raw.get(),
                        error: error.reason,
                    }));
                }
            }
        }

        let max_batch = self.publisher.max_batch_size().max(1);
        let mut publishing = 0usize;
        loop {
            let now = Instant::now();
            while publishing < self.config.publish_concurrency {
                // A call in flight will free more aggregates: wait for it
                // rather than send a part-filled call, since every call has
                // a fixed cost.
                if publishing > 0
                    && aggregates
                        .iter()
                        .filter(|a| a.ready(now))
                        .take(max_batch)
                        .count()
                        < max_batch
                {
                    break;
                }
                let mut events = Vec::new();
                let mut tickets = Vec::new();
                // Aggregates in order of first appearance: the earliest
                // records go first, which keeps a reported position low.
                for (index, aggregate) in aggregates.iter_mut().enumerate() {
                    if events.len() == max_batch {
                        break;
                    }
                    if !aggregate.ready(now) {
                        continue;
                    }
                    if let Some(head) = aggregate.queue.pop_front() {
                        aggregate.busy = true;
                        aggregate.not_before = None;
                        tickets.push((index, head.record, head.failures));
                        events.push(head.event);
                    }
                }
                if events.is_empty() {
                    break;
                }
                publishing += 1;
                tasks.push(self.run(Task::Publish { events, tickets }));
            }

            let wake = aggregates
                .iter()
                .filter_map(AggregateQueue::waiting_until)
                .min();
            let done = match (tasks.is_empty(), wake) {
                (true, None) => break,
                (true, Some(at)) => {
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                (false, None) => tasks.next().await,
                (false, Some(at)) => tokio::select! {
                    done = tasks.next() => done,
                    () = tokio::time::sleep_until(at) => continue,
                },
            };
            let Some(done) = done else { continue };

            match done {
                Done::Published {
                    events,
                    tickets,
                    results,
                } => {
                    publishing -= 1;
                    let mut dead = Vec::new();
                    let mut dead_tickets = Vec::new();
                    let now = Instant::now();
                    for ((event, (index, record, failures)), result) in
                        events.into_iter().zip(tickets).zip(results)
                    {
                        let aggregate = &mut aggregates[index];
                        let error = match result {
                            Ok(()) => {
                                report.published += 1;
                                aggregate.busy = false;
                                records[record].remaining -= 1;
                                continue;
                            }
                            Err(error) => error,
                        };
                        let failures = failures.saturating_add(1);
                        let id = event.id;
                        let delay = match error.disposition() {
                            Disposition::Permanent => {
                                tracing::warn!(%id, %error, "stream relay: permanent failure, dead-lettering");
                                dead.push((event, failures, format!("permanent: {error}")));
                                dead_tickets.push((index, record));
                                continue;
                            }
                            Disposition::RetryAfter(after) => {
                                after.max(self.config.backoff(failures))
                            }
                            _ => self.config.backoff(failures),
                        };
                        aggregate.busy = false;
                        if failures > self.config.entry_retries
                            || delay > self.config.max_retry_backoff
                        {
                            tracing::warn!(%id, %error, failures, "stream relay: giving the record back to Lambda");
                            records[record].failed = true;
                            aggregate.blocked = true;
                            aggregate.queue.push_front(Pending {
                                record,
                                event,
                                failures,
                            });
                        } else {
                            tracing::debug!(%id, %error, failures, ?delay, "stream relay: retrying");
                            report.retries += 1;
                            aggregate.not_before = Some(now + delay);
                            aggregate.queue.push_front(Pending {
                                record,
                                event,
                                failures,
                            });
                        }
                    }
                    if !dead.is_empty() {
                        tasks.push(self.run(Task::DeadLetterEvents {
                            dead,
                            tickets: dead_tickets,
                        }));
                    }
                }
                Done::EventsDeadLettered { tickets, result } => {
                    if let Err(error) = &result {
                        tracing::error!(%error, "stream relay: dead-letter store failed; the records go back to Lambda");
                    } else {
                        report.dead_lettered += tickets.len();
                    }
                    for (index, record) in tickets {
                        let aggregate = &mut aggregates[index];
                        aggregate.busy = false;
                        if result.is_ok() {
                            records[record].remaining -= 1;
                        } else {
                            records[record].failed = true;
                            aggregate.blocked = true;
                        }
                    }
                }
                Done::RecordDeadLettered { record, result } => {
                    if let Err(error) = result {
                        tracing::error!(%error, "stream relay: dead-letter store failed for a malformed record");
                        records[record].failed = true;
                    }
                }
            }
        }

        report.unfinished = records
            .iter()
            .filter(|r| r.failed || r.remaining > 0)
            .count();
        if let Some(first) = records.iter().position(|r| r.failed || r.remaining > 0) {
            // A record without a sequence number cannot be named: resume from
            // the nearest earlier one (its events come again, which consumers
            // absorb), or have Lambda retry the whole batch.
            let resume = records[..=first]
                .iter()
                .rev()
                .find_map(|r| r.sequence_number.clone())
                .unwrap_or_default();
            report.response = StreamBatchResponse::retry_from(resume);
        }
        report
    }

    async fn run(&self, task: Task<'_>) -> Done {
        match task {
            Task::Publish { events, tickets } => {
                let results = self.publish_call(&events).await;
                Done::Published {
                    events,
                    tickets,
                    results,
                }
            }
            Task::DeadLetterEvents { dead, tickets } => Done::EventsDeadLettered {
                result: self.dead_letters.dead_letter_events(&dead).await,
                tickets,
            },
            Task::DeadLetterRecord {
                record,
                sequence_number,
                raw,
                error,
            } => Done::RecordDeadLettered {
                record,
                result: self
                    .dead_letters
                    .dead_letter_record(&sequence_number, raw, &error)
                    .await,
            },
        }
    }

    /// One publish call, bounded by the publish timeout, always answering one
    /// result per event.
    async fn publish_call(&self, events: &[Event]) -> Vec<PublishResult> {
        let call = self.publisher.publish(PublishRequest::new(events));
        let mut results = match tokio::time::timeout(self.config.publish_timeout, call).await {
            Ok(results) => results,
            Err(_) => vec![Err(PublishError::transient("publish timed out")); events.len()],
        };
        if results.len() != events.len() {
            let message = format!(
                "publisher returned {} results for {} events",
                results.len(),
                events.len()
            );
            results.resize_with(events.len(), || {
                Err(PublishError::transient(message.clone()))
            });
        }
        results
    }
}

/// A stable key for a record that has no sequence number, so a retried
/// invocation keeps it under the same name (FNV-1a of the raw record).
fn stand_in_sequence_number(raw: &str) -> String {
    let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("no-sequence-number-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_has_the_lambda_shape() {
        assert_eq!(
            serde_json::to_string(&StreamBatchResponse::retry_from("42")).unwrap(),
            r#"{"batchItemFailures":[{"itemIdentifier":"42"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&StreamBatchResponse::success()).unwrap(),
            r#"{"batchItemFailures":[]}"#
        );
        let sdk: aws_lambda_events::event::streams::DynamoDbEventResponse =
            StreamBatchResponse::retry_from("42").into();
        assert_eq!(
            serde_json::to_value(&sdk).unwrap(),
            serde_json::to_value(StreamBatchResponse::retry_from("42")).unwrap()
        );
    }

    #[test]
    fn backoff_doubles_within_jitter() {
        let c = HandlerConfig::default();
        for _ in 0..50 {
            let first = c.backoff(1);
            let third = c.backoff(3);
            assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
            assert!(third >= Duration::from_millis(100) && third <= Duration::from_millis(200));
        }
        assert!(HandlerConfig::default().validate().is_ok());
        assert!(HandlerConfig::default()
            .publish_concurrency(0)
            .validate()
            .is_err());
    }

    #[test]
    fn stand_in_sequence_numbers_are_stable() {
        assert_eq!(
            stand_in_sequence_number("{}"),
            stand_in_sequence_number("{}")
        );
        assert_ne!(
            stand_in_sequence_number("{}"),
            stand_in_sequence_number("[]")
        );
    }
}
