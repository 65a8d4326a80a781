#![doc = include_str!("../README.md")]

mod admin;
mod append;
mod connections;
mod error;
mod inbox;
mod migrate;
mod rows;
mod source;
mod transaction;
mod vacuum;
mod wake;

use std::sync::Arc;
use std::time::Duration;

use outbox_core::secret::redact_url;
use outbox_core::{DeadLetterPolicy, Event, StoreError};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::sync::Mutex;

pub use inbox::PostgresInbox;
pub use migrate::SCHEMA_VERSION;
pub use transaction::PostgresTransaction;

use crate::append::{Batch, Wake, APPEND_SQL};
use crate::connections::RelayConnections;
use crate::error::map;
use crate::wake::LocalCommits;

/// Largest payload accepted by default, in bytes. PostgreSQL takes up to
/// 1 GB in a text column; brokers take far less (EventBridge and SNS:
/// 256 KiB a message, NATS: 1 MiB by default).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "outbox";

/// Longest schema name accepted (PostgreSQL's identifiers take 63 bytes;
/// the rest is kept for the notification channel's suffix).
const MAX_SCHEMA_BYTES: usize = 48;

/// Connections of a pool made by [`PostgresOutbox::connect`].
const DEFAULT_POOL_SIZE: u32 = 8;

/// How long [`PostgresOutbox::connect`] waits for its first connection.
pub const FIRST_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// `host:port` of a connection's options, for messages.
fn server(options: &PgConnectOptions) -> String {
    format!("{}:{}", options.get_host(), options.get_port())
}

/// What a failed first connection means, in words that say what to do.
fn first_connection_error(options: &PgConnectOptions, e: sqlx::Error) -> StoreError {
    let at = server(options);
    match &e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            StoreError::Unavailable(
                format!("connection refused by {at}: is PostgreSQL running and listening there?")
                    .into(),
            )
        }
        sqlx::Error::Io(io) => {
            StoreError::Unavailable(format!("cannot reach PostgreSQL at {at}: {io}").into())
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid password, or no such role / not allowed by pg_hba.conf
            Some("28P01" | "28000") => StoreError::Config(format!(
                "PostgreSQL at {at} refused the credentials of user `{}`: {}",
                options.get_username(),
                db.message()
            )),
            Some("3D000") => StoreError::Config(format!(
                "PostgreSQL at {at} has no database `{}`",
                options.get_database().unwrap_or_default()
            )),
            _ => map(e),
        },
        _ => map(e),
    }
}

/// A validated schema name, and the statements that depend on it.
#[derive(Debug)]
pub(crate) struct Schema {
    name: String,
}

impl Schema {
    fn new(name: &str) -> Result<Self, StoreError> {
        // Lower-case letters, digits and `_`: then the name never needs
        // escaping, in identifiers or in the notification channel.
        let valid = !name.is_empty()
            && name.len() <= MAX_SCHEMA_BYTES
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && !name.starts_with("pg_");
        if !valid {
            return Err(StoreError::Config(format!(
                "schema name `{name}`: use 1 to {MAX_SCHEMA_BYTES} lower-case letters, digits and `_`, not starting with a digit or `pg_`"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.name)
    }

    /// The channel appends notify and relays listen on.
    pub(crate) fn channel(&self) -> String {
        format!("{}_outbox", self.name)
    }

    /// `sql` with `{schema}` (quoted) and `{schema_name}` filled in.
    pub(crate) fn render(&self, sql: &str) -> String {
        sql.replace("{schema}", &self.quoted())
            .replace("{schema_name}", &self.name)
    }

    pub(crate) fn sql(&self, sql: &str) -> AssertSqlSafe<Arc<str>> {
        AssertSqlSafe(Arc::from(self.render(sql)))
    }
}

/// The outbox in a PostgreSQL schema: append events in your transaction,
/// hand the same value to one or several [`outbox_core::Relay`]s (in one
/// process or many) to publish them.
#[derive(Debug, Clone)]
pub struct PostgresOutbox {
    pool: PgPool,
    schema: Arc<Schema>,
    max_payload_bytes: usize,
    dead_letter_policy: DeadLetterPolicy,
    /// Whether appends send a notification on commit.
    notify: bool,
    /// Whether relays wait for notifications (else they poll).
    listen: bool,
    /// Whether settlements wait for their WAL flush (see
    /// [`PostgresOutbox::synchronous_settlements`]).
    synchronous_settlements: bool,
    /// The relays' notification connection, made at the first wait.
    listener: Arc<Mutex<Option<PgListener>>>,
    /// How the relays of this process wait (see `wait_for_events`).
    waiting: Arc<std::sync::Mutex<source::Waiting>>,
    /// The relays' vacuum of the queue tables (see [`vacuum`]).
    vacuum: Arc<vacuum::QueueVacuum>,
    /// The connections relays claim and settle on (see [`connections`]).
    relay_connections: Arc<RelayConnections>,
    /// This process's commits of events to this schema (see [`wake`]).
    local_commits: Arc<LocalCommits>,
}

impl PostgresOutbox {
    /// Connects to `url` (`postgres://user@host:port/database`) with a pool
    /// of its own. Nothing is created: call [`PostgresOutbox::migrate`].
    ///
    /// One connection is made first, within [`FIRST_CONNECTION_TIMEOUT`],
    /// so that a server that is not there, credentials it refuses or a
    /// database it does not have are named at once (a pool retries until
    /// its own timeout and then reports only that it timed out).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let unusable =
            |e: sqlx::Error| StoreError::Config(format!("cannot use `{}`: {e}", redact_url(url)));
        let options: PgConnectOptions = url.parse().map_err(unusable)?;
        match tokio::time::timeout(
            FIRST_CONNECTION_TIMEOUT,
            PgConnection::connect_with(&options),
        )
        .await
        {
            Err(_) => {
                return Err(StoreError::Unavailable(
                    format!(
                        "no answer from PostgreSQL at {} within {FIRST_CONNECTION_TIMEOUT:?}: \
                         is the host reachable, and the port open?",
                        server(&options)
                    )
                    .into(),
                ))
            }
            Ok(Err(e)) => return Err(first_connection_error(&options, e)),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(DEFAULT_POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::Configuration(_) => unusable(e),
                e => map(e),
            })?;
        Ok(Self::from_pool(pool))
    }

    /// Uses an existing pool (yours, shared with your business tables).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            local_commits: LocalCommits::of(&pool, DEFAULT_SCHEMA),
            relay_connections: Arc::default(),
            pool,
            schema: Arc::new(Schema {
                name: DEFAULT_SCHEMA.to_owned(),
            }),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            dead_letter_policy: DeadLetterPolicy::default(),
            notify: true,
            listen: true,
            synchronous_settlements: false,
            listener: Arc::new(Mutex::new(None)),
            waiting: Arc::default(),
            vacuum: vacuum::QueueVacuum::new(vacuum::DEFAULT_EVERY),
        }
    }

