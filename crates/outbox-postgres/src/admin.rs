//! The operator's side: monitoring, dead letters, retention.

use chrono::{DateTime, Utc};
use outbox_core::{DeadLetter, DeadLetters, OutboxStats, Purge, ReplaySelector, Stats, StoreError};

use crate::error::map;
use crate::rows;
use crate::PostgresOutbox;

/// Rows deleted per statement when purging, so no statement holds many
/// row locks or runs long.
const PURGE_CHUNK: i64 = 5_000;

impl Stats for PostgresOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        type Counts = (i64, i64, i64, Option<DateTime<Utc>>, Option<String>);
        let (pending, published, dead, oldest, last_error): Counts =
            sqlx::query_as(self.schema.sql(
                "SELECT (SELECT count(*) FROM {schema}.outbox WHERE status = 'pending'),
                        (SELECT count(*) FROM {schema}.outbox WHERE status = 'published'),
                        (SELECT count(*) FROM {schema}.outbox WHERE status = 'dead' AND skipped_at IS NULL),
                        (SELECT created_at FROM {schema}.outbox WHERE status = 'pending'
                         ORDER BY position LIMIT 1),
                        (SELECT last_error FROM {schema}.outbox
                         WHERE status = 'pending' AND last_error IS NOT NULL
                         ORDER BY next_attempt_at DESC LIMIT 1)",
            ))
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        let mut stats = OutboxStats::default();
        stats.pending = u64::try_from(pending).unwrap_or(0);
        stats.published = u64::try_from(published).unwrap_or(0);
        stats.dead = u64::try_from(dead).unwrap_or(0);
        stats.oldest_pending_at = oldest;
        stats.last_error = last_error;
        Ok(stats)
    }
}

impl DeadLetters for PostgresOutbox {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let found = sqlx::query(self.schema.sql(
            "SELECT * FROM {schema}.outbox WHERE status = 'dead' AND skipped_at IS NULL
             ORDER BY position LIMIT $1",
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(map)?;
        let mut letters = Vec::with_capacity(found.len());
        for row in &found {
            letters.push(match rows::decode(row)? {
                Ok(stored) => DeadLetter::event(stored.event, stored.attempts, stored.last_error),
                // Listed with its fields as found: why it could not be
                // published is in its last error.
                Err(bad) => DeadLetter::malformed(
                    format!("position {}", bad.position),
                    bad.raw,
                    bad.last_error.or(Some(bad.reason)),
                ),
            });
        }
        Ok(letters)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.update_dead_letters(
            "status = 'pending', attempts = 0, next_attempt_at = $1, lease_id = NULL",
            which,
        )
        .await
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.update_dead_letters("skipped_at = $1", which).await
    }
}

impl PostgresOutbox {
    /// Applies `set` (which may use `$1`, now) to the selected dead
    /// letters, and wakes the relays: replayed events, or an aggregate
    /// parked behind a skipped one, are due now.
    async fn update_dead_letters(
        &self,
        set: &str,
        which: ReplaySelector,
    ) -> Result<u64, StoreError> {
        let ids: Option<Vec<String>> = match &which {
            ReplaySelector::All => None,
            ReplaySelector::Ids(ids) => Some(ids.iter().map(|id| id.to_string()).collect()),
            _ => {
                return Err(StoreError::Config(
                    "unsupported dead-letter selector".into(),
                ))
            }
        };
        let sql = format!(
            "WITH changed AS (
                UPDATE {{schema}}.outbox SET {set}
                WHERE status = 'dead' AND skipped_at IS NULL
                  AND ($2::text[] IS NULL OR id = ANY($2::text[]))
                RETURNING 1),
             woken AS (SELECT pg_notify($3, ''))
             SELECT (SELECT count(*) FROM changed) FROM woken"
        );
        let changed: i64 = sqlx::query_scalar(self.schema.sql(&sql))
            .bind(Utc::now())
            .bind(ids)
            .bind(self.schema.channel())
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        Ok(u64::try_from(changed).unwrap_or(0))
    }
}

impl Purge for PostgresOutbox {
    async fn purge_published(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(self.schema.sql(
                "DELETE FROM {schema}.outbox WHERE position IN (
                    SELECT position FROM {schema}.outbox
                    WHERE status = 'published' AND published_at < $1 LIMIT $2)",
            ))
            .bind(before)
            .bind(PURGE_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(map)?
            .rows_affected();
            purged += deleted;
            if deleted < PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }
}
