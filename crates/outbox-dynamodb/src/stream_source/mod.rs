//! The standalone stream relay's source: reads the outbox table's DynamoDB
//! Stream through the Streams API and serves it to the core `Relay` as a
//! [`ClaimSource`].
//!
//! Records are read into an in-memory buffer and handed out per aggregate in
//! stream order. Per shard, the checkpoint is the last record such that it and
//! every earlier record are settled (published, dead-lettered or ignored); it
//! is written to the checkpoint table, so a restart re-reads at most the
//! records that were unsettled. A child shard is read only once its parent is
//! read to the end and settled.
//!
//! Checkpoint table (key `consumer` + `shard`):
//!
//! ```text
//! consumer         S  partition key: the consumer name
//! shard            S  sort key: the shard id, or "#lease" for the relay lease
//! sequence_number  S  last settled record of the prefix        (shards)
//! finished         BOOL  read to the end and settled            (shards)
//! owner            S  id of the process holding the lease       (#lease)
//! expires_at       N  milliseconds since the epoch              (#lease)
//! updated_at       N
//! ```
//!
//! ```no_run
//! use outbox_core::publishers::StdoutPublisher;
//! use outbox_core::{Relay, RelayConfig};
//! use outbox_dynamodb::{StartAt, StreamSource};
//!
//! # async fn shutdown_signal() {}
//! # async fn run() -> Result<(), outbox_core::StoreError> {
//! let config = outbox_aws::load_config().await;
//! let source = StreamSource::new(
//!     aws_sdk_dynamodb::Client::new(&config),
//!     aws_sdk_dynamodbstreams::Client::new(&config),
//!     "Outbox",
//! )
//! .consumer("relay")
//! .start_at(StartAt::TrimHorizon);
//! source.create_tables_if_missing().await?;
//! let relay = Relay::new(source.clone(), StdoutPublisher::new("orders"), RelayConfig::default())?;
//! relay.run(shutdown_signal()).await?;
//! // Hand the stream over at once instead of after the lease runs out.
//! source.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! One process at a time reads a stream per consumer: it holds the `#lease`
//! item and renews it on every claim, and every checkpoint write is
//! conditional on still holding it.
//!
//! What lies in the stream beyond the buffer is known only to DynamoDB: watch
//! the stream's `IteratorAge` metric for the backlog; [`Stats`] counts what
//! this process has read and not settled.

mod buffer;
mod raw;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, ReturnValue, TransactWriteItem, Update,
};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use chrono::{DateTime, Utc};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, DeadLetter, DeadLetters, EventId, LeaseId, OutboxStats,
    Purge, ReplaySelector, Settlements, Stats, StoreError,
};

pub use buffer::StreamReceipt;
use buffer::{Applied, Buffer};

use crate::dead_letters::{create_table, DeadLetterTable};
use crate::record::{decode_streams_record, Change};

const CONSUMER: &str = "consumer";
const SHARD: &str = "shard";
const SEQUENCE_NUMBER: &str = "sequence_number";
const FINISHED: &str = "finished";
const OWNER: &str = "owner";
const EXPIRES_AT: &str = "expires_at";
const UPDATED_AT: &str = "updated_at";
/// The sort key of the relay lease; shard ids never start with `#`.
const LEASE_KEY: &str = "#lease";

/// `GetRecords` returns at most 1000 records per call (DynamoDB Streams limit).
pub const GET_RECORDS_MAX: i32 = 1000;
/// `TransactWriteItems` takes at most 100 actions (DynamoDB limit); one is
/// the lease check.
const CHECKPOINTS_PER_TRANSACTION: usize = 99;

/// Shard id, new checkpoint, whether the shard is finished.
type CheckpointUpdate = (String, Option<String>, bool);

/// Where to start reading a shard that has no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The oldest record still in the stream (24 hours): nothing is lost.
    #[default]
    TrimHorizon,
    /// Only records written from now on; shards already closed are skipped.
    Latest,
}

