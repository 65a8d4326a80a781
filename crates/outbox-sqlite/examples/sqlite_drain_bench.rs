//! The SQLite half of `outbox bench`, without the CLI's other stores and
//! brokers, so it builds in a minute and two versions of the store can be
//! run side by side:
//!
//! ```sh
//! cargo run --release -p outbox-sqlite --example sqlite_drain_bench -- /tmp/b.db 100000          # drain only
//! cargo run --release -p outbox-sqlite --example sqlite_drain_bench -- /tmp/b.db 100000 1000 10  # + steady 1,000/s for 10 s
//! ```
//!
//! Writes a backlog of EVENTS (1,000 per transaction, one event per
//! aggregate), times one relay draining it to a null publisher (batches of
//! 1,000, as `outbox bench`), then optionally writes one event per
//! transaction at RATE for SECONDS with the relay running and reports
//! commit-to-publish p50 and p99.

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::publishers::NullPublisher;
use outbox_core::{Event, EventId, PublishRequest, PublishResult, Publisher, Relay, RelayConfig};
use outbox_sqlite::SqliteOutbox;

/// Notes when each event was acknowledged.
#[derive(Debug, Clone, Default)]
struct Probe {
    published: Arc<Mutex<Vec<(EventId, Instant)>>>,
}

impl Publisher for Probe {
    fn max_batch_size(&self) -> usize {
        usize::MAX
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let now = Instant::now();
        if let Ok(mut published) = self.published.lock() {
            published.extend(request.events.iter().map(|e| (e.id, now)));
        }
        vec![Ok(()); request.events.len()]
    }
}

fn event(run: &str, aggregate: u64) -> Result<Event, Box<dyn Error>> {
    Ok(Event::builder(
        "Order",
        format!("bench-{run}-{aggregate}"),
        1,
        "OrderCreated",
    )
    .payload(&serde_json::json!({ "orderId": aggregate, "totalCents": 4200, "items": [1, 2, 3] }))
    .build()?)
}

fn arg(args: &[String], i: usize, default: u64) -> Result<u64, Box<dyn Error>> {
    Ok(args
        .get(i)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default))
}

/// The `p`-th percentile in milliseconds, nearest rank.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: sqlite_drain_bench FILE [EVENTS] [RATE SECONDS]")?;
    let events = arg(&args, 2, 100_000)?;
    let rate = arg(&args, 3, 0)?;
    let seconds = arg(&args, 4, 10)?;
    let store = SqliteOutbox::connect(path).await?;
    let run = EventId::new().to_string()[24..].to_owned();

    let started = Instant::now();
    let mut batch = Vec::with_capacity(1_000);
    for aggregate in 0..events {
        batch.push(event(&run, aggregate)?);
        if batch.len() == 1_000 || aggregate + 1 == events {
            let mut tx = store.begin().await?;
            store.append(&mut tx, &batch).await?;
            store.commit(tx).await?;
            batch.clear();
        }
    }
    let write = events as f64 / started.elapsed().as_secs_f64();

    let config = RelayConfig::default()
        .batch_size(1_000)
        .idle_poll(Duration::from_millis(50));
    let relay = Relay::new(store.clone(), NullPublisher, config.clone())?;
    let started = Instant::now();
    let report = relay.drain().await?;
    let drain = events as f64 / started.elapsed().as_secs_f64();
    if report.published as u64 != events {
        return Err(format!("drained {} of {events} events", report.published).into());
    }
    print!("written {write:.0} events/s, drained {drain:.0} events/s");

    if rate > 0 {
        let probe = Probe::default();
        let relay = Relay::new(store.clone(), probe.clone(), config)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let relay = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await
        });
        let total = rate.saturating_mul(seconds);
        let mut commits = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        for n in 0..total {
            ticker.tick().await;
            let e = event(&run, events + n)?;
            let mut tx = store.begin().await?;
            store.append(&mut tx, std::slice::from_ref(&e)).await?;
            store.commit(tx).await?;
            commits.insert(e.id, Instant::now());
        }
        let achieved = total as f64 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop.send(true);
        relay.await??;
        let published = probe
            .published
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let mut latencies: Vec<Duration> = published
            .iter()
            .filter_map(|(id, at)| commits.get(id).map(|c| at.saturating_duration_since(*c)))
            .collect();
        latencies.sort_unstable();
        print!(
            "; steady {rate}/s (achieved {achieved:.0}/s): p50 {:.2} ms, p99 {:.2} ms over {} events",
            percentile_ms(&latencies, 50.0),
            percentile_ms(&latencies, 99.0),
            latencies.len()
        );
    }
    println!();
    Ok(())
}
