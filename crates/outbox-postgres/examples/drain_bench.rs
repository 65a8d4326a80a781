//! Drains a backlog through the relay to a publisher that sends nowhere,
//! measuring the store alone:
//!
//! ```text
//! cargo run --release -p outbox-postgres --example drain_bench -- [EVENTS] [AGGREGATES] [RELAYS] [sync]
//! ```
//!
//! With `sync`, settlements wait for their disk flush
//! (`PostgresOutbox::synchronous_settlements`).
//!
//! Uses `OUTBOX_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and a schema of its own, dropped at the end.

use std::time::{Duration, Instant};

use outbox_core::publishers::NullPublisher;
use outbox_core::{Event, Relay, RelayConfig, Stats};
use outbox_postgres::PostgresOutbox;
use sqlx::postgres::PgPoolOptions;
use sqlx::AssertSqlSafe;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let aggregates: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let relays: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let synchronous = args.next().is_some_and(|a| a == "sync");
    let url = std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    let outbox = PostgresOutbox::from_pool(pool.clone()).schema(&schema)?;
    outbox.migrate().await?;

    // The backlog: versions 1, 2, ... of each aggregate, 1,000 events a transaction.
    let written = Instant::now();
    let mut next_version = vec![0u64; aggregates];
    let mut batch = Vec::with_capacity(1000);
    for n in 0..events {
        let a = n % aggregates;
        next_version[a] += 1;
        batch.push(
            Event::builder(
                "Order",
                format!("order-{a}"),
                next_version[a],
                "OrderUpdated",
            )
            .payload(&serde_json::json!({ "order": a, "total": n }))
            .build()?,
        );
        if batch.len() == 1000 || n + 1 == events {
            let mut tx = pool.begin().await?;
            outbox.append(&mut tx, &batch).await?;
            tx.commit().await?;
            batch.clear();
        }
    }
    println!(
        "wrote {events} events over {aggregates} aggregates in {:?}",
        written.elapsed()
    );
    sqlx::raw_sql(AssertSqlSafe(format!("VACUUM ANALYZE {schema}.outbox")))
        .execute(&pool)
        .await?;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..relays {
        let store = PostgresOutbox::from_pool(
            PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await?,
        )
        .schema(&schema)?
        .synchronous_settlements(synchronous);
        let relay = Relay::new(store, NullPublisher, RelayConfig::default().batch_size(500))?;
        tasks.push(tokio::spawn(async move {
            // Several relays: each drains until nothing is claimable, then
            // waits a moment in case another relay released something.
            loop {
                let report = relay.drain().await?;
                if report.claimed == 0 {
                    if relay.source().stats().await?.pending == 0 {
                        return Ok::<_, outbox_core::StoreError>(());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let stats = outbox.stats().await?;
    println!(
        "drained {} events with {relays} relay(s){} in {elapsed:?}: {:.0} events/s (pending {}, dead {})",
        stats.published,
        if synchronous {
            ", synchronous settlements"
        } else {
            ""
        },
        stats.published as f64 / elapsed.as_secs_f64(),
        stats.pending,
        stats.dead
    );
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await?;
    Ok(())
}