#[derive(Debug, Clone)]
struct Config {
    outbox_table: String,
    checkpoint_table: String,
    consumer: String,
    start_at: StartAt,
    poll_interval: Duration,
    buffer_limit: usize,
    lease_ttl: Duration,
    wait_for_lease: bool,
    shard_refresh: Duration,
}

#[derive(Debug)]
struct Shard {
    parent: Option<String>,
    iterator: Option<String>,
    /// The last record taken into the buffer: where a lost iterator resumes.
    last_read: Option<String>,
    start: ShardIteratorType,
    exhausted: bool,
    finished: bool,
    next_read_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    buffer: Buffer,
    shards: HashMap<String, Shard>,
    listed_at: Option<Instant>,
    stream_arn: Option<String>,
    /// Shards whose `finished` flag is still to be written.
    finished_unwritten: Vec<String>,
    lease_until_ms: Option<i64>,
    replays_polled_at: Option<Instant>,
    /// Replays published or dead again whose replay items are still to go.
    replays_to_finish: Vec<EventId>,
}

struct Inner {
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    dead_letters: DeadLetterTable,
    config: Config,
    owner: String,
    state: Mutex<State>,
    /// One reader of the stream at a time within the process.
    reading: tokio::sync::Mutex<()>,
}

/// Reads the outbox table's stream for the core relay. Clones share one buffer.
#[derive(Clone)]
pub struct StreamSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("config", &self.inner.config)
            .field("owner", &self.inner.owner)
            .finish()
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn config_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Config(e.to_string())
}

