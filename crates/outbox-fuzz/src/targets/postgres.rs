//! PostgreSQL outbox rows: column values of any kind PostgreSQL's types
//! hold (±infinity and far-off times, huge and odd text, extreme numbers,
//! wrong-looking ids) written by hand into a real outbox schema, beside a
//! row the store appended, then read the way the relay (`claim`, `settle`)
//! and the operator (`stats`, `dead_letters`, `purge`) read them.
//!
//! Half the inputs go through the schema's checks (a refusal must name its
//! rule); the other half around them, as the append writes and as rows
//! written before schema version 5 were. Either way nothing may fail as a
//! whole: the appended row comes out whole, the hand-written one is an
//! event or a dead letter with its reason.

use std::time::Duration;

use chrono::Utc;
use fastrand::Rng;
use outbox_core::{ClaimRequest, ClaimSource, DeadLetters, Event, Purge, Settlements, Stats};
use outbox_postgres::PostgresOutbox;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::AssertSqlSafe;

use crate::corpus;
use crate::mutate::{mutate_string, odd_string};
use crate::runner::{refusal, Target, Verdict};

/// The columns written, in order, with the type each value is cast to.
const COLUMNS: [(&str, &str); 11] = [
    ("id", "text"),
    ("aggregate_type", "text"),
    ("aggregate_id", "text"),
    ("aggregate_version", "bigint"),
    ("event_type", "text"),
    ("payload", "text"),
    ("occurred_at", "timestamptz"),
    ("traceparent", "text"),
    ("correlation_id", "text"),
    ("causation_id", "text"),
    ("created_at", "timestamptz"),
];

/// What a refusal may name: a column, an envelope field, a rule.
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
    "metadata",
    "created_at",
];

/// Times PostgreSQL holds that no event can carry, and ordinary ones.
const TIMES: &[&str] = &[
    "infinity",
    "-infinity",
    "294276-12-31 23:59:59.999999+00",
    "4713-01-01 00:00:00+00 BC",
    "0001-01-01 00:00:00+00",
    "0001-01-01 00:00:00+00 BC",
    "9999-12-31 23:59:59.999999+00",
    "10000-01-01 00:00:00+00",
    "epoch",
    "now",
    "2026-11-22 09:20:00+14",
    "2026-11-22T09:20:00.123456789Z",
    "2999-01-01 00:00:00+00",
];

const NUMBERS: &[&str] = &[
    "-9223372036854775808",
    "9223372036854775807",
    "-1",
    "0",
    "1",
    "2",
    "4294967296",
    "1e3",
    "01",
    " 7 ",
];

/// A generated row: each cell the text cast to its column's type, or NULL;
/// whether it goes into the schema without checks.
#[derive(Debug, Clone)]
pub struct Row {
    pub cells: Vec<Option<String>>,
    pub unchecked: bool,
}

/// Reads generated rows through real outbox schemas on the machine's
/// PostgreSQL (`OUTBOX_TEST_POSTGRES`, or 127.0.0.1:5432/test).
#[derive(Debug)]
pub struct PostgresRows {
    seeds: Vec<Vec<Option<String>>>,
    known: Vec<String>,
    runtime: tokio::runtime::Runtime,
    checked: PostgresOutbox,
    unchecked: PostgresOutbox,
}

/// Largest payload read; larger ones are dead-lettered by the claim.
const MAX_PAYLOAD: usize = 64 * 1024;

