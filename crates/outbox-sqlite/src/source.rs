//! The relay's side: claim due events, settle them.

use std::time::Duration;

use crate::error::map;
use crate::rows::{self, rows_as_json};
use crate::SqliteOutbox;
use chrono::{DateTime, SecondsFormat, Utc};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetterPolicy, LeaseId, Malformed,
    Settlements, StoreError,
};

pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `[[position, time, error], ...]`: a batch's settlements as one JSON
/// parameter, read with `json_each`, so a batch of any size is one statement.
fn rows_json<'a>(
    rows: impl Iterator<Item = (i64, Option<i64>, Option<&'a str>)>,
) -> Result<String, StoreError> {
    serde_json::to_string(&rows.collect::<Vec<_>>()).map_err(|e| StoreError::Backend(Box::new(e)))
}

/// One settlement statement: `$set` applied to the rows of `?1` still held
/// under lease `?2`; `f.at` and `f.err` are each row's time and error.
macro_rules! settle_sql {
    ($set:literal) => {
        concat!(
            "UPDATE outbox SET ", $set, ", lease_id = NULL
             FROM (SELECT value ->> 0 AS pos, value ->> 1 AS at, value ->> 2 AS err
                   FROM json_each(?1)) AS f
             WHERE outbox.position = f.pos AND outbox.lease_id = ?2 AND outbox.status = 'pending'"
        )
    };
}

/// [`settle_sql!`] for outcomes that share one time, `?3`: `?1` is then a
/// plain array of positions. Most of a batch settles this way, and reading
/// a `[position, time, error]` triple back per row cost a third of the
/// statement's instructions.
macro_rules! settle_all_sql {
    ($set:literal) => {
        concat!(
            "UPDATE outbox SET ",
            $set,
            ", lease_id = NULL
             WHERE position IN (SELECT value FROM json_each(?1))
               AND lease_id = ?2 AND status = 'pending'"
        )
    };
}

const SETTLE_PUBLISHED: &str = settle_all_sql!("status = 'published', published_at = ?3");
const SETTLE_RELEASED: &str = settle_all_sql!("next_attempt_at = ?3");
const SETTLE_RETRY: &str =
    settle_sql!("attempts = attempts + 1, next_attempt_at = f.at, last_error = f.err");
const SETTLE_DEAD: &str =
    settle_sql!("status = 'dead', attempts = attempts + 1, last_error = f.err");
const SETTLE_DEFERRED: &str = settle_sql!("next_attempt_at = f.at, last_error = f.err");