/// Sequence numbers are decimal strings of varying length.
fn seq_after(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data behind: every
    // update is a few plain assignments.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl StreamSource {
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        streams: aws_sdk_dynamodbstreams::Client,
        outbox_table: impl Into<String>,
    ) -> Self {
        let outbox_table = outbox_table.into();
        let config = Config {
            checkpoint_table: format!("{outbox_table}-checkpoints"),
            consumer: "relay".to_owned(),
            start_at: StartAt::default(),
            poll_interval: Duration::from_millis(250),
            buffer_limit: 10_000,
            lease_ttl: Duration::from_secs(30),
            wait_for_lease: false,
            shard_refresh: Duration::from_secs(30),
            outbox_table: outbox_table.clone(),
        };
        let dead_letters =
            DeadLetterTable::new(dynamodb.clone(), format!("{outbox_table}-dead-letters"));
        Self {
            inner: Arc::new(Inner {
                dynamodb,
                streams,
                dead_letters,
                config,
                owner: uuid::Uuid::new_v4().to_string(),
                state: Mutex::default(),
                reading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => tracing::warn!("stream source: configure before cloning; setting ignored"),
        }
        self
    }

    /// Default `<outbox>-checkpoints`.
    pub fn checkpoint_table(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.configure(|i| i.config.checkpoint_table = name)
    }

    /// Default `<outbox>-dead-letters`.
    pub fn dead_letter_table(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.configure(|i| i.dead_letters = DeadLetterTable::new(i.dynamodb.clone(), name))
    }

    /// Checkpoints are kept per consumer; default "relay".
    pub fn consumer(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.configure(|i| i.config.consumer = name)
    }

    pub fn start_at(self, start_at: StartAt) -> Self {
        self.configure(|i| i.config.start_at = start_at)
    }

    /// Least time between two reads of a shard that had nothing new
    /// (DynamoDB Streams allows 5 `GetRecords` a second per shard). Default 250 ms.
    pub fn poll_interval(self, every: Duration) -> Self {
        self.configure(|i| i.config.poll_interval = every)
    }

    /// Most events held in memory; reading pauses above it. Default 10 000.
    pub fn buffer_limit(self, n: usize) -> Self {
        self.configure(|i| i.config.buffer_limit = n.max(1))
    }

    /// How long the relay lease lasts unless renewed; a process that dies
    /// holds the stream this long. Default 30 s.
    pub fn lease_ttl(self, ttl: Duration) -> Self {
        self.configure(|i| i.config.lease_ttl = ttl)
    }

    /// When another process holds the stream: wait (claims return nothing
    /// until its lease runs out) instead of failing with `Conflict`.
    pub fn wait_for_lease(self, wait: bool) -> Self {
        self.configure(|i| i.config.wait_for_lease = wait)
    }

    pub fn dead_letters_table(&self) -> &DeadLetterTable {
        &self.inner.dead_letters
    }

    /// Creates the checkpoint and dead-letter tables unless they exist.
    pub async fn create_tables_if_missing(&self) -> Result<(), StoreError> {
        create_table(
            &self.inner.dynamodb,
            &self.inner.config.checkpoint_table,
            CONSUMER,
            SHARD,
        )
        .await?;
        self.inner.dead_letters.create_table_if_missing().await
    }

    /// Writes pending checkpoints and gives the stream up, so another
    /// process can take over at once.
    pub async fn release(&self) -> Result<(), StoreError> {
        let _reading = self.inner.reading.lock().await;
        self.flush_checkpoints().await?;
        let held = lock(&self.inner.state).lease_until_ms.take().is_some();
        if held {
            let c = &self.inner.config;
            let out = self
                .inner
                .dynamodb
                .delete_item()
                .table_name(&c.checkpoint_table)
                .key(CONSUMER, s(&c.consumer))
                .key(SHARD, s(LEASE_KEY))
                .condition_expression("#o = :me")
                .expression_attribute_names("#o", OWNER)
                .expression_attribute_values(":me", s(&self.inner.owner))
                .send()
                .await;
            if let Err(e) = out {
                if !e
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception())
                {
                    return Err(outbox_aws::store_error("DeleteItem", e));
                }
            }
        }
        *lock(&self.inner.state) = State::default();
        Ok(())
    }

    /// Reads what the stream holds now into the buffer; returns how many
    /// events were added. `claim` does this itself; tests and tools use it
    /// to wait until written events are visible.
    pub async fn poll_stream(&self) -> Result<usize, StoreError> {
        if !self.ensure_lease().await? {
            return Ok(0);
        }
        let _reading = self.inner.reading.lock().await;
        self.read_shards().await
    }

    // ---- the relay lease --------------------------------------------------

    /// Takes or renews the lease; false when another process holds it and
    /// the source is told to wait.
    async fn ensure_lease(&self) -> Result<bool, StoreError> {
        let c = &self.inner.config;
        let ttl_ms = i64::try_from(c.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let held_until = lock(&self.inner.state).lease_until_ms;
        if held_until.is_some_and(|until| until - now > ttl_ms * 2 / 3) {
            return Ok(true);
        }
        let out = self
            .inner
            .dynamodb
            .put_item()
            .table_name(&c.checkpoint_table)
            .item(CONSUMER, s(&c.consumer))
            .item(SHARD, s(LEASE_KEY))
            .item(OWNER, s(&self.inner.owner))
            .item(EXPIRES_AT, AttributeValue::N((now + ttl_ms).to_string()))
            .item(UPDATED_AT, AttributeValue::N(now.to_string()))
            .condition_expression("attribute_not_exists(#c) OR #o = :me OR #e < :now")
            .expression_attribute_names("#c", CONSUMER)
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#e", EXPIRES_AT)
            .expression_attribute_values(":me", s(&self.inner.owner))
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match out {
            Ok(out) => {
                // Who held the lease before this put: if it was this process
                // all along, nobody read or settled in between, even when a
                // long batch let the lease lapse, and the buffer stays valid.
                let held_by_other = out
                    .attributes()
                    .and_then(|old| old.get(OWNER))
                    .is_some_and(|owner| *owner != s(&self.inner.owner));
                let mut state = lock(&self.inner.state);
                if held_by_other && state.lease_until_ms.is_some() {
                    // Another process held the stream meanwhile and may have
                    // settled records: start again from the checkpoints.
                    tracing::warn!("stream source: lease was taken over meanwhile; re-reading from checkpoints");
                    *state = State::default();
                }
                state.lease_until_ms = Some(now + ttl_ms);
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                let lost = {
                    let mut state = lock(&self.inner.state);
                    let lost = state.lease_until_ms.is_some();
                    *state = State::default();
                    lost
                };
                if lost {
                    tracing::error!(table = %c.outbox_table, consumer = %c.consumer,
                        "stream source: lease lost to another process; buffer dropped");
                }
                if c.wait_for_lease {
                    return Ok(false);
                }
                Err(StoreError::Conflict(format!(
                    "another relay holds the stream of table {} for consumer `{}` (lease item in {}); \
                     run one relay per consumer, or wait until its lease ({:?}) runs out",
                    c.outbox_table, c.consumer, c.checkpoint_table, c.lease_ttl
                )))
            }
            Err(e) => Err(outbox_aws::store_error("PutItem", e)),
        }
    }

    // ---- reading the stream -----------------------------------------------

    async fn stream_arn(&self) -> Result<String, StoreError> {
        if let Some(arn) = lock(&self.inner.state).stream_arn.clone() {
            return Ok(arn);
        }
        let table = &self.inner.config.outbox_table;
        let out = self
            .inner
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("DescribeTable", e))?;
        let arn = out
            .table()
            .and_then(|t| t.latest_stream_arn())
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "table {table} has no stream: enable one with view type NEW_IMAGE"
                ))
            })?
            .to_owned();
        lock(&self.inner.state).stream_arn = Some(arn.clone());
        Ok(arn)
    }

    /// Lists the stream's shards and loads the checkpoints of new ones.
    async fn list_shards(&self, arn: &str) -> Result<(), StoreError> {
        let mut listed = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .inner
                .streams
                .describe_stream()
                .stream_arn(arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("DescribeStream", e))?;
            let Some(desc) = out.stream_description else {
                break;
            };
            for shard in desc.shards() {
                if let Some(id) = shard.shard_id() {
                    let closed = shard
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some();
                    listed.push((
                        id.to_owned(),
                        shard.parent_shard_id().map(str::to_owned),
                        closed,
                    ));
                }
            }
            match desc.last_evaluated_shard_id {
                Some(id) if Some(&id) != start.as_ref() => start = Some(id),
                _ => break,
            }
        }
        let checkpoints = self.load_checkpoints().await?;
        let mut state = lock(&self.inner.state);
        let first_listing = state.listed_at.is_none();
        for (id, parent, closed) in listed {
            if state.shards.contains_key(&id) {
                continue;
            }
            let (checkpoint, finished) = checkpoints.get(&id).cloned().unwrap_or((None, false));
            let latest = first_listing && self.inner.config.start_at == StartAt::Latest;
            let skip = latest && checkpoint.is_none() && closed;
            let start = if latest {
                ShardIteratorType::Latest
            } else {
                ShardIteratorType::TrimHorizon
            };
            state.shards.insert(
                id,
                Shard {
                    parent,
                    iterator: None,
                    last_read: checkpoint,
                    start,
                    exhausted: finished || skip,
                    finished: finished || skip,
                    next_read_at: Instant::now(),
                },
            );
        }
        state.listed_at = Some(Instant::now());
        Ok(())
    }

    async fn load_checkpoints(
        &self,
    ) -> Result<HashMap<String, (Option<String>, bool)>, StoreError> {
        let c = &self.inner.config;
        let mut found = HashMap::new();
        let mut start = None;
        loop {
            let out = self
                .inner
                .dynamodb
                .query()
                .table_name(&c.checkpoint_table)
                .key_condition_expression("#c = :c")
                .expression_attribute_names("#c", CONSUMER)
                .expression_attribute_values(":c", s(&c.consumer))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query", e))?;
            for item in out.items() {
                let Some(shard) = item.get(SHARD).and_then(|v| v.as_s().ok()) else {
                    continue;
                };
                if shard == LEASE_KEY {
                    continue;
                }
                let seq = item
                    .get(SEQUENCE_NUMBER)
                    .and_then(|v| v.as_s().ok())
                    .cloned();
                let finished = item
                    .get(FINISHED)
                    .and_then(|v| v.as_bool().ok())
                    .copied()
                    .unwrap_or(false);
                found.insert(shard.clone(), (seq, finished));
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(found),
            }
        }
    }

    /// One round of reads over the shards that may be read now.
    async fn read_shards(&self) -> Result<usize, StoreError> {
        let arn = self.stream_arn().await?;
        let refresh = {
            let state = lock(&self.inner.state);
            state
                .listed_at
                .is_none_or(|at| at.elapsed() >= self.inner.config.shard_refresh)
        };
        if refresh {
            self.list_shards(&arn).await?;
        }
        let readable: Vec<String> = {
            let state = lock(&self.inner.state);
            let now = Instant::now();
            state
                .shards
                .iter()
                .filter(|(_, sh)| !sh.exhausted && sh.next_read_at <= now)
                .filter(|(_, sh)| {
                    sh.parent
                        .as_ref()
                        .and_then(|p| state.shards.get(p))
                        .is_none_or(|p| p.finished)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut added = 0;
        let mut first_error = None;
        for shard in readable {
            if lock(&self.inner.state).buffer.len() >= self.inner.config.buffer_limit {
                break;
            }
            match self.read_shard(&arn, &shard).await {
                Ok(n) => added += n,
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "stream source: reading a shard failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.update_finished();
        self.flush_checkpoints().await?;
        match first_error {
            Some(e) if added == 0 => Err(e),
            _ => Ok(added),
        }
    }

    async fn shard_iterator(&self, arn: &str, shard: &str) -> Result<Option<String>, StoreError> {
        let (after, start) = {
            let state = lock(&self.inner.state);
            let Some(sh) = state.shards.get(shard) else {
                return Ok(None);
            };
            (sh.last_read.clone(), sh.start.clone())
        };
        let request = |kind: ShardIteratorType, after: Option<String>| {
            self.inner
                .streams
                .get_shard_iterator()
                .stream_arn(arn)
                .shard_id(shard)
                .shard_iterator_type(kind)
                .set_sequence_number(after)
                .send()
        };
        let out = match after {
            Some(seq) => request(ShardIteratorType::AfterSequenceNumber, Some(seq)).await,
            None => request(start, None).await,
        };
        let out = match out {
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_trimmed_data_access_exception()) =>
            {
                tracing::error!(%shard, "stream source: the checkpoint is older than the stream's \
                    24-hour retention; records in between are LOST to this relay. Continuing at TRIM_HORIZON");
                request(ShardIteratorType::TrimHorizon, None).await
            }
            other => other,
        };
        match out {
            Ok(o) => Ok(o.shard_iterator),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                tracing::warn!(%shard, "stream source: shard is gone from the stream");
                let mut state = lock(&self.inner.state);
                if let Some(sh) = state.shards.get_mut(shard) {
                    sh.exhausted = true;
                }
                Ok(None)
            }
            Err(e) => Err(outbox_aws::store_error("GetShardIterator", e)),
        }
    }

    async fn read_shard(&self, arn: &str, shard: &str) -> Result<usize, StoreError> {
        let iterator = lock(&self.inner.state)
            .shards
            .get(shard)
            .and_then(|s| s.iterator.clone());
        let iterator = match iterator {
            Some(it) => it,
            None => match self.shard_iterator(arn, shard).await? {
                Some(it) => it,
                None => return Ok(0),
            },
        };
        let room = {
            let state = lock(&self.inner.state);
            self.inner
                .config
                .buffer_limit
                .saturating_sub(state.buffer.len())
        };
        let limit = i32::try_from(room)
            .unwrap_or(GET_RECORDS_MAX)
            .clamp(1, GET_RECORDS_MAX);
        let out = self
            .inner
            .streams
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let service = e.as_service_error();
                let expired = service.is_some_and(|e| e.is_expired_iterator_exception());
                let trimmed = service.is_some_and(|e| e.is_trimmed_data_access_exception());
                let mut state = lock(&self.inner.state);
                if let Some(sh) = state.shards.get_mut(shard) {
                    sh.iterator = None;
                    if trimmed {
                        tracing::error!(%shard, "stream source: records were trimmed before they \
                            were read; they are LOST to this relay. Continuing at TRIM_HORIZON");
                        sh.last_read = None;
                        sh.start = ShardIteratorType::TrimHorizon;
                    }
                }
                if expired || trimmed {
                    // A fresh iterator is taken on the next read.
                    return Ok(0);
                }
                return Err(outbox_aws::store_error("GetRecords", e));
            }
        };
        let records = out.records.unwrap_or_default();
        let got_records = !records.is_empty();
        let mut added = 0;
        for record in &records {
            let decoded = decode_streams_record(record);
            let seq = match &decoded {
                Ok(r) => Some(r.sequence_number.clone()),
                Err(e) => e.sequence_number.clone(),
            };
            let already = {
                let state = lock(&self.inner.state);
                let last = state.shards.get(shard).and_then(|s| s.last_read.clone());
                matches!((&seq, last), (Some(seq), Some(last)) if !seq_after(seq, &last))
            };
            if already {
                continue;
            }
            let events = match decoded {
                Ok(r) => match r.change {
                    Change::Events(item) => item.events,
                    Change::Ignored { reason } => {
                        tracing::debug!(%shard, seq = %r.sequence_number, %reason, "stream source: record ignored");
                        Vec::new()
                    }
                },
                Err(e) => {
                    tracing::error!(%shard, error = %e, "stream source: malformed record dead-lettered");
                    let key = seq
                        .clone()
                        .or_else(|| record.event_id().map(str::to_owned))
                        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                    let stored = self
                        .inner
                        .dead_letters
                        .put_malformed(&key, &raw::record_json(record), &e.reason)
                        .await;
                    if let Err(err) = stored {
                        // Resume after the last record taken, to try it again.
                        let mut state = lock(&self.inner.state);
                        if let Some(sh) = state.shards.get_mut(shard) {
                            sh.iterator = None;
                        }
                        return Err(err);
                    }
                    Vec::new()
                }
            };
            let mut state = lock(&self.inner.state);
            let Some(sh) = state.shards.get_mut(shard) else {
                return Ok(added);
            };
            let Some(seq) = seq else {
                continue;
            };
            sh.last_read = Some(seq.clone());
            added += events.len();
            state.buffer.push_record(shard, &seq, events);
        }
        let mut state = lock(&self.inner.state);
        if let Some(sh) = state.shards.get_mut(shard) {
            match out.next_shard_iterator {
                Some(next) => sh.iterator = Some(next),
                None => {
                    sh.iterator = None;
                    sh.exhausted = true;
                    // Its children can be listed now.
                    state.listed_at = None;
                }
            }
        }
        if let Some(sh) = state.shards.get_mut(shard) {
            sh.next_read_at = if got_records {
                Instant::now()
            } else {
                Instant::now() + self.inner.config.poll_interval
            };
        }
        Ok(added)
    }

    /// Marks exhausted shards whose records are all settled as finished.
    fn update_finished(&self) {
        let mut state = lock(&self.inner.state);
        let State {
            shards,
            buffer,
            finished_unwritten,
            ..
        } = &mut *state;
        for (id, sh) in shards.iter_mut() {
            if sh.exhausted && !sh.finished && buffer.logs.get(id).is_none_or(|l| l.is_settled()) {
                sh.finished = true;
                finished_unwritten.push(id.clone());
            }
        }
    }

    /// Writes advanced checkpoints and finished shards, on the condition
    /// that this process still holds the lease.
    async fn flush_checkpoints(&self) -> Result<(), StoreError> {
        let (mut updates, finished): (Vec<CheckpointUpdate>, Vec<String>) = {
            let mut state = lock(&self.inner.state);
            let advanced: Vec<_> = state.buffer.advanced.drain().collect();
            let finished = std::mem::take(&mut state.finished_unwritten);
            (
                advanced
                    .into_iter()
                    .map(|(id, seq)| (id, Some(seq), false))
                    .collect(),
                finished,
            )
        };
        for id in &finished {
            match updates.iter_mut().find(|u| &u.0 == id) {
                Some(u) => u.2 = true,
                None => updates.push((id.clone(), None, true)),
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        let c = &self.inner.config;
        for (n, chunk) in updates.chunks(CHECKPOINTS_PER_TRANSACTION).enumerate() {
            let check = ConditionCheck::builder()
                .table_name(&c.checkpoint_table)
                .key(CONSUMER, s(&c.consumer))
                .key(SHARD, s(LEASE_KEY))
                .condition_expression("#o = :me")
                .expression_attribute_names("#o", OWNER)
                .expression_attribute_values(":me", s(&self.inner.owner))
                .build()
                .map_err(config_error)?;
            let mut request = self
                .inner
                .dynamodb
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().condition_check(check).build());
            for (shard, seq, finished) in chunk {
                let mut expression = "SET #u = :u".to_owned();
                let mut update = Update::builder()
                    .table_name(&c.checkpoint_table)
                    .key(CONSUMER, s(&c.consumer))
                    .key(SHARD, s(shard))
                    .expression_attribute_names("#u", UPDATED_AT)
                    .expression_attribute_values(":u", AttributeValue::N(now_ms().to_string()));
                if let Some(seq) = seq {
                    expression.push_str(", #s = :s");
                    update = update
                        .expression_attribute_names("#s", SEQUENCE_NUMBER)
                        .expression_attribute_values(":s", s(seq));
                }
                if *finished {
                    expression.push_str(", #f = :f");
                    update = update
                        .expression_attribute_names("#f", FINISHED)
                        .expression_attribute_values(":f", AttributeValue::Bool(true));
                }
                let update = update
                    .update_expression(expression)
                    .build()
                    .map_err(config_error)?;
                request =
                    request.transact_items(TransactWriteItem::builder().update(update).build());
            }
            if let Err(e) = request.send().await {
                let lost = e
                    .as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception());
                if lost {
                    let mut state = lock(&self.inner.state);
                    *state = State::default();
                    return Err(StoreError::Conflict(format!(
                        "the stream lease of consumer `{}` was taken by another process; \
                         checkpoints not written, buffer dropped",
                        c.consumer
                    )));
                }
                // Keep what was not written for the next flush.
                let mut state = lock(&self.inner.state);
                for (shard, seq, finished) in
                    updates.into_iter().skip(n * CHECKPOINTS_PER_TRANSACTION)
                {
                    if let Some(seq) = seq {
                        state.buffer.advanced.entry(shard.clone()).or_insert(seq);
                    }
                    if finished {
                        state.finished_unwritten.push(shard);
                    }
                }
                return Err(outbox_aws::store_error("TransactWriteItems", e));
            }
        }
        Ok(())
    }

    // ---- replays ----------------------------------------------------------

    async fn poll_replays(&self, limit: usize) -> Result<(), StoreError> {
        let due = {
            let state = lock(&self.inner.state);
            state
                .replays_polled_at
                .is_none_or(|at| at.elapsed() >= self.inner.config.poll_interval)
        };
        if !due {
            return Ok(());
        }
        lock(&self.inner.state).replays_polled_at = Some(Instant::now());
        let replays = self.inner.dead_letters.take_replays(limit.max(1)).await?;
        let mut state = lock(&self.inner.state);
        for event in replays {
            if !state.replays_to_finish.contains(&event.id)
                && !state.buffer.is_replay_buffered(&event.id)
            {
                state.buffer.push_replay(event);
            }
        }
        Ok(())
    }

    async fn finish_replays(&self, mut ids: Vec<EventId>) {
        ids.append(&mut lock(&self.inner.state).replays_to_finish);
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.inner.dead_letters.finish_replays(&ids).await {
            tracing::warn!(error = %e, "stream source: replay items not removed yet; retrying later");
            lock(&self.inner.state).replays_to_finish.extend(ids);
        }
    }
}

