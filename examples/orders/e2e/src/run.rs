//! The whole run: resources, functions, mappings, faults, traffic, then the
//! check of what Shipping holds against what the API accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, Select};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Serialize;

use crate::faults::{EventBridgeProxy, FaultPlan, FaultStats};
use crate::front::FrontDoor;
use crate::queue::{QueuePoller, QueueStats};
use crate::runtime::{Function, FunctionSpec, FunctionStats, KillPlan};
use crate::setup::{self, Clients};
use crate::stream::{StreamPoller, StreamStats};
use crate::template::{self, ORDERS_API_FUNCTION, PUBLISH_EVENTS_FUNCTION, SHIPPING_FUNCTION};
use crate::workload::{self, Expected};
use crate::Error;

/// The function binaries, as `cargo build` (or `cargo lambda build`) names them.
pub const ORDERS_API_BIN: &str = "orders-api";
pub const PUBLISH_EVENTS_BIN: &str = "publish-events";
pub const SHIPPING_BIN: &str = "shipping";
/// The inbox partition Shipping records its events under.
pub const SHIPPING_CONSUMER: &str = "shipping";

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub orders: usize,
    /// Where the function binaries are.
    pub bin_dir: PathBuf,
    /// The SAM template the mappings are read from (defaults when missing).
    pub template: PathBuf,
    /// Where the functions' logs go.
    pub log_dir: PathBuf,
    /// Execution environments of the API function.
    pub api_environments: usize,
    /// Requests in flight at once.
    pub client_concurrency: usize,
    pub faults: FaultPlan,
    /// Kill `publish-events` during its n-th invocation (or the next one
    /// still running when the kill comes).
    pub kill_publish_events_at: Option<KillPlan>,
    pub kill_shipping_at: Option<KillPlan>,
    /// How long to wait for Shipping to catch up after the traffic.
    pub settle_timeout: Duration,
}

impl RunConfig {
    pub fn new(orders: usize, bin_dir: PathBuf, template: PathBuf, log_dir: PathBuf) -> Self {
        Self {
            orders,
            bin_dir,
            template,
            log_dir,
            api_environments: 2,
            client_concurrency: 4,
            faults: FaultPlan::default(),
            kill_publish_events_at: Some(KillPlan {
                from_invocation: 3,
                after: Duration::from_millis(40),
            }),
            kill_shipping_at: Some(KillPlan {
                from_invocation: 5,
                after: Duration::from_millis(10),
            }),
            settle_timeout: Duration::from_secs(300),
        }
    }
}

/// What a run did and found. `problems` is empty when every check passed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub orders: u64,
    pub requests: u64,
    /// Requests that had to be refused (400, 404, 409) and were.
    pub refusals_checked: u64,
    /// Events the orders wrote (read from the outbox stream).
    pub events_written: u64,
    /// Events Shipping applied: one inbox record each.
    pub delivered: u64,
    /// Deliveries to Shipping beyond the first of each event (EventBridge
    /// retries, SQS redeliveries); the inbox made them harmless.
    pub duplicates_absorbed: u64,
    /// PutEvents entries answered with an injected error.
    pub put_events_failures_injected: u64,
    pub function_kills: u64,
    /// Stream batches retried (partial failures, bisections, errors) plus
    /// SQS messages received again.
    pub retries: u64,
    /// Events written that Shipping never applied and no dead letter holds.
    pub lost: u64,
    /// Orders whose shipment does not end where the API left the order.
    pub out_of_order: u64,
    /// Deliveries that reached Shipping after a later version of the same
    /// order (tolerated through `aggregateversion`).
    pub reordered_deliveries: u64,
    /// Events in the relay's dead-letter table.
    pub dead_letters: u64,
    pub shipping_dlq_messages: u64,
    pub failure_destination_messages: u64,
    pub elapsed_ms: u64,
    /// Process start to first `/next`, per function, first start.
    pub init_ms: BTreeMap<String, u64>,
    pub functions: BTreeMap<String, FunctionStats>,
    pub stream: StreamStats,
    pub queue: QueueStats,
    pub faults: FaultStats,
    /// Where the event source mapping settings came from.
    pub mappings_from: String,
    pub problems: Vec<String>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// The summary for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("  {k:<30} {v}\n"));
        };
        out.push_str("orders end to end\n");
        line(&mut out, "orders", self.orders.to_string());
        line(
            &mut out,
            "requests",
            format!(
                "{} ({} refusals checked)",
                self.requests, self.refusals_checked
            ),
        );
        line(&mut out, "events written", self.events_written.to_string());
        line(&mut out, "delivered", self.delivered.to_string());
        line(
            &mut out,
            "duplicates absorbed",
            self.duplicates_absorbed.to_string(),
        );
        line(
            &mut out,
            "put-events failures injected",
            self.put_events_failures_injected.to_string(),
        );
        line(&mut out, "function kills", self.function_kills.to_string());
        line(&mut out, "retries", self.retries.to_string());
        line(&mut out, "lost", self.lost.to_string());
        line(&mut out, "out of order", self.out_of_order.to_string());
        line(
            &mut out,
            "reordered deliveries",
            self.reordered_deliveries.to_string(),
        );
        line(
            &mut out,
            "dead letters / DLQ / on-failure",
            format!(
                "{} / {} / {}",
                self.dead_letters, self.shipping_dlq_messages, self.failure_destination_messages
            ),
        );
        for (f, ms) in &self.init_ms {
            line(&mut out, &format!("init {f}"), format!("{ms} ms"));
        }
        line(
            &mut out,
            "elapsed",
            format!("{:.1} s", self.elapsed_ms as f64 / 1000.0),
        );
        line(&mut out, "mappings from", self.mappings_from.clone());
        if self.problems.is_empty() {
            out.push_str("PASSED\n");
        } else {
            out.push_str("FAILED\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The shipment status each order status leads to.
pub fn shipment_status(order_status: &str) -> &'static str {
    match order_status {
        "paid" => "ready_to_ship",
        "cancelled" => "cancelled",
        _ => "awaiting_payment",
    }
}

/// Every item of a table (the check reads everything once, at the end).
pub async fn scan_all(
    db: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<Vec<HashMap<String, AttributeValue>>, Error> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let page = db
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| Error::Check(format!("Scan {table}: {}", outbox_aws::describe(&e))))?;
        items.extend(page.items.unwrap_or_default());
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(items);
        }
    }
}

