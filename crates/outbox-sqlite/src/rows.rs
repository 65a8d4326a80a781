//! Outbox rows read in bulk. SQLite folds a batch into one JSON array
//! (`json_group_array`), so the batch leaves the driver's thread as one
//! value instead of one message per row, which is most of a claim's cost.
//!
//! A row is checked by the same rules as at write time; one that fails
//! (edited by hand, written by another program) is reported alone, with its
//! position, its fields as found and the reason, and spoils nothing else.

use chrono::{DateTime, Utc};
use outbox_core::{Event, EventId, Metadata, Payload};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::corrupt;
use outbox_core::StoreError;

/// `SELECT` of one JSON array holding every row of the subquery `$from`.
/// Each row is the array decoded by [`decode`]. `rows_as_json!(fast, "x";
/// ...)` selects the expression `x` as a second column.
///
/// `rows_as_json!(fast; ...)` reads the columns as they are, which is what
/// a claim does; but one text column holding a BLOB (edited by hand, written
/// by another program) makes `json_array` fail the whole batch.
/// `rows_as_json!(safe; ...)` then reads every such cell as
/// `{"blob": LENGTH}`, so only its row is refused.
macro_rules! rows_as_json {
    ($read:ident; $($from:expr),+) => {
        concat!(
            "SELECT json_group_array(", $crate::rows::row_as_json!($read), ") FROM (",
            $($from,)+
            ")"
        )
    };
    ($read:ident, $also:expr; $($from:expr),+) => {
        concat!(
            "SELECT json_group_array(", $crate::rows::row_as_json!($read), "), ", $also, " FROM (",
            $($from,)+
            ")"
        )
    };
}

/// One row as a JSON array, for [`rows_as_json`].
macro_rules! row_as_json {
    (fast) => {
        "json_array(position, id, aggregate_type, aggregate_id,
                aggregate_version, event_type, payload, occurred_at, traceparent,
                correlation_id, causation_id, attempts, last_error)"
    };
    (safe) => {
        "json_array(position,
                IIF(typeof(id) = 'blob', json_object('blob', length(id)), id),
                IIF(typeof(aggregate_type) = 'blob', json_object('blob', length(aggregate_type)), aggregate_type),
                IIF(typeof(aggregate_id) = 'blob', json_object('blob', length(aggregate_id)), aggregate_id),
                IIF(typeof(aggregate_version) = 'blob', json_object('blob', length(aggregate_version)), aggregate_version),
                IIF(typeof(event_type) = 'blob', json_object('blob', length(event_type)), event_type),
                IIF(typeof(payload) = 'blob', json_object('blob', length(payload)), payload),
                IIF(typeof(occurred_at) = 'blob', json_object('blob', length(occurred_at)), occurred_at),
                IIF(typeof(traceparent) = 'blob', json_object('blob', length(traceparent)), traceparent),
                IIF(typeof(correlation_id) = 'blob', json_object('blob', length(correlation_id)), correlation_id),
                IIF(typeof(causation_id) = 'blob', json_object('blob', length(causation_id)), causation_id),
                IIF(typeof(attempts) = 'blob', json_object('blob', length(attempts)), attempts),
                IIF(typeof(last_error) = 'blob', json_object('blob', length(last_error)), last_error))"
    };
}
pub(crate) use row_as_json;
pub(crate) use rows_as_json;

/// The columns of [`rows_as_json`], in order.
const COLUMNS: [&str; 13] = [
    "position",
    "id",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "event_type",
    "payload",
    "occurred_at",
    "traceparent",
    "correlation_id",
    "causation_id",
    "attempts",
    "last_error",
];

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

/// The position of a decoded or malformed row.
pub(crate) fn position(row: &Result<StoredEvent, BadRow>) -> i64 {
    match row {
        Ok(stored) => stored.position,
        Err(bad) => bad.position,
    }
}

/// Decodes each row on its own, so one damaged row is reported with its
/// position and does not spoil the rest of the batch.
pub(crate) fn decode(json: &str) -> Result<Vec<Result<StoredEvent, BadRow>>, StoreError> {
    let rows: Vec<&RawValue> = serde_json::from_str(json).map_err(corrupt)?;
    rows.into_iter().map(decode_row).collect()
}

fn decode_row(raw: &RawValue) -> Result<Result<StoredEvent, BadRow>, StoreError> {
    // The fast path: every cell of the type the schema promises.
    let reason = match serde_json::from_str::<Row>(raw.get()) {
        Ok(row) => match to_event(row) {
            Ok(stored) => return Ok(Ok(stored)),
            Err(reason) => reason,
        },
        Err(_) => String::new(),
    };
    // Something is off: name it, column by column. A cell JSON numbers
    // cannot hold (SQLite writes an infinite REAL as `9.0e+999`) is kept
    // as its text, so only its row is refused.
    let cells: Vec<Value> = serde_json::from_str::<Vec<&RawValue>>(raw.get())
        .map_err(corrupt)?
        .into_iter()
        .map(|cell| {
            serde_json::from_str(cell.get())
                .unwrap_or_else(|_| Value::String(cell.get().to_owned()))
        })
        .collect();
    let position = cells
        .first()
        .and_then(Value::as_i64)
        .ok_or_else(|| corrupt(format!("row without a position: {}", raw.get())))?;
    let reason = if reason.is_empty() {
        wrong_types(&cells)
    } else {
        reason
    };
    let last_error = cells.get(12).and_then(Value::as_str).map(str::to_owned);
    let raw = Value::Object(
        COLUMNS
            .iter()
            .zip(cells)
            .map(|(name, cell)| ((*name).to_owned(), cell))
            .collect(),
    );
    Ok(Err(BadRow {
        position,
        reason,
        raw,
        last_error,
    }))
}

/// Which cells are not of the type the schema promises.
fn wrong_types(cells: &[Value]) -> String {
    let optional = |i: usize| matches!(i, 8 | 9 | 10 | 12);
    let integer = |i: usize| matches!(i, 0 | 4 | 11);
    let problems: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let cell = cells.get(i).unwrap_or(&Value::Null);
            let found = match cell {
                Value::Object(o) if o.contains_key("blob") => {
                    format!("a BLOB of {} bytes", o["blob"])
                }
                Value::Null if optional(i) => return None,
                Value::Null => "NULL".to_owned(),
                Value::String(_) if !integer(i) => return None,
                Value::Number(n) if integer(i) && n.is_i64() => return None,
                other => format!("`{other}`"),
            };
            let want = if integer(i) { "an integer" } else { "text" };
            Some(format!("{name} holds {found}, not {want}"))
        })
        .collect();
    if problems.is_empty() {
        "the row does not have the outbox's columns".to_owned()
    } else {
        problems.join("; ")
    }
}

fn to_event(row: Row) -> Result<StoredEvent, String> {
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
        id: id.parse::<EventId>().map_err(|e| e.to_string())?,
        aggregate_type,
        aggregate_id,
        aggregate_version: u64::try_from(version)
            .map_err(|_| format!("aggregate_version {version} is negative"))?,
        event_type,
        payload: Payload::from_json(payload).map_err(|e| e.to_string())?,
        occurred_at: DateTime::parse_from_rfc3339(&occurred_at)
            .map_err(|e| format!("occurred_at `{occurred_at}`: {e}"))?
            .with_timezone(&Utc),
        metadata: Metadata {
            traceparent,
            correlation_id,
            causation_id,
        },
    };
    // The rules every write passed.
    event.validate().map_err(|e| e.to_string())?;
    Ok(StoredEvent {
        position,
        event,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error,
    })
}