impl PostgresRows {
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let url = std::env::var("OUTBOX_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let (checked, unchecked) = runtime.block_on(async {
            // One connection: the inputs run one at a time.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
            let mut made = Vec::new();
            for name in ["fuzz_rows_checked", "fuzz_rows_unchecked"] {
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .execute(&pool)
                .await
                .map_err(|e| e.to_string())?;
                let outbox = PostgresOutbox::from_pool(pool.clone())
                    .schema(name)
                    .map_err(|e| e.to_string())?
                    .max_payload_bytes(MAX_PAYLOAD)
                    .queue_vacuum_every(0);
                outbox.migrate().await.map_err(|e| e.to_string())?;
                made.push(outbox);
            }
            let unchecked = made.pop().ok_or("no schema")?;
            let checked = made.pop().ok_or("no schema")?;
            Ok::<_, String>((checked, unchecked))
        })?;
        let seeds = seed_rows();
        let known = seeds.iter().flatten().flatten().cloned().collect();
        Ok(Self {
            seeds,
            known,
            runtime,
            checked,
            unchecked,
        })
    }

    fn mutate_cell(&self, rng: &mut Rng, column: usize, cell: &mut Option<String>) {
        let kind = COLUMNS[column].1;
        *cell = match (rng.usize(..10), kind) {
            (0..=2, "timestamptz") => Some(TIMES[rng.usize(..TIMES.len())].to_owned()),
            (0..=2, "bigint") => Some(NUMBERS[rng.usize(..NUMBERS.len())].to_owned()),
            (0..=3, _) => Some(mutate_string(
                rng,
                cell.as_deref().unwrap_or_default(),
                &self.known,
                0,
            )),
            (4, _) => None,
            (5, _) => Some(match rng.usize(..3) {
                // Text far longer than any event's field, or a payload over the limit.
                0 => "x".repeat(rng.usize(500..2_000)),
                1 => format!("\"{}\"", "y".repeat(MAX_PAYLOAD + rng.usize(..100))),
                _ => " ".repeat(rng.usize(1..5)),
            }),
            (6, _) => Some(rng.i64(..).to_string()),
            (7, _) => Some(odd_string(rng, &self.known)),
            _ => self
                .known
                .get(rng.usize(..self.known.len().max(1)))
                .cloned(),
        };
    }

    async fn read(&self, row: &Row) -> Verdict {
        let outbox = if row.unchecked {
            &self.unchecked
        } else {
            &self.checked
        };
        let schema = outbox.schema_name();
        // Each input on empty tables: the previous one's rows, leases and
        // versions go.
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(format!(
            "DELETE FROM {schema}.outbox; DELETE FROM {schema}.outbox_queue;
             DELETE FROM {schema}.outbox_dead; DELETE FROM {schema}.outbox_leases;
             DELETE FROM {schema}.outbox_aggregates; DELETE FROM {schema}.outbox_published"
        )))
        .execute(outbox.pool())
        .await
        {
            return Verdict::Broken(format!("could not empty the outbox: {e}"));
        }
        let companion = match companion() {
            Ok(event) => event,
            Err(e) => return Verdict::Broken(e),
        };
        let mut tx = match outbox.begin().await {
            Ok(tx) => tx,
            Err(e) => return Verdict::Broken(format!("begin: {e}")),
        };
        if let Err(e) = tx.append(std::slice::from_ref(&companion)) {
            return Verdict::Broken(format!("the companion event: {e}"));
        }
        if let Err(e) = tx.commit().await {
            return Verdict::Broken(format!("could not append the companion event: {e}"));
        }
        if let Err(e) = self.write(outbox, &row.cells, row.unchecked).await {
            return refused_by_schema(&e);
        }
        self.relay(outbox, &companion).await
    }

    /// Inserts the row as a writer in another language would, or (when
    /// `unchecked`) around the schema's checks, as schema version 4 let
    /// rows in: the way the append writes, with its queue entry.
    async fn write(
        &self,
        outbox: &PostgresOutbox,
        cells: &[Option<String>],
        unchecked: bool,
    ) -> Result<(), sqlx::Error> {
        let schema = outbox.schema_name();
        let names: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
        let values: Vec<String> = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}", i + 1, c.1))
            .collect();
        let mut tx = outbox.pool().begin().await?;
        if unchecked {
            sqlx::query("SELECT set_config($1, 'y', true)")
                .bind(format!("outbox_appending.{schema}"))
                .execute(&mut *tx)
                .await?;
        }
        let mut query = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {schema}.outbox ({}) VALUES ({}) RETURNING position",
            names.join(", "),
            values.join(", ")
        )));
        for cell in cells {
            query = query.bind(cell.as_deref());
        }
        let position: i64 = query.fetch_one(&mut *tx).await?;
        if unchecked {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version,
                    written_at, created_ahead)
                 SELECT position, {schema}.outbox_aggregate_key(aggregate_type, aggregate_id),
                        aggregate_version, clock_timestamp(),
                        NOT coalesce(created_at <= clock_timestamp(), false)
                 FROM {schema}.outbox WHERE position = $1"
            )))
            .bind(position)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Claims both rows, settles them (the hand-written one published if
    /// it reads as an event, dead-lettered if not), then asks for the
    /// figures, the dead letters and a purge.
    async fn relay(&self, outbox: &PostgresOutbox, companion: &Event) -> Verdict {
        let request = ClaimRequest::new(10, Duration::from_secs(60));
        let claimed = match ClaimSource::claim(outbox, request).await {
            Ok(claimed) => claimed,
            Err(e) => return Verdict::Broken(format!("the claim failed as a whole: {e}")),
        };
        let companion_ok = claimed.events.iter().any(|c| c.event == *companion);
        if !companion_ok || claimed.len() != 2 {
            return Verdict::Broken(format!(
                "the claim did not give both rows back whole: {} events (companion {}), {} malformed",
                claimed.events.len(),
                if companion_ok { "whole" } else { "missing or changed" },
                claimed.malformed.len()
            ));
        }
        for c in &claimed.events {
            if let Err(e) = c.event.validate() {
                return Verdict::Broken(format!("claimed an invalid event: {e}"));
            }
        }
        let reason = claimed.malformed.first().map(|m| m.reason.clone());
        let mut settlements = Settlements::default();
        settlements.published = claimed.events.iter().map(|c| c.receipt).collect();
        settlements.dead = claimed
            .malformed
            .iter()
            .map(|m| (m.receipt, format!("malformed: {}", m.reason)))
            .collect();
        match outbox.settle(claimed.lease, settlements).await {
            Ok(2) => {}
            Ok(n) => return Verdict::Broken(format!("settled {n} of 2")),
            Err(e) => return Verdict::Broken(format!("settle failed: {e}")),
        }
        let stats = match outbox.stats().await {
            Ok(stats) => stats,
            Err(e) => return Verdict::Broken(format!("stats failed: {e}")),
        };
        let dead = u64::from(reason.is_some());
        if (stats.pending, stats.published, stats.dead) != (0, 2 - dead, dead) {
            return Verdict::Broken(format!("the figures are wrong: {stats:?}"));
        }
        match outbox.dead_letters(10).await {
            Ok(letters) if letters.len() as u64 == dead => {
                if let Some(letter) = letters.first() {
                    if letter.raw.is_none() || letter.last_error.is_none() {
                        return Verdict::Broken(format!(
                            "a dead letter without its fields or reason: {letter:?}"
                        ));
                    }
                    // A payload within the limit is kept whole (escaped, it
                    // may double); anything longer is cut.
                    if letter.raw.as_ref().map_or(0, |r| r.to_string().len())
                        > 2 * MAX_PAYLOAD + 16 * 1024
                    {
                        return Verdict::Broken(
                            "a dead letter carried overlong text whole".to_owned(),
                        );
                    }
                }
            }
            Ok(letters) => return Verdict::Broken(format!("dead letters listed: {letters:?}")),
            Err(e) => return Verdict::Broken(format!("listing dead letters failed: {e}")),
        }
        match outbox
            .purge_published(Utc::now() + chrono::Duration::seconds(1))
            .await
        {
            Ok(n) if n == 2 - dead => {}
            Ok(n) => return Verdict::Broken(format!("purged {n} of {}", 2 - dead)),
            Err(e) => return Verdict::Broken(format!("purge failed: {e}")),
        }
        match reason {
            None => Verdict::Accepted,
            Some(reason) => refusal(&reason, ROW_NAMES),
        }
    }
}

