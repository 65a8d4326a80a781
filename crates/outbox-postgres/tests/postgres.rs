//! The PostgreSQL store under what production does to it: many writers
//! committing out of order, several relays, hand-edited rows, stale versions.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{db, DropSchema};
use outbox_core::{Event, Relay, RelayConfig, Stats, StoreError};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::{order_event, RecordingPublisher};
use sqlx::{AssertSqlSafe, PgConnection};

async fn write(outbox: &PostgresOutbox, key: &str, events: &[Event]) -> Result<(), StoreError> {
    let mut tx = outbox.pool().begin().await.map_err(db)?;
    insert_order(outbox, &mut tx, key).await?;
    outbox.append(&mut tx, events).await?;
    tx.commit().await.map_err(db)
}

/// The business change: order `key`, in the caller's transaction.
async fn insert_order(
    outbox: &PostgresOutbox,
    conn: &mut PgConnection,
    key: &str,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.orders (id) VALUES ($1)",
        outbox.schema_name()
    )))
    .bind(key)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Every aggregate's publishes in strictly increasing version order.
fn assert_in_order(versions: &[(String, u64)]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (agg, v) in versions {
        let prev = last.insert(agg, *v).unwrap_or(0);
        assert!(
            *v > prev,
            "aggregate {agg}: version {v} published after {prev}"
        );
    }
}

async fn wait_until_settled(outbox: &PostgresOutbox, within: Duration) {
    let until = tokio::time::Instant::now() + within;
    loop {
        let s = outbox.stats().await.expect("stats");
        if s.pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "still pending after {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .idle_poll(Duration::from_millis(50))
}

/// The known failure of position-reading relays: a row whose transaction
/// commits after a later position is visible. It must be published once
/// it commits, not skipped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_committing_row_is_not_skipped() {
    let outbox = common::outbox("late", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let mut late = outbox.pool().begin().await.expect("begin");
    outbox
        .append(&mut late, &[order_event("slow", 1, "OrderCreated")])
        .await
        .expect("append");
    write(&outbox, "fast", &[order_event("fast", 1, "OrderCreated")])
        .await
        .expect("write");
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    relay.drain().await.expect("drain");
    assert_eq!(publisher.versions(), vec![("fast".to_owned(), 1)]);
    late.commit().await.expect("commit");
    relay.drain().await.expect("drain");
    assert_eq!(
        publisher.versions(),
        vec![("fast".to_owned(), 1), ("slow".to_owned(), 1)],
        "the late commit was skipped"
    );
}

/// A writer that read an old version waits for the concurrent writer of the
/// same aggregate, then gets a typed conflict; its business row is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_version_is_a_typed_conflict() {
    let outbox = common::outbox("stale", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, "o-1", &[order_event("o", 1, "OrderCreated")])
        .await
        .expect("write");
    let mut first = outbox.pool().begin().await.expect("begin");
    outbox
        .append(&mut first, &[order_event("o", 2, "OrderPaid")])
        .await
        .expect("append");
    let second = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            write(&outbox, "o-2", &[order_event("o", 2, "OrderCancelled")]).await
        })
    };
    // The second writer is blocked behind the first's aggregate row.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "writers of one aggregate were not serialized"
    );
    first.commit().await.expect("commit");
    let err = second
        .await
        .expect("task")
        .expect_err("a stale version was accepted");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let n = common::count(&outbox, "SELECT count(*) FROM {s}.orders").await;
    assert_eq!(n, 1, "the conflicting transaction's business row stayed");
    write(&outbox, "o-3", &[order_event("o", 3, "OrderShipped")])
        .await
        .expect("the next version is accepted");
    assert_eq!(outbox.stats().await.expect("stats").pending, 3);
}

/// Oversized payloads and rolled-back transactions leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_rolled_back_writes_leave_nothing() {
    let outbox = common::outbox("refuse", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let outbox = outbox.max_payload_bytes(64);
    let big = Event::builder("Order", "big", 1, "OrderCreated")
        .payload(&"x".repeat(100))
        .build()
        .expect("event");
    let err = write(&outbox, "big", &[big]).await.expect_err("too big");
    assert!(
        matches!(
            err,
            StoreError::LimitExceeded {
                actual: 102,
                max: 64,
                ..
            }
        ),
        "{err:?}"
    );
    let mut tx = outbox.pool().begin().await.expect("begin");
    outbox
        .append(&mut tx, &[order_event("r", 1, "OrderCreated")])
        .await
        .expect("append");
    tx.rollback().await.expect("rollback");
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (0, 0, 0));
    // The rolled-back version is free again.
    write(&outbox, "r", &[order_event("r", 1, "OrderCreated")])
        .await
        .expect("write");
}

