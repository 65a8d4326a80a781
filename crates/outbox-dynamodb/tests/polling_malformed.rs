//! Items the polling relay cannot read, and what a dead letter does to its
//! aggregate, on DynamoDB Local.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use outbox_core::{
    DeadLetterPolicy, DeadLetters, Relay, RelayConfig, ReplaySelector, RetryPolicy, Stats,
};
use outbox_dynamodb::{DynamoOutbox, PollingOutbox, Shape};
use outbox_testkit::{order_event, RecordingPublisher};

async fn outbox() -> DynamoOutbox {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
    let client = Client::new(&outbox_aws::load_config().await);
    let outbox =
        DynamoOutbox::new(client, outbox_aws::testing::unique_name("outbox")).shape(Shape::Polling);
    outbox.create_table_if_missing().await.unwrap();
    outbox
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

/// Writes by hand what no writer of this library would: aggregate
/// `Order/<id>` at version 1 with `event` as given, pending and due, plus its
/// head item so the library can append version 2 after it.
async fn put_bad_item(outbox: &DynamoOutbox, id: &str, event: AttributeValue) {
    let pk = format!("Order#{id}");
    let now = chrono::Utc::now().timestamp_millis();
    outbox
        .client()
        .put_item()
        .table_name(outbox.table())
        .item("pk", s(&pk))
        .item("sk", n(0))
        .item("version", n(1))
        .item("aggregate_type", s("Order"))
        .item("aggregate_id", s(id))
        .send()
        .await
        .unwrap();
    outbox
        .client()
        .put_item()
        .table_name(outbox.table())
        .item("pk", s(&pk))
        .item("sk", n(1))
        .item("event", event)
        .item("status", s("pending"))
        .item("pending_key", s("pending"))
        .item("position", n(now * 10_000))
        .item("created_at", n(now))
        .item("attempts", n(0))
        .item("next_attempt_at", n(now))
        .send()
        .await
        .unwrap();
}

fn config() -> RelayConfig {
    RelayConfig::default().batch_size(50).retry(RetryPolicy {
        initial: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        jitter: 0.0,
        ..RetryPolicy::default()
    })
}

#[tokio::test]
async fn unreadable_items_are_dead_lettered_alone_and_listed() {
    let outbox = outbox().await;
    let good = order_event("ok", 1, "OrderCreated");
    let mut newline = order_event("nl", 1, "OrderCreated");
    newline.event_type = "Order\nCreated".into();
    put_bad_item(
        &outbox,
        "blob",
        AttributeValue::B(Blob::new(vec![0, 159, 146, 150])),
    )
    .await;
    put_bad_item(&outbox, "json", s("{not json")).await;
    put_bad_item(&outbox, "nl", s(&serde_json::to_string(&newline).unwrap())).await;
    let mut wrong_version = order_event("v0", 1, "OrderCreated");
    wrong_version.aggregate_version = 0;
    put_bad_item(
        &outbox,
        "v0",
        s(&serde_json::to_string(&wrong_version).unwrap()),
    )
    .await;
    // Later events of a bad item's aggregate, and another aggregate.
    outbox
        .transaction()
        .events([good.clone(), order_event("blob", 2, "OrderShipped")])
        .commit()
        .await
        .unwrap();

    let store = PollingOutbox::new(outbox.clone()).unwrap();
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(store.clone(), publisher.clone(), config()).unwrap();
    let report = relay.drain().await.unwrap();
    assert_eq!(report.malformed, 4, "{report:?}");
    let mut sent = publisher.versions();
    sent.sort();
    assert_eq!(sent, vec![("blob".to_owned(), 2), ("ok".to_owned(), 1)]);

    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.dead, stats.published),
        (0, 4, 2),
        "{stats:?}"
    );
    let letters = store.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 4, "{letters:?}");
    for letter in &letters {
        assert!(letter.event.is_none(), "{letter:?}");
        let raw = letter.raw.as_ref().unwrap();
        assert!(raw.get("event").is_some(), "raw fields kept: {raw}");
        assert!(
            letter
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("malformed")),
            "{letter:?}"
        );
    }
    let blob = letters
        .iter()
        .find(|l| l.reference == "Order#blob/1")
        .unwrap();
    assert_eq!(blob.raw.as_ref().unwrap()["event"]["B"], "AJ+Slg==");
}

#[tokio::test]
async fn parked_aggregate_waits_for_skip() {
    let outbox = outbox().await;
    put_bad_item(&outbox, "parked", s("{not json")).await;
    outbox
        .transaction()
        .events([
            order_event("parked", 2, "OrderShipped"),
            order_event("free", 1, "OrderCreated"),
        ])
        .commit()
        .await
        .unwrap();
    let store = PollingOutbox::new(outbox.clone())
        .unwrap()
        .dead_letter_policy(DeadLetterPolicy::Park);
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(store.clone(), publisher.clone(), config()).unwrap();
    relay.drain().await.unwrap();
    relay.drain().await.unwrap();
    assert_eq!(publisher.versions(), vec![("free".to_owned(), 1)]);
    assert_eq!(store.stats().await.unwrap().pending, 1, "version 2 waits");

    assert_eq!(store.skip(ReplaySelector::All).await.unwrap(), 1);
    relay.drain().await.unwrap();
    assert_eq!(
        publisher.versions(),
        vec![("free".to_owned(), 1), ("parked".to_owned(), 2)]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 0), "{stats:?}");
    assert!(store.dead_letters(10).await.unwrap().is_empty());
}
