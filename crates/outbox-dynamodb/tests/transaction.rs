//! The transaction builder against DynamoDB Local: atomicity with the
//! caller's own writes, one action per aggregate, limits refused before any
//! network call, and each kind of failure reported as what it is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::types::{AttributeValue, Put};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, StoreError};
use outbox_dynamodb::item::{aggregate_key, OutboxItem};
use outbox_dynamodb::{DynamoOutbox, Shape, TransactError};

async fn local_client() -> Client {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
    Client::new(&outbox_aws::load_config().await)
}

/// A client whose every request would hang: nothing listens at a
/// non-routable address. A refusal that comes back at once never used it.
fn unreachable_client() -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url("http://10.255.255.1:9")
        .build();
    Client::from_conf(config)
}

struct Tables {
    client: Client,
    outbox: DynamoOutbox,
    orders: String,
}

async fn tables() -> Tables {
    let client = local_client().await;
    let outbox = DynamoOutbox::new(client.clone(), outbox_aws::testing::unique_name("outbox"));
    outbox
        .create_table_if_missing()
        .await
        .expect("outbox table");
    let orders = outbox_aws::testing::unique_name("orders");
    DynamoOutbox::new(client.clone(), &orders)
        .create_table_if_missing()
        .await
        .expect("orders table");
    Tables {
        client,
        outbox,
        orders,
    }
}

fn new_order(table: &str, id: &str) -> Put {
    Put::builder()
        .table_name(table)
        .item("pk", AttributeValue::S(id.to_owned()))
        .item("status", AttributeValue::S("placed".to_owned()))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .expect("put")
}

fn event(aggregate: &str, version: u64) -> Event {
    outbox_testkit::order_event(aggregate, version, "OrderUpdated")
}

fn events(aggregate: &str, versions: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    versions.map(|v| event(aggregate, v)).collect()
}

/// An event whose payload is `bytes` long.
fn big_event(aggregate: &str, version: u64, bytes: usize) -> Event {
    Event::builder("Order", aggregate, version, "OrderUpdated")
        .payload(&"x".repeat(bytes))
        .build()
        .expect("event")
}