/// Many writers, some on the same aggregates, hold their transactions open
/// for random times, so commits come in another order than inserts; three
/// relays, each with its own pool, publish while they write. Nothing is
/// lost, nothing is reordered, nothing is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_relays_keep_order() {
    let outbox = common::outbox("writers", 10).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let writers = 8;
    let writes_each = 60;
    let aggregates = 12;

    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    for _ in 0..3 {
        let store = common::same_outbox(&outbox, &common::url(), 3).await;
        let relay =
            Relay::new(store, publisher.clone(), fast_config().batch_size(20)).expect("relay");
        let stop = stop.clone();
        relays.push(tokio::spawn(async move {
            relay
                .run(async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
        }));
    }

    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            let mut conflicts = 0u64;
            for n in 0..writes_each {
                let agg = format!("agg-{}", fastrand_index(w * 1000 + n, aggregates));
                loop {
                    let current: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                        "SELECT version FROM {}.outbox_aggregates
                         WHERE aggregate_type = 'Order' AND aggregate_id = $1",
                        outbox.schema_name()
                    )))
                    .bind(&agg)
                    .fetch_optional(outbox.pool())
                    .await
                    .expect("read version");
                    let version = current.unwrap_or(0) as u64 + 1;
                    let event = order_event(&agg, version, "OrderUpdated");
                    // Hold the transaction open: later inserts commit first.
                    let hold = Duration::from_millis(((w * 7 + n * 13) % 15) as u64);
                    // Half the writers append with a statement, half let
                    // the commit carry the event.
                    let outcome = if w % 2 == 0 {
                        let mut tx = outbox.pool().begin().await.expect("begin");
                        match outbox.append(&mut tx, &[event]).await {
                            Ok(()) => {
                                tokio::time::sleep(hold).await;
                                tx.commit().await.expect("commit");
                                Ok(())
                            }
                            Err(e) => {
                                tx.rollback().await.expect("rollback");
                                Err(e)
                            }
                        }
                    } else {
                        let mut tx = outbox.begin().await.expect("begin");
                        tx.append(&[event]).expect("checked");
                        tokio::time::sleep(hold).await;
                        tx.commit().await
                    };
                    match outcome {
                        Ok(()) => {
                            written += 1;
                            break;
                        }
                        Err(StoreError::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("append failed: {e}"),
                    }
                }
            }
            (written, conflicts)
        }));
    }
    let mut written = 0;
    let mut conflicts = 0;
    for t in tasks {
        let (w, c) = t.await.expect("writer");
        written += w;
        conflicts += c;
    }
    wait_until_settled(&outbox, Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    for r in relays {
        r.await.expect("relay task").expect("relay");
    }

    assert_eq!(written, (writers * writes_each) as u64);
    assert!(
        conflicts > 0,
        "no writers raced on an aggregate; the test proves little"
    );
    let versions = publisher.versions();
    assert_eq!(versions.len() as u64, written, "lost or duplicated events");
    assert_in_order(&versions);
    let ids: HashSet<_> = publisher.received().iter().map(|e| e.id).collect();
    assert_eq!(ids.len() as u64, written);
    // Every aggregate's versions are 1..=n without a gap.
    let mut by_agg: HashMap<String, Vec<u64>> = HashMap::new();
    for (agg, v) in versions {
        by_agg.entry(agg).or_default().push(v);
    }
    for (agg, vs) in by_agg {
        assert_eq!(vs, (1..=vs.len() as u64).collect::<Vec<_>>(), "{agg}");
    }
}

/// A cheap, deterministic spread of writes over aggregates.
fn fastrand_index(seed: usize, n: usize) -> usize {
    (seed.wrapping_mul(2_654_435_761) >> 7) % n
}