async fn count_items(db: &aws_sdk_dynamodb::Client, table: &str) -> Result<u64, Error> {
    let mut total = 0u64;
    let mut start = None;
    loop {
        let page = db
            .scan()
            .table_name(table)
            .select(Select::Count)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| Error::Check(format!("Scan {table}: {}", outbox_aws::describe(&e))))?;
        total = total.saturating_add(u64::try_from(page.count).unwrap_or(0));
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(total);
        }
    }
}

/// Messages in a queue, visible or in flight.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<u64, Error> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| {
            Error::Check(format!(
                "GetQueueAttributes {url}: {}",
                outbox_aws::describe(&e)
            ))
        })?;
    let attrs = out.attributes.unwrap_or_default();
    let get = |k: &QueueAttributeName| {
        attrs
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(
        get(&QueueAttributeName::ApproximateNumberOfMessages).saturating_add(get(
            &QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )),
    )
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    }
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse().ok(),
        _ => None,
    }
}

/// The events the outbox table says were written: the sum of its items'
/// versions (one item per order, its version counting its events).
async fn outbox_events(db: &aws_sdk_dynamodb::Client) -> Result<u64, Error> {
    Ok(scan_all(db, setup::OUTBOX_TABLE)
        .await?
        .iter()
        .filter_map(|i| number(i, "version"))
        .sum())
}

fn binary(config: &RunConfig, name: &str) -> Result<PathBuf, Error> {
    let path = config.bin_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Setup(format!(
            "{} is missing: build the functions first (cargo build -p orders -p outbox-lambda --bins)",
            path.display()
        )))
    }
}

