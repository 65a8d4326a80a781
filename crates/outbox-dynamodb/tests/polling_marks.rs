//! The polling shape's per-aggregate mark: claims read from it, not from an
//! aggregate's published history, and replays, parking and marks written
//! by hand or by older versions keep the order, on DynamoDB Local.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::interceptors::AfterDeserializationInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::query::QueryOutput;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use outbox_core::publishers::NullPublisher;
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, DeadLetterPolicy, DeadLetters, Relay, RelayConfig,
    ReplaySelector, Settlements,
};
use outbox_dynamodb::{DynamoOutbox, PollingOutbox, PollingReceipt, Shape};
use outbox_testkit::order_event;

/// Adds up the items every Query evaluated (`ScannedCount`, before filters).
#[derive(Debug, Clone, Default)]
struct ScannedItems(Arc<AtomicU64>);

impl Intercept for ScannedItems {
    fn name(&self) -> &'static str {
        "ScannedItems"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Ok(output) = context.output_or_error() {
            if let Some(query) = output.downcast_ref::<QueryOutput>() {
                self.0
                    .fetch_add(query.scanned_count as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

async fn outbox_counting(scanned: ScannedItems) -> DynamoOutbox {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
    let config = outbox_aws::load_config().await;
    let client = Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&config)
            .interceptor(scanned)
            .build(),
    );
    let outbox =
        DynamoOutbox::new(client, outbox_aws::testing::unique_name("outbox")).shape(Shape::Polling);
    outbox.create_table_if_missing().await.unwrap();
    outbox
}

async fn outbox() -> DynamoOutbox {
    outbox_counting(ScannedItems::default()).await
}

async fn commit(outbox: &DynamoOutbox, id: &str, versions: std::ops::RangeInclusive<u64>) {
    let events: Vec<_> = versions
        .map(|v| order_event(id, v, "OrderUpdated"))
        .collect();
    // 98 events and the head per transaction, under DynamoDB's 100 actions.
    for chunk in events.chunks(98) {
        outbox
            .transaction()
            .events(chunk.iter().cloned())
            .commit()
            .await
            .unwrap();
    }
}

async fn claim(store: &PollingOutbox) -> Claimed<PollingReceipt> {
    store
        .claim(ClaimRequest::new(100, Duration::from_secs(30)))
        .await
        .unwrap()
}

fn versions(claimed: &Claimed<PollingReceipt>) -> Vec<u64> {
    claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect()
}

/// Settles a claim: the versions in `dead` dead, the rest published.
async fn settle(store: &PollingOutbox, claimed: Claimed<PollingReceipt>, dead: &[u64]) {
    let mut settlements = Settlements::default();
    for c in claimed.events {
        if dead.contains(&c.receipt.version) {
            settlements.dead.push((c.receipt, "refused".to_owned()));
        } else {
            settlements.published.push(c.receipt);
        }
    }
    store.settle(claimed.lease, settlements).await.unwrap();
}

/// The mark item's number attributes: clear_through, settled_through, reopened.
async fn mark(outbox: &DynamoOutbox, id: &str) -> (Option<i64>, Option<i64>, Option<i64>) {
    let item = outbox
        .client()
        .get_item()
        .table_name(outbox.table())
        .key("pk", AttributeValue::S(format!("Order#{id}")))
        .key("sk", AttributeValue::N("-1".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_default();
    let number = |name: &str| match item.get(name) {
        Some(AttributeValue::N(v)) => Some(v.parse::<i64>().unwrap()),
        _ => None,
    };
    (
        number("clear_through"),
        number("settled_through"),
        number("reopened"),
    )
}

#[tokio::test]
async fn a_claim_reads_what_is_pending_not_the_published_history() {
    let scanned = ScannedItems::default();
    let outbox = outbox_counting(scanned.clone()).await;
    commit(&outbox, "h", 1..=250).await;
    let store = PollingOutbox::new(outbox.clone()).unwrap();
    let relay = Relay::new(store.clone(), NullPublisher, RelayConfig::default()).unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 250);

    // The mark trails by the last claim: the next claim catches up once...
    commit(&outbox, "h", 251..=255).await;
    let first = claim(&store).await;
    assert_eq!(versions(&first), vec![251, 252, 253, 254, 255]);
    settle(&store, first, &[]).await;
    assert_eq!(mark(&outbox, "h").await.0, Some(250));

    // ...and from then on reads what is pending and what was published
    // since the last claim, whatever the history.
    commit(&outbox, "h", 256..=260).await;
    let before = scanned.0.load(Ordering::Relaxed);
    let second = claim(&store).await;
    let read = scanned.0.load(Ordering::Relaxed) - before;
    assert_eq!(versions(&second), vec![256, 257, 258, 259, 260]);
    // 5 from the pending index, mark and head, 5 published, 5 pending.
    assert_eq!(read, 17, "items read by one claim");
    assert_eq!(mark(&outbox, "h").await.0, Some(255));
}

#[tokio::test]
async fn a_replay_below_the_mark_lowers_it() {
    let outbox = outbox().await;
    let store = PollingOutbox::new(outbox.clone()).unwrap();
    commit(&outbox, "r", 1..=3).await;
    let claimed = claim(&store).await;
    assert_eq!(versions(&claimed), vec![1, 2, 3]);
    settle(&store, claimed, &[1]).await;

    // Flowing past its dead letter, the aggregate's mark passes it.
    commit(&outbox, "r", 4..=4).await;
    let claimed = claim(&store).await;
    assert_eq!(versions(&claimed), vec![4]);
    settle(&store, claimed, &[]).await;
    assert_eq!(mark(&outbox, "r").await, (Some(3), Some(0), None));

    assert_eq!(store.replay(ReplaySelector::All).await.unwrap(), 1);
    assert_eq!(mark(&outbox, "r").await, (Some(0), Some(0), Some(1)));
    let claimed = claim(&store).await;
    assert_eq!(versions(&claimed), vec![1], "the replayed event is found");
    settle(&store, claimed, &[]).await;
    commit(&outbox, "r", 5..=5).await;
    assert_eq!(versions(&claim(&store).await), vec![5]);
    assert_eq!(mark(&outbox, "r").await.0, Some(4));
}

#[tokio::test]
async fn a_parking_store_stops_at_a_dead_letter_another_store_flowed_past() {
    let outbox = outbox().await;
    let flowing = PollingOutbox::new(outbox.clone()).unwrap();
    let parking = PollingOutbox::new(outbox.clone())
        .unwrap()
        .dead_letter_policy(DeadLetterPolicy::Park);
    commit(&outbox, "p", 1..=2).await;
    let claimed = claim(&flowing).await;
    settle(&flowing, claimed, &[1]).await;
    commit(&outbox, "p", 3..=3).await;
    let claimed = claim(&flowing).await;
    assert_eq!(versions(&claimed), vec![3]);
    // Given back unsent: version 3 stays pending.
    let mut released = Settlements::default();
    released.released = claimed.events.into_iter().map(|c| c.receipt).collect();
    flowing.settle(claimed.lease, released).await.unwrap();
    assert_eq!(mark(&outbox, "p").await, (Some(2), Some(0), None));

    assert!(claim(&parking).await.is_empty(), "parked behind version 1");
    assert_eq!(parking.skip(ReplaySelector::All).await.unwrap(), 1);
    assert_eq!(versions(&claim(&parking).await), vec![3]);
    assert_eq!(mark(&outbox, "p").await, (Some(2), Some(2), None));
}

/// An event made pending again without lowering the mark (by a replay of
/// an older version of this library, or by hand) is still claimed: the
/// pending index shows it, and the claim corrects the mark.
#[tokio::test]
async fn a_mark_above_a_pending_event_is_corrected() {
    let outbox = outbox().await;
    let store = PollingOutbox::new(outbox.clone()).unwrap();
    commit(&outbox, "c", 1..=3).await;
    let claimed = claim(&store).await;
    settle(&store, claimed, &[2]).await;
    commit(&outbox, "c", 4..=4).await;
    let claimed = claim(&store).await;
    settle(&store, claimed, &[]).await;
    assert_eq!(mark(&outbox, "c").await.0, Some(3));

    outbox
        .client()
        .update_item()
        .table_name(outbox.table())
        .key("pk", AttributeValue::S("Order#c".into()))
        .key("sk", AttributeValue::N("2".into()))
        .update_expression("SET #s = :p, pending_key = :p, next_attempt_at = :zero REMOVE dead_key")
        .expression_attribute_names("#s", "status")
        .expression_attribute_values(":p", AttributeValue::S("pending".into()))
        .expression_attribute_values(":zero", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(versions(&claim(&store).await), vec![2]);
    assert_eq!(mark(&outbox, "c").await.0, Some(1));
}
