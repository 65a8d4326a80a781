//! The DynamoDB Streams source driven by the core relay, against DynamoDB Local.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, StreamSpecification, StreamViewType, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{
    ClaimRequest, ClaimSource, DeadLetters, Event, Relay, RelayConfig, ReplaySelector, RetryPolicy,
    Stats, StoreError,
};
use outbox_dynamodb::{item, StreamSource};
use outbox_testkit::{order_event, Chaos, Fault, FaultyPublisher, RecordingPublisher};

struct Setup {
    client: Client,
    streams: aws_sdk_dynamodbstreams::Client,
    outbox: String,
}

async fn setup() -> Setup {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB", "DYNAMODB_STREAMS"]);
    let config = outbox_aws::load_config().await;
    let client = Client::new(&config);
    let streams = aws_sdk_dynamodbstreams::Client::new(&config);
    let outbox = outbox_aws::testing::unique_name("outbox");
    client
        .create_table()
        .table_name(&outbox)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(item::PK)
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(item::PK)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let s = Setup {
        client,
        streams,
        outbox,
    };
    s.source().create_tables_if_missing().await.unwrap();
    s
}

impl Setup {
    fn source(&self) -> StreamSource {
        StreamSource::new(self.client.clone(), self.streams.clone(), &self.outbox)
            .poll_interval(Duration::from_millis(50))
    }

    /// One transaction of one aggregate: the outbox item update with the
    /// version condition of item.rs.
    async fn commit(&self, events: &[Event]) {
        let first = &events[0];
        let key = item::aggregate_key(&first.aggregate_type, &first.aggregate_id).unwrap();
        let mut update = Update::builder()
            .table_name(&self.outbox)
            .key(item::PK, AttributeValue::S(key))
            .condition_expression("attribute_not_exists(#pk) OR #version = :prev")
            .expression_attribute_names("#pk", item::PK)
            .expression_attribute_values(
                ":prev",
                AttributeValue::N((first.aggregate_version - 1).to_string()),
            );
        let mut sets = Vec::new();
        for (name, value) in item::item_values(events, 0).unwrap() {
            sets.push(format!("#{name} = :{name}"));
            update = update
                .expression_attribute_names(format!("#{name}"), name.clone())
                .expression_attribute_values(format!(":{name}"), value);
        }
        let update = update
            .update_expression(format!("SET {}", sets.join(", ")))
            .build()
            .unwrap();
        self.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(update).build())
            .send()
            .await
            .unwrap();
    }

    /// `aggregates` aggregates, `transactions` transactions each of 1 to 3
    /// events, written round-robin so aggregates interleave in the stream.
    async fn write_many(&self, aggregates: usize, transactions: usize) -> Vec<Event> {
        let mut all = Vec::new();
        let mut next_version = vec![1u64; aggregates];
        for t in 0..transactions {
            for (a, next) in next_version.iter_mut().enumerate() {
                let count = 1 + (a + t) as u64 % 3;
                let events: Vec<Event> = (*next..*next + count)
                    .map(|v| order_event(&format!("agg-{a}"), v, "OrderUpdated"))
                    .collect();
                *next += count;
                self.commit(&events).await;
                all.extend(events);
            }
        }
        all
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

fn config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(10)
        .idle_poll(Duration::from_millis(50))
        .retry(fast_retry())
        .max_attempts(50)
}

