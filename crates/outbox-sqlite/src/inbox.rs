//! The consumer's inbox: processed event ids, in the consumer's transaction.

use chrono::{DateTime, Utc};
use outbox_core::{EventId, Inbox, Seen, StoreError};
use sqlx::{SqliteConnection, SqlitePool};

use crate::error::map;

/// Records processed events in the `inbox` table.
///
/// ```no_run
/// # async fn handle(outbox: outbox_sqlite::SqliteOutbox, id: outbox_core::EventId) -> Result<(), outbox_core::StoreError> {
/// use outbox_core::{Inbox, Seen};
/// let inbox = outbox_sqlite::SqliteInbox;
/// let mut tx = outbox.begin().await?;
/// if inbox.record(&mut tx, "shipping", id).await? == Seen::First {
///     // apply the event with `tx` here
/// }
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteInbox;

impl Inbox for SqliteInbox {
    type Connection = SqliteConnection;

    async fn record(
        &self,
        conn: &mut SqliteConnection,
        consumer: &str,
        event_id: EventId,
    ) -> Result<Seen, StoreError> {
        if consumer.is_empty() {
            return Err(StoreError::Config(
                "inbox consumer name must not be empty".into(),
            ));
        }
        let inserted = sqlx::query(
            "INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?, ?, ?)
             ON CONFLICT (consumer, event_id) DO NOTHING",
        )
        .bind(consumer)
        .bind(event_id.to_string())
        .bind(Utc::now().timestamp_millis())
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

impl SqliteInbox {
    /// Forgets ids processed before `before`. Keep them longer than any
    /// broker may redeliver (and than any replay you may run).
    pub async fn purge(&self, pool: &SqlitePool, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM inbox WHERE processed_at < ?")
            .bind(before.timestamp_millis())
            .execute(pool)
            .await
            .map_err(map)?
            .rows_affected())
    }
}