/// A commit wakes an idle relay at once (LISTEN/NOTIFY), long before its
/// poll; with LISTEN off, the poll finds the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_wakes_the_relay() {
    let outbox = common::outbox("notify", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    for (listen, poll, within) in [
        (true, Duration::from_secs(30), Duration::from_secs(5)),
        (false, Duration::from_millis(100), Duration::from_secs(5)),
    ] {
        let publisher = RecordingPublisher::new();
        let relay = Relay::new(
            outbox.clone().listen(listen),
            publisher.clone(),
            RelayConfig::default().idle_poll(poll),
        )
        .expect("relay");
        let stop = Arc::new(tokio::sync::Notify::new());
        let running = {
            let stop = stop.clone();
            tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
        };
        // Let the relay go idle (and start listening).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let key = format!("wake-{listen}");
        let started = tokio::time::Instant::now();
        write(&outbox, &key, &[order_event(&key, 1, "OrderCreated")])
            .await
            .expect("write");
        while publisher.received().is_empty() {
            assert!(
                started.elapsed() < within,
                "the commit did not wake the relay (listen: {listen})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.notify_one();
        running.await.expect("task").expect("relay");
    }
    let published = common::count(
        &outbox,
        "SELECT count(*) FROM {s}.outbox_events WHERE status = 'published'",
    )
    .await;
    assert_eq!(published, 2);
}

/// Published events leave dead rows at the head of the queue, where every
/// claim starts reading: the relays vacuum the queue tables after every
/// `queue_vacuum_every` settled events, so claims stop paying for them
/// whether autovacuum runs or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_vacuum_the_queue_they_empty() {
    let outbox = common::outbox("vacuum", 4).await.queue_vacuum_every(100);
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let vacuums = |outbox: PostgresOutbox| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT vacuum_count + autovacuum_count FROM pg_stat_user_tables
             WHERE schemaname = $1 AND relname = 'outbox_queue'",
        )
        .bind(outbox.schema_name().to_owned())
        .fetch_one(outbox.pool())
        .await
        .expect("stats")
    };
    let before = vacuums(outbox.clone()).await;
    for n in 0..250 {
        write(
            &outbox,
            &format!("o-{n}"),
            &[order_event(&format!("o-{n}"), 1, "OrderPlaced")],
        )
        .await
        .expect("write");
    }
    let relay =
        Relay::new(outbox.clone(), RecordingPublisher::new(), fast_config()).expect("relay");
    assert_eq!(relay.drain().await.expect("drain").published, 250);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while vacuums(outbox.clone()).await == before {
        assert!(
            tokio::time::Instant::now() < until,
            "no vacuum of the queue after 250 settled events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = common::count(&outbox, "SELECT count(*) FROM {s}.outbox_queue").await;
    assert_eq!(left, 0, "the queue still holds published events");
}

/// A commit that carries its events stores them exactly, whatever their
/// text holds: quotes, dollar quotes, backslashes, statement separators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_carries_its_events_exactly() {
    let outbox = common::outbox("carried", 2).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let awkward = [
        "it's",
        "$o$",
        "$o1$ $$ $tag$",
        "back\\slash \\x00 \\n",
        "'); DROP TABLE orders; --",
        "; COMMIT; BEGIN",
        "ünïcødé ✓ 𝄞",
    ];
    let mut events = Vec::new();
    for (n, text) in awkward.iter().enumerate() {
        let mut event = Event::builder("Order", format!("{text}#{n}"), 1, format!("Type {text}"))
            .payload(&serde_json::json!({ "text": text, "n": n }))
            .build()
            .expect("event");
        event.metadata.correlation_id = Some((*text).to_owned());
        event.metadata.causation_id = (n % 2 == 0).then(|| format!("cause {text}"));
        events.push(event);
    }
    // Two versions of one aggregate in the same commit.
    events.push(order_event("it's#0", 2, "OrderPaid"));

    let mut tx = outbox.begin().await.expect("begin");
    insert_order(&outbox, &mut tx, "carried")
        .await
        .expect("business row");
    tx.append(&events[..3]).expect("append");
    tx.append(&events[3..]).expect("append");
    tx.commit().await.expect("commit");

    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    relay.drain().await.expect("drain");
    let mut received = publisher.received();
    received.sort_by_key(|e| events.iter().position(|x| x.id == e.id));
    assert_eq!(received, events);
    let n = common::count(&outbox, "SELECT count(*) FROM {s}.orders").await;
    assert_eq!(n, 1);
}

