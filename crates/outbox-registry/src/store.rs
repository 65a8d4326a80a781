//! Opening a store named by URL, and the one type callers use for any store.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetter, DeadLetterPolicy, DeadLetters,
    LeaseId, Malformed, OutboxStats, Purge, ReplaySelector, Settlements, Stats, StoreError,
};
use outbox_dynamodb::{
    DynamoOutbox, PollingOutbox, PollingReceipt, Shape, StreamReceipt, StreamSource,
};
use outbox_postgres::{PostgresOutbox, SCHEMA_VERSION};
use outbox_sqlite::SqliteOutbox;

use crate::error::RegistryError;
use crate::url::{DynamoShape, StoreUrl};

/// An opened store: a source for the relay and the operator's commands, by
/// delegation, so callers need not know which store it is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Store {
    Sqlite(SqliteOutbox),
    DynamoStream(StreamSource),
    DynamoPolling(PollingOutbox),
    Postgres(PostgresOutbox),
}

/// The receipt of whichever store claimed an event.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreReceipt {
    Sqlite(i64),
    DynamoStream(StreamReceipt),
    DynamoPolling(PollingReceipt),
    /// The event's position in the PostgreSQL outbox table.
    Postgres(i64),
}

/// What `outbox migrate` did to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Migrated {
    /// The PostgreSQL schema is at this version now.
    Postgres { schema: String, version: i64 },
    /// SQLite: the migrations run whenever the store is opened.
    OnOpen,
    /// DynamoDB: tables have no schema to migrate.
    Nothing,
}

impl StoreUrl {
    /// Opens the store, creating its database or tables when missing.
    /// `aws` is needed for DynamoDB only (see [`StoreUrl::is_aws`]).
    pub async fn open(&self, aws: Option<&aws_config::SdkConfig>) -> Result<Store, RegistryError> {
        self.open_with(aws, true).await
    }

    /// Opens a store that must already exist (the relay and the operator's
    /// commands never create one: a mistyped name would idle forever).
    pub async fn open_existing(
        &self,
        aws: Option<&aws_config::SdkConfig>,
    ) -> Result<Store, RegistryError> {
        self.open_with(aws, false).await
    }

    /// Creates or upgrades the store's tables where a store has migrations
    /// (PostgreSQL); safe to run again, and from several processes at once.
    pub async fn migrate(&self) -> Result<Migrated, RegistryError> {
        match self {
            StoreUrl::Postgres { .. } => {
                let outbox = self.connect_postgres().await?;
                outbox
                    .migrate()
                    .await
                    .map_err(|source| RegistryError::Store {
                        url: self.to_string(),
                        source,
                    })?;
                Ok(Migrated::Postgres {
                    schema: outbox.schema_name().to_owned(),
                    version: SCHEMA_VERSION,
                })
            }
            StoreUrl::Sqlite { .. } => Ok(Migrated::OnOpen),
            StoreUrl::DynamoDb { .. } => Ok(Migrated::Nothing),
        }
    }

    /// Connects to a `postgres://` store's database, with its schema and
    /// policy set; creates nothing.
    async fn connect_postgres(&self) -> Result<PostgresOutbox, RegistryError> {
        let store_error = |source: StoreError| RegistryError::Store {
            url: self.to_string(),
            source,
        };
        let StoreUrl::Postgres {
            url,
            schema,
            dead_letters,
            listen,
            queue_vacuum_every,
        } = self
        else {
            return Err(RegistryError::Unsupported {
                url: self.to_string(),
                reason: "not a PostgreSQL store".to_owned(),
            });
        };
        let outbox = PostgresOutbox::connect(url)
            .await
            .map_err(store_error)?
            .schema(schema)
            .map_err(store_error)?
            .dead_letter_policy(*dead_letters)
            .listen(*listen);
        Ok(match queue_vacuum_every {
            Some(every) => outbox.queue_vacuum_every(*every),
            None => outbox,
        })
    }

