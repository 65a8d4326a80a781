//! `outbox bench`: backlog drain throughput and commit-to-publish latency,
//! on any store and broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use outbox_core::{
    ClaimSource, Event, EventId, PublishRequest, PublishResult, Publisher, Relay, RelayConfig,
    Stats, StoreError,
};
use outbox_postgres::PostgresOutbox;
use outbox_sqlite::SqliteOutbox;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::latency::percentile_ms;
use crate::progress::Progress;
use crate::target::{self, Store, StoreUrl, TargetUrl};
use crate::url_arg::UrlParser;
use crate::{print_json, CliError};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The store to measure; by default a temporary SQLite file.
    #[arg(long, value_parser = UrlParser::<StoreUrl>::new())]
    store: Option<StoreUrl>,
    /// The broker to publish to.
    #[arg(long, default_value = "null://", value_parser = UrlParser::<TargetUrl>::new())]
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
    /// Concurrent writers (each its own transactions) for the backlog and
    /// the steady load.
    #[arg(long, default_value_t = 1)]
    writers: u64,
    /// Relays draining the store at once, each with its own connections.
    #[arg(long, default_value_t = 1)]
    relays: u64,
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
    writers: u64,
    relays: u64,
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

impl EventWriter for PostgresOutbox {
    async fn write(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        tx.append(events)?;
        tx.commit().await
    }
}