fn pairs(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Runs everything and checks it; the summary says what passed.
pub async fn run(config: &RunConfig) -> Result<Summary, Error> {
    let started = Instant::now();
    for service in ["DYNAMODB", "DYNAMODB_STREAMS", "EVENTBRIDGE", "SQS"] {
        let var = format!("AWS_ENDPOINT_URL_{service}");
        match std::env::var(&var) {
            Ok(url) if url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost") => {}
            Ok(url) => return Err(Error::Setup(format!("{var}={url} is not a local emulator; the run only uses 127.0.0.1"))),
            Err(_) => return Err(Error::Setup(format!("{var} is not set: start the emulators with scripts/services start and load eval \"$(scripts/services env)\""))),
        }
    }
    let settings =
        template::load_or_default(&config.template).map_err(|e| Error::Setup(e.to_string()))?;
    std::fs::create_dir_all(&config.log_dir)
        .map_err(|e| Error::Setup(format!("{}: {e}", config.log_dir.display())))?;
    let clients = Clients::from_env().await;
    let resources = setup::create(
        &clients,
        settings.visibility_timeout,
        settings.max_receive_count,
    )
    .await?;

    let upstream = std::env::var("AWS_ENDPOINT_URL_EVENTBRIDGE").unwrap_or_default();
    let upstream = crate::http::socket_addr_of(&upstream).map_err(Error::Setup)?;
    let proxy = EventBridgeProxy::start(upstream, config.faults)
        .await
        .map_err(|e| Error::Setup(format!("fault proxy: {e}")))?;

    let log = |name: &str| Some(config.log_dir.join(format!("{name}.log")));
    let bus_target = format!("eventbridge://{}", setup::BUS);
    let publish_events = Arc::new(Function::new(FunctionSpec {
        name: PUBLISH_EVENTS_FUNCTION.to_owned(),
        binary: binary(config, PUBLISH_EVENTS_BIN)?,
        env: {
            let mut env = pairs(&[
                ("OUTBOX_TARGET", bus_target.as_str()),
                ("OUTBOX_SOURCE", setup::SOURCE),
                ("OUTBOX_DEAD_LETTER_TABLE", setup::OUTBOX_DEAD_LETTERS_TABLE),
            ]);
            env.push(("AWS_ENDPOINT_URL_EVENTBRIDGE".to_owned(), proxy.url()));
            env
        },
        timeout: settings.timeout(PUBLISH_EVENTS_FUNCTION, Duration::from_secs(60)),
        log: log(PUBLISH_EVENTS_FUNCTION),
    }));
    let shipping = Arc::new(Function::new(FunctionSpec {
        name: SHIPPING_FUNCTION.to_owned(),
        binary: binary(config, SHIPPING_BIN)?,
        env: pairs(&[
            ("SHIPMENTS_TABLE", setup::SHIPMENTS_TABLE),
            ("INBOX_TABLE", setup::SHIPPING_INBOX_TABLE),
        ]),
        timeout: settings.timeout(SHIPPING_FUNCTION, Duration::from_secs(10)),
        log: log(SHIPPING_FUNCTION),
    }));
    let api_binary = binary(config, ORDERS_API_BIN)?;
    let apis: Vec<Arc<Function>> = (0..config.api_environments.max(1))
        .map(|_| {
            Arc::new(Function::new(FunctionSpec {
                name: ORDERS_API_FUNCTION.to_owned(),
                binary: api_binary.clone(),
                env: pairs(&[
                    ("ORDERS_TABLE", setup::ORDERS_TABLE),
                    ("OUTBOX_TABLE", setup::OUTBOX_TABLE),
                    ("OUTBOX_SOURCE", setup::SOURCE),
                ]),
                timeout: settings.timeout(ORDERS_API_FUNCTION, Duration::from_secs(10)),
                log: log(ORDERS_API_FUNCTION),
            }))
        })
        .collect();
    let mut all: Vec<Arc<Function>> = vec![publish_events.clone(), shipping.clone()];
    all.extend(apis.iter().cloned());
    // Cold starts before the traffic, so init time is measured alone.
    for f in &all {
        f.warm_up(Duration::from_secs(30))
            .await
            .map_err(|e| Error::Setup(e.to_string()))?;
    }
    if let Some(plan) = config.kill_publish_events_at {
        publish_events.plan_kill(plan);
    }
    if let Some(plan) = config.kill_shipping_at {
        shipping.plan_kill(plan);
    }

    let stream = StreamPoller::new(
        clients.streams.clone(),
        clients.sqs.clone(),
        resources.stream_arn.clone(),
        publish_events.clone(),
        settings.stream.clone(),
        resources.failure_queue_url.clone(),
    );
    let queue = QueuePoller::new(
        clients.sqs.clone(),
        resources.shipping_queue_url.clone(),
        resources.shipping_queue_arn.clone(),
        shipping.clone(),
        settings.queue.clone(),
    );
    let stream_task = tokio::spawn(stream.clone().run());
    let queue_task = tokio::spawn(queue.clone().run());
    let front = FrontDoor::start(apis.clone())
        .await
        .map_err(|e| Error::Setup(format!("front door: {e}")))?;

    tracing::info!(orders = config.orders, front_door = %front.addr(), "sending orders");
    let traffic = workload::send(front.addr(), config.orders, config.client_concurrency).await;
    tracing::info!(
        requests = traffic.requests,
        "traffic done; waiting for Shipping"
    );

    let mut problems = Vec::new();
    let settled = wait_settled(&clients, &resources, &stream, config.settle_timeout).await?;
    if !settled {
        problems.push(format!(
            "Shipping had not caught up after {:?}",
            config.settle_timeout
        ));
    }
    stream_task.abort();
    queue_task.abort();
    drop(front);
    for f in &all {
        f.stop().await;
    }

    let mut summary = check(&clients, &resources, &traffic.expected, &stream, &queue).await?;
    problems.extend(traffic.mismatches.iter().map(|m| {
        format!(
            "{}: expected {}, got {} {}",
            m.request, m.expected, m.got, m.body
        )
    }));
    problems.append(&mut summary.problems);
    summary.problems = problems;
    summary.orders = traffic.expected.len() as u64;
    summary.requests = traffic.requests;
    summary.refusals_checked = traffic.refusals_checked;
    summary.faults = proxy.stats();
    summary.put_events_failures_injected = summary.faults.entries_failed;
    for f in &all {
        let stats = f.stats();
        if let Some(first) = stats.init_ms.first() {
            summary.init_ms.entry(f.name().to_owned()).or_insert(*first);
        }
        let entry = summary.functions.entry(f.name().to_owned()).or_default();
        merge_stats(entry, &stats);
    }
    summary.function_kills = summary.functions.values().map(|s| s.kills).sum();
    summary.retries = summary
        .stream
        .retries
        .saturating_add(summary.queue.redeliveries);
    summary.mappings_from = settings.origin.clone();
    summary.elapsed_ms = millis(started.elapsed());
    if let Some(plan) = config.kill_publish_events_at {
        let kills = summary
            .functions
            .get(PUBLISH_EVENTS_FUNCTION)
            .map_or(0, |s| s.kills);
        if kills == 0 {
            summary
                .problems
                .push(format!("publish-events was never killed (plan {plan:?})"));
        }
    }
    if let Some(plan) = config.kill_shipping_at {
        let kills = summary
            .functions
            .get(SHIPPING_FUNCTION)
            .map_or(0, |s| s.kills);
        if kills == 0 {
            summary
                .problems
                .push(format!("shipping was never killed (plan {plan:?})"));
        }
    }
    Ok(summary)
}

fn merge_stats(into: &mut FunctionStats, from: &FunctionStats) {
    into.invocations = into.invocations.saturating_add(from.invocations);
    into.responses = into.responses.saturating_add(from.responses);
    into.errors = into.errors.saturating_add(from.errors);
    into.starts = into.starts.saturating_add(from.starts);
    into.kills = into.kills.saturating_add(from.kills);
    into.crashes = into.crashes.saturating_add(from.crashes);
    into.timeouts = into.timeouts.saturating_add(from.timeouts);
    into.init_ms.extend(from.init_ms.iter().copied());
}

/// Waits until the stream mapping has read every event the outbox holds,
/// Shipping's inbox has them all and its queue is empty.
async fn wait_settled(
    clients: &Clients,
    resources: &setup::Resources,
    stream: &StreamPoller,
    timeout: Duration,
) -> Result<bool, Error> {
    let until = Instant::now() + timeout;
    let mut calm = 0;
    while Instant::now() < until {
        let written = outbox_events(&clients.dynamodb).await?;
        let seen = stream.stats().events_seen;
        let applied = count_items(&clients.dynamodb, setup::SHIPPING_INBOX_TABLE).await?;
        let depth = queue_depth(&clients.sqs, &resources.shipping_queue_url).await?;
        let discarded = stream.stats().discarded_records;
        let done = seen >= written && (applied >= written || discarded > 0) && depth == 0;
        tracing::info!(
            written,
            seen,
            applied,
            queued = depth,
            "waiting for Shipping"
        );
        calm = if done { calm + 1 } else { 0 };
        // Twice in a row: a message between queue and function is not missed.
        if calm >= 2 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(false)
}

/// Reads the tables and queues and compares them with what the API
/// accepted and what the stream carried.
async fn check(
    clients: &Clients,
    resources: &setup::Resources,
    expected: &HashMap<String, Expected>,
    stream: &StreamPoller,
    queue: &QueuePoller,
) -> Result<Summary, Error> {
    let db = &clients.dynamodb;
    let mut summary = Summary {
        stream: stream.stats(),
        queue: queue.stats(),
        ..Summary::default()
    };
    let written = stream.written();
    summary.events_written = written.len() as u64;
    let in_outbox = outbox_events(db).await?;
    if in_outbox != summary.events_written {
        summary.problems.push(format!(
            "the outbox holds {in_outbox} events, the stream carried {}",
            summary.events_written
        ));
    }
    let expected_events: u64 = expected.values().map(|e| e.version).sum();
    if expected_events != summary.events_written {
        summary.problems.push(format!(
            "the API accepted commands worth {expected_events} events, the stream carried {}",
            summary.events_written
        ));
    }

    let inbox: Vec<String> = scan_all(db, setup::SHIPPING_INBOX_TABLE)
        .await?
        .iter()
        .filter(|i| text(i, "pk").as_deref() == Some(SHIPPING_CONSUMER))
        .filter_map(|i| text(i, "sk"))
        .collect();
    let inbox_set: HashSet<&String> = inbox.iter().collect();
    summary.delivered = inbox_set.len() as u64;
    if inbox_set.len() != inbox.len() {
        summary
            .problems
            .push("the inbox holds an event twice".to_owned());
    }
    let dead = outbox_dynamodb::DeadLetterTable::new(db.clone(), setup::OUTBOX_DEAD_LETTERS_TABLE);
    summary.dead_letters = dead
        .count_dead()
        .await
        .map_err(|e| Error::Check(e.to_string()))?
        .saturating_add(
            dead.count_malformed()
                .await
                .map_err(|e| Error::Check(e.to_string()))?,
        );
    let unknown = inbox_set
        .iter()
        .filter(|id| !written.contains_key(id.as_str()))
        .count();
    if unknown > 0 {
        summary
            .problems
            .push(format!("{unknown} inbox records name events nobody wrote"));
    }
    let missing: Vec<&String> = written
        .keys()
        .filter(|id| !inbox_set.contains(id))
        .collect();
    // A dead-lettered event is visible and replayable, not lost; none is
    // expected in this run all the same.
    summary.lost = (missing.len() as u64).saturating_sub(summary.dead_letters);
    if summary.lost > 0 {
        summary.problems.push(format!(
            "{} events never reached Shipping, e.g. {:?}",
            summary.lost,
            missing.iter().take(3).collect::<Vec<_>>()
        ));
    }
    if summary.dead_letters > 0 {
        summary.problems.push(format!(
            "{} events were dead-lettered",
            summary.dead_letters
        ));
    }

    let shipments: HashMap<String, (String, u64)> = scan_all(db, setup::SHIPMENTS_TABLE)
        .await?
        .iter()
        .filter_map(|i| {
            Some((
                text(i, "order_id")?,
                (
                    text(i, "status").unwrap_or_default(),
                    number(i, "order_version").unwrap_or(0),
                ),
            ))
        })
        .collect();
    let mut wrong = Vec::new();
    for (order, want) in expected {
        let want_status = shipment_status(&want.status);
        match shipments.get(order) {
            Some((status, version)) if status == want_status && *version == want.version => {}
            got => wrong.push(format!(
                "{order}: expected {want_status} v{}, shipment {got:?}",
                want.version
            )),
        }
    }
    summary.out_of_order = wrong.len() as u64;
    if !wrong.is_empty() {
        summary.problems.push(format!(
            "{} orders' shipments do not match the API: {:?}",
            wrong.len(),
            wrong.iter().take(3).collect::<Vec<_>>()
        ));
    }
    let strays = shipments
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .count();
    if strays > 0 {
        summary.problems.push(format!(
            "{strays} shipments for orders the API never accepted"
        ));
    }

    let delivered = queue.delivered();
    summary.duplicates_absorbed = delivered.handed.values().map(|n| n.saturating_sub(1)).sum();
    summary.reordered_deliveries = delivered
        .versions
        .values()
        .map(|versions| {
            let mut highest = 0;
            let mut late = 0u64;
            for v in versions {
                if *v < highest {
                    late = late.saturating_add(1);
                }
                highest = highest.max(*v);
            }
            late
        })
        .sum();

    summary.shipping_dlq_messages = queue_depth(&clients.sqs, &resources.shipping_dlq_url).await?;
    summary.failure_destination_messages =
        queue_depth(&clients.sqs, &resources.failure_queue_url).await?;
    if summary.shipping_dlq_messages > 0 {
        summary.problems.push(format!(
            "{} messages in {}",
            summary.shipping_dlq_messages,
            setup::SHIPPING_DLQ
        ));
    }
    if summary.failure_destination_messages > 0 {
        summary.problems.push(format!(
            "{} batches sent to {}",
            summary.failure_destination_messages,
            setup::FAILURE_QUEUE
        ));
    }
    Ok(summary)
}
