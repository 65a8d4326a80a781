//! The stream shape's dead-letter table against DynamoDB Local.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use outbox_core::{DeadLetters, ReplaySelector};
use outbox_dynamodb::DeadLetterTable;
use outbox_testkit::order_event;

async fn table() -> DeadLetterTable {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
    let config = outbox_aws::load_config().await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let table = DeadLetterTable::new(client, outbox_aws::testing::unique_name("dead"));
    table.create_table_if_missing().await.unwrap();
    // Idempotent.
    table.create_table_if_missing().await.unwrap();
    table
}

#[tokio::test]
async fn put_list_replay_take_finish() {
    let t = table().await;
    let events: Vec<_> = (1..=30)
        .map(|v| order_event("a", v, "OrderUpdated"))
        .collect();
    let rows: Vec<_> = events
        .iter()
        .map(|e| (e.clone(), 3, format!("boom {}", e.aggregate_version)))
        .collect();
    // More than one BatchWriteItem call.
    t.put_events(&rows).await.unwrap();
    assert_eq!(t.count_dead().await.unwrap(), 30);

    let dead = t.dead_letters(100).await.unwrap();
    assert_eq!(dead.len(), 30);
    let listed: Vec<_> = dead.iter().filter_map(|d| d.event.clone()).collect();
    assert_eq!(listed, events, "oldest first, read back as written");
    assert_eq!(dead[4].attempts, 3);
    assert_eq!(dead[4].last_error.as_deref(), Some("boom 5"));
    assert_eq!(t.dead_letters(7).await.unwrap().len(), 7);

    let replayed = t
        .replay(ReplaySelector::Ids(vec![
            events[0].id,
            events[1].id,
            events[0].id,
        ]))
        .await
        .unwrap();
    assert_eq!(replayed, 2, "a second replay of the same id does nothing");
    assert_eq!(t.count_dead().await.unwrap(), 28);
    assert_eq!(t.count_replays().await.unwrap(), 2);
    let taken = t.take_replays(10).await.unwrap();
    assert_eq!(taken, events[..2].to_vec());
    // Taking does not remove: only finishing does.
    assert_eq!(t.take_replays(10).await.unwrap().len(), 2);
    t.finish_replays(&[events[0].id]).await.unwrap();
    assert_eq!(t.take_replays(10).await.unwrap(), vec![events[1].clone()]);

    assert_eq!(t.replay(ReplaySelector::All).await.unwrap(), 28);
    assert_eq!(t.count_dead().await.unwrap(), 0);
    assert!(t.dead_letters(10).await.unwrap().is_empty());
    let ids: Vec<_> = t
        .take_replays(100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 29);
    t.finish_replays(&ids).await.unwrap();
    assert_eq!(t.count_replays().await.unwrap(), 0);
}

#[tokio::test]
async fn puts_are_idempotent() {
    let t = table().await;
    let e = order_event("a", 1, "OrderCreated");
    t.put_events(&[(e.clone(), 1, "first".into())])
        .await
        .unwrap();
    t.put_events(&[(e.clone(), 2, "second".into())])
        .await
        .unwrap();
    let dead = t.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_deref()),
        (2, Some("second"))
    );
    assert_eq!(t.count_dead().await.unwrap(), 1);
}

#[tokio::test]
async fn malformed_records_are_kept() {
    let t = table().await;
    t.put_malformed("200", r#"{"eventName":"INSERT"}"#, "bad events")
        .await
        .unwrap();
    t.put_malformed("1000", r#"{"x":1}"#, "other")
        .await
        .unwrap();
    t.put_malformed("200", r#"{"eventName":"INSERT"}"#, "bad events")
        .await
        .unwrap();
    let kept = t.malformed(10).await.unwrap();
    let seqs: Vec<_> = kept.iter().map(|m| m.sequence_number.as_str()).collect();
    assert_eq!(
        seqs,
        vec!["200", "1000"],
        "one item per record, in stream order"
    );
    assert_eq!(kept[0].raw_record, r#"{"eventName":"INSERT"}"#);
    assert_eq!(kept[0].error, "bad events");
    // Malformed records are not event dead letters.
    assert_eq!(t.count_dead().await.unwrap(), 0);
}
