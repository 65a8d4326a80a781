//! What the outbox adds to a business transaction, beside what the
//! simplest outbox adds: a one-row INSERT transaction; the same plus one
//! bare row in a plain outbox table (an identity key, the event's columns,
//! `processed_at` and a partial index on the unprocessed: what a user writes
//! by hand), as a statement of its own and sent in the COMMIT's message;
//! the same with one event carried by the commit (`PostgresTransaction`),
//! with the notification on and off; and with `append` as a statement of
//! its own. All run in turns on one connection so that they see the same
//! machine.
//!
//! ```text
//! cargo run --release -p outbox-postgres --example append_overhead -- [ROUNDS]
//! ```
//!
//! Uses `OUTBOX_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and a schema of its own, dropped at the end.

use std::time::{Duration, Instant};

use outbox_core::Event;
use outbox_postgres::PostgresOutbox;
use sqlx::postgres::PgPoolOptions;
use sqlx::AssertSqlSafe;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    BareStatement,
    BareCarried,
    Carried,
    CarriedQuiet,
    Statement,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(2000), |a| a.parse())?;
    let url = std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    // One connection: every transaction pays the same round trips.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    let outbox = PostgresOutbox::from_pool(pool.clone()).schema(&schema)?;
    outbox.migrate().await?;
    let quiet = outbox.clone().notify(false);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {schema}.orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL);
         CREATE TABLE {schema}.plain_outbox (
             id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             event_id UUID NOT NULL,
             aggregate_type TEXT NOT NULL,
             aggregate_id TEXT NOT NULL,
             aggregate_version BIGINT NOT NULL,
             event_type TEXT NOT NULL,
             payload TEXT NOT NULL,
             occurred_at TIMESTAMPTZ NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             processed_at TIMESTAMPTZ);
         CREATE INDEX ON {schema}.plain_outbox (id) WHERE processed_at IS NULL;"
    )))
    .execute(&pool)
    .await?;

    let kinds = [
        Kind::Plain,
        Kind::BareStatement,
        Kind::BareCarried,
        Kind::Carried,
        Kind::CarriedQuiet,
        Kind::Statement,
    ];
    let mut times: [Vec<Duration>; 6] = Default::default();
    let mut key = 0i64;
    // A warm-up round of each, not counted.
    for round in 0..=rounds {
        // Rotate the order so no kind always follows another.
        for i in 0..kinds.len() {
            let kind = kinds[(i + round) % kinds.len()];
            key += 1;
            let outbox = if kind == Kind::CarriedQuiet {
                &quiet
            } else {
                &outbox
            };
            let took = one_transaction(outbox, &schema, key, kind).await?;
            if round > 0 {
                times[kinds.iter().position(|k| *k == kind).unwrap_or(0)].push(took);
            }
        }
    }
    let [plain, bare, bare_carried, carried, quiet, statement] = times.map(|mut t| summary(&mut t));
    println!("{rounds} transactions of each kind, in turns, one connection");
    println!("{:<48} {}", "INSERT one row", show(plain));
    for (name, s) in [
        ("+ one bare outbox row (a statement)", bare),
        (
            "+ one bare outbox row (in the COMMIT's message)",
            bare_carried,
        ),
        ("+ one event carried by the commit", carried),
        ("  the same, notification off", quiet),
        ("+ one event by `append` (a statement)", statement),
    ] {
        println!(
            "{name:<48} {}  (mean {:+.1}%, median {:+.1}%)",
            show(s),
            percent(s.0, plain.0),
            percent(s.1, plain.1)
        );
    }
    // What each adds, against what the bare row adds the same way.
    let added = |s: (Duration, Duration, Duration)| s.1.saturating_sub(plain.1).as_secs_f64();
    println!(
        "median added: carried commit {:.3} ms = {:.2} x the bare row in the COMMIT's message ({:.3} ms); append statement {:.3} ms = {:.2} x the bare row statement ({:.3} ms)",
        added(carried) * 1e3,
        added(carried) / added(bare_carried).max(f64::MIN_POSITIVE),
        added(bare_carried) * 1e3,
        added(statement) * 1e3,
        added(statement) / added(bare).max(f64::MIN_POSITIVE),
        added(bare) * 1e3,
    );
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await?;
    Ok(())
}

async fn one_transaction(
    outbox: &PostgresOutbox,
    schema: &str,
    key: i64,
    kind: Kind,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let event = Event::builder("Order", format!("order-{key}"), 1, "OrderCreated")
        .payload(&serde_json::json!({ "order": key, "total": 99 }))
        .build()?;
    let insert = AssertSqlSafe(format!(
        "INSERT INTO {schema}.orders (id, total) VALUES ($1, $2)"
    ));
    let started = Instant::now();
    // The same transaction type for every kind: only the events differ.
    let mut tx = outbox.begin().await?;
    sqlx::query(insert)
        .bind(key)
        .bind(99_i64)
        .execute(&mut *tx)
        .await?;
    let bare_row = |values: &str| {
        format!(
            "INSERT INTO {schema}.plain_outbox (event_id, aggregate_type, aggregate_id,
                 aggregate_version, event_type, payload, occurred_at) VALUES ({values})"
        )
    };
    match kind {
        Kind::Plain => {}
        Kind::BareStatement => {
            sqlx::query(AssertSqlSafe(bare_row("$1::uuid, $2, $3, $4, $5, $6, $7")))
                .bind(event.id.to_string())
                .bind(&event.aggregate_type)
                .bind(&event.aggregate_id)
                .bind(event.aggregate_version as i64)
                .bind(&event.event_type)
                .bind(event.payload.as_str())
                .bind(event.occurred_at)
                .execute(&mut *tx)
                .await?;
        }
        Kind::BareCarried => {
            // The row's literals and the COMMIT in one message, as the
            // carried commit sends its events.
            let values = format!(
                "'{}', 'Order', '{}', 1, 'OrderCreated', '{}', '{}'",
                event.id,
                event.aggregate_id,
                event.payload.as_str(),
                event.occurred_at.to_rfc3339()
            );
            sqlx::raw_sql(AssertSqlSafe(format!("{}; COMMIT", bare_row(&values))))
                .execute(&mut *tx)
                .await?;
            let took = started.elapsed();
            // Committed already: this ROLLBACK only closes the value (untimed).
            tx.rollback().await?;
            return Ok(took);
        }
        Kind::Carried | Kind::CarriedQuiet => tx.append(&[event])?,
        Kind::Statement => outbox.append(&mut tx, &[event]).await?,
    }
    tx.commit().await?;
    Ok(started.elapsed())
}

/// Mean, median and 99th percentile.
fn summary(times: &mut [Duration]) -> (Duration, Duration, Duration) {
    if times.is_empty() {
        return Default::default();
    }
    times.sort_unstable();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    let at = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (mean, at(0.5), at(0.99))
}

fn show((mean, median, p99): (Duration, Duration, Duration)) -> String {
    format!("mean {mean:>9.2?}  median {median:>9.2?}  p99 {p99:>9.2?}")
}

fn percent(value: Duration, base: Duration) -> f64 {
    (value.as_secs_f64() / base.as_secs_f64().max(f64::MIN_POSITIVE) - 1.0) * 100.0
}
