//! What is particular to the SQLite store: limits, migrations, query plans,
//! and rows damaged outside the store.

use std::time::Duration;

use outbox_core::{ClaimRequest, ClaimSource, DeadLetters, Event, Settlements, Stats, StoreError};
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
    assert_eq!(versions, vec![1, 2, 3]);
    sqlx::query("INSERT INTO outbox_schema_migrations (version) VALUES (99)")
        .execute(outbox.pool())
        .await
        .unwrap();
    let err = SqliteOutbox::open(&dir.path().join("o.db"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

/// An outbox of schema version 2, with a backlog and an event leased row by
/// row by a relay of that version, upgrades in place: the backlog stays
/// due, the old lease still holds its aggregate, and a relay of the old
/// version still running is stopped with a clear error.
#[tokio::test]
async fn version_2_upgrades_with_its_backlog_and_old_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    for sql in [
        include_str!("../migrations/0001_outbox_and_inbox.sql"),
        include_str!("../migrations/0002_skipped_dead_letters.sql"),
        "CREATE TABLE outbox_schema_migrations (
            version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
         INSERT INTO outbox_schema_migrations (version) VALUES (1), (2);",
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    }
    let leased_until = chrono::Utc::now().timestamp_millis() + 60_000;
    for (aggregate, version, next_attempt_at, lease) in [
        ("a", 1, 1_000, None),
        ("a", 2, 1_000, None),
        ("b", 1, leased_until, Some("old-relay")),
        ("b", 2, 1_000, None),
    ] {
        sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, aggregate_version, event_type,
                payload, occurred_at, next_attempt_at, lease_id, created_at)
             VALUES (?1, 'Order', ?2, ?3, 'OrderCreated', '{}', '2026-01-01T00:00:00Z', ?4, ?5, 1000)",
        )
        .bind(outbox_core::EventId::new().to_string())
        .bind(aggregate)
        .bind(version)
        .bind(next_attempt_at)
        .bind(lease)
        .execute(&pool)
        .await
        .unwrap();
    }

    let outbox = SqliteOutbox::open(&path).await.expect("upgrade");
    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .unwrap();
    let got = outbox_testkit::claimed_versions(&claimed);
    assert_eq!(
        got,
        vec![("a".to_owned(), 1), ("a".to_owned(), 2)],
        "the old lease must still hold b"
    );

    // What a relay of version 2 does to lease.
    let err = sqlx::query(
        "UPDATE outbox SET next_attempt_at = 1, lease_id = 'x' WHERE aggregate_id = 'a'",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("upgrade it"), "{err}");
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
             WHERE held.status = 'pending' AND held.next_attempt_at > 0
               AND held.aggregate_type = o.aggregate_type
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
        plan.contains("SEARCH held USING COVERING INDEX outbox_held"),
        "held check not on its index:\n{plan}"
    );
}

