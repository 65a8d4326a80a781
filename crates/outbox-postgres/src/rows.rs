//! Outbox rows read back. The column types hold what PostgreSQL can check;
//! what it cannot (a UUID in `id`, JSON in `payload`, the envelope's rules)
//! is checked here, row by row: a row edited by hand into something
//! unreadable is reported alone, with its fields as found and the reason,
//! and spoils nothing else.

use chrono::{DateTime, Utc};
use outbox_core::{Event, EventId, Metadata, Payload, StoreError};
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::error::map;

/// An event as stored, with the relay's bookkeeping.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub position: i64,
    pub event: Event,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A row that cannot be read as an event.
#[derive(Debug)]
pub(crate) struct BadRow {
    pub position: i64,
    pub reason: String,
    /// The row's fields as found, by column name.
    pub raw: Value,
    pub last_error: Option<String>,
}

struct Columns {
    position: i64,
    id: String,
    aggregate_type: String,
    aggregate_id: String,
    aggregate_version: i64,
    event_type: String,
    payload: String,
    occurred_at: DateTime<Utc>,
    traceparent: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    attempts: i32,
    last_error: Option<String>,
}

fn columns(row: &PgRow) -> Result<Columns, sqlx::Error> {
    Ok(Columns {
        position: row.try_get("position")?,
        id: row.try_get("id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_version: row.try_get("aggregate_version")?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        occurred_at: row.try_get("occurred_at")?,
        traceparent: row.try_get("traceparent")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Decodes one outbox row (all its columns, as `SELECT *` or `RETURNING *`).
pub(crate) fn decode(row: &PgRow) -> Result<Result<StoredEvent, BadRow>, StoreError> {
    // The types come from the schema: a mismatch is a broken table, not a bad row.
    let c = columns(row).map_err(map)?;
    match to_event(&c) {
        Ok(event) => Ok(Ok(StoredEvent {
            position: c.position,
            event,
            attempts: u32::try_from(c.attempts).unwrap_or(0),
            last_error: c.last_error,
        })),
        Err(reason) => Ok(Err(BadRow {
            position: c.position,
            reason,
            raw: json!({
                "position": c.position,
                "id": c.id,
                "aggregate_type": c.aggregate_type,
                "aggregate_id": c.aggregate_id,
                "aggregate_version": c.aggregate_version,
                "event_type": c.event_type,
                "payload": c.payload,
                "occurred_at": c.occurred_at,
                "traceparent": c.traceparent,
                "correlation_id": c.correlation_id,
                "causation_id": c.causation_id,
                "attempts": c.attempts,
            }),
            last_error: c.last_error,
        })),
    }
}

fn to_event(c: &Columns) -> Result<Event, String> {
    let event = Event {
        id: c.id.parse::<EventId>().map_err(|e| e.to_string())?,
        aggregate_type: c.aggregate_type.clone(),
        aggregate_id: c.aggregate_id.clone(),
        aggregate_version: u64::try_from(c.aggregate_version)
            .map_err(|_| format!("aggregate_version {} is negative", c.aggregate_version))?,
        event_type: c.event_type.clone(),
        payload: Payload::from_json(c.payload.clone()).map_err(|e| e.to_string())?,
        occurred_at: c.occurred_at,
        metadata: Metadata {
            traceparent: c.traceparent.clone(),
            correlation_id: c.correlation_id.clone(),
            causation_id: c.causation_id.clone(),
        },
    };
    // The rules every write passed.
    event.validate().map_err(|e| e.to_string())?;
    Ok(event)
}
