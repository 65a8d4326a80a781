//! Benchmark of the `PublishEvents` handler against the EventBridge endpoint
//! of `AWS_ENDPOINT_URL_EVENTBRIDGE` (a local emulator).
//!
//! ```sh
//! eval "$(scripts/services env)"
//! cargo run --release -p outbox-lambda --example publish_events_bench -- [--input FILE]
//!     [--events 200] [--records 100] [--transient-failure-rate 0.01] [--write FILE]
//!     [--added-latency-ms 20]
//! ```
//!
//! Feeds Lambda stream events (one JSON event a line, generated unless
//! `--input` is given) to the handler in a loop and prints one JSON line:
//! init time (process start to handler ready), CPU time per record, peak RSS
//! and wall time. With `--transient-failure-rate` some entries fail
//! transiently and Lambda's retry from the reported record is simulated;
//! order and duplicates are then checked from what reached the publisher.
//!
//! With `--added-latency-ms`, every PutEvents response is held that long by
//! the testkit's TCP proxy in front of the emulator, and each batch's wall
//! time is compared with its ordering floor: the versions of the deepest
//! aggregate in the batch (each needs its own call, one after the other)
//! times one call's time (the added latency plus the emulator's own time per
//! call, measured first through the same proxy without the delay).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use outbox_core::{Event, EventId, PublishError, PublishRequest, PublishResult, Publisher};
use outbox_dynamodb::{decode_lambda_record, Change, LambdaStreamEvent};
use outbox_lambda::config::{DEAD_LETTER_TABLE_VAR, TARGET_VAR};
use outbox_lambda::testing::{stream_event_json, stream_record};
use outbox_lambda::{
    publish_events_handler, AwsPublisher, StreamRelayHandler, StreamRelaySettings,
};
use outbox_testkit::proxy::{Direction, FaultProxy};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Args {
    input: Option<String>,
    write: Option<String>,
    events: usize,
    records: usize,
    records_per_aggregate: usize,
    failure_rate: f64,
    init_runs: usize,
    init_only: bool,
    null_publisher: bool,
    added_latency_ms: Option<u64>,
    calibration_calls: usize,
    publish_concurrency: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        input: None,
        write: None,
        events: 200,
        records: 100,
        records_per_aggregate: 4,
        failure_rate: 0.0,
        init_runs: 7,
        init_only: false,
        null_publisher: false,
        added_latency_ms: None,
        calibration_calls: 100,
        publish_concurrency: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--input" => args.input = Some(value()?),
            "--write" => args.write = Some(value()?),
            "--events" => args.events = number(value()?)?,
            "--records" => args.records = number(value()?)?,
            "--records-per-aggregate" => args.records_per_aggregate = number(value()?)?.max(1),
            "--init-runs" => args.init_runs = number(value()?)?,
            "--transient-failure-rate" => {
                args.failure_rate = value()?
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..1.0).contains(r))
                    .ok_or("--transient-failure-rate takes a number in [0, 1)")?
            }
            "--added-latency-ms" => args.added_latency_ms = Some(number(value()?)? as u64),
            "--publish-concurrency" => args.publish_concurrency = Some(number(value()?)?),
            "--calibration-calls" => args.calibration_calls = number(value()?)?.max(1),
            "--init-only" => args.init_only = true,
            // Accept every entry without a network call: the handler's own cost.
            "--null-publisher" => args.null_publisher = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// The settings the benchmark runs with: the environment's, with a target
/// and dead-letter table filled in when missing.
fn settings_var(name: &str) -> Option<String> {
    std::env::var(name).ok().or_else(|| match name {
        TARGET_VAR => Some(format!("eventbridge://{BENCH_BUS}")),
        DEAD_LETTER_TABLE_VAR => Some("outbox-bench-dead-letters".to_owned()),
        _ => None,
    })
}

const BENCH_BUS: &str = "outbox-lambda-bench";

