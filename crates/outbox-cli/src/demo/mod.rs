//! `outbox demo`: the seed's Order and Shipping services end to end, with the
//! guarantees checked against the database afterwards.

mod broker;
mod dynamodb;
mod postgres;
mod processes;
mod shop;
mod sqlite;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::FutureExt;
use outbox_core::publishers::memory_broker;
use outbox_core::publishers::{Chaos, FaultyPublisher, InjectedFaults};
use outbox_core::{EventId, Publisher, Relay, RelayConfig, RetryPolicy, Stats, StoreError};
use serde::Serialize;
use tokio::sync::watch;

use crate::latency::percentile_ms;
use crate::progress::Progress;
use crate::target::{self, DynamoShape, Store, StoreUrl, TargetUrl};
use crate::url_arg::UrlParser;
use crate::{print_json, CliError};
use broker::{Deliveries, MemoryDeliveries};
use shop::{NewOrder, Shipped, Shop};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 500)]
    orders: u64,
    /// Make the broker fail at random and kill the relay mid-batch, repeatedly.
    /// On PostgreSQL: kill relay processes with SIGKILL and restart them, and
    /// cut their broker connection for a few seconds, repeatedly.
    #[arg(long)]
    chaos: bool,
    /// Where the services keep their data: sqlite://FILE (by default a
    /// temporary file), dynamodb://TABLE (DynamoDB with its stream), or
    /// postgres://USER@HOST:PORT/DB (a schema of its own per run, dropped
    /// afterwards, unless ?schema=NAME names one to use and keep).
    #[arg(long, value_parser = UrlParser::<StoreUrl>::new())]
    store: Option<StoreUrl>,
    /// The broker: memory:// (in-process) with SQLite; eventbridge://BUS with
    /// DynamoDB, delivering through a rule into an SQS queue; with PostgreSQL,
    /// nats://HOST:PORT (a JetStream stream) or amqp://USER:PASS@HOST:PORT/VHOST
    /// (an exchange and a queue bound to it).
    #[arg(long, value_parser = UrlParser::<TargetUrl>::new())]
    to: Option<TargetUrl>,
    /// Relay processes to run (PostgreSQL only; SQLite and DynamoDB run one
    /// relay inside the demo).
    #[arg(long, default_value_t = 1)]
    relays: u32,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Give up waiting for delivery after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Share of orders later cancelled in a transaction of their own.
    #[arg(long, default_value_t = 0.1)]
    cancel_rate: f64,
    /// Orders placed a second (0: as fast as the database takes them, which
    /// measures queueing more than delivery). Default 500; 20 on DynamoDB,
    /// where the local emulators carry only a few dozen events a second.
    #[arg(long)]
    rate: Option<u64>,
}

/// The demo's result; the JSON form is the contract of `--json`.
#[derive(Debug, Serialize)]
struct Summary {
    orders: u64,
    events_written: u64,
    events_published: u64,
    delivered_unique: u64,
    duplicates_absorbed: u64,
    dead_lettered: u64,
    lost: u64,
    out_of_order: u64,
    relay_restarts: u64,
    publish_failures_injected: u64,
    /// Relay processes run side by side (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    relays: Option<u32>,
    /// Times the relays' broker connection was cut and later restored (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_cuts: Option<u64>,
    p50_ms: f64,
    p99_ms: f64,
    elapsed_s: f64,
}

const SOURCE: &str = "urn:outbox:demo:order-service";
/// Orders a second by default.
const DEFAULT_RATE: u64 = 500;
/// On DynamoDB: what the local emulators carry (moto's PutEvents into SQS
/// slows as its queue grows: 50 orders a second already backs up on two cores).
const DYNAMODB_DEFAULT_RATE: u64 = 20;
/// Most deliveries the Shipping service applies in one transaction.
const CONSUMER_BATCH: usize = 100;

/// Most relay processes `--relays` starts.
const MAX_RELAYS: u32 = 16;

