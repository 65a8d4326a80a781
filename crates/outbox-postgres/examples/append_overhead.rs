//! What the outbox adds to a business transaction: a one-row INSERT
//! transaction; the same with one event carried by the commit
//! (`PostgresTransaction`), with the notification on and off; and the same
//! with `append` as a statement of its own. All run in turns on one
//! connection so that they see the same machine.
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
        "CREATE TABLE {schema}.orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await?;

    let kinds = [
        Kind::Plain,
        Kind::Carried,
        Kind::CarriedQuiet,
        Kind::Statement,
    ];
    let mut times: [Vec<Duration>; 4] = Default::default();
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
    let [plain, carried, quiet, statement] = times.map(|mut t| summary(&mut t));
    println!("{rounds} transactions of each kind, in turns, one connection");
    println!("{:<44} {}", "INSERT one row", show(plain));
    for (name, s) in [
        ("+ one event carried by the commit", carried),
        ("  the same, notification off", quiet),
        ("+ one event by `append` (a statement)", statement),
    ] {
        println!(
            "{name:<44} {}  (mean {:+.1}%, median {:+.1}%)",
            show(s),
            percent(s.0, plain.0),
            percent(s.1, plain.1)
        );
    }
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
    match kind {
        Kind::Plain => {}
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
