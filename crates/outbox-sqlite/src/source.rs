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

/// The settling relay's lease is still there: not ended and dropped by
/// another relay's claim (which may then have taken the events again).
macro_rules! lease_held {
    () => {
        "EXISTS (SELECT 1 FROM outbox_leases WHERE lease_id = ?2)"
    };
}

/// One settlement statement: `$set` applied to the pending rows of `?1`
/// while lease `?2` holds; `f.at` and `f.err` are each row's time and error.
macro_rules! settle_sql {
    ($set:literal) => {
        concat!(
            "UPDATE outbox SET ",
            $set,
            "
             FROM (SELECT value ->> 0 AS pos, value ->> 1 AS at, value ->> 2 AS err
                   FROM json_each(?1)) AS f
             WHERE outbox.position = f.pos AND outbox.status = 'pending' AND ",
            lease_held!()
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
            " WHERE position IN (SELECT value FROM json_each(?1)) AND status = 'pending' AND ",
            lease_held!()
        )
    };
}

const SETTLE_PUBLISHED: &str = settle_all_sql!("status = 'published', published_at = ?3");
const SETTLE_RETRY: &str =
    settle_sql!("attempts = attempts + 1, next_attempt_at = f.at, last_error = f.err");
const SETTLE_DEAD: &str =
    settle_sql!("status = 'dead', attempts = attempts + 1, last_error = f.err");
const SETTLE_DEFERRED: &str = settle_sql!("next_attempt_at = f.at, last_error = f.err");
/// Released events need no change (a claim leaves its rows as they were),
/// only counting: the relay compares what was applied with what it claimed.
const SETTLE_RELEASED: &str = concat!(
    "SELECT count(*) FROM outbox
     WHERE position IN (SELECT value FROM json_each(?1)) AND status = 'pending' AND ",
    lease_held!()
);

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
        // `outbox_held` only holds times after 0: before 1970, nothing is due.
        let cutoff = request.due_cutoff(now).timestamp_millis().max(0);
        let until = now.timestamp_millis().saturating_add(millis(request.lease));
        let [fast, safe] = match self.dead_letter_policy {
            DeadLetterPolicy::Park => CLAIMABLE_PARKED,
            _ => CLAIMABLE,
        };
        // Read and lease in one IMMEDIATE transaction, so two relays (even in
        // two processes) never take the same events.
        let mut tx = self.begin().await?;
        // Leases that ended unsettled free their aggregates.
        sqlx::query("DELETE FROM outbox_leases WHERE expires_at <= ?1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let written_before = request.written_before.map(|at| at.timestamp_millis());
        let mut rows = Ok(Vec::new());
        let mut aggregates = String::new();
        for (sql, last) in [(fast, false), (safe, true)] {
            let json: Result<(String, String), _> = sqlx::query_as(sql)
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
                Ok((json, keys)) => {
                    rows = rows::decode(&json);
                    aggregates = keys;
                }
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
        sqlx::query(
            "INSERT INTO outbox_leases (lease_id, expires_at, aggregates) VALUES (?1, ?2, ?3)",
        )
        .bind(lease.to_string())
        .bind(until)
        .bind(aggregates)
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
        let released = positions_json(&s.released)?;
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
        if released != "[]" {
            let count: i64 = sqlx::query_scalar(SETTLE_RELEASED)
                .bind(released)
                .bind(&lease)
                .fetch_one(&mut *tx)
                .await
                .map_err(map)?;
            applied += u64::try_from(count).unwrap_or(0);
        }
        // The relay settles a whole claim at once: its aggregates are free.
        sqlx::query("DELETE FROM outbox_leases WHERE lease_id = ?1")
            .bind(&lease)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.committed.notified()).await;
    }
}

/// An aggregate as `outbox_leases` keeps it; `$t` qualifies the columns.
macro_rules! aggregate_key {
    ($t:literal) => {
        concat!(
            "quote(",
            $t,
            "aggregate_type) || quote(",
            $t,
            "aggregate_id)"
        )
    };
}

/// Pending events due by `?1` (and written by `?3`, when given) whose
/// aggregate no lease holds and no earlier pending event holds back (not
/// due by `?1`: backing off or deferred); the first `?2` of them in write
/// order give each aggregate a prefix of its queue, with the keys of their
/// aggregates for the lease. The fast read, then the one that survives
/// BLOBs (see `rows_as_json!`).
macro_rules! claimable {
    ($read:ident, $parked:expr) => {
        rows_as_json!($read, concat!("json_group_array(", aggregate_key!(""), ")");
            "SELECT * FROM outbox AS o
             WHERE o.status = 'pending' AND o.next_attempt_at <= ?1
               AND (?3 IS NULL OR o.created_at <= ?3)
               AND NOT EXISTS (
                 SELECT 1 FROM outbox AS held
                 WHERE held.status = 'pending' AND held.next_attempt_at > 0
                   AND held.aggregate_type = o.aggregate_type
                   AND held.aggregate_id = o.aggregate_id
                   AND held.next_attempt_at > ?1
                   AND held.position < o.position)
               AND (NOT EXISTS (SELECT 1 FROM outbox_leases)
                    OR ", aggregate_key!("o."), " NOT IN (
                      SELECT k.value FROM outbox_leases AS l, json_each(l.aggregates) AS k))",
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
