//! The DynamoDB stream event source mapping: reads the outbox table's
//! stream with the Streams API (shards, iterators, `GetRecords`), batches
//! records as the mapping's `BatchSize` and batching window say, invokes the
//! function with the Lambda event, and settles each batch as Lambda does
//! (see [`crate::esm`]): partial batch responses, bisect on function error,
//! `MaximumRetryAttempts`, then the on-failure destination. One task per
//! shard keeps each shard's order; a child shard waits for its parent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use outbox_dynamodb::{decode_streams_record, Change};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::esm::{stream_verdict, Settled, StreamBatch, StreamMapping};
use crate::runtime::Function;

/// Pause between `GetRecords` calls that found nothing (Lambda polls a
/// shard about four times a second).
const EMPTY_POLL: Duration = Duration::from_millis(250);
/// How often new shards are looked for.
const SHARD_DISCOVERY: Duration = Duration::from_secs(2);

/// What the mapping did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamStats {
    pub records: u64,
    pub batches: u64,
    pub invocations: u64,
    pub function_errors: u64,
    /// Invocations answered with some records reported failed.
    pub partial_failures: u64,
    pub retries: u64,
    pub bisections: u64,
    /// Records given up on and sent to the on-failure destination.
    pub discarded_records: u64,
    /// Events found in the stream's records (each written event once).
    pub events_seen: u64,
}

/// The ids of the events the stream carried, per aggregate, in the order
/// the records came: what the run checks Shipping against.
#[derive(Debug, Default)]
pub struct Written {
    /// Event id -> (aggregate id, version).
    pub events: HashMap<String, (String, u64)>,
}

#[derive(Debug)]
struct Shared {
    streams: aws_sdk_dynamodbstreams::Client,
    sqs: aws_sdk_sqs::Client,
    stream_arn: String,
    region: String,
    function: Arc<Function>,
    mapping: StreamMapping,
    failure_queue_url: String,
    stats: Mutex<StreamStats>,
    written: Mutex<Written>,
    finished_shards: Mutex<HashSet<String>>,
}

