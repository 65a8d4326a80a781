//! Rows the store did not write: by hand, by another language's writer, or
//! from before the schema checked them. The schema refuses what it can,
//! with an error that names the rule; every value it lets through (or let
//! through before) is published or dead-lettered alone, and no relay,
//! report or purge stops on it.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{count, DropSchema};
use outbox_core::{
    ClaimRequest, ClaimSource, DeadLetters, Purge, Relay, RelayConfig, ReplaySelector, Stats,
};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::{order_event, RecordingPublisher};
use sqlx::AssertSqlSafe;

fn fast_config() -> RelayConfig {
    RelayConfig::default()
        .idle_poll(Duration::from_millis(20))
        .max_attempts(3)
}

/// A row as another writer would insert it. `created_at` and `occurred_at`
/// are SQL expressions.
struct Row<'a> {
    id: String,
    aggregate_id: &'a str,
    version: i64,
    event_type: &'a str,
    payload: String,
    occurred_at: &'a str,
    created_at: &'a str,
}

impl<'a> Row<'a> {
    fn new(aggregate_id: &'a str, version: i64) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            aggregate_id,
            version,
            event_type: "OrderUpdated",
            payload: "{}".to_owned(),
            occurred_at: "now()",
            created_at: "clock_timestamp()",
        }
    }

    async fn insert(&self, outbox: &PostgresOutbox) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".outbox (id, aggregate_type, aggregate_id, aggregate_version,
                event_type, payload, occurred_at, created_at)
             VALUES ($1, 'Order', $2, $3, $4, $5, {}, {})",
            outbox.schema_name(),
            self.occurred_at,
            self.created_at
        )))
        .bind(&self.id)
        .bind(self.aggregate_id)
        .bind(self.version)
        .bind(self.event_type)
        .bind(&self.payload)
        .execute(outbox.pool())
        .await
        .map(|_| ())
    }

    /// The row as a writer that went around the checks left it: written
    /// the way the append writes (the trigger off), with its queue entry.
    async fn insert_unchecked(&self, outbox: &PostgresOutbox) -> Result<(), sqlx::Error> {
        let schema = outbox.schema_name();
        let mut tx = outbox.pool().begin().await?;
        sqlx::query("SELECT set_config($1, 'y', true)")
            .bind(format!("outbox_appending.{schema}"))
            .execute(&mut *tx)
            .await?;
        let position: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".outbox (id, aggregate_type, aggregate_id, aggregate_version,
                event_type, payload, occurred_at, created_at)
             VALUES ($1, 'Order', $2, $3, $4, $5, {}, {}) RETURNING position",
            self.occurred_at, self.created_at
        )))
        .bind(&self.id)
        .bind(self.aggregate_id)
        .bind(self.version)
        .bind(self.event_type)
        .bind(&self.payload)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".outbox_queue (position, aggregate_key, aggregate_version,
                written_at, created_ahead)
             SELECT position, \"{schema}\".outbox_aggregate_key(aggregate_type, aggregate_id),
                    aggregate_version, clock_timestamp(),
                    NOT coalesce(created_at <= clock_timestamp(), false)
             FROM \"{schema}\".outbox WHERE position = $1"
        )))
        .bind(position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
}

async fn write(outbox: &PostgresOutbox, events: &[outbox_core::Event]) {
    let mut tx = outbox.begin().await.expect("begin");
    tx.append(events).expect("append");
    tx.commit().await.expect("commit");
}

fn db_error(e: &sqlx::Error) -> (String, String) {
    match e {
        sqlx::Error::Database(db) => (
            db.code().unwrap_or_default().into_owned(),
            db.message().to_owned(),
        ),
        e => (String::new(), e.to_string()),
    }
}