    /// Keeps the outbox's tables in schema `name` (default `outbox`), so
    /// several outboxes (or test runs) share one database.
    pub fn schema(mut self, name: &str) -> Result<Self, StoreError> {
        self.schema = Arc::new(Schema::new(name)?);
        self.local_commits = LocalCommits::of(&self.pool, name);
        self.listener = Arc::new(Mutex::new(None));
        self.waiting = Arc::default();
        self.vacuum = vacuum::QueueVacuum::new(self.vacuum.every());
        Ok(self)
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

    /// Whether relays wait for commit notifications (`LISTEN`, the default)
    /// or only poll every `idle_poll`. Turn it off behind a pooler that
    /// breaks `LISTEN`, such as PgBouncer in transaction mode.
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self.listener = Arc::new(Mutex::new(None));
        self.waiting = Arc::default();
        self
    }

    /// Whether appends notify sleeping relays on commit (`pg_notify`, the
    /// default). With it off, relays find new events at their next poll.
    /// Only commits made while every relay sleeps notify: a relay that
    /// found events in the last moments polls every millisecond instead,
    /// because notifying commits wait for each other in PostgreSQL.
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// Whether a relay's settlements (published, retry, dead letter...)
    /// wait for PostgreSQL to flush them to disk before the relay goes on.
    /// Off by default: they commit with `synchronous_commit = off` (that
    /// transaction only), which saves a disk flush per batch. A crash of
    /// the PostgreSQL server can then lose the settlements of its last
    /// moments (at most three times `wal_writer_delay`, 600 ms by default):
    /// those events are published again, exactly as when a relay dies
    /// before settling, which consumers absorb by event id (the inbox). A
    /// lost retry or dead letter is attempted again. Nothing is lost and no
    /// aggregate is reordered. Turn it on to trade throughput for fewer
    /// duplicates after a server crash.
    pub fn synchronous_settlements(mut self, on: bool) -> Self {
        self.synchronous_settlements = on;
        self
    }

    /// How many settled events between two vacuums of the queue tables by
    /// this process's relays (default 2,000; 0 leaves them to autovacuum).
    /// Each published event leaves a dead row at the head of the queue,
    /// where every claim starts reading, and autovacuum comes at most once
    /// a minute. The vacuum runs in the background, one at a time, and only
    /// if this connection's user owns the tables.
    pub fn queue_vacuum_every(mut self, events: u64) -> Self {
        self.vacuum = vacuum::QueueVacuum::new(events);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn schema_name(&self) -> &str {
        self.schema.name()
    }

    /// Creates the schema and its tables, or brings them up to date. Safe to
    /// run from several processes at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate::run(&self.pool, &self.schema).await
    }

    /// The consumer-side inbox in the same schema.
    pub fn inbox(&self) -> PostgresInbox {
        PostgresInbox::new(self.schema.clone())
    }

    /// Appends `events` inside the caller's transaction: they are stored if
    /// and only if it commits. One round trip; [`PostgresOutbox::begin`]
    /// gives a transaction whose commit carries its events instead, without
    /// a round trip of their own.
    ///
    /// Every event is checked before anything is written. Each aggregate's
    /// row in `outbox_aggregates` is updated to the newest version appended,
    /// on the condition that it holds an older version than the first one
    /// appended: a concurrent writer of the same aggregate waits for this
    /// transaction to end, so an aggregate's transactions commit in version
    /// order. A version at or below the stored one fails with
    /// [`StoreError::Conflict`] and aborts the transaction: roll it back,
    /// reload, decide again.
    pub async fn append(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let batch = Batch::check(events, self.max_payload_bytes)?;
        if batch.is_empty() {
            return Ok(());
        }
        batch
            .bind(
                sqlx::query(self.schema.sql(APPEND_SQL)),
                self.wake(Wake::AtCommit),
            )
            .execute(conn)
            .await
            .map_err(map)?;
        Ok(())
    }

    /// The payload limit as the schema's functions take it: rows over it
    /// are dead-lettered alone instead of read.
    pub(crate) fn max_payload_column(&self) -> i32 {
        i32::try_from(self.max_payload_bytes).unwrap_or(i32::MAX)
    }

    /// Who wakes sleeping relays for an append: `when_notifying`, unless
    /// notifications are off.
    pub(crate) fn wake(&self, when_notifying: Wake) -> Wake {
        if self.notify {
            when_notifying
        } else {
            Wake::Never
        }
    }
}