async fn build_handler() -> Result<outbox_lambda::PublishEventsHandler, Error> {
    let settings = StreamRelaySettings::from_vars(settings_var)?;
    let config = outbox_aws::load_config().await;
    Ok(publish_events_handler(&config, &settings).await?)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("publish_events_bench: {e}");
            return ExitCode::from(2);
        }
    };
    // The same runtime the Lambda binary uses.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("publish_events_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, started)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("publish_events_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, started: Instant) -> Result<(), Error> {
    if args.init_only {
        let handler = build_handler().await?;
        println!("ready {}", started.elapsed().as_micros());
        drop(handler);
        return Ok(());
    }
    outbox_aws::testing::require_local_endpoints(&["EVENTBRIDGE"]);
    // The handler checks at start that its bus exists.
    if std::env::var(TARGET_VAR).is_err() {
        let client = aws_sdk_eventbridge::Client::new(&outbox_aws::load_config().await);
        outbox_eventbridge::setup::ensure_bus(&client, BENCH_BUS).await?;
    }

    let handler = build_handler().await?;
    let init_in_process = started.elapsed();
    let init_ms = init_from_process_start(args.init_runs)?;

    let path = match &args.input {
        Some(path) => path.clone(),
        None => {
            let path = args.write.clone().unwrap_or_else(|| {
                std::env::temp_dir()
                    .join(format!("publish-events-bench-{}.jsonl", std::process::id()))
                    .to_string_lossy()
                    .into_owned()
            });
            generate(&path, &args)?;
            path
        }
    };

    // With an added latency, the publisher goes through the proxy.
    let proxy = match args.added_latency_ms {
        Some(_) if args.null_publisher => {
            return Err("--added-latency-ms needs the EventBridge publisher".into())
        }
        Some(_) => Some(Proxied::start(&handler).await?),
        None => None,
    };
    let publisher = proxy.as_ref().map_or(handler.publisher(), |p| &p.publisher);
    let call_floor = match (&proxy, args.added_latency_ms) {
        (Some(proxy), Some(ms)) => {
            let own = proxy.calibrate(args.calibration_calls).await?;
            proxy
                .proxy
                .set_latency_on(Direction::ToClient, std::time::Duration::from_millis(ms));
            Some((own, ms as f64))
        }
        _ => None,
    };
    let depths = if call_floor.is_some() {
        deepest_aggregates(&path)?
    } else {
        Vec::new()
    };

    let mut faults = Faults::new(args.failure_rate);
    faults.null = args.null_publisher;
    let tracked = Tracked {
        inner: publisher,
        faults: &faults,
    };
    let mut config = handler.handler_config().clone();
    if let Some(n) = args.publish_concurrency {
        config = config.publish_concurrency(n);
    }
    let measured = StreamRelayHandler::new(tracked, handler.dead_letters()).config(config.clone());

    let cpu_before = cpu_ticks()?;
    let wall = Instant::now();
    let mut records = 0usize;
    let mut events = 0usize;
    let mut invocations = 0usize;
    let mut batch_walls: Vec<f64> = Vec::new();
    let mut reported = 0usize;
    let mut dead_lettered = 0usize;
    let reader = BufReader::new(std::fs::File::open(&path)?);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let mut event = LambdaStreamEvent::from_json(&line)?;
        events += 1;
        records += event.records.len();
        let batch_started = Instant::now();
        loop {
            invocations += 1;
            let report = measured.process(&event).await;
            dead_lettered += report.dead_lettered;
            let Some(from) = report.response.retry_sequence_number() else {
                break;
            };
            reported += 1;
            // Lambda hands over the batch again from the reported record.
            let position = event
                .records
                .iter()
                .position(|r| decode_lambda_record(r).is_ok_and(|d| d.sequence_number == from))
                .unwrap_or(0);
            event.records.drain(..position);
            if invocations > events * 50 {
                return Err("no progress: the same records keep failing".into());
            }
        }
        batch_walls.push(batch_started.elapsed().as_secs_f64() * 1e3);
    }
    let wall = wall.elapsed();
    let cpu = cpu_ticks()? - cpu_before;
    let cpu_us_per_record = cpu as f64 * 1e6 / CLOCK_TICKS_PER_SECOND / records.max(1) as f64;

    let mut out = serde_json::json!({
        "records": records,
        "stream_events": events,
        "invocations": invocations,
        "init_ms": round(init_ms, 2),
        "init_in_process_ms": round(init_in_process.as_secs_f64() * 1e3, 2),
        "cpu_us_per_record": round(cpu_us_per_record, 2),
        "peak_rss_mb": round(peak_rss_kb()? as f64 / 1024.0, 1),
        "wall_s": round(wall.as_secs_f64(), 2),
        "records_per_s": round(records as f64 / wall.as_secs_f64(), 0),
        "publish_calls": faults.calls.load(Ordering::Relaxed),
        "dead_lettered": dead_lettered,
        "publisher": if args.null_publisher { "null" } else { "eventbridge" },
        "publish_concurrency": config.publish_concurrency,
    });
    if let Some((own_ms, added_ms)) = call_floor {
        let call_ms = own_ms + added_ms;
        let floors: Vec<f64> = depths.iter().map(|d| *d as f64 * call_ms).collect();
        let mut ratios: Vec<f64> = batch_walls
            .iter()
            .zip(&floors)
            .map(|(wall, floor)| wall / floor)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let n = batch_walls.len().max(1) as f64;
        out["added_latency_ms"] = added_ms.into();
        out["emulator_ms_per_call"] = round(own_ms, 2).into();
        out["deepest_aggregate_mean"] = round(depths.iter().sum::<usize>() as f64 / n, 2).into();
        out["wall_ms_per_batch"] = round(batch_walls.iter().sum::<f64>() / n, 1).into();
        out["floor_ms_per_batch"] = round(floors.iter().sum::<f64>() / n, 1).into();
        out["wall_over_floor"] = round(
            batch_walls.iter().sum::<f64>() / floors.iter().sum::<f64>().max(1e-9),
            3,
        )
        .into();
        out["wall_over_floor_p50"] =
            round(ratios.get(ratios.len() / 2).copied().unwrap_or(0.0), 3).into();
        out["wall_over_floor_max"] = round(ratios.last().copied().unwrap_or(0.0), 3).into();
    }
    if args.failure_rate > 0.0 {
        let seen = faults.seen.lock().map_err(|_| "poisoned")?;
        out["transient_failure_rate"] = args.failure_rate.into();
        out["transient_failures_injected"] = faults.injected.load(Ordering::Relaxed).into();
        out["batches_reported"] = reported.into();
        out["published_after_newer_version"] = seen.out_of_order.into();
        out["duplicates"] = seen.duplicates.into();
        out["duplicate_fraction"] = round(seen.duplicates as f64 / records.max(1) as f64, 5).into();
        out["distinct_published"] = seen.ids.len().into();
    }
    println!("{out}");
    if args.input.is_none() && args.write.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Process start to handler ready, measured from outside: the median of
