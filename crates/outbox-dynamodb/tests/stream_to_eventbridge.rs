//! The standalone stream relay end to end: business writes and their events
//! committed together on DynamoDB Local, the outbox table's stream relayed by
//! `Relay` + `StreamSource` to an EventBridge bus (moto), and a rule
//! delivering to an SQS queue that the test reads back. Part-way the relay
//! crashes (its task is aborted, nothing released) and a new process takes
//! the stream over once the old lease has run out.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType,
};
use outbox_core::cloudevents::Received;
use outbox_core::{
    DeadLetters, Event, EventId, PublishRequest, PublishResult, Publisher, Relay, RelayConfig,
    RetryPolicy, Stats,
};
use outbox_dynamodb::{DynamoOutbox, StreamSource};
use outbox_eventbridge::{setup as bus_setup, EventBridgePublisher};
use outbox_sqs::{setup as queue_setup, SqsReceiver};

const SOURCE: &str = "com.example.orders";
const AGGREGATES: usize = 20;
/// Transaction rounds written before the crash; the rest come after.
const ROUNDS_BEFORE_CRASH: usize = 2;
const BATCH_SIZE: usize = 10;
/// Each transaction carries 1 to 3 events of its aggregate.
const MAX_EVENTS_PER_TRANSACTION: usize = 3;
/// Both relays' lease: how long the crashed one keeps the stream.
const LEASE_TTL: Duration = Duration::from_secs(1);

/// The publisher under test, remembering what each successful `PutEvents`
/// call carried, in call order: the relay's own order, independent of the
/// queue behind the bus.
#[derive(Clone)]
struct Recorded<P> {
    inner: P,
    published: Arc<Mutex<Vec<Event>>>,
}

impl<P: Publisher> Publisher for Recorded<P> {
    fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size()
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let results = self.inner.publish(request).await;
        let mut published = self.published.lock().unwrap();
        for (event, result) in request.events.iter().zip(&results) {
            if result.is_ok() {
                published.push(event.clone());
            }
        }
        results
    }
}

struct World {
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    events: aws_sdk_eventbridge::Client,
    outbox: DynamoOutbox,
    orders: String,
    bus: String,
    receiver: SqsReceiver,
}

async fn world() -> World {
    outbox_aws::testing::require_local_endpoints(&[
        "DYNAMODB",
        "DYNAMODB_STREAMS",
        "EVENTBRIDGE",
        "SQS",
    ]);
    let config = outbox_aws::load_config().await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let events = aws_sdk_eventbridge::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);

    let outbox = DynamoOutbox::new(dynamodb.clone(), outbox_aws::testing::unique_name("outbox"));
    outbox.create_table_if_missing().await.unwrap();
    let orders = outbox_aws::testing::unique_name("orders");
    create_business_table(&dynamodb, &orders).await;

    let bus = outbox_aws::testing::unique_name("orders-bus");
    bus_setup::ensure_bus(&events, &bus).await.unwrap();
    let queue =
        queue_setup::ensure_queue(&sqs, &outbox_aws::testing::unique_name("shipping"), false)
            .await
            .unwrap();
    let rule = outbox_aws::testing::unique_name("orders-to-shipping");
    bus_setup::ensure_rule_to_queue(
        &events,
        &bus,
        &rule,
        &queue.arn,
        &bus_setup::source_pattern(SOURCE),
    )
    .await
    .unwrap();
    let rule_arn = events
        .describe_rule()
        .name(&rule)
        .event_bus_name(&bus)
        .send()
        .await
        .unwrap()
        .arn
        .unwrap();
    queue_setup::allow_senders(&sqs, &queue, &[&rule_arn])
        .await
        .unwrap();

    World {
        streams: aws_sdk_dynamodbstreams::Client::new(&config),
        receiver: SqsReceiver::new(sqs, &queue.url),
        dynamodb,
        events,
        outbox,
        orders,
        bus,
    }
}

/// A plain entity table: no stream, the relay never reads it.
async fn create_business_table(client: &aws_sdk_dynamodb::Client, name: &str) {
    client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

impl World {
    fn source(&self) -> StreamSource {
        StreamSource::new(
            self.dynamodb.clone(),
            self.streams.clone(),
            self.outbox.table(),
        )
        .consumer("eventbridge")
        .poll_interval(Duration::from_millis(50))
        .lease_ttl(LEASE_TTL)
        .wait_for_lease(true)
    }

    fn relay(
        &self,
        source: StreamSource,
        published: &Arc<Mutex<Vec<Event>>>,
    ) -> Relay<StreamSource, Recorded<EventBridgePublisher>> {
        let publisher = Recorded {
            inner: EventBridgePublisher::new(self.events.clone(), &self.bus).source(SOURCE),
            published: published.clone(),
        };
        let config = RelayConfig::default()
            .batch_size(BATCH_SIZE)
            .idle_poll(Duration::from_millis(50))
            .retry(RetryPolicy {
                initial: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
                ..RetryPolicy::default()
            });
        Relay::new(source, publisher, config).unwrap()
    }

    /// Transaction `round` of every aggregate that has one, aggregates
    /// interleaved: each is the order's entity `Put` plus its next 1 to 3
    /// events, committed together.
    async fn write_round(&self, round: usize, next_version: &mut [u64]) -> Vec<Event> {
        let mut written = Vec::new();
        for (a, next) in next_version.iter_mut().enumerate() {
            // Aggregates have 3 or 4 transactions.
            if round >= 3 + a % 2 {
                continue;
            }
            let order = format!("order-{a}");
            let count = 1 + ((a + round) % MAX_EVENTS_PER_TRANSACTION) as u64;
            let events: Vec<Event> = (*next..*next + count)
                .map(|version| {
                    Event::builder("Order", &order, version, "OrderUpdated")
                        .correlation_id(format!("checkout-{a}-{round}"))
                        .payload(&serde_json::json!({ "round": round, "version": version }))
                        .build()
                        .unwrap()
                })
                .collect();
            *next += count;
            let entity = Put::builder()
                .table_name(&self.orders)
                .item("pk", AttributeValue::S(order.clone()))
                .item("revision", AttributeValue::N(round.to_string()))
                .build()
                .unwrap();
            self.outbox
                .transaction()
                .put(entity)
                .events(events.iter().cloned())
                .commit()
                .await
                .unwrap();
            written.extend(events);
        }
        written
    }
}

/// Reads the queue into `arrived` until it holds `n` distinct events or
/// `timeout` has passed.
async fn read_until(
    receiver: &SqsReceiver,
    arrived: &mut Vec<Received>,
    n: usize,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let distinct = arrived
            .iter()
            .map(|r| r.event.id)
            .collect::<HashSet<_>>()
            .len();
        let left = deadline.saturating_duration_since(Instant::now());
        if distinct >= n || left.is_zero() {
            return;
        }
        let more = receiver
            .collect_events(n - distinct, left.min(Duration::from_secs(2)))
            .await
            .unwrap();
        arrived.extend(more);
    }
}

