//! `outbox bench`: backlog drain throughput and commit-to-publish latency,
//! on any store and broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use outbox_core::{
    ClaimSource, Event, EventId, PublishRequest, PublishResult, Publisher, Relay, RelayConfig,
    Stats, StoreError,
};
use outbox_sqlite::SqliteOutbox;
use serde::Serialize;

use crate::latency::percentile_ms;
use crate::progress::Progress;
use crate::target::{self, Store, StoreUrl, TargetUrl};
use crate::{print_json, CliError};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The store to measure; by default a temporary SQLite file.
    #[arg(long)]
    store: Option<StoreUrl>,
    /// The broker to publish to.
    #[arg(long, default_value = "null://")]
    to: TargetUrl,
    /// Size of the backlog to drain.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events a second written during the latency run, one transaction each.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events per aggregate in the backlog (1: every event its own aggregate).
    #[arg(long, default_value_t = 1)]
    events_per_aggregate: u64,
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Print the results as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Results {
    store: String,
    to: String,
    events: u64,
    events_per_aggregate: u64,
    write_events_per_s: f64,
    drain_events_per_s: f64,
    rate: u64,
    achieved_rate: f64,
    latency_samples: usize,
    p50_ms: f64,
    p99_ms: f64,
}

/// Writes events in one committed transaction: what a benchmark needs of a store.
pub trait EventWriter: ClaimSource + Stats + Clone + 'static {
    fn write(
        &self,
        events: &[Event],
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

impl EventWriter for SqliteOutbox {
    async fn write(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        self.append(&mut tx, events).await?;
        self.commit(tx).await
    }
}

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.events == 0 || args.rate == 0 || args.events_per_aggregate == 0 {
        return Err(CliError::Usage(
            "--events, --rate and --events-per-aggregate must be at least 1".into(),
        ));
    }
    let (url, _temp) = target::or_temporary(args.store.as_ref(), "bench.db")?;
    // Checked before opening: opening another store could create its tables.
    if !matches!(url, StoreUrl::Sqlite { .. }) {
        return Err(CliError::Usage(
            "bench measures the embedded store: use --store sqlite://FILE".into(),
        ));
    }
    let publisher = target::open_target(&args.to, "urn:outbox:bench").await?;
    let Store::Sqlite(store) = target::open_store(&url).await? else {
        return Err(CliError::Usage(
            "bench measures the embedded store: use --store sqlite://FILE".into(),
        ));
    };
    let results = measure(store, publisher, &args, &url).await?;
    println!("store {}  ->  {}", results.store, results.to);
    println!(
        "backlog of {} events ({} per aggregate): written at {:.0}/s, drained at {:.0} events/s",
        results.events,
        results.events_per_aggregate,
        results.write_events_per_s,
        results.drain_events_per_s
    );
    println!(
        "steady {} events/s (achieved {:.0}/s): commit to publish p50 {} ms, p99 {} ms over {} events",
        results.rate, results.achieved_rate, results.p50_ms, results.p99_ms, results.latency_samples
    );
    if args.json {
        print_json(&results);
    }
    Ok(())
}

/// An event of aggregate `bench-RUN-N`: each run has its own aggregates, so
/// a store can be benchmarked again without version conflicts.
fn event(run: &str, aggregate: u64, version: u64) -> Result<Event, StoreError> {
    Ok(Event::builder(
        "Order",
        format!("bench-{run}-{aggregate}"),
        version,
        "OrderCreated",
    )
    .payload(&serde_json::json!({ "orderId": aggregate, "totalCents": 4200, "items": [1, 2, 3] }))
    .build()?)
}

async fn measure<S: EventWriter, P: Publisher + Clone + 'static>(
    store: S,
    publisher: P,
    args: &BenchArgs,
    url: &StoreUrl,
) -> Result<Results, CliError> {
    if store.stats().await?.pending > 0 {
        return Err(CliError::Usage(format!(
            "{url} already has pending events; benchmark an empty store"
        )));
    }
    // 1. A backlog, written before any relay runs.
    // The tail of a v7 id is random; its head is the clock.
    let run = EventId::new().to_string()[24..].to_owned();
    let per_agg = args.events_per_aggregate;
    let mut progress = Progress::new(args.events, "events written");
    let started = Instant::now();
    let mut batch = Vec::with_capacity(1_000);
    for n in 0..args.events {
        batch.push(event(&run, n / per_agg, n % per_agg + 1)?);
        if batch.len() == 1_000 || n + 1 == args.events {
            store.write(&batch).await?;
            batch.clear();
            progress.update(n + 1, "");
        }
    }
    let write_rate = args.events as f64 / started.elapsed().as_secs_f64();
    progress.finish();

    // 2. Drain it.
    let config = RelayConfig::default()
        .batch_size(args.batch_size)
        .idle_poll(Duration::from_millis(50));
    let relay = Relay::new(store.clone(), publisher.clone(), config.clone())?;
    let started = Instant::now();
    let report = relay.drain().await?;
    let drain_secs = started.elapsed().as_secs_f64();
    if report.published as u64 != args.events {
        return Err(CliError::Check(format!(
            "drained {} of {} events",
            report.published, args.events
        )));
    }

    // 3. Steady load, one event a transaction, with the relay running.
    let probe = Probe {
        inner: publisher,
        published: Arc::default(),
    };
    let relay = Relay::new(store.clone(), probe.clone(), config)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay_task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let total = (args.rate as f64 * args.duration.as_secs_f64()).ceil() as u64;
    let mut commits: HashMap<EventId, Instant> = HashMap::with_capacity(total as usize);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut progress = Progress::new(total, "events at steady rate");
    let started = Instant::now();
    for n in 0..total {
        ticker.tick().await;
        let e = event(&run, args.events + n, 1)?;
        store.write(std::slice::from_ref(&e)).await?;
        commits.insert(e.id, Instant::now());
        progress.update(n + 1, "");
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    progress.finish();
    let wait_until = Instant::now() + Duration::from_secs(60);
    while store.stats().await?.pending > 0 && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    relay_task
        .await
        .map_err(|e| CliError::Check(format!("relay task failed: {e}")))??;

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
    Ok(Results {
        store: url.to_string(),
        to: args.to.to_string(),
        events: args.events,
        events_per_aggregate: per_agg,
        write_events_per_s: write_rate.round(),
        drain_events_per_s: (args.events as f64 / drain_secs).round(),
        rate: args.rate,
        achieved_rate: achieved.round(),
        latency_samples: latencies.len(),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
    })
}

/// Notes when each event was acknowledged by the broker.
#[derive(Debug, Clone)]
struct Probe<P> {
    inner: P,
    published: Arc<Mutex<Vec<(EventId, Instant)>>>,
}

impl<P: Publisher> Publisher for Probe<P> {
    fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size()
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let results = self.inner.publish(request).await;
        let now = Instant::now();
        if let Ok(mut published) = self.published.lock() {
            published.extend(
                request
                    .events
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .map(|(e, _)| (e.id, now)),
            );
        }
        results
    }
}
