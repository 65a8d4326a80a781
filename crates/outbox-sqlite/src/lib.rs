#![doc = include_str!("../README.md")]

mod admin;
mod error;
mod inbox;
mod migrate;
mod rows;
mod source;
mod write;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outbox_core::{DeadLetterPolicy, Event, StoreError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, Notify};

pub use inbox::SqliteInbox;
pub use write::WriteTx;

use crate::error::map;

/// Largest payload accepted by default, in bytes. SQLite itself takes up to
/// 1 GB; brokers take far less (EventBridge and SNS: 256 KiB a message).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest wait for SQLite's write lock (busy timeout) and, within the
/// process, for the turn to write.
const WRITE_TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// The outbox in a SQLite database: append events in your transaction,
/// hand the same value to a [`outbox_core::Relay`] to publish them.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    committed: Arc<Notify>,
    /// Whose turn it is to write (see [`WriteTx`]).
    writer: Arc<Mutex<()>>,
    write_turn_timeout: Duration,
    max_payload_bytes: usize,
    dead_letter_policy: DeadLetterPolicy,
}

impl SqliteOutbox {
    /// Opens (creating if missing) the database named by `url`:
    /// `sqlite://FILE`, `sqlite:FILE` or a plain path, and applies the
    /// outbox migrations.
    ///
    /// The database runs in WAL mode with `synchronous = NORMAL`: a crash of
    /// the process loses nothing; a power cut may lose the last commits, but
    /// business rows and their events always together.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() {
            return Err(StoreError::Config(format!(
                "`{url}` names no database file"
            )));
        }
        if path.contains(":memory:") || path.contains("mode=memory") {
            // Each pooled connection would see a database of its own.
            return Err(StoreError::Config(
                "in-memory SQLite databases are private to one connection; use a file".into(),
            ));
        }
        Self::open(Path::new(path)).await
    }

    /// Opens (creating if missing) the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(map)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(WRITE_TURN_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(_) | sqlx::Error::Io(_) => StoreError::Config(format!(
                    "cannot open SQLite database {}: {e}",
                    path.display()
                )),
                e => map(e),
            })?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool (yours, shared with your business tables) and
    /// applies the outbox migrations.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        migrate::run(&pool).await?;
        Ok(Self {
            pool,
            committed: Arc::new(Notify::new()),
            writer: Arc::new(Mutex::new(())),
            write_turn_timeout: WRITE_TURN_TIMEOUT,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            dead_letter_policy: DeadLetterPolicy::default(),
        })
    }

    /// How long [`SqliteOutbox::begin`] waits for the turn to write before
    /// failing with a retryable error (default 10 s).
    pub fn write_turn_timeout(mut self, wait: Duration) -> Self {
        self.write_turn_timeout = wait;
        self
    }

    /// Refuses payloads larger than `bytes` at append time.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// What a dead letter does to the later events of its aggregate: flow
    /// past it (the default), or park the aggregate until the dead letter
    /// is replayed or skipped.
    pub fn dead_letter_policy(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter_policy = policy;
        self
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write transaction when it is this caller's turn among the
    /// process's writers (see [`WriteTx`]); `BEGIN IMMEDIATE`, so it holds
    /// SQLite's write lock from the start instead of failing at its first write.
    pub async fn begin(&self) -> Result<WriteTx, StoreError> {
        // Bounded like SQLite's own busy timeout: a caller that begins a
        // second transaction while holding one gets an error, not a hang.
        let wait = self.write_turn_timeout;
        let turn = tokio::time::timeout(wait, self.writer.clone().lock_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable(
                    format!("no write turn within {wait:?}: another write transaction of this process is still open").into(),
                )
            })?;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
        Ok(WriteTx::new(tx, turn))
    }

    /// Appends `events` inside the caller's transaction: they are stored if
    /// and only if it commits.
    ///
    /// Every event is checked before the first is written. Appending a
    /// version at or below one the aggregate already has fails with
    /// [`StoreError::Conflict`] (another writer got there first); the
    /// transaction should then be rolled back.
    pub async fn append(
        &self,
        conn: &mut SqliteConnection,
        events: &[Event],
    ) -> Result<(), StoreError> {
        for event in events {
            event.validate()?;
            let size = event.payload.as_str().len();
            if size > self.max_payload_bytes {
                return Err(StoreError::LimitExceeded {
                    limit: "payload size in bytes",
                    actual: size as u64,
                    max: self.max_payload_bytes as u64,
                });
            }
        }
        let now = Utc::now().timestamp_millis();
        for event in events {
            // Versions only go up: the relay publishes an aggregate in write
            // order, which is then version order. A version at or below one
            // already stored inserts nothing and is refused below.
            let inserted = sqlx::query(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, aggregate_version, event_type,
                    payload, occurred_at, traceparent, correlation_id, causation_id,
                    next_attempt_at, created_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12
                 WHERE NOT EXISTS (SELECT 1 FROM outbox
                    WHERE aggregate_type = ?2 AND aggregate_id = ?3 AND aggregate_version >= ?4)",
            )
            .bind(event.id.to_string())
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            // validate() keeps versions within i64.
            .bind(event.aggregate_version as i64)
            .bind(&event.event_type)
            .bind(event.payload.as_str())
            .bind(source::format_time(&event.occurred_at))
            .bind(&event.metadata.traceparent)
            .bind(&event.metadata.correlation_id)
            .bind(&event.metadata.causation_id)
            // Due at once (see migration 0003).
            .bind(0_i64)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(map)?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "{}/{} already has version {} or a later one",
                    event.aggregate_type, event.aggregate_id, event.aggregate_version
                )));
            }
        }
        Ok(())
    }

    /// Commits the caller's transaction and wakes the relays of this process
    /// at once (others find the events at their next poll).
    pub async fn commit(&self, tx: WriteTx) -> Result<(), StoreError> {
        tx.commit().await?;
        self.notify_committed();
        Ok(())
    }

    /// Tells this process's relays that events were committed, for callers
    /// that commit their transactions themselves.
    pub fn notify_committed(&self) {
        self.committed.notify_one();
    }
}

/// The project README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ProjectReadme;