    /// Fails clearly, pointing to `outbox migrate`, when the schema's tables
    /// do not exist or are older than this build.
    async fn require_migrated(&self, outbox: &PostgresOutbox) -> Result<(), RegistryError> {
        let store_error = |e: sqlx::Error| RegistryError::Store {
            url: self.to_string(),
            source: sql_error(e),
        };
        // Schema names are validated (lower-case letters, digits, `_`), so
        // quoting them needs no escaping.
        let table = format!("\"{}\".outbox_schema_migrations", outbox.schema_name());
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1::text) IS NOT NULL")
            .bind(&table)
            .fetch_one(outbox.pool())
            .await
            .map_err(store_error)?;
        let version: i64 = if exists {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT COALESCE(MAX(version), 0) FROM {table}"
            )))
            .fetch_one(outbox.pool())
            .await
            .map_err(store_error)?
        } else {
            0
        };
        let schema = outbox.schema_name();
        let url = self.to_string();
        match version {
            0 => Err(RegistryError::NoStore {
                reason: format!(
                    "no outbox tables in schema `{schema}`; create them with \
                     `outbox migrate --store {url}`"
                ),
                url,
            }),
            v if v < SCHEMA_VERSION => Err(RegistryError::NoStore {
                reason: format!(
                    "the outbox tables in schema `{schema}` are at version {v}, this build \
                     needs version {SCHEMA_VERSION}; upgrade them with `outbox migrate --store {url}`"
                ),
                url,
            }),
            v if v > SCHEMA_VERSION => Err(RegistryError::Unsupported {
                reason: format!(
                    "the outbox tables in schema `{schema}` are at version {v}, newer than \
                     this build knows ({SCHEMA_VERSION}); upgrade this program"
                ),
                url,
            }),
            _ => Ok(()),
        }
    }

    async fn open_with(
        &self,
        aws: Option<&aws_config::SdkConfig>,
        create: bool,
    ) -> Result<Store, RegistryError> {
        let store_error = |source: StoreError| RegistryError::Store {
            url: self.to_string(),
            source,
        };
        match self {
            StoreUrl::Sqlite { path, .. } if !create && !path.exists() => {
                Err(RegistryError::NoStore {
                    url: self.to_string(),
                    reason: format!("no database at {}", path.display()),
                })
            }
            StoreUrl::Sqlite { path, dead_letters } => Ok(Store::Sqlite(
                SqliteOutbox::open(path)
                    .await
                    .map_err(store_error)?
                    .dead_letter_policy(*dead_letters),
            )),
            StoreUrl::Postgres { .. } => {
                let outbox = self.connect_postgres().await?;
                if create {
                    outbox.migrate().await.map_err(store_error)?;
                } else {
                    self.require_migrated(&outbox).await?;
                }
                Ok(Store::Postgres(outbox))
            }
            StoreUrl::DynamoDb {
                table,
                shape,
                dead_letters,
            } => {
                let config = aws.ok_or_else(|| RegistryError::Unsupported {
                    url: self.to_string(),
                    reason: "a DynamoDB store needs the AWS configuration".to_owned(),
                })?;
                let dynamodb = aws_sdk_dynamodb::Client::new(config);
                let outbox = DynamoOutbox::new(dynamodb.clone(), table);
                match shape {
                    DynamoShape::Stream => {
                        if *dead_letters == DeadLetterPolicy::Park {
                            return Err(RegistryError::Unsupported {
                                url: self.to_string(),
                                reason: "dead_letters=park is not supported by the stream shape \
                                         yet; use shape=polling to park aggregates"
                                    .to_owned(),
                            });
                        }
                        let streams = aws_sdk_dynamodbstreams::Client::new(config);
                        let source = StreamSource::new(dynamodb.clone(), streams, table);
                        if create {
                            outbox
                                .create_table_if_missing()
                                .await
                                .map_err(store_error)?;
                        } else {
                            self.require_table(&dynamodb, table).await?;
                        }
                        // The relay's own bookkeeping: checkpoints and dead letters.
                        source
                            .create_tables_if_missing()
                            .await
                            .map_err(store_error)?;
                        Ok(Store::DynamoStream(source))
                    }
                    DynamoShape::Polling => {
                        let outbox = outbox.shape(Shape::Polling);
                        if create {
                            outbox
                                .create_table_if_missing()
                                .await
                                .map_err(store_error)?;
                        } else {
                            self.require_table(&dynamodb, table).await?;
                        }
                        Ok(Store::DynamoPolling(
                            PollingOutbox::new(outbox)
                                .map_err(store_error)?
                                .dead_letter_policy(*dead_letters),
                        ))
                    }
                }
            }
        }
    }

    /// Fails clearly when the outbox table does not exist.
    async fn require_table(
        &self,
        client: &aws_sdk_dynamodb::Client,
        table: &str,
    ) -> Result<(), RegistryError> {
        match client.describe_table().table_name(table).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Err(RegistryError::NoStore {
                    url: self.to_string(),
                    reason: format!("no DynamoDB table named {table}"),
                })
            }
            Err(e) => Err(RegistryError::Store {
                url: self.to_string(),
                source: outbox_aws::store_error("DescribeTable", e),
            }),
        }
    }
}