async fn get(client: &Client, table: &str, pk: &str) -> Option<HashMap<String, AttributeValue>> {
    client
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(pk.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item
}

async fn outbox_item(t: &Tables, aggregate: &str) -> Option<OutboxItem> {
    let key = aggregate_key("Order", aggregate).expect("key");
    get(&t.client, t.outbox.table(), &key)
        .await
        .map(|image| OutboxItem::decode(&image).expect("decodes"))
}

#[tokio::test]
async fn order_and_events_commit_together_or_not_at_all() {
    let t = tables().await;
    let created = events("o-1", 1..=2);
    t.outbox
        .transaction()
        .put(new_order(&t.orders, "o-1"))
        .events(created.clone())
        .commit()
        .await
        .expect("commit");
    assert!(get(&t.client, &t.orders, "o-1").await.is_some());
    let item = outbox_item(&t, "o-1").await.expect("outbox item");
    assert_eq!((item.version, item.events), (2, created));

    // The order exists already: its condition fails, and nothing of the
    // transaction is written, neither for this aggregate nor for a new one.
    let err = t
        .outbox
        .transaction()
        .put(new_order(&t.orders, "o-1"))
        .events([event("o-1", 3), event("o-new", 1)])
        .commit()
        .await
        .expect_err("the order already exists");
    assert!(
        matches!(err, TransactError::EntityCondition { index: 0, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(matches!(StoreError::from(err), StoreError::Conflict(_)));
    assert_eq!(outbox_item(&t, "o-1").await.expect("item").version, 2);
    assert!(
        outbox_item(&t, "o-new").await.is_none(),
        "an outbox item was written"
    );
}

#[tokio::test]
async fn one_hundred_fifty_events_are_one_action() {
    let t = tables().await;
    let many = events("o-big", 1..=150);
    let built = t
        .outbox
        .transaction()
        .put(new_order(&t.orders, "o-big"))
        .events(many.clone())
        .build()
        .expect("build");
    assert_eq!(built.len(), 2, "the entity and ONE outbox update");
    t.outbox
        .transaction()
        .put(new_order(&t.orders, "o-big"))
        .events(many.clone())
        .commit()
        .await
        .expect("commit");
    let item = outbox_item(&t, "o-big").await.expect("outbox item");
    assert_eq!(item.version, 150);
    assert_eq!(item.events, many, "all 150 events, in order");
}

#[tokio::test]
async fn limits_are_refused_before_any_network_call() {
    let outbox = DynamoOutbox::new(unreachable_client(), "never-reached");
    let started = Instant::now();

    // 100 entity writes + 1 outbox update = 101 actions.
    let mut tx = outbox.transaction();
    for i in 0..100 {
        tx.push_put(new_order("orders", &format!("o-{i}")));
    }
    let err = tokio::time::timeout(
        Duration::from_secs(2),
        tx.events([event("o-1", 1)]).commit(),
    )
    .await
    .expect("refused at once, without the network")
    .expect_err("101 actions");
    assert_eq!(err.to_string(), "transaction actions exceeded: 101 > 100");
    assert!(matches!(
        StoreError::from(err),
        StoreError::LimitExceeded {
            limit: "transaction actions",
            actual: 101,
            max: 100
        }
    ));

    // One aggregate's events over 400 KB in its one item.
    let err = outbox
        .transaction()
        .events((1..=5).map(|v| big_event("o-1", v, 90 * 1024)))
        .commit()
        .await
        .expect_err("item over 400 KB");
    assert!(
        matches!(err, TransactError::LimitExceeded { limit: "item bytes", max: 409_600, actual } if actual > 450_000),
        "{err:?}"
    );

    // Eleven items under 400 KB each, over 4 MB together.
    let err = outbox
        .transaction()
        .events((0..11).map(|a| big_event(&format!("o-{a}"), 1, 390 * 1024)))
        .commit()
        .await
        .expect_err("transaction over 4 MB");
    assert!(
        matches!(
            err,
            TransactError::LimitExceeded {
                limit: "transaction bytes",
                max: 4_194_304,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("transaction bytes exceeded: "));

    // Bad events, and versions going down, are refused too.
    let mut bad = event("o-1", 1);
    bad.aggregate_type = "Or#der".into();
    let err = outbox.transaction().events([bad]).build().expect_err("#");
    assert!(matches!(err, TransactError::Invalid(ref e) if e.field() == "aggregate_type"));
    let err = outbox
        .transaction()
        .events([event("o-1", 2), event("o-1", 1)])
        .build()
        .expect_err("versions going down");
    assert!(matches!(
        err,
        TransactError::VersionOrder {
            version: 1,
            after: 2,
            ..
        }
    ));

    // Overridable: a lower limit bites sooner.
    let err = outbox
        .clone()
        .limits(outbox_dynamodb::Limits::default().max_actions(2))
        .transaction()
        .events([event("a", 1), event("b", 1), event("c", 1)])
        .build()
        .expect_err("3 > 2");
    assert_eq!(err.to_string(), "transaction actions exceeded: 3 > 2");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_stale_version_is_a_version_conflict() {
    let t = tables().await;
    t.outbox
        .transaction()
        .events(events("o-1", 1..=2))
        .commit()
        .await
        .expect("commit");
    // A writer that loaded version 1 and appends version 2 lost the race.
    let err = t
        .outbox
        .transaction()
        .put(new_order(&t.orders, "o-1"))
        .events([event("o-1", 2)])
        .commit()
        .await
        .expect_err("stale");
    match &err {
        TransactError::VersionConflict {
            aggregate_type,
            aggregate_id,
            expected,
        } => assert_eq!(
            (aggregate_type.as_str(), aggregate_id.as_str(), *expected),
            ("Order", "o-1", 1)
        ),
        other => panic!("expected VersionConflict, got {other:?}"),
    }
    assert!(
        get(&t.client, &t.orders, "o-1").await.is_none(),
        "the entity write of a conflicting transaction was kept"
    );
    // A first version 1 for an aggregate that already exists conflicts too.
    let err = t
        .outbox
        .transaction()
        .events([event("o-1", 1)])
        .commit()
        .await
        .expect_err("exists");
    assert!(matches!(
        err,
        TransactError::VersionConflict { expected: 0, .. }
    ));
    // The writer that reloads goes on from version 2.
    t.outbox
        .transaction()
        .events([event("o-1", 3)])
        .commit()
        .await
        .expect("commit");
    let item = outbox_item(&t, "o-1").await.expect("item");
    assert_eq!(item.version, 3);
    assert_eq!(
        item.events.len(),
        1,
        "the item holds the last transaction's events"
    );
}

#[tokio::test]
async fn two_aggregates_in_one_transaction() {
    let t = tables().await;
    let (a, b) = (events("o-a", 1..=3), events("o-b", 1..=2));
    // Interleaved on purpose: each aggregate keeps its own order.
    let mixed = vec![
        a[0].clone(),
        b[0].clone(),
        a[1].clone(),
        b[1].clone(),
        a[2].clone(),
    ];
    let built = t
        .outbox
        .transaction()
        .put(new_order(&t.orders, "o-a"))
        .events(mixed.clone())
        .build()
        .expect("build");
    assert_eq!(built.len(), 3);
    t.outbox
        .transaction()
        .put(new_order(&t.orders, "o-a"))
        .events(mixed)
        .commit()
        .await
        .expect("commit");
    assert_eq!(outbox_item(&t, "o-a").await.expect("a").events, a);
    assert_eq!(outbox_item(&t, "o-b").await.expect("b").events, b);
}

#[tokio::test]
async fn polling_shape_writes_a_head_and_one_item_per_event() {
    let outbox = DynamoOutbox::new(unreachable_client(), "never-reached").shape(Shape::Polling);
    let built = outbox
        .transaction()
        .events(events("o-1", 1..=3))
        .build()
        .expect("build");
    assert_eq!(built.len(), 4, "one head update and three puts");
    assert!(built[0].update().is_some());
    assert!(built[1..].iter().all(|i| i.put().is_some()));
    // 99 events and the head fit; 100 do not.
    outbox
        .transaction()
        .events(events("o-1", 1..=99))
        .build()
        .expect("100 actions");
    let err = outbox
        .transaction()
        .events(events("o-1", 1..=100))
        .build()
        .expect_err("101 actions");
    assert_eq!(err.to_string(), "transaction actions exceeded: 101 > 100");
}

/// The size count agrees with DynamoDB: the largest item the count lets
/// through (exactly 400 KiB by DynamoDB's rules) is accepted by the service.
///
/// Each probe is a commit (of an aggregate of its own), not a `build()`
/// followed later by a commit: the item holds the commit's time as numbers,
/// whose size moves by a byte with the clock's trailing zeros.
#[tokio::test]
async fn the_largest_item_allowed_is_accepted() {
    let t = tables().await;
    let aggregate = |payload: usize| format!("p-{payload:06}");
    let fits = |payload: usize| {
        let outbox = t.outbox.clone();
        async move {
            match outbox
                .transaction()
                .events([big_event(&aggregate(payload), 1, payload)])
                .commit()
                .await
            {
                Ok(()) => true,
                Err(TransactError::LimitExceeded { .. }) => false,
                Err(e) => panic!("DynamoDB accepts what the count lets through: {e:?}"),
            }
        }
    };
    // The largest payload that commits, by bisection.
    let (mut ok, mut too_big) = (1usize, 400 * 1024);
    assert!(fits(ok).await && !fits(too_big).await);
    while too_big - ok > 1 {
        let mid = (ok + too_big) / 2;
        if fits(mid).await {
            ok = mid;
        } else {
            too_big = mid;
        }
    }
    assert!(
        ok > 400 * 1024 - 1024,
        "the envelope cannot take 1 KiB: {ok}"
    );
    let item = outbox_item(&t, &aggregate(ok)).await.expect("stored");
    assert_eq!(item.version, 1);
    // And the count is not lax: with our check lifted, a few bytes more are
    // refused by DynamoDB itself.
    let err = t
        .outbox
        .clone()
        .limits(outbox_dynamodb::Limits::default().max_item_bytes(usize::MAX))
        .transaction()
        .events([big_event("o-2", 1, ok + 64)])
        .commit()
        .await
        .expect_err("DynamoDB refuses an item over 400 KiB");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("size"), "{err}");
}
