//! The consumer's inbox: processed event ids, in the consumer's transaction.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use outbox_core::{EventId, Inbox, Seen, StoreError};
use sqlx::{PgConnection, PgPool};

use crate::error::map;
use crate::Schema;

/// Records processed events in the `inbox` table of the outbox's schema
/// (get one from [`crate::PostgresOutbox::inbox`]).
///
/// ```no_run
/// # async fn handle(outbox: outbox_postgres::PostgresOutbox, id: outbox_core::EventId) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::{Inbox, Seen};
/// let inbox = outbox.inbox();
/// let mut tx = outbox.pool().begin().await?;
/// if inbox.record(&mut tx, "shipping", id).await? == Seen::First {
///     // apply the event with `tx` here
/// }
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresInbox {
    schema: Arc<Schema>,
}

impl PostgresInbox {
    pub(crate) fn new(schema: Arc<Schema>) -> Self {
        Self { schema }
    }

    /// Forgets ids processed before `before`. Keep them longer than any
    /// broker may redeliver (and than any replay you may run).
    pub async fn purge(&self, pool: &PgPool, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            self.schema
                .sql("DELETE FROM {schema}.inbox WHERE processed_at < $1"),
        )
        .bind(before)
        .execute(pool)
        .await
        .map_err(map)?
        .rows_affected())
    }
}

impl Inbox for PostgresInbox {
    type Connection = PgConnection;

    async fn record(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: EventId,
    ) -> Result<Seen, StoreError> {
        if consumer.is_empty() {
            return Err(StoreError::Config(
                "inbox consumer name must not be empty".into(),
            ));
        }
        let inserted = sqlx::query(self.schema.sql(
            "INSERT INTO {schema}.inbox (consumer, event_id) VALUES ($1, $2::uuid)
             ON CONFLICT (consumer, event_id) DO NOTHING",
        ))
        .bind(consumer)
        .bind(event_id.to_string())
        .execute(conn)
        .await
        .map_err(map)?
        .rows_affected();
        Ok(if inserted == 1 {
            Seen::First
        } else {
            Seen::Duplicate
        })
    }
}