pub async fn run(args: DemoArgs) -> Result<(), CliError> {
    if !(0.0..=1.0).contains(&args.cancel_rate) {
        return Err(CliError::Usage(
            "--cancel-rate must be between 0 and 1".into(),
        ));
    }
    if !(1..=MAX_RELAYS).contains(&args.relays) {
        return Err(CliError::Usage(format!(
            "--relays must be between 1 and {MAX_RELAYS}"
        )));
    }
    let on_postgres = matches!(args.store, Some(StoreUrl::Postgres { .. }));
    if args.relays > 1 && !on_postgres {
        return Err(CliError::Usage(
            "--relays runs relay processes on a postgres:// store; SQLite and DynamoDB run one relay inside the demo".into(),
        ));
    }
    if let Some(StoreUrl::Postgres {
        url,
        schema,
        dead_letters,
        ..
    }) = &args.store
    {
        let store = postgres::PgStore {
            url: url.clone(),
            schema: schema.clone(),
            dead_letters: *dead_letters,
        };
        return postgres::run(store, &args).await;
    }
    if let Some(StoreUrl::DynamoDb { table, shape, .. }) = &args.store {
        if *shape != DynamoShape::Stream {
            return Err(CliError::Usage(
                "the demo on DynamoDB runs the stream shape: use dynamodb://TABLE".into(),
            ));
        }
        let bus =
            match &args.to {
                Some(TargetUrl::EventBridge { bus }) => bus.clone(),
                other => {
                    return Err(CliError::Usage(format!(
                    "the demo on DynamoDB publishes to EventBridge: use --to eventbridge://BUS{}",
                    other.as_ref().map(|t| format!(", not {t}")).unwrap_or_default()
                )))
                }
            };
        let shop = dynamodb::DynamoShop::open(table).await?;
        let (publisher, deliveries) = broker::eventbridge_to_sqs(&bus, table, SOURCE).await?;
        let relays = in_process_relays(shop.clone(), publisher, true, args.chaos);
        let summary = run_with(shop, deliveries, relays, DYNAMODB_DEFAULT_RATE, &args).await?;
        return report(&summary, &args, &kept(args.store.as_ref()));
    }
    if args.to.as_ref().is_some_and(|t| *t != TargetUrl::Memory) {
        return Err(CliError::Usage(format!(
            "the demo on SQLite runs with the in-process broker (memory://), not {}; \
             nats:// and amqp:// run with a postgres:// store",
            args.to
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        )));
    }
    let (url, _temp) = target::or_temporary(args.store.as_ref(), "demo.db")?;
    let Store::Sqlite(outbox) = target::open_store(&url).await? else {
        return Err(CliError::Usage(format!("{url} is not a SQLite store")));
    };
    let shop = sqlite::SqliteShop::new(outbox).await?;
    let (broker, subscriber) = memory_broker(SOURCE);
    let relays = in_process_relays(shop.clone(), broker.clone(), false, args.chaos);
    let summary = run_with(
        shop,
        MemoryDeliveries::new(broker, subscriber),
        relays,
        DEFAULT_RATE,
        &args,
    )
    .await?;
    report(&summary, &args, &kept(args.store.as_ref()))
}

/// What a run leaves behind in a store the user named, one line each.
fn kept(url: Option<&StoreUrl>) -> Vec<String> {
    match url {
        Some(url @ StoreUrl::Sqlite { .. }) => vec![format!(
            "database kept at     {url} (tables orders, outbox, shipments, inbox)"
        )],
        Some(StoreUrl::DynamoDb { table, .. }) => vec![format!(
            "tables kept          {table} (outbox), {table}-orders, {table}-shipments, {table}-inbox, {table}-dead-letters"
        )],
        _ => Vec::new(),
    }
}

fn report(s: &Summary, args: &DemoArgs, kept: &[String]) -> Result<(), CliError> {
    println!("orders placed        {}", s.orders);
    println!("events written       {}", s.events_written);
    println!("events published     {}", s.events_published);
    println!("delivered (unique)   {}", s.delivered_unique);
    println!("duplicates absorbed  {}", s.duplicates_absorbed);
    println!("dead-lettered        {}", s.dead_lettered);
    println!("lost                 {}", s.lost);
    println!("out of order         {}", s.out_of_order);
    if let Some(relays) = s.relays {
        println!("relay processes      {relays}");
    }
    if args.chaos {
        println!("relay restarts       {}", s.relay_restarts);
        match s.broker_cuts {
            Some(cuts) => println!("broker cuts          {cuts}"),
            None => println!("failures injected    {}", s.publish_failures_injected),
        }
    }
    println!(
        "commit to consumer   p50 {} ms, p99 {} ms",
        s.p50_ms, s.p99_ms
    );
    println!("elapsed              {:.2} s", s.elapsed_s);
    for line in kept {
        println!("{line}");
    }
    if args.json {
        print_json(s);
    }
    let accounted = s.delivered_unique + s.dead_lettered == s.events_written;
    if s.lost > 0 || s.out_of_order > 0 || !accounted {
        return Err(CliError::Check(format!(
            "guarantee broken: lost {}, out of order {}, delivered + dead = {} of {} written",
            s.lost,
            s.out_of_order,
            s.delivered_unique + s.dead_lettered,
            s.events_written
        )));
    }
    Ok(())
}