/// At commit, a stale version fails with a typed conflict and writes
/// nothing, the business row included; the connection goes back to the
/// pool clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_fails_the_carrying_commit() {
    let outbox = common::outbox("carried_stale", 1).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, "o-1", &[order_event("o", 1, "OrderCreated")])
        .await
        .expect("write");
    let mut tx = outbox.begin().await.expect("begin");
    insert_order(&outbox, &mut tx, "o-2")
        .await
        .expect("business row");
    tx.append(&[order_event("o", 1, "OrderCreated")])
        .expect("checked");
    let err = tx.commit().await.expect_err("a stale version was accepted");
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("Order/o from version 1")),
        "{err:?}"
    );
    // The pool's one connection is usable and outside any transaction.
    let n = common::count(&outbox, "SELECT count(*) FROM {s}.orders").await;
    assert_eq!(n, 1, "the conflicting transaction's business row stayed");
    assert_eq!(outbox.stats().await.expect("stats").pending, 1);
    write(&outbox, "o-3", &[order_event("o", 2, "OrderPaid")])
        .await
        .expect("the next version is accepted");
}

/// A transaction dropped without a commit, or rolled back, leaves nothing,
/// and its connection does not go back to the pool inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_transaction_writes_nothing() {
    let outbox = common::outbox("carried_drop", 1).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    for rollback in [false, true] {
        let mut tx = outbox.begin().await.expect("begin");
        insert_order(&outbox, &mut tx, "dropped")
            .await
            .expect("business row");
        // A statement append and a carried one.
        outbox
            .append(&mut tx, &[order_event("d", 1, "OrderCreated")])
            .await
            .expect("append");
        tx.append(&[order_event("d", 2, "OrderPaid")])
            .expect("checked");
        if rollback {
            tx.rollback().await.expect("rollback");
        } else {
            drop(tx);
        }
        let n = common::count(&outbox, "SELECT count(*) FROM {s}.orders").await;
        assert_eq!(n, 0, "rollback: {rollback}");
        let s = outbox.stats().await.expect("stats");
        assert_eq!((s.pending, s.published, s.dead), (0, 0, 0));
    }
}

/// A row written by hand after an append, in the same transaction, still
/// joins the queue (the append's own rows skip the enqueue trigger only
/// while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_row_after_an_append_is_queued() {
    let outbox = common::outbox("hand_after", 2).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let mut tx = outbox.pool().begin().await.expect("begin");
    outbox
        .append(&mut tx, &[order_event("a", 1, "OrderCreated")])
        .await
        .expect("append");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.outbox (id, aggregate_type, aggregate_id, aggregate_version,
             event_type, payload, occurred_at)
         VALUES ($1, 'Order', 'by-hand', 1, 'OrderCreated', '{{}}', now())",
        outbox.schema_name()
    )))
    .bind(outbox_core::EventId::new().to_string())
    .execute(&mut *tx)
    .await
    .expect("hand-written row");
    tx.commit().await.expect("commit");
    let queued = common::count(&outbox, "SELECT count(*) FROM {s}.outbox_queue").await;
    assert_eq!(queued, 2);
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(outbox.clone(), publisher.clone(), fast_config()).expect("relay");
    relay.drain().await.expect("drain");
    let mut versions = publisher.versions();
    versions.sort();
    assert_eq!(
        versions,
        vec![("a".to_owned(), 1), ("by-hand".to_owned(), 1)]
    );
}

/// A carrying commit wakes the relays of its process at once, with no
/// notification and long before their poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrying_commit_wakes_this_process_relays() {
    let outbox = common::outbox("local_wake", 2).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    // Another outbox value of the same schema, as a relay with a pool of
    // its own has; no LISTEN, and a poll far away.
    let relay_store = common::same_outbox(&outbox, &common::url(), 2)
        .await
        .listen(false);
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(
        relay_store,
        publisher.clone(),
        RelayConfig::default().idle_poll(Duration::from_secs(30)),
    )
    .expect("relay");
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=3 {
        let started = tokio::time::Instant::now();
        let mut tx = outbox.clone().notify(false).begin().await.expect("begin");
        tx.append(&[order_event("w", n, "OrderUpdated")])
            .expect("checked");
        tx.commit().await.expect("commit");
        while publisher.received().len() < n as usize {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "commit {n} did not wake the relay"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Idle again before the next commit.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.notify_one();
    running.await.expect("task").expect("relay");
}