/// The running mapping.
#[derive(Debug, Clone)]
pub struct StreamPoller {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StreamPoller {
    pub fn new(
        streams: aws_sdk_dynamodbstreams::Client,
        sqs: aws_sdk_sqs::Client,
        stream_arn: String,
        function: Arc<Function>,
        mapping: StreamMapping,
        failure_queue_url: String,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                streams,
                sqs,
                stream_arn,
                region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned()),
                function,
                mapping,
                failure_queue_url,
                stats: Mutex::new(StreamStats::default()),
                written: Mutex::new(Written::default()),
                finished_shards: Mutex::new(HashSet::new()),
            }),
        }
    }

    pub fn stats(&self) -> StreamStats {
        lock(&self.shared.stats).clone()
    }

    /// The events the stream carried so far: id -> (aggregate id, version).
    pub fn written(&self) -> HashMap<String, (String, u64)> {
        lock(&self.shared.written).events.clone()
    }

    /// Runs until aborted: discovers shards and polls each in its own task.
    pub async fn run(self) {
        let mut started: HashSet<String> = HashSet::new();
        let mut tasks = JoinSet::new();
        loop {
            match self.shards().await {
                Ok(shards) => {
                    let known: HashSet<&String> = shards.iter().map(|(id, _)| id).collect();
                    for (id, parent) in &shards {
                        if started.contains(id) {
                            continue;
                        }
                        // A child waits until its parent is read to its end,
                        // unless the parent is gone from the stream.
                        let parent_pending = parent.as_ref().is_some_and(|p| {
                            known.contains(p) && !lock(&self.shared.finished_shards).contains(p)
                        });
                        if parent_pending {
                            continue;
                        }
                        started.insert(id.clone());
                        let shard = ShardReader {
                            shared: self.shared.clone(),
                            shard_id: id.clone(),
                        };
                        tasks.spawn(shard.run());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "stream mapping: DescribeStream failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(SHARD_DISCOVERY) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }

    async fn shards(&self) -> Result<Vec<(String, Option<String>)>, String> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .shared
                .streams
                .describe_stream()
                .stream_arn(&self.shared.stream_arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| outbox_aws::describe(&e))?;
            let Some(description) = out.stream_description else {
                return Ok(shards);
            };
            for shard in description.shards() {
                if let Some(id) = shard.shard_id() {
                    shards.push((id.to_owned(), shard.parent_shard_id().map(str::to_owned)));
                }
            }
            start = description.last_evaluated_shard_id;
            if start.is_none() {
                return Ok(shards);
            }
        }
    }
}

/// One shard's reader: its own iterator and batches, in shard order.
struct ShardReader {
    shared: Arc<Shared>,
    shard_id: String,
}

impl ShardReader {
    async fn iterator(&self, after: Option<&str>) -> Result<Option<String>, String> {
        let mut request = self
            .shared
            .streams
            .get_shard_iterator()
            .stream_arn(&self.shared.stream_arn)
            .shard_id(&self.shard_id);
        request = match after {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            None if self.shared.mapping.starting_position == "LATEST" => {
                request.shard_iterator_type(ShardIteratorType::Latest)
            }
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = request.send().await.map_err(|e| outbox_aws::describe(&e))?;
        Ok(out.shard_iterator)
    }

    async fn run(self) {
        let mapping = self.shared.mapping.clone();
        // The last record settled: where a new iterator starts after an
        // error, as Lambda's checkpoint does.
        let mut checkpoint: Option<String> = None;
        let mut iterator = loop {
            match self.iterator(None).await {
                Ok(it) => break it,
                Err(e) => {
                    tracing::warn!(shard = %self.shard_id, error = %e, "stream mapping: GetShardIterator failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut buffer: Vec<Record> = Vec::new();
        let mut first_at: Option<tokio::time::Instant> = None;
        loop {
            let Some(current) = iterator.clone() else {
                // The shard is closed and read to its end.
                if !buffer.is_empty() {
                    self.deliver(std::mem::take(&mut buffer), &mut checkpoint)
                        .await;
                }
                lock(&self.shared.finished_shards).insert(self.shard_id.clone());
                return;
            };
            let want = mapping
                .batch_size
                .saturating_sub(buffer.len())
                .clamp(1, 1000);
            let got = self
                .shared
                .streams
                .get_records()
                .shard_iterator(current)
                .limit(i32::try_from(want).unwrap_or(1000))
                .send()
                .await;
            let found = match got {
                Ok(out) => {
                    iterator = out.next_shard_iterator;
                    let records = out.records.unwrap_or_default();
                    let n = records.len();
                    if n > 0 && first_at.is_none() {
                        first_at = Some(tokio::time::Instant::now());
                    }
                    buffer.extend(records);
                    n
                }
                Err(e) => {
                    tracing::warn!(shard = %self.shard_id, error = %outbox_aws::describe(&e), "stream mapping: GetRecords failed; new iterator from the checkpoint");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // Records buffered but not delivered are read again.
                    buffer.clear();
                    first_at = None;
                    if let Ok(it) = self.iterator(checkpoint.as_deref()).await {
                        iterator = it;
                    }
                    continue;
                }
            };
            let window_over = first_at.is_some_and(|t| t.elapsed() >= mapping.batching_window);
            if !buffer.is_empty()
                && (buffer.len() >= mapping.batch_size || window_over || iterator.is_none())
            {
                let batch = std::mem::take(&mut buffer);
                first_at = None;
                self.deliver(batch, &mut checkpoint).await;
            } else if found == 0 {
                tokio::time::sleep(EMPTY_POLL).await;
            }
        }
    }

    fn note_written(&self, records: &[Record]) {
        let mut written = lock(&self.shared.written);
        let mut events = 0u64;
        for record in records {
            if let Ok(decoded) = decode_streams_record(record) {
                if let Change::Events(item) = decoded.change {
                    for event in item.events {
                        let new = written
                            .events
                            .insert(
                                event.id.to_string(),
                                (event.aggregate_id.clone(), event.aggregate_version),
                            )
                            .is_none();
                        if new {
                            events = events.saturating_add(1);
                        }
                    }
                }
            }
        }
        drop(written);
        let mut stats = lock(&self.shared.stats);
        stats.events_seen = stats.events_seen.saturating_add(events);
    }

    /// Delivers one batch until it is settled; moves the checkpoint.
    async fn deliver(&self, records: Vec<Record>, checkpoint: &mut Option<String>) {
        self.note_written(&records);
        {
            let mut stats = lock(&self.shared.stats);
            stats.records = stats.records.saturating_add(records.len() as u64);
            stats.batches = stats.batches.saturating_add(1);
        }
        let mapping = &self.shared.mapping;
        // Records older than MaximumRecordAgeInSeconds are not invoked.
        let (records, expired): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|r| !self.expired(r));
        if !expired.is_empty() {
            self.discard(&expired, "record age exceeded MaximumRecordAgeInSeconds")
                .await;
        }
        let mut batch = StreamBatch::new(records, mapping);
        while let Some(part) = batch.next().map(<[Record]>::to_vec) {
            let sequence_numbers: Vec<String> = part
                .iter()
                .map(|r| {
                    r.dynamodb()
                        .and_then(|d| d.sequence_number())
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            let event = json!({
                "Records": part
                    .iter()
                    .map(|r| crate::events::stream_record_json(r, &self.shared.stream_arn, &self.shared.region))
                    .collect::<Vec<_>>()
            });
            let answer = self.shared.function.invoke(&event).await;
            let verdict = match &answer {
                Ok(response) => Some(stream_verdict(
                    &sequence_numbers,
                    response,
                    mapping.report_batch_item_failures,
                )),
                Err(e) => {
                    tracing::info!(shard = %self.shard_id, error = %e, "stream mapping: function error");
                    None
                }
            };
            {
                let mut stats = lock(&self.shared.stats);
                stats.invocations = stats.invocations.saturating_add(1);
                match &verdict {
                    None => stats.function_errors = stats.function_errors.saturating_add(1),
                    Some(crate::esm::Verdict::AllDone) => {}
                    Some(_) => stats.partial_failures = stats.partial_failures.saturating_add(1),
                }
            }
            match batch.settle(verdict) {
                Settled::Done(_) => {
                    *checkpoint = sequence_numbers.last().cloned();
                }
                Settled::Retry { from } => {
                    if from > 0 {
                        *checkpoint = sequence_numbers.get(from - 1).cloned();
                    }
                    let mut stats = lock(&self.shared.stats);
                    stats.retries = stats.retries.saturating_add(1);
                }
                Settled::Bisected => {
                    let mut stats = lock(&self.shared.stats);
                    stats.retries = stats.retries.saturating_add(1);
                    stats.bisections = stats.bisections.saturating_add(1);
                }
                Settled::Discarded(records) => {
                    let reason = match &answer {
                        Ok(_) => "retries exhausted with records reported failed".to_owned(),
                        Err(e) => format!("retries exhausted: {e}"),
                    };
                    *checkpoint = sequence_numbers.last().cloned();
                    self.discard(&records, &reason).await;
                }
            }
        }
    }

    fn expired(&self, record: &Record) -> bool {
        let Some(max) = self.shared.mapping.maximum_record_age else {
            return false;
        };
        let Some(created) = record
            .dynamodb()
            .and_then(|d| d.approximate_creation_date_time())
        else {
            return false;
        };
        let age = chrono::Utc::now()
            .timestamp()
            .saturating_sub(created.secs());
        // DynamoDB Local rounds creation times to the minute: allow for it.
        u64::try_from(age).unwrap_or(0) > max.as_secs().saturating_add(60)
    }

    /// Sends what Lambda sends an on-failure destination for a stream batch:
    /// where the records are, not the records.
    async fn discard(&self, records: &[Record], reason: &str) {
        let seq = |r: Option<&Record>| {
            r.and_then(|r| r.dynamodb())
                .and_then(|d| d.sequence_number())
                .unwrap_or_default()
                .to_owned()
        };
        let message: Value = json!({
            "requestContext": {
                "requestId": uuid::Uuid::new_v4().to_string(),
                "functionArn": format!("arn:aws:lambda:{}:123456789012:function:{}", self.shared.region, self.shared.function.name()),
                "condition": reason,
                "approximateInvokeCount": self.shared.mapping.maximum_retry_attempts.map(|m| m.saturating_add(1)),
            },
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "DDBStreamBatchInfo": {
                "shardId": self.shard_id,
                "startSequenceNumber": seq(records.first()),
                "endSequenceNumber": seq(records.last()),
                "batchSize": records.len(),
                "streamArn": self.shared.stream_arn,
            }
        });
        {
            let mut stats = lock(&self.shared.stats);
            stats.discarded_records = stats.discarded_records.saturating_add(records.len() as u64);
        }
        tracing::warn!(shard = %self.shard_id, records = records.len(), %reason, "stream mapping: records sent to the on-failure destination");
        if let Err(e) = self
            .shared
            .sqs
            .send_message()
            .queue_url(&self.shared.failure_queue_url)
            .message_body(message.to_string())
            .send()
            .await
        {
            tracing::error!(error = %outbox_aws::describe(&e), "stream mapping: cannot reach the on-failure destination");
        }
    }
}