/// What the Shipping consumer saw.
#[derive(Debug, Default)]
struct Consumed {
    deliveries: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    gaps: AtomicU64,
    errors: AtomicU64,
    /// The last receive found nothing waiting.
    idle: AtomicBool,
}

/// What a run hands its relays: whether to make trouble, whether orders are
/// still being written, where to count, and when to stop.
struct RelayRun {
    chaos: bool,
    writing: Arc<AtomicBool>,
    totals: Arc<RelayTotals>,
    stop: watch::Receiver<bool>,
}

/// The relays of a run, running until told to stop.
type RelayTask = Pin<Box<dyn Future<Output = Result<(), CliError>> + Send>>;

/// One relay inside the demo, publishing to `broker` through the fault
/// injector; with chaos, killed and started again at random moments.
fn in_process_relays<S: Shop, P: Publisher + Clone + 'static>(
    shop: S,
    broker: P,
    remote: bool,
    chaos: bool,
) -> impl FnOnce(RelayRun) -> RelayTask {
    // A remote broker (EventBridge) answers in tens of milliseconds, or more
    // on an emulator: wait longer for it, and leave hung calls to the
    // in-process broker, where the timeout is short enough to show them.
    let publish_timeout = if remote {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(500)
    };
    let faults = if chaos {
        Chaos {
            transient_rate: 0.05,
            lost_ack_rate: 0.03,
            poison_rate: 0.005,
            hang_rate: if remote { 0.0 } else { 0.005 },
            hang_for: Duration::from_secs(2),
        }
    } else {
        Chaos::default()
    };
    let publisher = FaultyPublisher::new(broker).with_chaos(faults);
    let injected = publisher.injected();
    // Smaller batches on a remote broker: a killed relay's batch is what a
    // stream relay publishes again.
    let config = RelayConfig::default()
        .batch_size(if remote { 50 } else { 200 })
        .lease(publish_timeout * 4)
        .publish_timeout(publish_timeout)
        .idle_poll(Duration::from_millis(100))
        .retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max_delay: Duration::from_millis(500),
            max_attempts: 25,
            ..RetryPolicy::default()
        });
    move |run| Box::pin(supervise(shop, publisher, config, injected, run))
}

