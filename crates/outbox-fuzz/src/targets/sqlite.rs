//! SQLite outbox rows: column values of any SQLite type (NULL, INTEGER,
//! REAL, TEXT, BLOB) written into a real outbox table, then read the way
//! the relay (`claim`) and the operator (`dead_letters`) read them.

use std::time::Duration;

use fastrand::Rng;
use outbox_core::{ClaimRequest, ClaimSource, DeadLetters, EventId};
use outbox_sqlite::SqliteOutbox;
use serde_json::Value;
use sqlx::sqlite::SqlitePoolOptions;

use crate::corpus;
use crate::mutate::{mutate_string, odd_string};
use crate::runner::{refusal, Target, Verdict};

/// One cell, of any of SQLite's storage classes.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// The columns written, in order; `status` last.
const COLUMNS: [&str; 12] = [
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

/// Columns that may hold NULL (the others are `NOT NULL`).
fn nullable(column: usize) -> bool {
    matches!(column, 7 | 8 | 9 | 11)
}

/// What a row refusal may name: a column, or an envelope field.
const ROW_NAMES: &[&str] = &[
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

/// A generated row and whether it is pending (claimed) or dead (listed).
#[derive(Debug, Clone)]
pub struct Row {
    pub cells: Vec<Cell>,
    pub dead: bool,
}

/// The companion row written beside each generated one: it must come out
/// whole whatever the other row holds.
const COMPANION_ID: &str = "019aaa52-ffff-7000-8000-000000000000";

fn companion() -> Vec<Cell> {
    vec![
        Cell::Text(COMPANION_ID.to_owned()),
        Cell::Text("Companion".to_owned()),
        Cell::Text("c-1".to_owned()),
        Cell::Integer(1),
        Cell::Text("CompanionCreated".to_owned()),
        Cell::Text("{}".to_owned()),
        Cell::Text("2026-11-22T09:20:00.000000Z".to_owned()),
        Cell::Null,
        Cell::Null,
        Cell::Null,
        Cell::Integer(0),
        Cell::Null,
    ]
}

/// Rows as the writer stores the fixture envelopes.
fn seed_rows() -> Vec<Vec<Cell>> {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Cell::Text(s.clone()),
        Some(Value::Null) | None => Cell::Null,
        Some(other) => Cell::Text(other.to_string()),
    };
    corpus::envelopes()
        .iter()
        .map(|e| {
            let occurred_at = e
                .get("occurred_at")
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| {
                    t.with_timezone(&chrono::Utc)
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                });
            vec![
                text(e.get("id")),
                text(e.get("aggregate_type")),
                text(e.get("aggregate_id")),
                Cell::Integer(
                    e.get("aggregate_version")
                        .and_then(Value::as_i64)
                        .unwrap_or(1),
                ),
                text(e.get("event_type")),
                Cell::Text(e.get("payload").map_or("{}".to_owned(), Value::to_string)),
                occurred_at.map_or(Cell::Null, Cell::Text),
                text(e.pointer("/metadata/traceparent")),
                text(e.pointer("/metadata/correlation_id")),
                text(e.pointer("/metadata/causation_id")),
                Cell::Integer(0),
                Cell::Null,
            ]
        })
        .collect()
}

/// Reads generated rows through a real outbox in an in-memory database.
#[derive(Debug)]
pub struct SqliteRows {
    seeds: Vec<Vec<Cell>>,
    known: Vec<String>,
    runtime: tokio::runtime::Runtime,
    outbox: SqliteOutbox,
}