/// `[position, ...]` as one JSON parameter.
fn positions_json(positions: &[i64]) -> Result<String, StoreError> {
    serde_json::to_string(positions).map_err(|e| StoreError::Backend(Box::new(e)))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ClaimSource for SqliteOutbox {
    /// The event's `position` in the outbox table.
    type Receipt = i64;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<i64>, StoreError> {
        let lease = LeaseId::new();
        let now = Utc::now();
        let cutoff = request.due_cutoff(now).timestamp_millis();
        let now = now.timestamp_millis();
        let [fast, safe] = match self.dead_letter_policy {
            DeadLetterPolicy::Park => CLAIMABLE_PARKED,
            _ => CLAIMABLE,
        };
        // Read and lease in one IMMEDIATE transaction, so two relays (even in
        // two processes) never take the same events.
        let mut tx = self.begin().await?;
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let written_before = request.written_before.map(|at| at.timestamp_millis());
        let mut rows = Ok(Vec::new());
        for (sql, last) in [(fast, false), (safe, true)] {
            let json: Result<String, _> = sqlx::query_scalar(sql)
                .bind(cutoff)
                .bind(limit)
                .bind(written_before)
                .fetch_one(&mut *tx)
                .await;
            // Only a cell JSON cannot hold (a BLOB) makes the fast read
            // fail, or (a BLOB SQLite took as JSONB) give text that is not JSON.
            match json {
                Err(e) if !last && is_json_error(&e) => continue,
                Err(e) => return Err(map(e)),
                Ok(json) => rows = rows::decode(&json),
            }
            if rows.is_ok() {
                break;
            }
        }
        let rows = rows?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Claimed::empty(lease));
        }
        let positions: Vec<i64> = rows.iter().map(rows::position).collect();
        let positions =
            serde_json::to_string(&positions).map_err(|e| StoreError::Backend(Box::new(e)))?;
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = ?1, lease_id = ?2
             WHERE position IN (SELECT value FROM json_each(?3))",
        )
        .bind(now.saturating_add(millis(request.lease)))
        .bind(lease.to_string())
        .bind(positions)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await?;

        let mut events = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for row in rows {
            match row {
                Ok(stored) => events.push(ClaimedEvent::new(
                    stored.event,
                    stored.attempts,
                    stored.position,
                )),
                // Leased like the rest; the relay dead-letters it alone.
                Err(bad) => malformed.push(Malformed::new(bad.position, bad.reason)),
            }
        }
        // An aggregate in JSON gives no order; the relay needs write order.
        events.sort_unstable_by_key(|c| c.receipt);
        Ok(Claimed::new(lease, events).with_malformed(malformed))
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<i64>) -> Result<u64, StoreError> {
        if s.is_empty() {
            return Ok(0);
        }
        let now = Utc::now().timestamp_millis();
        let statements = [
            (SETTLE_PUBLISHED, positions_json(&s.published)?),
            (SETTLE_RELEASED, positions_json(&s.released)?),
            (
                SETTLE_RETRY,
                rows_json(
                    s.retry
                        .iter()
                        .map(|(p, at, e)| (*p, Some(at.timestamp_millis()), Some(e.as_str()))),
                )?,
            ),
            (
                SETTLE_DEAD,
                rows_json(s.dead.iter().map(|(p, e)| (*p, None, Some(e.as_str()))))?,
            ),
            (
                SETTLE_DEFERRED,
                rows_json(
                    s.deferred
                        .iter()
                        .map(|(p, at, e)| (*p, Some(at.timestamp_millis()), Some(e.as_str()))),
                )?,
            ),
        ];
        let lease = lease.to_string();
        let mut tx = self.begin().await?;
        let mut applied = 0;
        // Categories with no rows (`[]`) need no statement.
        for (sql, rows) in statements.into_iter().filter(|(_, rows)| rows != "[]") {
            applied += sqlx::query(sql)
                .bind(rows)
                .bind(&lease)
                // Read by the shared-time statements only.
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map)?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.committed.notified()).await;
    }
}

/// Pending events due by `?1` (and written by `?3`, when given) that no
/// earlier pending event of their aggregate holds back (not due by `?1`:
/// backing off, or claimed by another relay); the first `?2` of them in
/// write order give each aggregate a prefix of its queue. The fast read,
/// then the one that survives BLOBs (see `rows_as_json!`).
macro_rules! claimable {
    ($read:ident, $parked:expr) => {
        rows_as_json!($read;
            "SELECT * FROM outbox AS o
             WHERE o.status = 'pending' AND o.next_attempt_at <= ?1
               AND (?3 IS NULL OR o.created_at <= ?3)
               AND NOT EXISTS (
                 SELECT 1 FROM outbox AS held
                 WHERE held.status = 'pending'
                   AND held.aggregate_type = o.aggregate_type
                   AND held.aggregate_id = o.aggregate_id
                   AND held.next_attempt_at > ?1
                   AND held.position < o.position)",
            $parked,
            " ORDER BY o.position
             LIMIT ?2"
        )
    };
}

const CLAIMABLE: [&str; 2] = [claimable!(fast, ""), claimable!(safe, "")];

/// [`CLAIMABLE`], also holding back aggregates parked behind a dead letter
/// ([`DeadLetterPolicy::Park`]) until it is replayed or skipped.
const CLAIMABLE_PARKED: [&str; 2] = [claimable!(fast, parked!()), claimable!(safe, parked!())];

/// No dead letter of the aggregate before the event, unless skipped.
macro_rules! parked {
    () => {
        " AND NOT EXISTS (
            SELECT 1 FROM outbox AS dead
            WHERE dead.status = 'dead' AND dead.skipped_at IS NULL
              AND dead.aggregate_type = o.aggregate_type
              AND dead.aggregate_id = o.aggregate_id
              AND dead.position < o.position)"
    };
}
use parked;

/// SQLite's refusal to put a cell into JSON (a BLOB in a text column), or
/// a BLOB it took as JSONB and copied into the text as bytes that are not
/// UTF-8.
fn is_json_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.message().contains("JSON"))
        || matches!(e, sqlx::Error::ColumnDecode { .. })
}