async fn run_with<S: Shop, D: Deliveries>(
    shop: S,
    deliveries: D,
    start_relays: impl FnOnce(RelayRun) -> RelayTask,
    default_rate: u64,
    args: &DemoArgs,
) -> Result<Summary, CliError> {
    let started = Instant::now();
    let in_flight = deliveries.in_flight_probe();
    let backlog = deliveries.backlog_probe();
    let rate = args.rate.unwrap_or(default_rate);

    let (stop_tx, stop_rx) = watch::channel(false);
    let consumed = Arc::new(Consumed::default());
    let consumer = tokio::spawn(consume(
        shop.clone(),
        deliveries,
        consumed.clone(),
        stop_rx.clone(),
    ));
    let writing = Arc::new(AtomicBool::new(true));
    let relay_totals = Arc::new(RelayTotals::default());
    let relays = tokio::spawn(start_relays(RelayRun {
        chaos: args.chaos,
        writing: writing.clone(),
        totals: relay_totals.clone(),
        stop: stop_rx,
    }));
    let written = Arc::new(AtomicU64::new(0));
    let orders_placed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_orders(
        shop.clone(),
        args.orders,
        rate,
        args.cancel_rate,
        written.clone(),
        orders_placed.clone(),
    ));

    let mut progress = Progress::new(args.orders, "orders");
    let deadline = started + args.timeout;
    let outbox = shop.outbox();
    let mut commits = None;
    let mut writer = Some(writer);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if writer.as_ref().is_some_and(|w| w.is_finished()) {
            if let Some(w) = writer.take() {
                commits = Some(
                    w.await
                        .map_err(|e| CliError::Check(format!("order writer failed: {e}")))??,
                );
            }
            writing.store(false, Ordering::Relaxed);
        }
        let stats = outbox.stats().await?;
        progress.update(
            orders_placed.load(Ordering::Relaxed),
            &format!(
                "| events {} delivered {} dead {} pending {} | restarts {}",
                written.load(Ordering::Relaxed),
                consumed.unique.load(Ordering::Relaxed),
                stats.dead,
                stats.pending,
                relay_totals.restarts.load(Ordering::Relaxed)
            ),
        );
        // Everything written is applied or dead-lettered, and nothing is still
        // on its way (where the broker can tell).
        let settled =
            consumed.unique.load(Ordering::Relaxed) + stats.dead >= written.load(Ordering::Relaxed);
        let drained = in_flight
            .as_ref()
            .is_none_or(|sent| consumed.deliveries.load(Ordering::Relaxed) == sent());
        let mut done = commits.is_some() && stats.pending == 0 && settled && drained;
        // A broker that can tell what it still holds for the consumer must
        // hold nothing, and the consumer must have found nothing more.
        if let (true, Some(backlog)) = (done, backlog.as_ref()) {
            done = consumed.idle.load(Ordering::Relaxed) && backlog().await? == 0;
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "timed out after {:?} with {} events pending",
                args.timeout, stats.pending
            );
            break;
        }
    }
    progress.finish();
    let _ = stop_tx.send(true);
    relays
        .await
        .map_err(|e| CliError::Check(format!("relay supervisor failed: {e}")))??;
    let first_delivery = consumer
        .await
        .map_err(|e| CliError::Check(format!("consumer failed: {e}")))?;
    if let Some(unfinished) = writer {
        // Timed out while still writing: the audit below reports what is missing.
        unfinished.abort();
    }
    let commits = commits.unwrap_or_default();

    let written_ids: HashSet<EventId> = commits.keys().copied().collect();
    let audit = shop.audit(&written_ids).await?;
    let mut latencies: Vec<Duration> = first_delivery
        .iter()
        .filter_map(|(id, at)| commits.get(id).map(|c| at.saturating_duration_since(*c)))
        .collect();
    latencies.sort_unstable();
    let unique = consumed.unique.load(Ordering::Relaxed);
    if unique != audit.delivered_unique || written.load(Ordering::Relaxed) != audit.events_written {
        return Err(CliError::Check(format!(
            "the run and the database disagree: consumer saw {unique} unique events, inbox holds {}; \
             writer wrote {} events, outbox holds {}",
            audit.delivered_unique,
            written.load(Ordering::Relaxed),
            audit.events_written
        )));
    }
    let gaps = consumed.gaps.load(Ordering::Relaxed);
    let errors = consumed.errors.load(Ordering::Relaxed);
    if gaps > 0 || errors > 0 {
        eprintln!("note: {gaps} event(s) applied after a dead-lettered predecessor, {errors} consumer error(s)");
    }
    Ok(Summary {
        orders: audit.orders,
        events_written: audit.events_written,
        events_published: audit
            .published
            .unwrap_or_else(|| relay_totals.published.load(Ordering::Relaxed)),
        delivered_unique: audit.delivered_unique,
        duplicates_absorbed: consumed.duplicates.load(Ordering::Relaxed),
        dead_lettered: audit.dead,
        lost: audit.lost,
        out_of_order: consumed.out_of_order.load(Ordering::Relaxed),
        relay_restarts: relay_totals.restarts.load(Ordering::Relaxed),
        publish_failures_injected: relay_totals.failures_injected.load(Ordering::Relaxed),
        relays: None,
        broker_cuts: None,
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        elapsed_s: (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    })
}

/// Calls `op` again while the store is busy (SQLite's single writer) or briefly down.
async fn retrying<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    mut op: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let mut tries = 0;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// The Order service: places orders and cancels some, one transaction each.
/// Returns when each event was committed.
async fn write_orders<S: Shop>(
    shop: S,
    orders: u64,
    rate: u64,
    cancel_rate: f64,
    written: Arc<AtomicU64>,
    placed: Arc<AtomicU64>,
) -> Result<HashMap<EventId, Instant>, CliError> {
    let mut commits = HashMap::new();
    let mut ids: Vec<String> = Vec::with_capacity(orders as usize);
    let mut pace = (rate > 0).then(|| {
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        every
    });
    for n in 0..orders {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let order = NewOrder::random(n);
        let events = retrying(|| shop.place_order(&order)).await?;
        let now = Instant::now();
        written.fetch_add(events.len() as u64, Ordering::Relaxed);
        commits.extend(events.iter().map(|e| (e.id, now)));
        ids.push(order.id);
        placed.fetch_add(1, Ordering::Relaxed);
        if !ids.is_empty() && fastrand::f64() < cancel_rate {
            let victim = &ids[fastrand::usize(..ids.len())];
            if let Some(event) = retrying(|| shop.cancel_order(victim)).await? {
                written.fetch_add(1, Ordering::Relaxed);
                commits.insert(event.id, Instant::now());
            }
        }
    }
    Ok(commits)
}

