//! The operator's side: monitoring, dead letters, retention.

use chrono::{DateTime, Utc};
use outbox_core::{DeadLetter, DeadLetters, OutboxStats, Purge, ReplaySelector, Stats, StoreError};

use sqlx::Row;

use crate::error::map;
use crate::rows;
use crate::PostgresOutbox;

/// Publications (settlements, about a batch of events each) purged per
/// statement, so no statement holds many row locks or runs long.
const PURGE_PUBLICATIONS: i32 = 20;

impl Stats for PostgresOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        type Counts = (i64, i64, i64, Option<DateTime<Utc>>, Option<String>, i64);
        // Times come from the server's clock (`written_at`), never from a
        // column a writer filled in: they are always readable and true.
        let (pending, kept, dead, oldest, last_error, created_ahead): Counts =
            sqlx::query_as(self.schema.sql(
                "SELECT (SELECT count(*) FROM {schema}.outbox_queue),
                        (SELECT count(*) FROM {schema}.outbox WHERE skipped_at IS NULL),
                        (SELECT count(*) FROM {schema}.outbox_dead),
                        (SELECT written_at FROM {schema}.outbox_queue ORDER BY position LIMIT 1),
                        coalesce(
                            (SELECT last_error FROM {schema}.outbox_queue
                             WHERE next_attempt_at IS NOT NULL AND last_error IS NOT NULL
                             ORDER BY next_attempt_at DESC LIMIT 1),
                            (SELECT last_error FROM {schema}.outbox_dead
                             WHERE last_error IS NOT NULL ORDER BY dead_at DESC LIMIT 1)),
                        (SELECT count(*) FROM {schema}.outbox_queue WHERE created_ahead)",
            ))
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let mut stats = OutboxStats::default();
        stats.pending = count(pending);
        stats.dead = count(dead);
        // Events neither pending nor dead (nor skipped) were published.
        stats.published = count(kept).saturating_sub(stats.pending + stats.dead);
        stats.oldest_pending_at = oldest;
        stats.last_error = last_error;
        stats.created_in_future = count(created_ahead);
        Ok(stats)
    }
}

impl DeadLetters for PostgresOutbox {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let found = sqlx::query(self.schema.sql(&format!(
            "SELECT {columns} FROM (
                SELECT array_agg(d.position ORDER BY d.position) AS p,
                       array_agg(d.attempts ORDER BY d.position) AS a,
                       array_agg(d.last_error ORDER BY d.position) AS e
                FROM (SELECT * FROM {{schema}}.outbox_dead ORDER BY position LIMIT $1) AS d) AS letters,
             {{schema}}.outbox_read(letters.p, letters.a, letters.e, $2)",
            columns = rows::READ_COLUMNS
        )))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(self.max_payload_column())
        .fetch_all(&self.pool)
        .await
        .map_err(map)?;
        // In position order (the function returns them in none).
        let mut found = found;
        found.sort_by_cached_key(|row| row.try_get::<i64, _>(0).unwrap_or(i64::MAX));
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
        // Back in the queue, due now, its attempts reset.
        self.update_dead_letters(
            "INSERT INTO {schema}.outbox_queue
                 (position, aggregate_key, aggregate_version, written_at, attempts, last_error)
             SELECT position, aggregate_key, aggregate_version, clock_timestamp(), 0, last_error
             FROM gone",
            which,
        )
        .await
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        // Out of the dead letters for good; the event stays, marked.
        self.update_dead_letters(
            "UPDATE {schema}.outbox AS o SET skipped_at = now()
             FROM gone WHERE o.position = gone.position",
            which,
        )
        .await
    }
}

impl PostgresOutbox {
    /// Takes the selected dead letters out of `outbox_dead` (as `gone`) and
    /// applies `then` to them, in one statement; then wakes the relays:
    /// replayed events, or an aggregate parked behind a skipped one, are
    /// due now.
    async fn update_dead_letters(
        &self,
        then: &str,
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
            "WITH gone AS (
                DELETE FROM {{schema}}.outbox_dead AS d
                WHERE $1::text[] IS NULL OR d.position IN (
                    SELECT o.position FROM {{schema}}.outbox AS o
                    JOIN {{schema}}.outbox_dead AS x USING (position)
                    WHERE o.id = ANY($1::text[]))
                RETURNING d.*),
             changed AS ({then} RETURNING 1),
             woken AS (SELECT pg_notify($2, ''))
             SELECT (SELECT count(*) FROM changed) FROM woken"
        );
        let changed: i64 = sqlx::query_scalar(self.schema.sql(&sql))
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
            let (publications, events): (i32, i64) = sqlx::query_as(
                self.schema
                    .sql("SELECT * FROM {schema}.outbox_purge($1, $2)"),
            )
            .bind(before)
            .bind(PURGE_PUBLICATIONS)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
            if publications == 0 {
                return Ok(purged);
            }
            purged += u64::try_from(events).unwrap_or(0);
        }
    }
}
