//! The PostgreSQL store against the store conformance suite, concurrent
//! relays included: once with `append` as a statement of the caller's
//! transaction, once with the events carried by the commit
//! (`PostgresTransaction`).

mod common;

use common::{db, DropSchema};
use outbox_core::{DeadLetterPolicy, Event, EventId, Inbox, Seen, StoreError};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::{StoreFeatures, StoreHarness};
use sqlx::AssertSqlSafe;

struct Postgres {
    outbox: PostgresOutbox,
    /// Whether writes go through `PostgresTransaction` (events carried by
    /// the commit) instead of `append`.
    carried: bool,
    _drop: DropSchema,
}

impl Postgres {
    async fn new() -> Self {
        let outbox = common::outbox("conf", 6).await;
        let drop = DropSchema(outbox.schema_name().to_owned());
        Self {
            outbox,
            carried: false,
            _drop: drop,
        }
    }

    async fn carried() -> Self {
        Self {
            carried: true,
            ..Self::new().await
        }
    }

    fn insert_order(&self) -> AssertSqlSafe<String> {
        AssertSqlSafe(format!(
            "INSERT INTO {}.orders (id) VALUES ($1)",
            self.schema()
        ))
    }

    fn schema(&self) -> &str {
        self.outbox.schema_name()
    }
}

impl StoreHarness for Postgres {
    type Store = PostgresOutbox;

    fn store(&self) -> PostgresOutbox {
        self.outbox.clone()
    }

    async fn write(&self, key: &str, events: &[Event], commit: bool) -> Result<(), StoreError> {
        if self.carried {
            let mut tx = self.outbox.begin().await?;
            sqlx::query(self.insert_order())
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            // On error `tx` is dropped, which rolls it back.
            tx.append(events)?;
            return if commit {
                tx.commit().await
            } else {
                tx.rollback().await
            };
        }
        let mut tx = self.outbox.pool().begin().await.map_err(db)?;
        sqlx::query(self.insert_order())
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        // On error `tx` is dropped, which rolls it back.
        self.outbox.append(&mut tx, events).await?;
        if commit {
            tx.commit().await.map_err(db)
        } else {
            tx.rollback().await.map_err(db)
        }
    }

    async fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.orders WHERE id = $1",
            self.schema()
        )))
        .bind(key)
        .fetch_one(self.outbox.pool())
        .await
        .map_err(db)?;
        Ok(n == 1)
    }

    async fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> Result<Seen, StoreError> {
        let mut tx = self.outbox.pool().begin().await.map_err(db)?;
        let seen = self.outbox.inbox().record(&mut tx, consumer, id).await?;
        if commit {
            tx.commit().await.map_err(db)?;
        } else {
            tx.rollback().await.map_err(db)?;
        }
        Ok(seen)
    }

    async fn write_malformed(&self, aggregate_id: &str) -> Result<bool, StoreError> {
        // A hand edit: a payload that is not JSON.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.outbox (id, aggregate_type, aggregate_id, aggregate_version,
                event_type, payload, occurred_at)
             VALUES ($1, 'Order', $2, 1, 'OrderCreated', '{{not json', now())",
            self.schema()
        )))
        .bind(EventId::new().to_string())
        .bind(aggregate_id)
        .execute(self.outbox.pool())
        .await
        .map_err(db)?;
        Ok(true)
    }

    fn parking_store(&self) -> Option<PostgresOutbox> {
        Some(
            self.outbox
                .clone()
                .dead_letter_policy(DeadLetterPolicy::Park),
        )
    }
}

outbox_testkit::store_conformance!(Postgres::new, StoreFeatures::all());

mod carried_by_the_commit {
    use super::*;

    outbox_testkit::store_conformance!(Postgres::carried, StoreFeatures::all());
}