/// Whatever is wrong with a row, it is refused alone, named, and listed.
#[tokio::test]
async fn every_kind_of_malformed_row_is_refused_alone_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let damage = [
        ("blob", "UPDATE outbox SET payload = X'00FF' WHERE aggregate_id = 'blob'", "payload holds a BLOB of 2 bytes"),
        ("json", "UPDATE outbox SET payload = '{broken' WHERE aggregate_id = 'json'", "payload"),
        ("uuid", "UPDATE outbox SET id = 'not-a-uuid' WHERE aggregate_id = 'uuid'", "not a UUID"),
        ("zero", "UPDATE outbox SET aggregate_version = 0 WHERE aggregate_id = 'zero'", "aggregate_version"),
        ("newline", "UPDATE outbox SET event_type = 'Order' || char(10) || 'Created' WHERE aggregate_id = 'newline'", "control characters"),
        ("empty", "UPDATE outbox SET aggregate_id = '' WHERE aggregate_id = 'empty'", "aggregate_id"),
        ("text-version", "UPDATE outbox SET aggregate_version = 'two' WHERE aggregate_id = 'text-version'", "aggregate_version holds"),
    ];
    let mut tx = outbox.begin().await.unwrap();
    let mut events: Vec<Event> = damage
        .iter()
        .map(|(agg, _, _)| order_event(agg, 1, "OrderCreated"))
        .collect();
    events.push(order_event("fine", 1, "OrderCreated"));
    outbox.append(&mut tx, &events).await.unwrap();
    outbox.commit(tx).await.unwrap();
    for (_, sql, _) in &damage {
        sqlx::query(*sql).execute(outbox.pool()).await.unwrap();
    }

    let claimed = outbox
        .claim(ClaimRequest::new(20, Duration::from_secs(5)))
        .await
        .unwrap();
    let ids: Vec<&str> = claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_id.as_str())
        .collect();
    assert_eq!(ids, vec!["fine"]);
    assert_eq!(claimed.malformed.len(), damage.len());
    for (_, _, reason) in &damage {
        assert!(
            claimed.malformed.iter().any(|m| m.reason.contains(reason)),
            "no malformed row says `{reason}`: {:?}",
            claimed.malformed
        );
    }
    // The relay settles them as dead; the listing shows them with their fields.
    let mut settle = Settlements::default();
    settle.published = claimed.events.iter().map(|c| c.receipt).collect();
    settle.dead = claimed
        .malformed
        .iter()
        .map(|m| (m.receipt, format!("malformed: {}", m.reason)))
        .collect();
    outbox.settle(claimed.lease, settle).await.unwrap();
    let dead = outbox.dead_letters(20).await.unwrap();
    assert_eq!(dead.len(), damage.len());
    let blob = dead
        .iter()
        .find(|d| d.raw.as_ref().is_some_and(|r| r["aggregate_id"] == "blob"))
        .expect("the BLOB row is listed");
    assert!(blob.event.is_none());
    assert_eq!(
        blob.raw.as_ref().unwrap()["payload"],
        serde_json::json!({ "blob": 2 })
    );
    assert!(blob.reference.starts_with("position "), "{blob:?}");
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (0, 7, 1));
}

/// An infinite REAL (SQLite's JSON writes it as `9.0e+999`, out of range
/// for JSON numbers) in an integer column spoils only its own row.
#[tokio::test]
async fn an_infinite_number_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let mut tx = outbox.begin().await.unwrap();
    let events = [
        order_event("infinite", 1, "OrderCreated"),
        order_event("fine", 1, "OrderCreated"),
    ];
    outbox.append(&mut tx, &events).await.unwrap();
    outbox.commit(tx).await.unwrap();
    sqlx::query("UPDATE outbox SET aggregate_version = 1e999 WHERE aggregate_id = 'infinite'")
        .execute(outbox.pool())
        .await
        .unwrap();

    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("one odd row does not fail the claim");
    let ids: Vec<&str> = claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_id.as_str())
        .collect();
    assert_eq!(ids, vec!["fine"]);
    assert_eq!(claimed.malformed.len(), 1);
    assert!(
        claimed.malformed[0]
            .reason
            .contains("aggregate_version holds"),
        "{:?}",
        claimed.malformed
    );
}

/// A BLOB that SQLite reads as JSONB holding bytes that are not UTF-8
/// spoils only its own row.
#[tokio::test]
async fn a_blob_read_as_jsonb_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let mut tx = outbox.begin().await.unwrap();
    let events = [
        order_event("jsonb", 1, "OrderCreated"),
        order_event("fine", 1, "OrderCreated"),
    ];
    outbox.append(&mut tx, &events).await.unwrap();
    outbox.commit(tx).await.unwrap();
    sqlx::query("UPDATE outbox SET occurred_at = X'45824920E9' WHERE aggregate_id = 'jsonb'")
        .execute(outbox.pool())
        .await
        .unwrap();
    // And one SQLite copies into the batch's JSON as text that is not JSON.
    sqlx::query("UPDATE outbox SET traceparent = X'230819' WHERE aggregate_id = 'jsonb'")
        .execute(outbox.pool())
        .await
        .unwrap();

    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("one odd row does not fail the claim");
    let ids: Vec<&str> = claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_id.as_str())
        .collect();
    assert_eq!(ids, vec!["fine"]);
    assert_eq!(claimed.malformed.len(), 1);
    assert!(
        claimed.malformed[0]
            .reason
            .contains("occurred_at holds a BLOB"),
        "{:?}",
        claimed.malformed
    );
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
