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
//! let relay = Relay::new(source, StdoutPublisher::new("orders"), RelayConfig::default())?;
//! // On stopping, the relay closes the source: checkpoints are written and
//! // the stream is handed over at once instead of after the lease runs out.
//! relay.run(shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! One process at a time reads a stream per consumer: it holds the `#lease`
//! item and renews it on every claim, and every checkpoint and dead-letter
//! write is conditional on still holding it.
//!
//! The code is split by concern: `lease` (the `#lease` item), `shards`
//! (listing shards, iterators, what a failed read means), `reading`
//! (records into the buffer, malformed records, trimmed ranges),
//! `checkpoints` (durable progress and the lease fence), `replays`, `buffer`
//! (the in-memory claims) and `source` (the `ClaimSource` impl).
//!
//! What lies in the stream beyond the buffer is known only to DynamoDB: watch
//! the stream's `IteratorAge` metric for the backlog; [`Stats`] counts what
//! this process has read and not settled.

mod buffer;
mod checkpoints;
mod lease;
mod raw;
mod reading;
mod replays;
mod shards;
mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
use buffer::{Applied, Buffer, Window};

use crate::attr::{now_ms, s};
use crate::dead_letters::DeadLetterTable;
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
    /// Records after this sequence number were trimmed before they were
    /// read: the loss is still to be recorded.
    gap_after: Option<String>,
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
    events_read: AtomicU64,
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

/// `now + d`, or far enough ahead never to come: durations are the user's.
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(outbox_core::time::MAX_RETRY_DELAY))
        .unwrap_or(now)
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
                events_read: AtomicU64::new(0),
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
        let every = every.min(outbox_core::time::MAX_WAIT);
        self.configure(|i| i.config.poll_interval = every)
    }

    /// Most events held in memory; reading pauses above it. Default 10 000.
    pub fn buffer_limit(self, n: usize) -> Self {
        self.configure(|i| i.config.buffer_limit = n.max(1))
    }

    /// How long the relay lease lasts unless renewed; a process that dies
    /// holds the stream this long. Default 30 s.
    /// At most `outbox_core::time::MAX_LEASE`; a longer one is cut to it.
    pub fn lease_ttl(self, ttl: Duration) -> Self {
        let ttl = ttl.min(outbox_core::time::MAX_LEASE);
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
        crate::tables::create_string_key_table(
            &self.inner.dynamodb,
            &self.inner.config.checkpoint_table,
            CONSUMER,
            SHARD,
            None,
        )
        .await?;
        self.inner.dead_letters.create_table_if_missing().await
    }

    /// Writes pending checkpoints and gives the stream up, so another
    /// process can take over at once. The lease item keeps this process as
    /// its last owner, so if this source claims again and nobody held the
    /// stream in between, its buffer (and what it already published of a
    /// record) is still good.
    pub async fn release(&self) -> Result<(), StoreError> {
        let _reading = self.inner.reading.lock().await;
        self.flush_checkpoints().await?;
        let held = lock(&self.inner.state).lease_until_ms.take().is_some();
        if held {
            let c = &self.inner.config;
            let out = self
                .inner
                .dynamodb
                .update_item()
                .table_name(&c.checkpoint_table)
                .key(CONSUMER, s(&c.consumer))
                .key(SHARD, s(LEASE_KEY))
                .update_expression("SET #e = :zero")
                .condition_expression("#o = :me")
                .expression_attribute_names("#o", OWNER)
                .expression_attribute_names("#e", EXPIRES_AT)
                .expression_attribute_values(":me", s(&self.inner.owner))
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .send()
                .await;
            if let Err(e) = out {
                if !e
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception())
                {
                    return Err(outbox_aws::store_error("UpdateItem (release)", e));
                }
                // Taken over already: what this process holds is stale.
                *lock(&self.inner.state) = State::default();
            }
        }
        Ok(())
    }

    /// How many events this source has taken from the stream into its
    /// buffer so far, whoever read them (a claim reads too): tests and tools
    /// use it to wait until written events are visible.
    pub fn events_read(&self) -> u64 {
        self.inner.events_read.load(Ordering::Relaxed)
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
}