impl ClaimSource for StreamSource {
    type Receipt = StreamReceipt;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<StreamReceipt>, StoreError> {
        if !self.ensure_lease().await? {
            return Ok(Claimed::empty(LeaseId::new()));
        }
        // Another clone reading already fills the same buffer.
        let read = match self.inner.reading.try_lock() {
            Ok(_reading) => self.read_shards().await.map(|_| ()),
            Err(_) => Ok(()),
        };
        let replays = self.poll_replays(request.limit).await;
        let mut state = lock(&self.inner.state);
        let claimed = state.buffer.claim(request.limit, request.lease);
        if claimed.events.is_empty() {
            read?;
            replays?;
        } else if let Err(e) = read.and(replays) {
            tracing::warn!(error = %e, "stream source: reading failed; serving the buffer");
        }
        Ok(claimed)
    }

    async fn settle(
        &self,
        lease: LeaseId,
        settlements: Settlements<StreamReceipt>,
    ) -> Result<u64, StoreError> {
        let mut applied = Applied::default();
        let dead_rows = {
            let mut state = lock(&self.inner.state);
            let b = &mut state.buffer;
            b.published(lease, &settlements.published, &mut applied);
            b.retry(lease, &settlements.retry, &mut applied);
            b.release(lease, &settlements.released, &mut applied);
            b.dead_rows(lease, &settlements.dead)
        };
        if !dead_rows.is_empty() {
            // Stored before they leave the buffer, so none is lost; if this
            // fails they stay claimed until the lease ends, then run again.
            match self.inner.dead_letters.put_events(&dead_rows).await {
                Ok(()) => {
                    let dead: Vec<_> = settlements.dead.iter().map(|(r, _)| *r).collect();
                    lock(&self.inner.state)
                        .buffer
                        .dead(lease, &dead, &mut applied);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream source: dead letters not stored; they run again");
                }
            }
        }
        self.finish_replays(std::mem::take(&mut applied.finished_replays))
            .await;
        self.update_finished();
        if let Err(e) = self.flush_checkpoints().await {
            // The outcome is recorded in memory; the checkpoint follows on
            // the next write, and a restart meanwhile only re-publishes.
            tracing::warn!(error = %e, "stream source: checkpoint not written yet");
        }
        Ok(applied.count)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let until = tokio::time::Instant::now() + max_wait;
        loop {
            if lock(&self.inner.state).buffer.has_due() {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(25))).await;
        }
    }
}

impl Stats for StreamSource {
    /// `pending` counts events read and not settled plus replays waiting;
    /// `published` counts this process's publications. The stream's backlog
    /// beyond the buffer shows in CloudWatch as `IteratorAge`.
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let dead = self.inner.dead_letters.count_dead().await?;
        let replays = self.inner.dead_letters.count_replays().await?;
        let state = lock(&self.inner.state);
        let unfinished = state.replays_to_finish.len() as u64;
        let mut stats = OutboxStats::default();
        stats.pending = state.buffer.stream_pending() + replays.saturating_sub(unfinished);
        stats.published = state.buffer.published;
        stats.dead = dead;
        stats.oldest_pending_at = state.buffer.oldest_pending_at();
        Ok(stats)
    }
}

impl DeadLetters for StreamSource {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters.dead_letters(limit).await
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.inner.dead_letters.replay(which).await
    }
}

impl Purge for StreamSource {
    /// Nothing to purge: DynamoDB drops stream records after 24 hours, and
    /// each aggregate's outbox item holds its latest transaction, which the
    /// next write's version condition needs.
    async fn purge_published(&self, _before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(0)
    }
}