/// What the schema refuses outright, each with the rule it broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_refuses_what_no_event_can_be() {
    let outbox = common::outbox("refuse", 2).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let long = "x".repeat(600);
    let cases: Vec<(Row, &str)> = vec![
        (Row::new("v0", 0), "outbox_version_positive"),
        (Row::new("neg", -5), "outbox_version_positive"),
        (Row::new("", 1), "outbox_names_short"),
        (Row::new(&long, 1), "outbox_names_short"),
        (
            Row {
                occurred_at: "'infinity'",
                ..Row::new("inf", 1)
            },
            "outbox_occurred_at_in_range",
        ),
        (
            Row {
                occurred_at: "'-infinity'",
                ..Row::new("neginf", 1)
            },
            "outbox_occurred_at_in_range",
        ),
        (
            Row {
                occurred_at: "'20000-01-01'",
                ..Row::new("far", 1)
            },
            "outbox_occurred_at_in_range",
        ),
        (
            Row {
                created_at: "'infinity'",
                ..Row::new("cinf", 1)
            },
            "outbox_created_at_in_range",
        ),
    ];
    for (row, rule) in &cases {
        let err = row.insert(&outbox).await.expect_err(rule);
        let (code, message) = db_error(&err);
        assert_eq!(code, "23514", "{message}");
        assert!(message.contains(rule), "{rule}: {message}");
    }
    assert_eq!(count(&outbox, "SELECT count(*) FROM {s}.outbox").await, 0);
    assert_eq!(
        count(&outbox, "SELECT count(*) FROM {s}.outbox_queue").await,
        0
    );
}

/// Rows the schema lets through but the envelope refuses: each is
/// dead-lettered alone with its reason and its fields as found; the events
/// around them flow, and a replay takes them back (to die again, alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_rows_the_envelope_refuses_are_dead_lettered_alone() {
    let outbox = common::outbox("edit", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(
        &outbox,
        &[
            order_event("a", 1, "OrderCreated"),
            order_event("a", 2, "OrderPaid"),
        ],
    )
    .await;
    let bad: Vec<(Row, &str)> = vec![
        (
            Row {
                id: "not-a-uuid".into(),
                ..Row::new("x1", 1)
            },
            "not a UUID",
        ),
        (
            Row {
                id: String::new(),
                ..Row::new("x2", 1)
            },
            "id",
        ),
        (Row::new("   ", 1), "aggregate_id"),
        (
            Row {
                event_type: "Order\u{7}Created",
                ..Row::new("x5", 1)
            },
            "control characters",
        ),
        (
            Row {
                payload: "{\"open\": ".into(),
                ..Row::new("x6", 1)
            },
            "not valid JSON",
        ),
    ];
    for (row, _) in &bad {
        row.insert(&outbox).await.expect("hand edit");
    }
    write(&outbox, &[order_event("b", 1, "OrderCreated")]).await;
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    let report = relay.drain().await.expect("drain");
    assert_eq!(
        (report.malformed, report.published),
        (bad.len(), 3),
        "{report:?}"
    );
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (0, 3, bad.len() as u64));
    let dead = outbox.dead_letters(100).await.expect("dead letters");
    assert_eq!(dead.len(), bad.len());
    for (letter, (row, reason)) in dead.iter().zip(bad.iter()) {
        let error = letter.last_error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("malformed:") && error.contains(reason),
            "{error}"
        );
        let raw = letter.raw.as_ref().expect("raw fields kept");
        assert_eq!(raw["aggregate_id"], row.aggregate_id, "{raw}");
        assert_eq!(raw["payload"], row.payload.as_str(), "{raw}");
        assert!(letter.reference.starts_with("position "), "{letter:?}");
    }
    assert_eq!(
        outbox.replay(ReplaySelector::All).await.expect("replay"),
        bad.len() as u64
    );
    let report = relay.drain().await.expect("drain");
    assert_eq!(report.malformed, bad.len(), "{report:?}");
}

