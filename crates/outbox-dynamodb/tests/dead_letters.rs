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
    t.put_malformed("shard-1", "200", r#"{"eventName":"INSERT"}"#, "bad events")
        .await
        .unwrap();
    t.put_malformed("shard-1", "1000", r#"{"x":1}"#, "other")
        .await
        .unwrap();
    t.put_malformed("shard-1", "200", r#"{"eventName":"INSERT"}"#, "bad events")
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
    // Malformed records are not event dead letters, but they are listed.
    assert_eq!(t.count_dead().await.unwrap(), 0);
    assert_eq!(t.count_malformed().await.unwrap(), 2);
    let letters = t.dead_letters(10).await.unwrap();
    let refs: Vec<_> = letters.iter().map(|l| l.reference.as_str()).collect();
    assert_eq!(refs, vec!["shard-1/200", "shard-1/1000"]);
    assert!(letters[0].event.is_none());
    assert_eq!(
        letters[0].raw.as_ref().unwrap(),
        &serde_json::json!({"eventName": "INSERT"})
    );
    assert_eq!(
        letters[0].last_error.as_deref(),
        Some("malformed: bad events")
    );
}

#[tokio::test]
async fn oversize_malformed_record_is_kept_cut_with_its_size() {
    let t = table().await;
    // Over DynamoDB's 400 KB item limit as it came.
    let raw = format!(r#"{{"blob":"{}"}}"#, "é".repeat(250 * 1024));
    assert!(raw.len() > 400 * 1024);
    t.put_malformed("shard-9", "77", &raw, "too big to decode")
        .await
        .expect("an oversize record is stored, cut");
    let kept = t.malformed(10).await.unwrap();
    assert_eq!(kept.len(), 1);
    let m = &kept[0];
    assert!(m.truncated);
    assert_eq!(m.raw_size, raw.len() as u64);
    assert_eq!(m.shard.as_deref(), Some("shard-9"));
    assert_eq!(m.sequence_number, "77");
    assert!(m.raw_record.len() <= outbox_dynamodb::dead_letters::MAX_RAW_BYTES);
    assert!(raw.starts_with(&m.raw_record));
    let letters = t.dead_letters(10).await.unwrap();
    let raw_letter = letters[0].raw.as_ref().unwrap();
    assert_eq!(raw_letter["truncated"], true);
    assert_eq!(raw_letter["size"], raw.len() as u64);
    assert_eq!(letters[0].reference, "shard-9/77");
}

#[tokio::test]
async fn skipped_dead_letters_leave_the_listing() {
    let t = table().await;
    let a = order_event("a", 1, "OrderCreated");
    let b = order_event("b", 1, "OrderCreated");
    t.put_events(&[(a.clone(), 3, "x".into()), (b.clone(), 3, "y".into())])
        .await
        .unwrap();
    assert_eq!(t.skip(ReplaySelector::Ids(vec![a.id])).await.unwrap(), 1);
    assert_eq!(t.skip(ReplaySelector::Ids(vec![a.id])).await.unwrap(), 0);
    let left: Vec<_> = t
        .dead_letters(10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.reference)
        .collect();
    assert_eq!(left, vec![b.id.to_string()]);
    assert!(
        t.take_replays(10).await.unwrap().is_empty(),
        "a skip is no replay"
    );
}