/// Runs the relay until `done` holds (checked every 50 ms), at most `limit`.
async fn run_until<S: ClaimSource, P: outbox_core::Publisher>(
    relay: &Relay<S, P>,
    limit: Duration,
    done: impl Fn() -> bool,
) {
    let until = tokio::time::Instant::now() + limit;
    let stop = async {
        while !done() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    relay.run(stop).await.unwrap();
    assert!(done(), "relay did not finish within {limit:?}");
}

/// Per aggregate, the first delivery of each event comes in version order.
fn assert_in_aggregate_order(received: &[Event]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in received {
        if !seen.insert(e.id) {
            continue;
        }
        let prev = last
            .insert(&e.aggregate_id, e.aggregate_version)
            .unwrap_or(0);
        assert!(
            e.aggregate_version > prev,
            "{}: version {} delivered after {prev}",
            e.aggregate_id,
            e.aggregate_version
        );
    }
}

fn unique(received: &[Event]) -> usize {
    received.iter().map(|e| e.id).collect::<HashSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_event_once_in_aggregate_order() {
    let s = setup().await;
    let written = s.write_many(20, 4).await;
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(s.source(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(30), || {
        publisher.received().len() >= written.len()
    })
    .await;
    let received = publisher.received();
    assert_eq!(received.len(), written.len(), "duplicates");
    assert_eq!(unique(&received), written.len());
    let written_ids: HashSet<_> = written.iter().map(|e| e.id).collect();
    assert!(received.iter().all(|e| written_ids.contains(&e.id)));
    assert_in_aggregate_order(&received);
    // Multi-event transactions arrive whole and as written.
    let by_id: HashMap<_, _> = written.iter().map(|e| (e.id, e)).collect();
    assert!(received.iter().all(|e| by_id[&e.id] == e));
    let stats = relay.source().stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.published, stats.dead),
        (0, written.len() as u64, 0)
    );

    // A new source over the same checkpoints finds nothing left to publish.
    relay.source().release().await.unwrap();
    let again = s.source();
    for _ in 0..5 {
        assert_eq!(
            again.poll_stream().await.unwrap(),
            0,
            "re-read settled records"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

/// Stops a relay half-way, gracefully or by killing it mid-batch, and
/// starts a new source over the same checkpoint table.
async fn restart(crash: bool) {
    let s = setup().await;
    let written = s.write_many(30, 3).await;
    let first = RecordingPublisher::new().with_latency(Duration::from_millis(10));
    let source = s.source().lease_ttl(Duration::from_secs(1));
    let relay = Relay::new(source.clone(), first.clone(), config()).unwrap();
    let half = written.len() / 2;
    if crash {
        // Killed while a batch is in flight: its outcome is never recorded.
        let task = tokio::spawn(async move { relay.run(std::future::pending()).await });
        while first.received().len() < half {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task.abort();
        let _ = task.await;
    } else {
        run_until(&relay, Duration::from_secs(30), || {
            first.received().len() >= half
        })
        .await;
        source.release().await.unwrap();
    }
    drop(source);
    let before = first.received();
    assert!(
        before.len() < written.len(),
        "stopped too late to test a restart"
    );

    let second = RecordingPublisher::new();
    // After a crash the old lease has to run out first.
    let relay = Relay::new(s.source().wait_for_lease(true), second.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(30), || {
        unique(&[first.received(), second.received()].concat()) == written.len()
    })
    .await;
    // Give a wrongly re-read tail a chance to show up.
    relay.drain().await.unwrap();
    let all = [before, second.received()].concat();
    assert_eq!(
        unique(&all),
        written.len(),
        "events lost across the restart"
    );
    let duplicates = all.len() - written.len();
    assert!(
        duplicates <= config().batch_size,
        "{duplicates} events published again: more than the batch in flight"
    );
    assert_in_aggregate_order(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_shutdown_loses_nothing_and_repeats_at_most_the_last_batch() {
    restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_crash_loses_nothing_and_repeats_at_most_the_last_batch() {
    restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_order_and_a_poison_event_is_dead_lettered_then_replayed() {
    let s = setup().await;
    let written = s.write_many(10, 3).await;
    let poison = written
        .iter()
        .find(|e| e.aggregate_id == "agg-3" && e.aggregate_version == 2)
        .unwrap()
        .clone();
    let publisher = FaultyPublisher::new(RecordingPublisher::new()).with_chaos(Chaos {
        transient_rate: 0.25,
        ..Chaos::default()
    });
    publisher.script(poison.id, [Fault::Permanent]);
    let source = s.source();
    let relay = Relay::new(source.clone(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(60), || {
        unique(&publisher.inner().received()) >= written.len() - 1
    })
    .await;
    let received = publisher.inner().received();
    assert!(
        publisher
            .injected()
            .transient
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(!received.iter().any(|e| e.id == poison.id));
    assert_in_aggregate_order(&received);
    // Later events of the poisoned aggregate still flowed.
    assert!(received
        .iter()
        .any(|e| e.aggregate_id == "agg-3" && e.aggregate_version > 2));

    let dead = source.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.as_ref(), Some(&poison));
    assert_eq!(source.stats().await.unwrap().dead, 1);

    assert_eq!(source.replay(ReplaySelector::All).await.unwrap(), 1);
    run_until(&relay, Duration::from_secs(30), || {
        publisher
            .inner()
            .received()
            .iter()
            .any(|e| e.id == poison.id)
    })
    .await;
    let stats = source.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 0));
    assert!(source
        .dead_letters_table()
        .take_replays(10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_item_is_dead_lettered_and_does_not_block_the_shard() {
    let s = setup().await;
    s.commit(&[order_event("a", 1, "OrderCreated")]).await;
    s.client
        .put_item()
        .table_name(&s.outbox)
        .item(item::PK, AttributeValue::S("Order#bad".into()))
        .item(item::AGGREGATE_TYPE, AttributeValue::S("Order".into()))
        .item(item::AGGREGATE_ID, AttributeValue::S("bad".into()))
        .item(item::VERSION, AttributeValue::N("1".into()))
        .item(
            item::EVENTS,
            AttributeValue::L(vec![AttributeValue::S("{not an event".into())]),
        )
        .send()
        .await
        .unwrap();
    s.commit(&[order_event("a", 2, "OrderPaid")]).await;
    s.commit(&[order_event("b", 1, "OrderCreated")]).await;

    let publisher = RecordingPublisher::new();
    let source = s.source();
    let relay = Relay::new(source.clone(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(30), || {
        publisher.received().len() >= 3
    })
    .await;
    let malformed = source.dead_letters_table().malformed(10).await.unwrap();
    assert_eq!(malformed.len(), 1, "{malformed:?}");
    assert!(
        malformed[0].error.contains("events"),
        "{:?}",
        malformed[0].error
    );
    assert!(malformed[0].raw_record.contains("not an event"));
    assert!(malformed[0].raw_record.contains("Order#bad"));
    assert_eq!(source.stats().await.unwrap().pending, 0);

    // The checkpoint passed it: a new source reads nothing again.
    source.release().await.unwrap();
    let again = s.source();
    for _ in 0..5 {
        assert_eq!(again.poll_stream().await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(
        again
            .dead_letters_table()
            .malformed(10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_per_consumer() {
    let s = setup().await;
    s.commit(&[order_event("a", 1, "OrderCreated")]).await;
    let first = s.source();
    first.poll_stream().await.unwrap();

    let second = s.source();
    let err = second.poll_stream().await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("another relay"), "{err}");
    let claim = ClaimRequest::new(10, Duration::from_secs(5));
    assert!(matches!(
        second.claim(claim).await,
        Err(StoreError::Conflict(_))
    ));

    // A standby waits: it claims nothing while the first holds the stream.
    let standby = s.source().wait_for_lease(true);
    assert!(standby.claim(claim).await.unwrap().events.is_empty());

    // Another consumer has checkpoints and a lease of its own.
    let audit = s.source().consumer("audit");
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while audit.claim(claim).await.unwrap().events.is_empty() {
        assert!(tokio::time::Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Once the first lets go, the standby takes over and reads the event.
    first.release().await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while standby.claim(claim).await.unwrap().events.is_empty() {
        assert!(tokio::time::Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A process that dies holds the stream only until its lease runs out.
    let crashed = s
        .source()
        .consumer("short")
        .lease_ttl(Duration::from_millis(800));
    crashed.poll_stream().await.unwrap();
    drop(crashed);
    let next = s.source().consumer("short");
    assert!(next.poll_stream().await.is_err());
    tokio::time::sleep(Duration::from_millis(900)).await;
    next.poll_stream().await.unwrap();
}

#[tokio::test]
async fn dead_letter_write_of_a_relay_that_lost_the_lease_is_refused() {
    let s = setup().await;
    s.commit(&[order_event("fenced", 1, "OrderCreated")]).await;
    let first = s.source().lease_ttl(Duration::from_millis(300));
    let claim = ClaimRequest::new(10, Duration::from_secs(30));
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let claimed = loop {
        let c = first.claim(claim).await.unwrap();
        if !c.events.is_empty() {
            break c;
        }
        assert!(tokio::time::Instant::now() < until, "event never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The first relay stalls past its lease; a second one takes the stream.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = s.source();
    second.poll_stream().await.unwrap();

    let mut dead = outbox_core::Settlements::default();
    dead.dead = vec![(claimed.events[0].receipt, "permanent: refused".to_owned())];
    assert_eq!(first.settle(claimed.lease, dead).await.unwrap(), 0);
    assert!(
        second.dead_letters(10).await.unwrap().is_empty(),
        "a relay without the lease wrote a dead letter"
    );
    assert_eq!(second.stats().await.unwrap().dead, 0);

    // The owner publishes it.
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(second.clone(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(20), || {
        publisher.received().len() == 1
    })
    .await;
    assert_eq!(publisher.versions(), vec![("fenced".to_owned(), 1)]);
}

#[tokio::test]
async fn trimmed_checkpoint_is_a_recorded_loss() {
    let s = setup().await;
    s.commit(&[order_event("t", 1, "OrderCreated")]).await;
    let publisher = RecordingPublisher::new();
    let first = s.source();
    let relay = Relay::new(first.clone(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(20), || {
        publisher.received().len() == 1
    })
    .await;
    first.release().await.unwrap();

    // The checkpoint now points before anything the shard holds, as one
    // does after the stream's 24-hour retention passed it by.
    let checkpoints = format!("{}-checkpoints", s.outbox);
    let items = s
        .client
        .query()
        .table_name(&checkpoints)
        .key_condition_expression("#c = :c")
        .expression_attribute_names("#c", "consumer")
        .expression_attribute_values(":c", AttributeValue::S("relay".into()))
        .send()
        .await
        .unwrap()
        .items
        .unwrap();
    let shard = items
        .iter()
        .filter_map(|i| i.get("shard").and_then(|v| v.as_s().ok()))
        .find(|id| !id.starts_with('#'))
        .unwrap()
        .clone();
    let old = "000000000000000000001";
    s.client
        .update_item()
        .table_name(&checkpoints)
        .key("consumer", AttributeValue::S("relay".into()))
        .key("shard", AttributeValue::S(shard.clone()))
        .update_expression("SET sequence_number = :s")
        .expression_attribute_values(":s", AttributeValue::S(old.into()))
        .send()
        .await
        .unwrap();
    s.commit(&[order_event("t", 2, "OrderShipped")]).await;

    let second = s.source();
    let relay = Relay::new(second.clone(), publisher.clone(), config()).unwrap();
    run_until(&relay, Duration::from_secs(20), || {
        publisher.versions().contains(&("t".to_owned(), 2))
    })
    .await;
    let stats = second.stats().await.unwrap();
    assert_eq!(stats.lost, 1, "{stats:?}");
    let letters = second.dead_letters(10).await.unwrap();
    let lost: Vec<_> = letters
        .iter()
        .filter(|l| l.reference.starts_with("lost "))
        .collect();
    assert_eq!(lost.len(), 1, "{letters:?}");
    assert!(lost[0].reference.contains(&shard), "{:?}", lost[0]);
    assert_eq!(lost[0].raw.as_ref().unwrap()["after_sequence_number"], old);
    // Read again from the trim horizon: nothing after the gap is lost.
    assert!(publisher.versions().contains(&("t".to_owned(), 2)));
    // Another process sees the loss too.
    assert_eq!(s.source().stats().await.unwrap().lost, 1);
}