/// Most writers or relays a run takes: more would measure the machine's
/// scheduler, not the store.
const MAX_PARALLEL: u64 = 64;

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.events == 0 || args.rate == 0 || args.events_per_aggregate == 0 {
        return Err(CliError::Usage(
            "--events, --rate and --events-per-aggregate must be at least 1".into(),
        ));
    }
    for (flag, n) in [("--writers", args.writers), ("--relays", args.relays)] {
        if !(1..=MAX_PARALLEL).contains(&n) {
            return Err(CliError::Usage(format!(
                "{flag} must be between 1 and {MAX_PARALLEL}, not {n}"
            )));
        }
    }
    let (url, _temp) = target::or_temporary(args.store.as_ref(), "bench.db")?;
    // Checked before opening: opening another store could create its tables.
    if !matches!(url, StoreUrl::Sqlite { .. } | StoreUrl::Postgres { .. }) {
        return Err(sql_stores_only());
    }
    let publisher = target::open_target(&args.to, "urn:outbox:bench").await?;
    // One store per relay, each with its own connections, as separate
    // relay processes would have; the first also serves the writers.
    let mut stores = Vec::new();
    for _ in 0..args.relays {
        stores.push(target::open_store(&url).await?);
    }
    let results = match stores.first() {
        Some(Store::Sqlite(_)) => {
            let stores = each(stores, |s| match s {
                Store::Sqlite(s) => Some(s),
                _ => None,
            });
            measure(stores, publisher, &args, &url).await?
        }
        Some(Store::Postgres(_)) => {
            let stores = each(stores, |s| match s {
                Store::Postgres(s) => Some(s),
                _ => None,
            });
            measure(stores, publisher, &args, &url).await?
        }
        _ => return Err(sql_stores_only()),
    };
    println!("store {}  ->  {}", results.store, results.to);
    println!(
        "backlog of {} events ({} per aggregate): written at {:.0}/s by {} writer(s), drained at {:.0} events/s by {} relay(s)",
        results.events,
        results.events_per_aggregate,
        results.write_events_per_s,
        results.writers,
        results.drain_events_per_s,
        results.relays
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

fn sql_stores_only() -> CliError {
    CliError::Usage(
        "bench measures the SQL stores: use --store sqlite://FILE or postgres://...".into(),
    )
}

/// The stores of one kind, opened from one URL.
fn each<S>(stores: Vec<Store>, kind: impl Fn(Store) -> Option<S>) -> Vec<S> {
    stores.into_iter().filter_map(kind).collect()
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
    stores: Vec<S>,
    publisher: P,
    args: &BenchArgs,
    url: &StoreUrl,
) -> Result<Results, CliError> {
    let Some(store) = stores.first().cloned() else {
        return Err(CliError::Usage("--relays must be at least 1".into()));
    };
    if store.stats().await?.pending > 0 {
        return Err(CliError::Usage(format!(
            "{url} already has pending events; benchmark an empty store"
        )));
    }
    // 1. A backlog, written before any relay runs: each writer takes every
    // `writers`-th aggregate, in transactions of up to 1,000 events.
    // The tail of a v7 id is random; its head is the clock.
    let run: Arc<str> = EventId::new().to_string()[24..].into();
    let per_agg = args.events_per_aggregate;
    let aggregates = args.events.div_ceil(per_agg);
    let written = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for w in 0..args.writers {
        let (store, run, written) = (store.clone(), run.clone(), written.clone());
        let (events, step) = (args.events, args.writers);
        writers.spawn(async move {
            let mut batch = Vec::with_capacity(1_000);
            let mut aggregate = w;
            while aggregate < aggregates {
                let first = aggregate * per_agg;
                for n in first..(first + per_agg).min(events) {
                    batch.push(event(&run, aggregate, n - first + 1)?);
                }
                aggregate += step;
                if batch.len() >= 1_000 || aggregate >= aggregates {
                    store.write(&batch).await?;
                    written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    batch.clear();
                }
            }
            Ok::<_, StoreError>(())
        });
    }
    let mut progress = Progress::new(args.events, "events written");
    join_all(&mut writers, || {
        progress.update(written.load(Ordering::Relaxed), "")
    })
    .await?;
    let write_rate = args.events as f64 / started.elapsed().as_secs_f64();
    progress.finish();

    // 2. Drain it with every relay at once.
    let config = RelayConfig::default()
        .batch_size(args.batch_size)
        .idle_poll(Duration::from_millis(50));
    let mut relays = JoinSet::new();
    let started = Instant::now();
    for store in &stores {
        let relay = Relay::new(store.clone(), publisher.clone(), config.clone())?;
        relays.spawn(async move { relay.drain().await });
    }
    let mut published = 0u64;
    while let Some(report) = relays.join_next().await {
        let report = report.map_err(|e| CliError::Check(format!("relay task failed: {e}")))??;
        published += report.published as u64;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    if published != args.events {
        // Say why: a target refusing every event (an unroutable RabbitMQ
        // exchange, say) leaves its error on the pending events.
        let why = match store.stats().await.map(|s| s.last_error) {
            Ok(Some(error)) => format!("; the latest error: {error}"),
            _ => String::new(),
        };
        return Err(CliError::Check(format!(
            "drained {published} of {} events{why}",
            args.events
        )));
    }

    // 3. Steady load, one event a transaction, the rate shared by the
    // writers, with every relay running.
    let probe = Probe {
        inner: publisher,
        published: Arc::default(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for store in &stores {
        let relay = Relay::new(store.clone(), probe.clone(), config.clone())?;
        let mut stop = stop_rx.clone();
        relays.spawn(async move {
            relay
                .run(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await
        });
    }
    let total = (args.rate as f64 * args.duration.as_secs_f64()).ceil() as u64;
    let commits: Arc<Mutex<HashMap<EventId, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let period = Duration::from_secs_f64(args.writers as f64 / args.rate as f64);
    let started = Instant::now();
    let first_tick = tokio::time::Instant::now();
    written.store(0, Ordering::Relaxed);
    for w in 0..args.writers {
        let (store, run, written, commits) =
            (store.clone(), run.clone(), written.clone(), commits.clone());
        let (first, step) = (aggregates + w, args.writers);
        // Staggered: the writers' ticks spread evenly over the period, so
        // the rate is steady rather than bursts of one commit per writer.
        let offset = period.mul_f64(w as f64 / args.writers as f64);
        writers.spawn(async move {
            let mut ticker = tokio::time::interval_at(first_tick + offset, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut aggregate = first;
            while written.fetch_add(1, Ordering::Relaxed) < total {
                ticker.tick().await;
                let e = event(&run, aggregate, 1)?;
                store.write(std::slice::from_ref(&e)).await?;
                let at = Instant::now();
                if let Ok(mut commits) = commits.lock() {
                    commits.insert(e.id, at);
                }
                aggregate += step;
            }
            Ok::<_, StoreError>(())
        });
    }
    let mut progress = Progress::new(total, "events at steady rate");
    join_all(&mut writers, || {
        progress.update(written.load(Ordering::Relaxed).min(total), "")
    })
    .await?;
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    progress.finish();
    let wait_until = Instant::now() + Duration::from_secs(60);
    while store.stats().await?.pending > 0 && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    while let Some(report) = relays.join_next().await {
        report.map_err(|e| CliError::Check(format!("relay task failed: {e}")))??;
    }

    let published = probe
        .published
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
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
        writers: args.writers,
        relays: args.relays,
        write_events_per_s: write_rate.round(),
        drain_events_per_s: (args.events as f64 / drain_secs).round(),
        rate: args.rate,
        achieved_rate: achieved.round(),
        latency_samples: latencies.len(),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
    })
}

/// Waits for every writer, calling `tick` now and then; the first error
/// stops the rest.
async fn join_all(
    tasks: &mut JoinSet<Result<(), StoreError>>,
    mut tick: impl FnMut(),
) -> Result<(), CliError> {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                None => return Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tasks.abort_all();
                    return Err(e.into());
                }
                Some(Err(e)) => {
                    tasks.abort_all();
                    return Err(CliError::Check(format!("writer task failed: {e}")));
                }
            },
            _ = every.tick() => tick(),
        }
    }
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
