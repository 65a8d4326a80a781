//! The operator's side: monitoring, dead letters, retention.

use chrono::{DateTime, Utc};
use outbox_core::{DeadLetter, DeadLetters, OutboxStats, Purge, ReplaySelector, Stats, StoreError};

use crate::error::map;
use crate::rows;
use crate::PostgresOutbox;

/// Rows deleted per statement when purging, so no statement holds many
/// row locks or runs long.
const PURGE_CHUNK: i64 = 5_000;

/// Rows looked at per purge statement: `published_at` is not indexed (so
/// that publishing is an in-place update), so purging walks the table in
/// position order, one range at a time.
const PURGE_RANGE: i64 = 50_000;

impl Stats for PostgresOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        type Counts = (i64, i64, i64, Option<DateTime<Utc>>, Option<String>);
        let (pending, published, dead, oldest, last_error): Counts =
            sqlx::query_as(self.schema.sql(
                "SELECT (SELECT count(*) FROM {schema}.outbox_queue WHERE NOT dead),
                        (SELECT count(*) FROM {schema}.outbox WHERE status = 'published'),
                        (SELECT count(*) FROM {schema}.outbox_queue WHERE dead),
                        (SELECT created_at FROM {schema}.outbox_queue WHERE NOT dead
                         ORDER BY position LIMIT 1),
                        (SELECT o.last_error
                         FROM {schema}.outbox_queue AS q JOIN {schema}.outbox AS o USING (position)
                         WHERE (q.next_attempt_at IS NOT NULL OR q.dead) AND NOT q.dead
                           AND o.last_error IS NOT NULL
                         ORDER BY q.next_attempt_at DESC LIMIT 1)",
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
            "SELECT o.* FROM {schema}.outbox_queue AS q JOIN {schema}.outbox AS o USING (position)
             WHERE q.dead ORDER BY q.position LIMIT $1",
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
        // Due now, in the queue again, its attempts reset.
        self.update_dead_letters(
            "UPDATE {schema}.outbox_queue AS q SET dead = false, next_attempt_at = $1
             FROM picked WHERE q.position = picked.position RETURNING q.position",
            "status = 'pending', attempts = 0",
            which,
        )
        .await
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        // Out of the queue for good; the row stays, marked.
        self.update_dead_letters(
            "DELETE FROM {schema}.outbox_queue AS q USING picked
             WHERE q.position = picked.position RETURNING q.position",
            "skipped_at = $1",
            which,
        )
        .await
    }
}

impl PostgresOutbox {
    /// Applies `queue_change` (a statement on the queue rows of the dead
    /// letters `picked`, returning their positions) and `set` (on their
    /// outbox rows) to the selected dead letters, in one statement that may
    /// use `$1`, now; then wakes the relays: replayed events, or an
    /// aggregate parked behind a skipped one, are due now.
    async fn update_dead_letters(
        &self,
        queue_change: &str,
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
            "WITH picked AS (
                SELECT q.position FROM {{schema}}.outbox_queue AS q
                JOIN {{schema}}.outbox AS o USING (position)
                WHERE q.dead AND ($2::text[] IS NULL OR o.id = ANY($2::text[]))),
             queued AS ({queue_change}),
             changed AS (
                UPDATE {{schema}}.outbox AS o SET {set}
                FROM queued WHERE o.position = queued.position
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
        let mut from: i64 = 0;
        loop {
            // Deletes up to PURGE_CHUNK old published rows among the next
            // PURGE_RANGE positions, and says where it stopped.
            let (deleted, next): (i64, Option<i64>) = sqlx::query_as(self.schema.sql(
                "WITH range AS (
                    SELECT position, status, published_at FROM {schema}.outbox
                    WHERE position >= $2 ORDER BY position LIMIT $4),
                 picked AS (
                    SELECT position FROM range
                    WHERE status = 'published' AND published_at < $1
                    ORDER BY position LIMIT $3),
                 gone AS (
                    DELETE FROM {schema}.outbox AS o USING picked
                    WHERE o.position = picked.position RETURNING o.position)
                 SELECT (SELECT count(*) FROM gone),
                        CASE WHEN (SELECT count(*) FROM picked) = $3
                             THEN (SELECT max(position) + 1 FROM picked)
                             ELSE (SELECT max(position) + 1 FROM range) END",
            ))
            .bind(before)
            .bind(from)
            .bind(PURGE_CHUNK)
            .bind(PURGE_RANGE)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
            purged += u64::try_from(deleted).unwrap_or(0);
            match next {
                Some(next) => from = next,
                None => return Ok(purged),
            }
        }
    }
}