/// A row the database refused: with a clear error (a check, a type's
/// input syntax, a version rule, a NUL byte the driver would not send),
/// or a failure that says nothing.
fn refused_by_schema(e: &sqlx::Error) -> Verdict {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 22: data exceptions (bad input syntax, out of range, NUL in
            // text); 23: integrity (NOT NULL, UNIQUE, CHECK); 54000: a
            // value too large for an index (an id of kilobytes written
            // around the checks); OB409: the version rule.
            if code.starts_with("22")
                || code.starts_with("23")
                || code == "54000"
                || code == "OB409"
            {
                Verdict::Refused
            } else {
                Verdict::Broken(format!(
                    "refused with an unexpected error {code}: {}",
                    db.message()
                ))
            }
        }
        sqlx::Error::Encode(_) => Verdict::Refused,
        e => Verdict::Broken(format!("the insert failed: {e}")),
    }
}

/// The event appended beside each hand-written row: it must come out whole.
fn companion() -> Result<Event, String> {
    Event::builder("Companion", "c-1", 1, "CompanionCreated")
        .payload(&serde_json::json!({ "n": 1 }))
        .build()
        .map_err(|e| e.to_string())
}

/// Rows as a writer in another language would write the fixture envelopes.
fn seed_rows() -> Vec<Vec<Option<String>>> {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    corpus::envelopes()
        .iter()
        .map(|e| {
            vec![
                text(e.get("id")),
                text(e.get("aggregate_type")),
                text(e.get("aggregate_id")),
                Some(
                    e.get("aggregate_version")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                        .to_string(),
                ),
                text(e.get("event_type")),
                Some(e.get("payload").map_or("{}".to_owned(), Value::to_string)),
                text(e.get("occurred_at")),
                text(e.pointer("/metadata/traceparent")),
                text(e.pointer("/metadata/correlation_id")),
                text(e.pointer("/metadata/causation_id")),
                Some("now".to_owned()),
            ]
        })
        .collect()
}

impl Target for PostgresRows {
    type Input = Row;

    fn name(&self) -> &'static str {
        "postgres-rows"
    }

    fn generate(&self, rng: &mut Rng) -> Row {
        let mut cells = self
            .seeds
            .get(rng.usize(..self.seeds.len().max(1)))
            .cloned()
            .unwrap_or_default();
        cells.resize(COLUMNS.len(), None);
        if rng.usize(..20) != 0 {
            let rate = rng.usize(1..5);
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
            unchecked: rng.bool(),
        }
    }

    fn dump(&self, input: &Row) -> Vec<u8> {
        let mut out = format!(
            "schema: {}\n",
            if input.unchecked {
                "around the checks (as schema version 4 let rows in)"
            } else {
                "checked"
            }
        );
        for ((name, kind), cell) in COLUMNS.iter().zip(&input.cells) {
            out.push_str(&format!("{name} ({kind}): {cell:?}\n"));
        }
        out.into_bytes()
    }

    fn check(&self, row: &Row) -> Verdict {
        self.runtime.block_on(self.read(row))
    }
}