/// Values written before the schema checked them (schema version 4 had no
/// checks), or around the checks: times PostgreSQL holds but no event can carry,
/// text longer than any event's, a payload over the limit. The relay
/// dead-letters each alone and publishes the rest; the status, the dead
/// letters, the purge and the figures all still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_before_the_checks_stop_nothing() {
    let outbox = common::outbox("legacy", 4).await.max_payload_bytes(1024);
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, &[order_event("good", 1, "OrderCreated")]).await;
    let long = "y".repeat(700);
    let bad: Vec<(Row, &str)> = vec![
        (
            Row {
                occurred_at: "'infinity'",
                ..Row::new("t1", 1)
            },
            "occurred_at infinity is outside",
        ),
        (
            Row {
                occurred_at: "'-infinity'",
                ..Row::new("t2", 1)
            },
            "occurred_at -infinity is outside",
        ),
        (
            Row {
                occurred_at: "'294276-12-31 23:59:59+00'",
                ..Row::new("t3", 1)
            },
            "outside the years 1 to 9999",
        ),
        (
            Row {
                occurred_at: "'4713-01-01 BC'",
                ..Row::new("t4", 1)
            },
            "outside the years 1 to 9999",
        ),
        (
            Row {
                payload: format!("\"{}\"", "z".repeat(5000)),
                ..Row::new("big", 1)
            },
            "over the limit of 1024",
        ),
        (Row::new(&long, 1), "aggregate_id is 700 bytes"),
        (
            Row {
                event_type: &long,
                ..Row::new("t7", 1)
            },
            "event_type is 700 bytes",
        ),
        (
            Row {
                created_at: "'infinity'",
                ..Row::new("t8", 1)
            },
            "",
        ),
        (
            Row {
                created_at: "'-infinity'",
                ..Row::new("t9", 1)
            },
            "",
        ),
    ];
    for (row, _) in &bad {
        row.insert_unchecked(&outbox).await.expect("legacy row");
    }
    write(&outbox, &[order_event("good", 2, "OrderPaid")]).await;
    let s = outbox.stats().await.expect("stats before");
    assert_eq!(s.pending, bad.len() as u64 + 2);
    // A creation time of infinity is ahead of any clock; -infinity is not.
    assert_eq!(s.created_in_future, 1, "{s:?}");
    let age = Utc::now() - s.oldest_pending_at.expect("oldest");
    assert!(age.num_seconds() < 60, "age from when written: {age}");

    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    let report = relay.drain().await.expect("drain");
    let unreadable = bad.iter().filter(|(_, why)| !why.is_empty()).count();
    assert_eq!(report.malformed, unreadable, "{report:?}");
    // Both created_at rows are events like any other.
    assert_eq!(report.published, 4, "{report:?}");
    let s = outbox.stats().await.expect("stats after");
    assert_eq!((s.pending, s.published, s.dead), (0, 4, unreadable as u64));
    let dead = outbox.dead_letters(100).await.expect("dead letters");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d.last_error.as_deref().unwrap_or_default())
        .collect();
    for (_, why) in bad.iter().filter(|(_, why)| !why.is_empty()) {
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "{why} not among {reasons:?}"
        );
    }
    for letter in &dead {
        let raw = letter.raw.as_ref().expect("raw fields");
        // Overlong text is kept cut, never whole.
        assert!(raw.to_string().len() < 2_000, "{raw}");
    }
    // The purge walks past every kind of row.
    let purged = outbox
        .purge_published(Utc::now() + chrono::Duration::seconds(1))
        .await
        .expect("purge");
    assert_eq!(purged, 4);
    let s = outbox.stats().await.expect("stats after purge");
    assert_eq!((s.pending, s.published, s.dead), (0, 0, unreadable as u64));
}