/// The Shipping service: applies each delivery once, through the inbox.
/// Returns when each event was first delivered.
async fn consume<S: Shop, D: Deliveries>(
    shop: S,
    mut deliveries: D,
    seen: Arc<Consumed>,
    mut stop: watch::Receiver<bool>,
) -> HashMap<EventId, Instant> {
    let mut first_delivery = HashMap::new();
    loop {
        // Whatever has arrived is handled in one go.
        let batch = tokio::select! {
            biased;
            b = deliveries.next(CONSUMER_BATCH) => b,
            _ = stop.wait_for(|s| *s).map(|r| r.is_ok()) => break,
        };
        let batch = match batch {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "shipping: cannot receive");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        seen.idle.store(batch.is_empty(), Ordering::Relaxed);
        if batch.is_empty() {
            continue;
        }
        let received_at = Instant::now();
        let mut events = Vec::with_capacity(batch.len());
        for delivery in &batch {
            match &delivery.event {
                Ok(event) => events.push(event.clone()),
                Err(e) => {
                    tracing::error!(id = %delivery.id, error = %e, "shipping: not a CloudEvent");
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        match retrying(|| shop.ship(&events)).await {
            Ok(outcomes) => {
                for (event, outcome) in events.iter().zip(outcomes) {
                    let counter = match outcome {
                        Shipped::Duplicate => &seen.duplicates,
                        // Older than what Shipping applied: the relay broke
                        // the order (or, Ignored, an event it never wrote).
                        Shipped::Stale | Shipped::Ignored => &seen.out_of_order,
                        Shipped::Applied | Shipped::AppliedAfterGap => {
                            if outcome == Shipped::AppliedAfterGap {
                                seen.gaps.fetch_add(1, Ordering::Relaxed);
                            }
                            first_delivery.insert(event.id, received_at);
                            &seen.unique
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                // Acknowledged only once applied: a crash before this redelivers.
                deliveries.ack(&batch).await;
            }
            Err(e) => {
                tracing::error!(error = %e, count = events.len(), "shipping: cannot process deliveries");
                seen.errors
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
            }
        }
        seen.deliveries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    first_delivery
}

/// What the relays of one run did, summed over restarts.
#[derive(Debug, Default)]
struct RelayTotals {
    restarts: AtomicU64,
    /// Events the relays marked published.
    published: AtomicU64,
    /// Publish failures the fault injector made.
    failures_injected: AtomicU64,
}

/// Runs the relay; with chaos, kills it at random moments (mid-batch, holding
/// claims) while orders are written, and starts a new one.
async fn supervise<S: Shop, P: Publisher + Clone + 'static>(
    shop: S,
    publisher: P,
    config: RelayConfig,
    injected: Arc<InjectedFaults>,
    run: RelayRun,
) -> Result<(), CliError> {
    let RelayRun {
        chaos,
        writing,
        totals,
        mut stop,
    } = run;
    loop {
        // A new relay reads from where the store says the last one got to.
        let relay = Relay::new(
            shop.relay_source().await?,
            publisher.clone(),
            config.clone(),
        )?;
        let metrics = relay.metrics();
        let count = || {
            totals
                .published
                .fetch_add(metrics.published.load(Ordering::Relaxed), Ordering::Relaxed);
            totals
                .failures_injected
                .store(injected.total(), Ordering::Relaxed);
        };
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let mut handle = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = shutdown_rx.await;
                })
                .await
        });
        let kill = chaos && writing.load(Ordering::Relaxed);
        let kill_in = Duration::from_millis(fastrand::u64(shop.relay_lifetime_ms()));
        tokio::select! {
            _ = stop.wait_for(|s| *s).map(|r| r.is_ok()) => {
                let _ = shutdown_tx.send(());
                let result = handle.await;
                count();
                return match result {
                    Ok(result) => result.map(drop).map_err(CliError::from),
                    Err(e) => Err(CliError::Check(format!("relay task failed: {e}"))),
                };
            }
            () = tokio::time::sleep(kill_in), if kill => {
                handle.abort();
                let _ = handle.await;
                count();
                totals.restarts.fetch_add(1, Ordering::Relaxed);
            }
            result = &mut handle => {
                count();
                return match result {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(CliError::Check(format!("relay task failed: {e}"))),
                };
            }
        }
    }
}
