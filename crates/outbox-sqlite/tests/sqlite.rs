//! What is particular to the SQLite store: limits, migrations, query plans,
//! and rows damaged outside the store.

use std::time::Duration;

use outbox_core::{ClaimRequest, ClaimSource, DeadLetters, Event, Stats, StoreError};
use outbox_sqlite::SqliteOutbox;
use outbox_testkit::order_event;

async fn open(dir: &tempfile::TempDir) -> SqliteOutbox {
    SqliteOutbox::open(&dir.path().join("o.db"))
        .await
        .expect("open")
}

#[tokio::test]
async fn oversized_payload_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await.max_payload_bytes(1_000);
    let small = order_event("a", 1, "OrderCreated");
    let big = Event::builder("Order", "a", 2, "OrderUpdated")
        .payload(&serde_json::json!({ "blob": "x".repeat(2_000) }))
        .build()
        .unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let err = outbox.append(&mut tx, &[small, big]).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LimitExceeded {
                limit: "payload size in bytes",
                max: 1_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("payload size"), "{err}");
    drop(tx);
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn reopening_does_not_migrate_twice_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    drop(open(&dir).await);
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox_schema_migrations")
        .fetch_all(outbox.pool())
        .await
        .unwrap();
    assert_eq!(versions, vec![1]);
    sqlx::query("INSERT INTO outbox_schema_migrations (version) VALUES (99)")
        .execute(outbox.pool())
        .await
        .unwrap();
    let err = SqliteOutbox::open(&dir.path().join("o.db"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[tokio::test]
async fn in_memory_and_empty_urls_are_refused() {
    for url in [
        "sqlite::memory:",
        "sqlite://",
        "sqlite://file:x?mode=memory",
    ] {
        let err = SqliteOutbox::connect(url).await.unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{url}: {err:?}");
    }
}

/// The claim must walk the partial index of pending rows, never the whole
/// table: published rows pile up until purged.
#[tokio::test]
async fn claim_uses_the_pending_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    use sqlx::Row;
    let plan: Vec<String> = sqlx::query(
        "EXPLAIN QUERY PLAN
         SELECT o.position FROM outbox AS o
         WHERE o.status = 'pending' AND o.next_attempt_at <= 0
           AND NOT EXISTS (SELECT 1 FROM outbox AS held
             WHERE held.status = 'pending' AND held.aggregate_type = o.aggregate_type
               AND held.aggregate_id = o.aggregate_id AND held.next_attempt_at > 0
               AND held.position < o.position)
         ORDER BY o.position LIMIT 10",
    )
    .fetch_all(outbox.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>("detail"))
    .collect();
    let plan = plan.join("\n");
    assert!(
        plan.lines()
            .any(|l| l == "SCAN o USING INDEX outbox_pending"),
        "outer scan not on the pending index:\n{plan}"
    );
    assert!(
        plan.contains("SEARCH held USING COVERING INDEX outbox_pending_held"),
        "held check not on its index:\n{plan}"
    );
}

#[tokio::test]
async fn a_malformed_row_is_dead_lettered_and_the_rest_still_flows() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let mut tx = outbox.begin().await.unwrap();
    outbox
        .append(
            &mut tx,
            &[
                order_event("a", 1, "OrderCreated"),
                order_event("b", 1, "OrderCreated"),
            ],
        )
        .await
        .unwrap();
    outbox.commit(tx).await.unwrap();
    sqlx::query("UPDATE outbox SET payload = '{broken' WHERE aggregate_id = 'a'")
        .execute(outbox.pool())
        .await
        .unwrap();

    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .unwrap();
    let ids: Vec<&str> = claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_id.as_str())
        .collect();
    assert_eq!(ids, vec!["b"]);
    let dead = outbox.dead_letters(10).await;
    // The damaged row cannot be read back as an event: listing says so rather than hide it.
    assert!(dead.is_err());
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (1, 1));
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM outbox WHERE aggregate_id = 'a'")
            .fetch_one(outbox.pool())
            .await
            .unwrap();
    assert!(error.contains("malformed outbox row"), "{error}");
}

/// A second write transaction begun while the first is open gets an error
/// after the busy timeout instead of waiting forever.
#[tokio::test]
async fn a_nested_write_transaction_times_out_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir)
        .await
        .write_turn_timeout(Duration::from_millis(200));
    let held = outbox.begin().await.unwrap();
    let err = outbox.begin().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("write turn"), "{err}");
    held.rollback().await.unwrap();
    outbox.begin().await.unwrap().commit().await.unwrap();
}