/// Per aggregate, the first delivery of each event comes in version order.
fn assert_in_aggregate_order<'a>(what: &str, events: impl IntoIterator<Item = &'a Event>) {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in events {
        if !seen.insert(e.id) {
            continue;
        }
        let prev = last
            .insert(&e.aggregate_id, e.aggregate_version)
            .unwrap_or(0);
        assert!(
            e.aggregate_version > prev,
            "{what}: {} version {} first delivered after version {prev}",
            e.aggregate_id,
            e.aggregate_version
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_relay_survives_a_crash_and_delivers_everything_in_order() {
    let started = Instant::now();
    let w = world().await;
    let first_source = w.source();
    first_source.create_tables_if_missing().await.unwrap();

    let mut next_version = vec![1u64; AGGREGATES];
    let mut written = w.write_round(0, &mut next_version).await;
    let published = Arc::new(Mutex::new(Vec::new()));
    let first = w.relay(first_source, &published);
    let crashed = tokio::spawn(async move { first.run(std::future::pending()).await });
    for round in 1..ROUNDS_BEFORE_CRASH {
        written.extend(w.write_round(round, &mut next_version).await);
    }

    // Crash once some events are through: no shutdown, no release.
    let mut arrived = Vec::new();
    read_until(
        &w.receiver,
        &mut arrived,
        written.len() / 3,
        Duration::from_secs(20),
    )
    .await;
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
    let before_crash = arrived.len();
    assert!(before_crash > 0, "nothing arrived before the crash");

    // The next process waits for the dead one's lease, then resumes from the
    // checkpoints while the service keeps writing.
    let second_source = w.source();
    let second = w.relay(second_source.clone(), &published);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let resumed = tokio::spawn(async move {
        second
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let mut round = ROUNDS_BEFORE_CRASH;
    loop {
        let more = w.write_round(round, &mut next_version).await;
        if more.is_empty() {
            break;
        }
        written.extend(more);
        round += 1;
    }
    assert!(
        before_crash < written.len(),
        "the crash must come before the end: {before_crash} of {} arrived",
        written.len()
    );

    read_until(
        &w.receiver,
        &mut arrived,
        written.len(),
        Duration::from_secs(40),
    )
    .await;
    stop.send(()).unwrap();
    resumed.await.unwrap().unwrap();
    second_source.release().await.unwrap();

    // Every event arrived, exactly as written.
    let by_id: HashMap<EventId, &Event> = written.iter().map(|e| (e.id, e)).collect();
    assert_eq!(by_id.len(), written.len());
    let mut delivered = HashSet::new();
    for r in &arrived {
        assert_eq!(r.source, SOURCE);
        let original = by_id
            .get(&r.event.id)
            .unwrap_or_else(|| panic!("an event that was never written arrived: {:?}", r.event));
        assert_eq!(&r.event, *original);
        delivered.insert(r.event.id);
    }
    assert_eq!(
        delivered.len(),
        written.len(),
        "{} of {} events arrived",
        delivered.len(),
        written.len()
    );

    // Order per aggregate: what the relay sent, and what the queue delivered.
    let published = published.lock().unwrap().clone();
    assert_in_aggregate_order("PutEvents calls", &published);
    assert_in_aggregate_order("SQS arrivals", arrived.iter().map(|r| &r.event));

    // The crash repeats the batch it interrupted. A batch ends on a stream
    // record's boundary (the checkpoint moves by whole transactions), so it
    // can run past the batch size by the rest of one transaction.
    let bound = BATCH_SIZE + MAX_EVENTS_PER_TRANSACTION - 1;
    let duplicates = arrived.len() - delivered.len();
    let mut counted = HashSet::new();
    let repeated: Vec<(String, u64)> = arrived
        .iter()
        .filter(|r| !counted.insert(r.event.id))
        .map(|r| (r.event.aggregate_id.clone(), r.event.aggregate_version))
        .collect();
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, more than one batch of {BATCH_SIZE} and the rest of a transaction: {repeated:?}"
    );

    let after = w.source();
    assert!(after.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(after.stats().await.unwrap().dead, 0);

    eprintln!(
        "{} events in {} transactions of {AGGREGATES} aggregates; {before_crash} arrived before \
         the crash, {duplicates} duplicates; {:.1?}",
        written.len(),
        (0..AGGREGATES).map(|a| 3 + a % 2).sum::<usize>(),
        started.elapsed()
    );
}
