//! The scheduled relay over a polling-shape outbox on DynamoDB Local.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_core::{Event, Relay, RelayConfig, Stats};
use outbox_dynamodb::{DynamoOutbox, PollingOutbox, Shape};
use outbox_lambda::run_scheduled;
use outbox_testkit::RecordingPublisher;

const AGGREGATES: u64 = 3;
const VERSIONS: u64 = 4;

/// A polling-shape outbox holding `VERSIONS` events of each of `AGGREGATES`
/// orders, two transactions per order.
async fn outbox_with_events() -> PollingOutbox {
    require_local_endpoints(&["DYNAMODB"]);
    let config = outbox_aws::load_config().await;
    let outbox = DynamoOutbox::new(
        aws_sdk_dynamodb::Client::new(&config),
        unique_name("scheduled"),
    )
    .shape(Shape::Polling);
    outbox.create_table_if_missing().await.unwrap();
    for half in [1..=VERSIONS / 2, VERSIONS / 2 + 1..=VERSIONS] {
        for order in 0..AGGREGATES {
            let events = half.clone().map(|v| {
                Event::builder("Order", format!("order-{order}"), v, "OrderChanged")
                    .build()
                    .unwrap()
            });
            outbox.transaction().events(events).commit().await.unwrap();
        }
    }
    PollingOutbox::new(outbox).unwrap()
}

#[tokio::test]
async fn publishes_everything_due_in_order_within_the_budget() {
    let source = outbox_with_events().await;
    let publisher = RecordingPublisher::new();
    // Small batches, so draining takes several of them.
    let relay = Relay::new(
        source,
        publisher.clone(),
        RelayConfig::default().batch_size(5),
    )
    .unwrap();

    let report = run_scheduled(&relay, Duration::from_secs(60), Duration::from_secs(5))
        .await
        .unwrap();
    let total = (AGGREGATES * VERSIONS) as usize;
    assert_eq!(
        (report.claimed, report.published),
        (total, total),
        "{report:?}"
    );
    assert_eq!((report.retried, report.dead_lettered), (0, 0));

    let versions = publisher.versions();
    assert_eq!(versions.len(), total);
    for order in 0..AGGREGATES {
        let id = format!("order-{order}");
        let seen: Vec<u64> = versions
            .iter()
            .filter(|(a, _)| *a == id)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(seen, (1..=VERSIONS).collect::<Vec<_>>(), "{id}");
    }
    assert_eq!(relay.source().stats().await.unwrap().pending, 0);

    // Nothing left: the next run ends at once.
    let again = run_scheduled(&relay, Duration::from_secs(60), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.claimed, 0);
}

#[tokio::test]
async fn zero_budget_publishes_nothing() {
    let source = outbox_with_events().await;
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(source, publisher.clone(), RelayConfig::default()).unwrap();

    for (budget, margin) in [
        (Duration::ZERO, Duration::ZERO),
        // Less left than the margin: no batch starts either.
        (Duration::from_secs(2), Duration::from_secs(5)),
    ] {
        let report = run_scheduled(&relay, budget, margin).await.unwrap();
        assert_eq!(report.claimed, 0, "{report:?}");
    }
    assert!(publisher.received().is_empty());
    assert_eq!(
        relay.source().stats().await.unwrap().pending,
        AGGREGATES * VERSIONS
    );
}
