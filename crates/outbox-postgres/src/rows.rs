//! Outbox rows read back, through the schema's `outbox_read` (the claim
//! returns the same columns). The server checks what could stop a reader
//! before a value leaves it (times outside the years 1 to 9999, overlong
//! text, a payload over the limit) and says why in `r_unreadable`; what it
//! cannot check (a UUID in `id`, JSON in `payload`, the envelope's rules) is
//! checked here, row by row. A row edited by hand into something unreadable
//! is reported alone, with its fields as found and the reason, and spoils
//! nothing else.

use chrono::{DateTime, Utc};
use outbox_core::{Event, EventId, Metadata, Payload, StoreError};
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::error::map;

/// The columns of `outbox_read`, in order.
pub(crate) const READ_COLUMNS: &str = "r_position, r_id, r_aggregate_type, r_aggregate_id, \
    r_aggregate_version, r_event_type, r_payload, r_occurred_at, r_traceparent, \
    r_correlation_id, r_causation_id, r_attempts, r_last_error, r_unreadable";

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
    /// The row's fields as found (overlong text cut), by column name.
    pub raw: Value,
    pub last_error: Option<String>,
}

/// Every column may come back NULL: a NULL where the schema forbids one is
/// a bad row, not a failed claim.
struct Columns {
    position: i64,
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    aggregate_version: Option<i64>,
    event_type: Option<String>,
    payload: Option<String>,
    occurred_at: Option<DateTime<Utc>>,
    traceparent: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    attempts: Option<i32>,
    last_error: Option<String>,
    unreadable: Option<String>,
}

fn columns(row: &PgRow) -> Result<Columns, sqlx::Error> {
    Ok(Columns {
        position: row.try_get(0)?,
        id: row.try_get(1)?,
        aggregate_type: row.try_get(2)?,
        aggregate_id: row.try_get(3)?,
        aggregate_version: row.try_get(4)?,
        event_type: row.try_get(5)?,
        payload: row.try_get(6)?,
        occurred_at: row.try_get(7)?,
        traceparent: row.try_get(8)?,
        correlation_id: row.try_get(9)?,
        causation_id: row.try_get(10)?,
        attempts: row.try_get(11)?,
        last_error: row.try_get(12)?,
        unreadable: row.try_get(13)?,
    })
}

/// Decodes one row of `outbox_read`.
pub(crate) fn decode(row: &PgRow) -> Result<Result<StoredEvent, BadRow>, StoreError> {
    // The types come from the function: a mismatch is a broken schema, not a bad row.
    let mut c = columns(row).map_err(map)?;
    let attempts = u32::try_from(c.attempts.unwrap_or(0)).unwrap_or(0);
    match to_event(&mut c) {
        Ok(event) => Ok(Ok(StoredEvent {
            position: c.position,
            event,
            attempts,
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

/// The event, or why the row is not one. Takes the row's strings once it
/// is sure to be one (the usual case: no copies); leaves them for the
/// report otherwise.
fn to_event(c: &mut Columns) -> Result<Event, String> {
    if let Some(why) = c.unreadable.as_deref().filter(|w| !w.is_empty()) {
        return Err(why.to_owned());
    }
    fn present<'a, T>(field: &str, value: &'a Option<T>) -> Result<&'a T, String> {
        value.as_ref().ok_or_else(|| format!("{field} is NULL"))
    }
    let id = present("id", &c.id)?
        .parse::<EventId>()
        .map_err(|e| e.to_string())?;
    let version = *present("aggregate_version", &c.aggregate_version)?;
    let aggregate_version =
        u64::try_from(version).map_err(|_| format!("aggregate_version {version} is negative"))?;
    let occurred_at = *present("occurred_at", &c.occurred_at)?;
    for (field, value) in [
        ("aggregate_type", &c.aggregate_type),
        ("aggregate_id", &c.aggregate_id),
        ("event_type", &c.event_type),
    ] {
        present(field, value)?;
    }
    // Checked borrowed first, so a bad payload stays in the report.
    serde_json::from_str::<&serde_json::value::RawValue>(present("payload", &c.payload)?)
        .map_err(|e| format!("payload: not valid JSON: {e}"))?;
    let mut event = Event {
        id,
        aggregate_type: c.aggregate_type.take().unwrap_or_default(),
        aggregate_id: c.aggregate_id.take().unwrap_or_default(),
        aggregate_version,
        event_type: c.event_type.take().unwrap_or_default(),
        payload: Payload::from_json(c.payload.take().unwrap_or_default())
            .map_err(|e| e.to_string())?,
        occurred_at,
        metadata: Metadata {
            traceparent: c.traceparent.take(),
            correlation_id: c.correlation_id.take(),
            causation_id: c.causation_id.take(),
        },
    };
    // The rules every write passed.
    if let Err(e) = event.validate() {
        c.aggregate_type = Some(std::mem::take(&mut event.aggregate_type));
        c.aggregate_id = Some(std::mem::take(&mut event.aggregate_id));
        c.event_type = Some(std::mem::take(&mut event.event_type));
        c.payload = Some(event.payload.as_str().to_owned());
        c.traceparent = event.metadata.traceparent.take();
        c.correlation_id = event.metadata.correlation_id.take();
        c.causation_id = event.metadata.causation_id.take();
        return Err(e.to_string());
    }
    Ok(event)
}
