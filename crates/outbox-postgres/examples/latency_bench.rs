//! Commit-to-publish latency at a steady rate: writers commit one event per
//! transaction on a fixed schedule, relays publish to an in-process
//! publisher that notes when each event arrived.
//!
//! ```text
//! cargo run --release -p outbox-postgres --example latency_bench -- [RATE] [SECONDS] [RELAYS] [WRITERS]
//! ```
//!
//! Defaults: 1,000 events/s for 10 s, 1 relay, 8 writers. Latency is the
//! time from the writer's `COMMIT` returning to the publisher receiving the
//! event (0 when the relay was quicker than the commit's reply). The first
//! second is not counted (connections warm up). Uses `OUTBOX_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/test`) and a schema of its
//! own, dropped at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::{Event, EventId, PublishRequest, PublishResult, Publisher, Relay, RelayConfig};
use outbox_postgres::PostgresOutbox;
use sqlx::postgres::PgPoolOptions;
use sqlx::AssertSqlSafe;

/// Notes when each event was first handed to it.
#[derive(Clone, Default)]
struct Timing {
    received: Arc<Mutex<HashMap<EventId, Instant>>>,
}

impl Publisher for Timing {
    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let now = Instant::now();
        if let Ok(mut received) = self.received.lock() {
            for event in request.events {
                received.entry(event.id).or_insert(now);
            }
        }
        vec![Ok(()); request.events.len()]
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rate: u32 = args.next().map_or(Ok(1000), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let relays: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let writers: u32 = args.next().map_or(Ok(8), |a| a.parse())?;
    if rate == 0 || writers == 0 {
        return Err("RATE and WRITERS must be at least 1".into());
    }
    let url = std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let pool = PgPoolOptions::new()
        .max_connections(writers + 2)
        .connect(&url)
        .await?;
    let outbox = PostgresOutbox::from_pool(pool.clone()).schema(&schema)?;
    outbox.migrate().await?;

    let publisher = Timing::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut relay_tasks = Vec::new();
    for _ in 0..relays {
        let store = PostgresOutbox::from_pool(
            PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await?,
        )
        .schema(&schema)?;
        let relay = Relay::new(store, publisher.clone(), RelayConfig::default())?;
        let stop = stop.clone();
        relay_tasks.push(tokio::spawn(async move {
            relay.run(async move { stop.notified().await }).await
        }));
    }
    // Let the relays go idle and listen.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Event n is due at start + n / rate; writer w commits the events n with
    // n % writers == w, each on an aggregate of its own.
    let total = u64::from(rate) * seconds;
    let started = Instant::now();
    let warm_up = started + Duration::from_secs(1);
    let mut writer_tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        let pool = pool.clone();
        writer_tasks.push(tokio::spawn(async move {
            let mut committed: Vec<(EventId, Instant)> = Vec::new();
            let mut versions: HashMap<u64, u64> = HashMap::new();
            let mut late = 0u64;
            let mut n = u64::from(w);
            while n < total {
                let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate));
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                } else if now - due > Duration::from_millis(5) {
                    late += 1;
                }
                let aggregate = n % 100;
                let version = versions.entry(aggregate).or_insert(0);
                *version += 1;
                let event = Event::builder(
                    "Order",
                    format!("w{w}-{aggregate}"),
                    *version,
                    "OrderUpdated",
                )
                .payload(&serde_json::json!({ "n": n }))
                .build()?;
                let id = event.id;
                let mut tx = pool.begin().await?;
                outbox.append(&mut tx, &[event]).await?;
                tx.commit().await?;
                committed.push((id, Instant::now()));
                n += u64::from(writers);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((committed, late))
        }));
    }
    let mut committed = Vec::new();
    let mut late = 0;
    for t in writer_tasks {
        let (c, l) = t.await?.map_err(|e| e.to_string())?;
        committed.extend(c);
        late += l;
    }
    let wrote_for = started.elapsed();
    // Wait for the last events.
    let until = Instant::now() + Duration::from_secs(30);
    while publisher.received.lock().map_or(0, |r| r.len()) < committed.len() {
        if Instant::now() > until {
            return Err("events still unpublished after 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.notify_waiters();
    for t in relay_tasks {
        t.await??;
    }

    let received = publisher
        .received
        .lock()
        .map_err(|e| e.to_string())?
        .clone();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter(|(_, at)| *at >= warm_up)
        .filter_map(|(id, at)| received.get(id).map(|p| p.saturating_duration_since(*at)))
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> Duration {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    println!(
        "{} events in {wrote_for:.1?} ({:.0}/s asked {rate}/s, {late} started over 5 ms late), {relays} relay(s), {writers} writers",
        committed.len(),
        committed.len() as f64 / wrote_for.as_secs_f64()
    );
    if latencies.is_empty() {
        println!("no events after the first second");
    } else {
        println!(
            "commit to publish over {} events: p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, p99.9 {:.2?}, max {:.2?}",
            latencies.len(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        );
    }
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await?;
    Ok(())
}