/// A driver error of the registry's own queries: a lost connection may pass.
fn sql_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(Box::new(e))
        }
        e => StoreError::Backend(Box::new(e)),
    }
}

/// Runs `$body` with `$s` bound to whichever store `$store` holds.
macro_rules! each_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            Store::Sqlite($s) => $body,
            Store::DynamoStream($s) => $body,
            Store::DynamoPolling($s) => $body,
            Store::Postgres($s) => $body,
        }
    };
}

/// A receipt of another store than the one settling: a bug, never data.
fn foreign_receipt() -> StoreError {
    StoreError::Config(
        "a receipt was settled with a store other than the one that claimed it".into(),
    )
}

/// Re-tags a claim's receipts with the store's variant.
fn wrap<R>(claimed: Claimed<R>, tag: fn(R) -> StoreReceipt) -> Claimed<StoreReceipt> {
    let events = claimed
        .events
        .into_iter()
        .map(|e| ClaimedEvent::new(e.event, e.attempts, tag(e.receipt)))
        .collect();
    let malformed = claimed
        .malformed
        .into_iter()
        .map(|m| Malformed::new(tag(m.receipt), m.reason))
        .collect();
    Claimed::new(claimed.lease, events)
        .with_malformed(malformed)
        .with_next_due(claimed.next_due)
}

/// Takes the store's own receipts back out of settlements.
fn unwrap<R>(
    settlements: Settlements<StoreReceipt>,
    untag: fn(StoreReceipt) -> Option<R>,
) -> Result<Settlements<R>, StoreError> {
    let one = |r: StoreReceipt| untag(r).ok_or_else(foreign_receipt);
    let timed = |v: Vec<(StoreReceipt, DateTime<Utc>, String)>| {
        v.into_iter()
            .map(|(r, at, e)| Ok((one(r)?, at, e)))
            .collect::<Result<Vec<_>, StoreError>>()
    };
    let mut out = Settlements::default();
    out.published = settlements
        .published
        .into_iter()
        .map(one)
        .collect::<Result<_, _>>()?;
    out.retry = timed(settlements.retry)?;
    out.dead = settlements
        .dead
        .into_iter()
        .map(|(r, e)| Ok((one(r)?, e)))
        .collect::<Result<_, StoreError>>()?;
    out.released = settlements
        .released
        .into_iter()
        .map(one)
        .collect::<Result<_, _>>()?;
    out.deferred = timed(settlements.deferred)?;
    Ok(out)
}

impl ClaimSource for Store {
    type Receipt = StoreReceipt;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<StoreReceipt>, StoreError> {
        Ok(match self {
            Store::Sqlite(s) => wrap(s.claim(request).await?, StoreReceipt::Sqlite),
            Store::DynamoStream(s) => wrap(s.claim(request).await?, StoreReceipt::DynamoStream),
            Store::DynamoPolling(s) => wrap(s.claim(request).await?, StoreReceipt::DynamoPolling),
            Store::Postgres(s) => wrap(s.claim(request).await?, StoreReceipt::Postgres),
        })
    }

    async fn settle(
        &self,
        lease: LeaseId,
        settlements: Settlements<StoreReceipt>,
    ) -> Result<u64, StoreError> {
        // Each store settles the receipts of its own kind (a foreign one is
        // an error, see `unwrap`).
        macro_rules! settle_as {
            ($store:expr, $kind:ident) => {{
                let mine = unwrap(settlements, |r| match r {
                    StoreReceipt::$kind(r) => Some(r),
                    _ => None,
                })?;
                $store.settle(lease, mine).await
            }};
        }
        match self {
            Store::Sqlite(s) => settle_as!(s, Sqlite),
            Store::DynamoStream(s) => settle_as!(s, DynamoStream),
            Store::DynamoPolling(s) => settle_as!(s, DynamoPolling),
            Store::Postgres(s) => settle_as!(s, Postgres),
        }
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        each_store!(self, s => s.wait_for_events(max_wait).await)
    }

    async fn close(&self) -> Result<(), StoreError> {
        each_store!(self, s => s.close().await)
    }
}

impl Stats for Store {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        each_store!(self, s => s.stats().await)
    }
}

impl DeadLetters for Store {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        each_store!(self, s => s.dead_letters(limit).await)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        each_store!(self, s => s.replay(which).await)
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        each_store!(self, s => s.skip(which).await)
    }
}

impl Purge for Store {
    async fn purge_published(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        each_store!(self, s => s.purge_published(before).await)
    }
}