/// `runs` fresh processes that build the handler and say so.
fn init_from_process_start(runs: usize) -> Result<f64, Error> {
    let exe = std::env::current_exe()?;
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let spawned = Instant::now();
        let mut child = Command::new(&exe)
            .arg("--init-only")
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready = spawned.elapsed();
        child.wait()?;
        if !line.starts_with("ready") {
            return Err(format!("init run failed: {line:?}").into());
        }
        times.push(ready.as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `USER_HZ`, the unit of `/proc/<pid>/stat` times on Linux.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU time of this process, in clock ticks.
fn cpu_ticks() -> Result<u64, Error> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').ok_or("unreadable /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    let utime: u64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

fn peak_rss_kb() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("unreadable VmHWM")?
        .parse()?)
}

/// Writes `args.events` stream events of `args.records` INSERT records each,
/// one event per record, several records per aggregate, one JSON event a line.
fn generate(path: &str, args: &Args) -> Result<(), Error> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    let mut rng = fastrand::Rng::with_seed(7);
    let aggregates_per_event = (args.records / args.records_per_aggregate).max(1);
    let mut sequence: u128 = 4_421_584_500_000_000_017_450_439_091;
    for batch in 0..args.events {
        let mut versions = vec![0u64; aggregates_per_event];
        let mut records = Vec::with_capacity(args.records);
        for _ in 0..args.records {
            let slot = rng.usize(..aggregates_per_event);
            versions[slot] += 1;
            let order = format!("o-{batch:04}-{slot:03}");
            let event = Event::builder("Order", &order, versions[slot], "OrderUpdated")
                .payload(&serde_json::json!({
                    "orderId": order,
                    "customerId": format!("c-{}", rng.u32(10_000..99_999)),
                    "status": "CONFIRMED",
                    "lines": [
                        {"sku": format!("SKU-{}", rng.u32(1000..9999)), "qty": rng.u32(1..5), "unitPrice": rng.u32(100..10_000)},
                        {"sku": format!("SKU-{}", rng.u32(1000..9999)), "qty": rng.u32(1..5), "unitPrice": rng.u32(100..10_000)}
                    ],
                    "total": rng.u32(100..50_000),
                    "currency": "EUR",
                    "shippingAddress": {"street": "Hauptstrasse 12", "city": "Berlin", "postalCode": "10115", "country": "DE"}
                }))
                .correlation_id(format!("req-{}", rng.u64(..)))
                .traceparent(format!(
                    "00-{:032x}-{:016x}-01",
                    rng.u128(..),
                    rng.u64(..)
                ))
                .build()?;
            sequence += 1;
            let kind = if versions[slot] == 1 {
                "INSERT"
            } else {
                "MODIFY"
            };
            records.push(
                stream_record(kind, &sequence.to_string(), std::slice::from_ref(&event))
                    .ok_or("cannot encode a generated event")?,
            );
        }
        writeln!(out, "{}", stream_event_json(records))?;
    }
    out.flush()?;
    Ok(())
}