/// A row written by hand follows the append's version rules, or is refused
/// with an error that names them; it never reorders an aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_rows_follow_the_version_rules() {
    let outbox = common::outbox("rules", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, &[order_event("o", 1, "OrderCreated")]).await;
    // Published, then a hand-written version 1 comes late: refused.
    let relay =
        Relay::new(outbox.clone(), RecordingPublisher::new(), fast_config()).expect("relay");
    assert_eq!(relay.drain().await.expect("drain").published, 1);
    for version in [1, 0] {
        let err = Row::new("o", version)
            .insert(&outbox)
            .await
            .expect_err("a version at or below the stored one");
        let (code, message) = db_error(&err);
        assert!(code == "OB409" || code == "23514", "{code}: {message}");
    }
    let (code, message) = db_error(&Row::new("o", 1).insert(&outbox).await.expect_err("dup"));
    assert_eq!(code, "OB409");
    assert!(
        message.contains("outbox version rule")
            && message.contains("Order/o already has version 1"),
        "{message}"
    );
    // Two rows with one version: the second is refused.
    Row::new("o", 2).insert(&outbox).await.expect("version 2");
    let err = Row::new("o", 2).insert(&outbox).await.expect_err("twice");
    assert_eq!(db_error(&err).0, "OB409");
    // An append after hand-written rows sees their version.
    let mut tx = outbox.begin().await.expect("begin");
    tx.append(&[order_event("o", 2, "OrderPaid")])
        .expect("checked");
    let err = tx.commit().await.expect_err("stale append");
    assert!(
        matches!(err, outbox_core::StoreError::Conflict(_)),
        "{err:?}"
    );
    write(&outbox, &[order_event("o", 3, "OrderShipped")]).await;
    // Several rows of one aggregate in one statement, in version order.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{}\".outbox (id, aggregate_type, aggregate_id, aggregate_version,
            event_type, payload, occurred_at)
         VALUES (gen_random_uuid()::text, 'Order', 'o', 4, 'A', '{{}}', now()),
                (gen_random_uuid()::text, 'Order', 'o', 5, 'B', '{{}}', now())",
        outbox.schema_name()
    )))
    .execute(outbox.pool())
    .await
    .expect("two rows");
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    relay.drain().await.expect("drain");
    let versions: Vec<u64> = publisher
        .received()
        .iter()
        .map(|e| e.aggregate_version)
        .collect();
    assert_eq!(versions, vec![2, 3, 4, 5]);
}

/// Two writers by hand of one aggregate: the later version waits for the
/// earlier one's transaction and takes its position after it, even when
/// its row was begun first. Before, it kept the position it was given at
/// insert and was published first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_writers_of_one_aggregate_publish_in_version_order() {
    let outbox = common::outbox("handorder", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let s = outbox.schema_name().to_owned();
    write(&outbox, &[order_event("o", 1, "OrderCreated")]).await;
    // Writer A holds the aggregate (as its own insert of version 2 would).
    let mut a = outbox.pool().begin().await.expect("begin a");
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{s}\".outbox_aggregates WHERE aggregate_id = 'o' FOR UPDATE"
    )))
    .execute(&mut *a)
    .await
    .expect("lock");
    // Writer B inserts version 3 meanwhile: it waits for A.
    let b_outbox = outbox.clone();
    let b = tokio::spawn(async move { Row::new("o", 3).insert(&b_outbox).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "B must wait for A's transaction");
    let row = Row::new("o", 2);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{s}\".outbox (id, aggregate_type, aggregate_id, aggregate_version,
            event_type, payload, occurred_at) VALUES ($1, 'Order', 'o', 2, 'OrderPaid', '{{}}', now())"
    )))
    .bind(&row.id)
    .execute(&mut *a)
    .await
    .expect("A's version 2");
    a.commit().await.expect("commit a");
    b.await.expect("join").expect("B's version 3");

    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let versions: Vec<u64> = claimed
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
}

/// A creation time ahead of the clock (a writer's clock, a hand edit) does
/// not make the event wait: it is due at once, its age counts from when it
/// was written, and the status reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_creation_time_is_due_now_and_reported() {
    let outbox = common::outbox("future", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    Row {
        created_at: "now() + interval '1 day'",
        ..Row::new("f", 1)
    }
    .insert(&outbox)
    .await
    .expect("future row");
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.created_in_future), (1, 1), "{s:?}");
    let age = Utc::now() - s.oldest_pending_at.expect("oldest");
    assert!(
        age >= chrono::Duration::zero() && age.num_seconds() < 60,
        "{age}"
    );
    let claimed = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(claimed.events.len(), 1, "a future created_at made it wait");
}
