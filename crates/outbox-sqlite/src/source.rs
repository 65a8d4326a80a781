//! The relay's side: claim due events, settle them.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, Event, EventId, LeaseId, Metadata, Payload,
    Settlements, StoreError,
};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::error::{corrupt, map};
use crate::SqliteOutbox;

pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The envelope columns, in the order [`event_from_row`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "position, id, aggregate_type, aggregate_id, aggregate_version, \
     event_type, payload, occurred_at, traceparent, correlation_id, causation_id, attempts, last_error";

pub(crate) fn event_from_row(row: &SqliteRow) -> Result<(i64, Event, u32), StoreError> {
    let get_str = |col: &str| row.try_get::<String, _>(col).map_err(corrupt);
    let position: i64 = row.try_get("position").map_err(corrupt)?;
    let id: EventId = get_str("id")?.parse().map_err(corrupt)?;
    let version: i64 = row.try_get("aggregate_version").map_err(corrupt)?;
    let occurred_at = DateTime::parse_from_rfc3339(&get_str("occurred_at")?)
        .map_err(|e| corrupt(format!("occurred_at: {e}")))?
        .with_timezone(&Utc);
    let attempts: i64 = row.try_get("attempts").map_err(corrupt)?;
    let event = Event {
        id,
        aggregate_type: get_str("aggregate_type")?,
        aggregate_id: get_str("aggregate_id")?,
        aggregate_version: u64::try_from(version)
            .map_err(|_| corrupt("negative aggregate_version"))?,
        event_type: get_str("event_type")?,
        payload: Payload::from_json(get_str("payload")?).map_err(corrupt)?,
        occurred_at,
        metadata: Metadata {
            traceparent: row.try_get("traceparent").map_err(corrupt)?,
            correlation_id: row.try_get("correlation_id").map_err(corrupt)?,
            causation_id: row.try_get("causation_id").map_err(corrupt)?,
        },
    };
    Ok((position, event, u32::try_from(attempts).unwrap_or(u32::MAX)))
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

const SETTLE_PUBLISHED: &str = settle_sql!("status = 'published', published_at = f.at");
const SETTLE_RELEASED: &str = settle_sql!("next_attempt_at = f.at");
const SETTLE_RETRY: &str =
    settle_sql!("attempts = attempts + 1, next_attempt_at = f.at, last_error = f.err");
const SETTLE_DEAD: &str =
    settle_sql!("status = 'dead', attempts = attempts + 1, last_error = f.err");

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ClaimSource for SqliteOutbox {
    /// The event's `position` in the outbox table.
    type Receipt = i64;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<i64>, StoreError> {
        let lease = LeaseId::new();
        let now = Utc::now().timestamp_millis();
        // One statement, so the claim is atomic. An event is claimable when it
        // is due and no earlier pending event of its aggregate is held; taking
        // the first `limit` such events in write order gives each aggregate a
        // prefix of its queue.
        let rows = sqlx::query(CLAIM)
            .bind(now.saturating_add(millis(request.lease)))
            .bind(lease.to_string())
            .bind(now)
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        let mut events = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for row in &rows {
            match event_from_row(row) {
                Ok((position, event, attempts)) => events.push(ClaimedEvent {
                    event,
                    attempts,
                    receipt: position,
                }),
                Err(e) => {
                    let position: i64 = row.try_get("position").map_err(map)?;
                    malformed.push((position, e.to_string()));
                }
            }
        }
        if !malformed.is_empty() {
            // A row that cannot be decoded would fail every claim forever:
            // dead-letter it, visibly, and carry on with the rest.
            tracing::error!(
                count = malformed.len(),
                "outbox: dead-lettering malformed rows"
            );
            self.settle(
                lease,
                Settlements {
                    dead: malformed,
                    ..Settlements::default()
                },
            )
            .await?;
        }
        // RETURNING gives no order; the relay needs write order.
        events.sort_unstable_by_key(|c| c.receipt);
        Ok(Claimed { lease, events })
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<i64>) -> Result<u64, StoreError> {
        if s.is_empty() {
            return Ok(0);
        }
        let now = Some(Utc::now().timestamp_millis());
        let statements = [
            (
                SETTLE_PUBLISHED,
                rows_json(s.published.iter().map(|p| (*p, now, None)))?,
            ),
            (
                SETTLE_RELEASED,
                rows_json(s.released.iter().map(|p| (*p, now, None)))?,
            ),
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
        ];
        let lease = lease.to_string();
        let mut tx = self.begin().await?;
        let mut applied = 0;
        // Categories with no rows (`[]`) need no statement.
        for (sql, rows) in statements.into_iter().filter(|(_, rows)| rows != "[]") {
            applied += sqlx::query(sql)
                .bind(rows)
                .bind(&lease)
                .execute(&mut *tx)
                .await
                .map_err(map)?
                .rows_affected();
        }
        tx.commit().await.map_err(map)?;
        Ok(applied)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.committed.notified()).await;
    }
}

const CLAIM: &str = "UPDATE outbox SET next_attempt_at = ?1, lease_id = ?2
     WHERE position IN (
        SELECT o.position FROM outbox AS o
        WHERE o.status = 'pending' AND o.next_attempt_at <= ?3
          AND NOT EXISTS (
            SELECT 1 FROM outbox AS held
            WHERE held.status = 'pending'
              AND held.aggregate_type = o.aggregate_type
              AND held.aggregate_id = o.aggregate_id
              AND held.next_attempt_at > ?3
              AND held.position < o.position)
        ORDER BY o.position
        LIMIT ?4)
     RETURNING position, id, aggregate_type, aggregate_id, aggregate_version, event_type,
        payload, occurred_at, traceparent, correlation_id, causation_id, attempts, last_error";