/// Transient failures of a stable random share of publish attempts, and a
/// record of what reached the publisher.
struct Faults {
    rate: f64,
    attempts: Mutex<HashMap<EventId, u32>>,
    seen: Mutex<Seen>,
    calls: AtomicU64,
    injected: AtomicU64,
    null: bool,
}

#[derive(Default)]
struct Seen {
    ids: HashSet<EventId>,
    newest: HashMap<String, u64>,
    out_of_order: u64,
    duplicates: u64,
}

impl Faults {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            attempts: Mutex::default(),
            seen: Mutex::default(),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            null: false,
        }
    }

    /// Whether this attempt of `id` fails: a hash of the id and the attempt
    /// number, so a rerun fails the same attempts.
    fn fails(&self, id: &EventId) -> bool {
        let Ok(mut attempts) = self.attempts.lock() else {
            return false;
        };
        let n = attempts.entry(*id).or_insert(0);
        *n += 1;
        let bits = id.as_uuid().as_u128();
        let mut x = (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17) ^ u64::from(*n);
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        (x as f64 / u64::MAX as f64) < self.rate
    }

    fn delivered(&self, event: &Event) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if !seen.ids.insert(event.id) {
            seen.duplicates += 1;
            return;
        }
        let newest = seen.newest.entry(event.aggregate_id.clone()).or_insert(0);
        let late = event.aggregate_version < *newest;
        *newest = (*newest).max(event.aggregate_version);
        if late {
            seen.out_of_order += 1;
        }
    }
}

struct Tracked<'a, P> {
    inner: &'a P,
    faults: &'a Faults,
}

impl<P: Publisher> Publisher for Tracked<'_, P> {
    fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size()
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        self.faults.calls.fetch_add(1, Ordering::Relaxed);
        if self.faults.null && self.faults.rate <= 0.0 {
            return vec![Ok(()); request.events.len()];
        }
        if self.faults.rate <= 0.0 {
            return self.inner.publish(request).await;
        }
        let failing: Vec<bool> = request
            .events
            .iter()
            .map(|e| self.faults.fails(&e.id))
            .collect();
        let forward: Vec<Event> = request
            .events
            .iter()
            .zip(&failing)
            .filter(|(_, f)| !**f)
            .map(|(e, _)| e.clone())
            .collect();
        let mut results = if forward.is_empty() {
            Vec::new()
        } else if self.faults.null {
            vec![Ok(()); forward.len()]
        } else {
            self.inner.publish(PublishRequest::new(&forward)).await
        };
        for (event, result) in forward.iter().zip(&results) {
            if result.is_ok() {
                self.faults.delivered(event);
            }
        }
        let mut results = results.drain(..);
        failing
            .into_iter()
            .map(|failed| {
                if failed {
                    self.faults.injected.fetch_add(1, Ordering::Relaxed);
                    Err(PublishError::transient("injected: broker unavailable"))
                } else {
                    results
                        .next()
                        .unwrap_or_else(|| Err(PublishError::transient("missing result")))
                }
            })
            .collect()
    }
}

