//! Outbox rows read in bulk. SQLite folds a batch into one JSON array
//! (`json_group_array`), so the batch leaves the driver's thread as one
//! value instead of one message per row, which is most of a claim's cost.

use chrono::{DateTime, Utc};
use outbox_core::{Event, EventId, Metadata, Payload, StoreError};
use serde_json::value::RawValue;

use crate::error::corrupt;

/// `SELECT` of one JSON array holding every row of the subquery `$from`.
/// Each row is the array decoded by [`decode`].
macro_rules! rows_as_json {
    ($from:literal) => {
        concat!(
            "SELECT json_group_array(json_array(position, id, aggregate_type, aggregate_id,
                aggregate_version, event_type, payload, occurred_at, traceparent,
                correlation_id, causation_id, attempts, last_error))
             FROM (",
            $from,
            ")"
        )
    };
}
pub(crate) use rows_as_json;

/// An event as stored, with the relay's bookkeeping.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub position: i64,
    pub event: Event,
    pub attempts: u32,
    pub last_error: Option<String>,
}

type Row = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
);

/// A row that could not be decoded, with its position when that much is readable.
pub(crate) type Malformed = (i64, StoreError);

/// The position of a decoded or malformed row.
pub(crate) fn position(row: &Result<StoredEvent, Malformed>) -> i64 {
    match row {
        Ok(stored) => stored.position,
        Err((position, _)) => *position,
    }
}

/// Decodes each row on its own, so one damaged row is reported with its
/// position and does not spoil the rest of the batch.
pub(crate) fn decode(json: &str) -> Result<Vec<Result<StoredEvent, Malformed>>, StoreError> {
    let rows: Vec<&RawValue> = serde_json::from_str(json).map_err(corrupt)?;
    rows.into_iter()
        .map(|raw| match serde_json::from_str::<Row>(raw.get()) {
            Ok(row) => {
                let position = row.0;
                Ok(to_event(row).map_err(|e| (position, e)))
            }
            Err(e) => {
                let position = serde_json::from_str::<Vec<serde_json::Value>>(raw.get())
                    .ok()
                    .and_then(|cells| cells.first().and_then(serde_json::Value::as_i64))
                    .ok_or_else(|| corrupt(format!("unreadable row {}", raw.get())))?;
                Ok(Err((position, corrupt(e))))
            }
        })
        .collect()
}

fn to_event(row: Row) -> Result<StoredEvent, StoreError> {
    let (
        position,
        id,
        aggregate_type,
        aggregate_id,
        version,
        event_type,
        payload,
        occurred_at,
        traceparent,
        correlation_id,
        causation_id,
        attempts,
        last_error,
    ) = row;
    let event = Event {
        id: id.parse::<EventId>().map_err(corrupt)?,
        aggregate_type,
        aggregate_id,
        aggregate_version: u64::try_from(version)
            .map_err(|_| corrupt("negative aggregate_version"))?,
        event_type,
        payload: Payload::from_json(payload).map_err(corrupt)?,
        occurred_at: DateTime::parse_from_rfc3339(&occurred_at)
            .map_err(|e| corrupt(format!("occurred_at: {e}")))?
            .with_timezone(&Utc),
        metadata: Metadata {
            traceparent,
            correlation_id,
            causation_id,
        },
    };
    Ok(StoredEvent {
        position,
        event,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error,
    })
}