impl SqliteRows {
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        let outbox = runtime.block_on(async {
            // One connection kept open: the in-memory database lives with it.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect("sqlite::memory:")
                .await
                .map_err(|e| e.to_string())?;
            SqliteOutbox::from_pool(pool)
                .await
                .map_err(|e| e.to_string())
        })?;
        let seeds = seed_rows();
        let mut known = Vec::new();
        for row in &seeds {
            for cell in row {
                if let Cell::Text(s) = cell {
                    known.push(s.clone());
                }
            }
        }
        Ok(Self {
            seeds,
            known,
            runtime,
            outbox,
        })
    }

    fn mutate_cell(&self, rng: &mut Rng, column: usize, cell: &mut Cell) {
        let choice = rng.usize(..10);
        *cell = match (choice, &*cell) {
            (0..=3, Cell::Text(s)) => Cell::Text(mutate_string(rng, s, &self.known, 0)),
            (0..=1, Cell::Integer(_)) => Cell::Integer(
                [i64::MIN, -1, 0, 1, 2, i64::MAX, i64::from(u32::MAX) + 1][rng.usize(..7)],
            ),
            (4, _) if nullable(column) => Cell::Null,
            (5, _) => Cell::Integer(rng.i64(..)),
            (6, _) => Cell::Real(
                [0.5, -0.0, 1e308, -1e308, f64::INFINITY, 1.0, 3.000_000_1][rng.usize(..7)],
            ),
            (7, _) => Cell::Blob(match rng.usize(..3) {
                0 => (0..rng.usize(..64)).map(|_| rng.u8(..)).collect(),
                1 => b"\xff\xfe{\"a\":1}".to_vec(),
                _ => match &*cell {
                    // The same text, stored as a BLOB.
                    Cell::Text(s) => s.clone().into_bytes(),
                    _ => b"1".to_vec(),
                },
            }),
            (8, _) => Cell::Text(odd_string(rng, &self.known)),
            _ => Cell::Text(
                self.known
                    .get(rng.usize(..self.known.len().max(1)))
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
    }

    async fn write(&self, cells: &[Cell], dead: bool) -> Result<(), sqlx::Error> {
        let mut query = sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, aggregate_version, event_type,
                payload, occurred_at, traceparent, correlation_id, causation_id, attempts,
                last_error, status, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0, 0)",
        );
        for cell in cells {
            query = match cell {
                Cell::Null => query.bind(None::<String>),
                Cell::Integer(i) => query.bind(*i),
                Cell::Real(r) => query.bind(*r),
                Cell::Text(s) => query.bind(s.clone()),
                Cell::Blob(b) => query.bind(b.clone()),
            };
        }
        query
            .bind(if dead { "dead" } else { "pending" })
            .execute(self.outbox.pool())
            .await
            .map(|_| ())
    }

    async fn read(&self, row: &Row) -> Verdict {
        // The previous input's claim is never settled: its lease goes too.
        if let Err(e) = sqlx::raw_sql("DELETE FROM outbox; DELETE FROM outbox_leases")
            .execute(self.outbox.pool())
            .await
        {
            return Verdict::Broken(format!("could not empty the outbox: {e}"));
        }
        if let Err(e) = self.write(&companion(), row.dead).await {
            return Verdict::Broken(format!("could not write the companion row: {e}"));
        }
        if self.write(&row.cells, row.dead).await.is_err() {
            // The schema refused the row (NOT NULL, UNIQUE): it never
            // reaches the decoder.
            return Verdict::Refused;
        }
        if row.dead {
            self.read_dead_letters(row).await
        } else {
            self.claim().await
        }
    }

    async fn claim(&self) -> Verdict {
        let request = ClaimRequest::new(10, Duration::from_secs(60));
        let claimed = match ClaimSource::claim(&self.outbox, request).await {
            Ok(claimed) => claimed,
            Err(e) => {
                return Verdict::Broken(format!("the claim failed as a whole: {e}"));
            }
        };
        let companion_ok = claimed
            .events
            .iter()
            .any(|c| c.event.id.to_string() == COMPANION_ID);
        if !companion_ok || claimed.events.len() + claimed.malformed.len() != 2 {
            return Verdict::Broken(format!(
                "the claim did not give both rows back whole: {} events ({}), {} malformed",
                claimed.events.len(),
                if companion_ok {
                    "companion included"
                } else {
                    "companion missing"
                },
                claimed.malformed.len()
            ));
        }
        for claimed_event in &claimed.events {
            if let Err(e) = claimed_event.event.validate() {
                return Verdict::Broken(format!("claimed an invalid event: {e}"));
            }
        }
        match claimed.malformed.first() {
            None => Verdict::Accepted,
            Some(bad) => refusal(&bad.reason, ROW_NAMES),
        }
    }

    async fn read_dead_letters(&self, row: &Row) -> Verdict {
        let letters = match DeadLetters::dead_letters(&self.outbox, 10).await {
            Ok(letters) => letters,
            Err(e) => return Verdict::Broken(format!("listing dead letters failed: {e}")),
        };
        let companion_ok = letters
            .iter()
            .any(|l| l.event.as_ref().map(|e| e.id) == COMPANION_ID.parse::<EventId>().ok());
        if !companion_ok || letters.len() != 2 {
            return Verdict::Broken(format!(
                "the dead letters did not list both rows whole: {letters:?}"
            ));
        }
        let Some(other) = letters.iter().find(|l| l.reference != COMPANION_ID) else {
            return Verdict::Broken("the generated row is not listed".to_owned());
        };
        match (&other.event, &other.raw) {
            (Some(event), None) => match event.validate() {
                Ok(()) => Verdict::Accepted,
                Err(e) => Verdict::Broken(format!("listed an invalid event: {e}")),
            },
            (None, Some(_)) => {
                // The row's own last error wins when it has one.
                let Some(reason) = &other.last_error else {
                    return Verdict::Broken("a malformed row listed without a reason".to_owned());
                };
                if !matches!(row.cells.get(11), Some(Cell::Null) | None) {
                    return Verdict::Refused;
                }
                refusal(reason, ROW_NAMES)
            }
            _ => Verdict::Broken(format!("a dead letter with neither or both: {other:?}")),
        }
    }
}

impl Target for SqliteRows {
    type Input = Row;

    fn name(&self) -> &'static str {
        "sqlite-rows"
    }

    fn generate(&self, rng: &mut Rng) -> Row {
        let mut cells = self
            .seeds
            .get(rng.usize(..self.seeds.len().max(1)))
            .cloned()
            .unwrap_or_else(companion);
        if rng.usize(..20) != 0 {
            let rate = rng.usize(1..6);
            let mut changed = false;
            for (column, cell) in cells.iter_mut().enumerate() {
                if rng.usize(..COLUMNS.len()) < rate {
                    self.mutate_cell(rng, column, cell);
                    changed = true;
                }
            }
            if !changed {
                let column = rng.usize(..COLUMNS.len());
                self.mutate_cell(rng, column, &mut cells[column]);
            }
        }
        Row {
            cells,
            dead: rng.usize(..5) == 0,
        }
    }

    fn dump(&self, input: &Row) -> Vec<u8> {
        let mut out = format!("status: {}\n", if input.dead { "dead" } else { "pending" });
        for (name, cell) in COLUMNS.iter().zip(&input.cells) {
            out.push_str(&format!("{name}: {cell:?}\n"));
        }
        out.into_bytes()
    }

    fn check(&self, row: &Row) -> Verdict {
        self.runtime.block_on(self.read(row))
    }
}
