//! The operator's side: monitoring, dead letters, retention.

use chrono::{DateTime, Utc};
use outbox_core::{DeadLetter, DeadLetters, OutboxStats, Purge, ReplaySelector, Stats, StoreError};

use crate::error::map;
use crate::rows::{self, rows_as_json};
use crate::SqliteOutbox;

/// Rows deleted per statement when purging, so writers are never locked out for long.
const PURGE_CHUNK: i64 = 5_000;

impl Stats for SqliteOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        type Counts = (i64, i64, i64, Option<i64>, Option<String>);
        let (pending, published, dead, oldest, last_error): Counts = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending'),
                    (SELECT count(*) FROM outbox WHERE status = 'published'),
                    (SELECT count(*) FROM outbox WHERE status = 'dead' AND skipped_at IS NULL),
                    (SELECT created_at FROM outbox WHERE status = 'pending' ORDER BY position LIMIT 1),
                    -- The latest error of a pending event, else of the
                    -- latest dead letter: never \"none\" beside dead letters.
                    coalesce(
                        (SELECT CAST(last_error AS TEXT) FROM outbox
                         WHERE status = 'pending' AND last_error IS NOT NULL
                         ORDER BY next_attempt_at DESC LIMIT 1),
                        (SELECT CAST(last_error AS TEXT) FROM outbox
                         WHERE status = 'dead' AND skipped_at IS NULL AND last_error IS NOT NULL
                         ORDER BY position DESC LIMIT 1))",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map)?;
        let mut stats = OutboxStats::default();
        stats.pending = pending as u64;
        stats.published = published as u64;
        stats.dead = dead as u64;
        stats.oldest_pending_at = oldest.and_then(DateTime::from_timestamp_millis);
        stats.last_error = last_error;
        Ok(stats)
    }
}

impl DeadLetters for SqliteOutbox {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let json: String = sqlx::query_scalar(rows_as_json!(safe;
            "SELECT * FROM outbox WHERE status = 'dead' AND skipped_at IS NULL
             ORDER BY position LIMIT ?1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await
        .map_err(map)?;
        let mut rows = rows::decode(&json)?;
        // Oldest first: an aggregate in JSON gives no order.
        rows.sort_by_key(rows::position);
        Ok(rows
            .into_iter()
            .map(|row| match row {
                Ok(stored) => DeadLetter::event(stored.event, stored.attempts, stored.last_error),
                // Listed with its fields as found: why it could not be
                // published is in its last error.
                Err(bad) => DeadLetter::malformed(
                    format!("position {}", bad.position),
                    bad.raw,
                    bad.last_error.or(Some(bad.reason)),
                ),
            })
            .collect())
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.update_dead_letters(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?1, lease_id = NULL
             WHERE status = 'dead' AND skipped_at IS NULL
               AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))",
            which,
        )
        .await
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.update_dead_letters(
            "UPDATE outbox SET skipped_at = ?1
             WHERE status = 'dead' AND skipped_at IS NULL
               AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))",
            which,
        )
        .await
    }
}

impl SqliteOutbox {
    /// Runs `sql` (bound to now and the selected ids, or NULL for all) on
    /// dead letters, and wakes the relays: replayed events, or an aggregate
    /// parked behind a skipped one, are due now.
    async fn update_dead_letters(
        &self,
        sql: &'static str,
        which: ReplaySelector,
    ) -> Result<u64, StoreError> {
        let now = Utc::now().timestamp_millis();
        let ids = match &which {
            ReplaySelector::All => None,
            ReplaySelector::Ids(ids) => Some(
                serde_json::to_string(&ids.iter().map(|id| id.to_string()).collect::<Vec<_>>())
                    .map_err(|e| StoreError::Backend(Box::new(e)))?,
            ),
            _ => {
                return Err(StoreError::Config(
                    "unsupported dead-letter selector".into(),
                ))
            }
        };
        let mut tx = self.begin().await?;
        let changed = sqlx::query(sql)
            .bind(now)
            .bind(ids)
            .execute(&mut *tx)
            .await
            .map_err(map)?
            .rows_affected();
        self.commit(tx).await?;
        Ok(changed)
    }
}

impl Purge for SqliteOutbox {
    async fn purge_published(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let cutoff = before.timestamp_millis();
        let mut purged = 0;
        loop {
            // Each chunk takes its write turn like any writer of the process.
            let mut tx = self.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM outbox WHERE position IN (
                    SELECT position FROM outbox
                    WHERE status = 'published' AND published_at < ?1 LIMIT ?2)",
            )
            .bind(cutoff)
            .bind(PURGE_CHUNK)
            .execute(&mut *tx)
            .await
            .map_err(map)?
            .rows_affected();
            tx.commit().await?;
            purged += deleted;
            if deleted < PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }
}