/// The handler's EventBridge publisher again, its client pointed at a fault
/// proxy in front of the emulator.
struct Proxied {
    proxy: FaultProxy,
    publisher: AwsPublisher,
}

impl Proxied {
    async fn start(handler: &outbox_lambda::PublishEventsHandler) -> Result<Self, Error> {
        let AwsPublisher::EventBridge(deployed) = handler.publisher() else {
            return Err("--added-latency-ms needs an eventbridge:// target".into());
        };
        let endpoint = std::env::var("AWS_ENDPOINT_URL_EVENTBRIDGE")
            .map_err(|_| "AWS_ENDPOINT_URL_EVENTBRIDGE is not set")?;
        let host_port = endpoint
            .split("://")
            .nth(1)
            .unwrap_or(&endpoint)
            .trim_end_matches('/');
        let upstream = tokio::net::lookup_host(host_port)
            .await?
            .next()
            .ok_or("cannot resolve the EventBridge endpoint")?;
        let proxy = FaultProxy::start(upstream).await?;
        let config = outbox_aws::load_config().await;
        // The deployed client's settings, at the proxy's address.
        let conf = aws_sdk_eventbridge::config::Builder::from(&config)
            .retry_config(aws_sdk_eventbridge::config::retry::RetryConfig::disabled())
            .stalled_stream_protection(
                aws_sdk_eventbridge::config::StalledStreamProtectionConfig::disabled(),
            )
            .endpoint_url(proxy.url_for("http"))
            .build();
        let client = aws_sdk_eventbridge::Client::from_conf(conf);
        let publisher = AwsPublisher::EventBridge(
            outbox_eventbridge::EventBridgePublisher::new(client, deployed.bus_name())
                .source("urn:outbox-bench"),
        );
        Ok(Self { proxy, publisher })
    }

    /// The emulator's own time for one call of 10 entries, through the proxy
    /// without delay: the mean of `calls` calls one after the other.
    async fn calibrate(&self, calls: usize) -> Result<f64, Error> {
        let events: Vec<Event> = (0..10u64)
            .map(|i| Event::builder("Calibration", format!("c-{i}"), 1, "Measured").build())
            .collect::<Result<_, _>>()?;
        // One call first, so connection set-up costs are as in the run.
        let _ = self.publisher.publish(PublishRequest::new(&events)).await;
        let started = Instant::now();
        for _ in 0..calls {
            let results = self.publisher.publish(PublishRequest::new(&events)).await;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                return Err(format!("calibration call failed: {e}").into());
            }
        }
        Ok(started.elapsed().as_secs_f64() * 1e3 / calls as f64)
    }
}

/// For each stream event of the input, the most events any one aggregate
/// has in it: the calls its batch needs one after the other.
fn deepest_aggregates(path: &str) -> Result<Vec<usize>, Error> {
    let reader = BufReader::new(std::fs::File::open(path)?);
    let mut depths = Vec::new();
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event = LambdaStreamEvent::from_json(&line)?;
        let mut per_aggregate: HashMap<(String, String), usize> = HashMap::new();
        for raw in &event.records {
            if let Ok(record) = decode_lambda_record(raw) {
                if let Change::Events(item) = record.change {
                    *per_aggregate
                        .entry((item.aggregate_type, item.aggregate_id))
                        .or_default() += item.events.len();
                }
            }
        }
        depths.push(per_aggregate.values().copied().max().unwrap_or(0));
    }
    Ok(depths)
}
