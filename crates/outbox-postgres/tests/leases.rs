//! The claim scheme of schema version 3: one lease row per claim, the
//! queue of events to publish, and the upgrade from version 2 with relays
//! of the old version holding claims.

mod common;

use std::time::Duration;

use common::DropSchema;
use outbox_core::{ClaimRequest, ClaimSource, Settlements, Stats};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::order_event;
use sqlx::AssertSqlSafe;

async fn write(outbox: &PostgresOutbox, aggregate: &str, versions: std::ops::RangeInclusive<u64>) {
    let events: Vec<_> = versions
        .map(|v| order_event(aggregate, v, "OrderUpdated"))
        .collect();
    let mut tx = outbox.pool().begin().await.expect("begin");
    outbox.append(&mut tx, &events).await.expect("append");
    tx.commit().await.expect("commit");
}

async fn count(outbox: &PostgresOutbox, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.replace("{schema}", outbox.schema_name())))
        .fetch_one(outbox.pool())
        .await
        .expect("count")
}

/// A relay killed while holding a claim (its lease never settled): another
/// relay takes the events once the lease ends, and whatever the dead
/// relay's settlement says when it finally arrives (published, released,
/// retry, dead) touches nothing the new holder has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_relay_settles_nothing_once_its_claim_is_taken_over() {
    let outbox = common::outbox("stale", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, "a", 1..=4).await;
    let killed = outbox
        .claim(ClaimRequest::new(2, Duration::from_millis(200)))
        .await
        .expect("claim");
    assert_eq!(killed.events.len(), 2);
    // While the lease lasts, the rest of the aggregate waits.
    let during = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert!(during.events.is_empty(), "{:?}", during.events);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let versions: Vec<u64> = taken
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);

    let receipts: Vec<i64> = killed.events.iter().map(|c| c.receipt).collect();
    let now = chrono::Utc::now();
    let mut late = Settlements::default();
    late.released = vec![receipts[0]];
    late.retry = vec![(receipts[1], now, "late".into())];
    assert_eq!(outbox.settle(killed.lease, late).await.expect("settle"), 0);
    let mut late = Settlements::default();
    late.dead = vec![(receipts[0], "late".into())];
    late.published = vec![receipts[1]];
    assert_eq!(outbox.settle(killed.lease, late).await.expect("settle"), 0);
    // The new holder still holds everything: nothing is claimable, nothing changed.
    let again = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert!(again.events.is_empty(), "{:?}", again.events);
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (4, 0, 0));

    // A holder may settle in several calls; the lease shrinks as it does.
    let all: Vec<i64> = taken.events.iter().map(|c| c.receipt).collect();
    let mut first = Settlements::default();
    first.published = vec![all[0]];
    first.released = vec![all[2], all[3]];
    assert_eq!(outbox.settle(taken.lease, first).await.expect("settle"), 3);
    // v2 is still held by the lease, so v3 and v4 wait behind it.
    let behind = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert!(behind.events.is_empty(), "{:?}", behind.events);
    let mut second = Settlements::default();
    second.published = vec![all[1]];
    assert_eq!(outbox.settle(taken.lease, second).await.expect("settle"), 1);
    assert_eq!(
        count(&outbox, "SELECT count(*) FROM {schema}.outbox_leases").await,
        0,
        "a settled lease is dropped"
    );
    let rest = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    let versions: Vec<u64> = rest
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect();
    assert_eq!(versions, vec![3, 4]);
}

/// A retry holds its aggregate back until it is due, other aggregates flow,
/// and an empty claim says when the next held event comes due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_holds_only_its_aggregate_until_due() {
    let outbox = common::outbox("retry", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    write(&outbox, "a", 1..=2).await;
    let first = outbox
        .claim(ClaimRequest::new(1, Duration::from_secs(30)))
        .await
        .expect("claim");
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(400);
    let mut failed = Settlements::default();
    failed.retry = vec![(first.events[0].receipt, due, "broker said no".into())];
    assert_eq!(outbox.settle(first.lease, failed).await.expect("settle"), 1);
    write(&outbox, "b", 1..=1).await;
    let next = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let got = outbox_testkit::claimed_versions(&next);
    assert_eq!(got, vec![("b".to_owned(), 1)]);
    let mut sent = Settlements::default();
    sent.published = vec![next.events[0].receipt];
    outbox.settle(next.lease, sent).await.expect("settle");
    let empty = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert!(empty.events.is_empty());
    let next_due = empty.next_due.expect("next due");
    assert!(
        (next_due - due).num_milliseconds().abs() < 5,
        "{next_due} {due}"
    );
    let s = outbox.stats().await.expect("stats");
    assert_eq!(s.last_error.as_deref(), Some("broker said no"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let retried = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let got: Vec<(u64, u32)> = retried
        .events
        .iter()
        .map(|c| (c.event.aggregate_version, c.attempts))
        .collect();
    assert_eq!(got, vec![(1, 1), (2, 0)]);
}

/// An outbox at schema version 2, with a pending backlog, an event leased
/// by a relay of the old version, a dead letter and published events, is
/// upgraded in place: nothing is lost, the old lease still holds its
/// aggregate until it ends, and publishing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_version_2_keeps_every_event_and_old_leases() {
    let schema = common::unique_schema("upgrade");
    let _drop = DropSchema(schema.clone());
    let pool = common::pool(&common::url(), 2).await;
    let mut sql = format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.outbox_schema_migrations (
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO {schema}.outbox_schema_migrations (version) VALUES (1), (2);"
    );
    for migration in [
        include_str!("../migrations/0001_outbox.sql"),
        include_str!("../migrations/0002_claim_and_settle.sql"),
    ] {
        sql.push_str(
            &migration
                .replace("{schema}", &format!("\"{schema}\""))
                .replace("{schema_name}", &schema),
        );
    }
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .expect("version 2");
    // Rows as version 2 left them: `lease_id` and `next_attempt_at` in the row.
    let rows = [
        // aggregate, version, status, leased for (ms)
        ("leased", 1, "pending", Some(2_000)),
        ("leased", 2, "pending", None),
        ("free", 1, "pending", None),
        ("free", 2, "pending", None),
        ("gone", 1, "published", None),
        ("broken", 1, "dead", None),
    ];
    for (aggregate, version, status, leased) in rows {
        let event = order_event(aggregate, version, "OrderUpdated");
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.outbox (id, aggregate_type, aggregate_id, aggregate_version,
                event_type, payload, occurred_at, status, lease_id, next_attempt_at)
             VALUES ($1, 'Order', $2, $3, 'OrderUpdated', '{{}}', now(), $4,
                     CASE WHEN $5::int IS NULL THEN NULL ELSE gen_random_uuid() END,
                     now() + make_interval(secs => coalesce($5::int, 0) / 1000.0))"
        )))
        .bind(event.id.to_string())
        .bind(aggregate)
        .bind(version as i64)
        .bind(status)
        .bind(leased)
        .execute(&pool)
        .await
        .expect("row");
    }

    let outbox = PostgresOutbox::from_pool(pool)
        .schema(&schema)
        .expect("schema");
    outbox.migrate().await.expect("upgrade");
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (4, 1, 1), "{s:?}");
    let first = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let got = outbox_testkit::claimed_versions(&first);
    assert_eq!(
        got,
        vec![("free".to_owned(), 1), ("free".to_owned(), 2)],
        "the old lease must hold its aggregate"
    );
    // The old lease ends 2 s after it was written.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let second = outbox
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let got = outbox_testkit::claimed_versions(&second);
    assert_eq!(
        got,
        vec![("leased".to_owned(), 1), ("leased".to_owned(), 2)]
    );
    // Migrating again changes nothing.
    outbox.migrate().await.expect("migrate again");
    let version: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM {schema}.outbox_schema_migrations"
    )))
    .fetch_one(outbox.pool())
    .await
    .expect("version");
    assert_eq!(version, outbox_postgres::SCHEMA_VERSION);
}

/// An outbox at schema version 4 with a backlog, a dead letter, published
/// events and a relay of version 4 holding a claim and still running, is
/// upgraded to version 5 in place: the old relay's next call fails with an
/// error that tells it to upgrade, its claim holds its aggregate until the
/// lease ends, the backlog stays due in order, the dead letter is listed
/// and replayable, and the published events can be purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_version_4_with_an_old_relay_running() {
    use outbox_core::{DeadLetters, Purge, ReplaySelector};

    let schema = common::unique_schema("upgrade4");
    let _drop = DropSchema(schema.clone());
    let pool = common::pool(&common::url(), 2).await;
    let mut sql = format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.outbox_schema_migrations (
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO {schema}.outbox_schema_migrations (version) VALUES (1), (2), (3), (4);"
    );
    for migration in [
        include_str!("../migrations/0001_outbox.sql"),
        include_str!("../migrations/0002_claim_and_settle.sql"),
        include_str!("../migrations/0003_queue_and_leases.sql"),
        include_str!("../migrations/0004_append_function.sql"),
    ] {
        sql.push_str(
            &migration
                .replace("{schema}", &format!("\"{schema}\""))
                .replace("{schema_name}", &schema),
        );
    }
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .expect("version 4");
    let run = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .map(|_| ())
        }
    };
    // Writers of version 4: three events of each aggregate.
    for aggregate in ["sent", "dies", "held", "free"] {
        run(format!(
            "SELECT \"{schema}\".outbox_append(ARRAY['Order'], ARRAY['{aggregate}'], ARRAY[1::bigint],
                ARRAY[3::bigint], ARRAY[gen_random_uuid()::text, gen_random_uuid()::text, gen_random_uuid()::text],
                ARRAY['Order', 'Order', 'Order'], ARRAY['{aggregate}', '{aggregate}', '{aggregate}'],
                ARRAY[1::bigint, 2, 3], ARRAY['A', 'B', 'C'], ARRAY['{{}}', '{{}}', '{{}}'],
                ARRAY[now(), now(), now()], ARRAY[NULL::text, NULL, NULL], ARRAY[NULL::text, NULL, NULL],
                ARRAY[NULL::text, NULL, NULL], 'never')"
        ))
        .await
        .expect("append at version 4");
    }
    // A relay of version 4 publishes `sent` and dead-letters `dies` v1...
    let lease = "11111111-1111-1111-1111-111111111111";
    run(format!(
        "WITH c AS (SELECT position, aggregate_id, aggregate_version FROM
             \"{schema}\".outbox_claim_v3(100, '{lease}', now() + interval '30 s', now(), NULL, false)
             WHERE aggregate_id IN ('sent', 'dies'))
         SELECT \"{schema}\".outbox_settle_v3('{lease}',
             ARRAY(SELECT position FROM c WHERE aggregate_id = 'sent' OR aggregate_version = 1 ORDER BY position),
             ARRAY(SELECT CASE WHEN aggregate_id = 'sent' THEN 1 ELSE 4 END::smallint FROM c
                   WHERE aggregate_id = 'sent' OR aggregate_version = 1 ORDER BY position),
             ARRAY(SELECT now() FROM c WHERE aggregate_id = 'sent' OR aggregate_version = 1),
             ARRAY(SELECT 'broker refused it' FROM c WHERE aggregate_id = 'sent' OR aggregate_version = 1),
             true)"
    ))
    .await
    .expect("relay of version 4");
    // ...and another one holds the rest of `dies` and all of `held` (its
    // lease ends in 2 s) when the upgrade comes.
    let old = "22222222-2222-2222-2222-222222222222";
    run(format!(
        "DELETE FROM \"{schema}\".outbox_leases;
         SELECT count(*) FROM \"{schema}\".outbox_claim_v3(5, '{old}', now() + interval '2 s', now(), NULL, false)"
    ))
    .await
    .expect("old claim");

    let outbox = PostgresOutbox::from_pool(pool.clone())
        .schema(&schema)
        .expect("schema");
    outbox.migrate().await.expect("upgrade to version 5");

    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (8, 3, 1), "{s:?}");
    // The old relay, still running, is stopped with a clear message.
    for call in [
        format!("SELECT * FROM \"{schema}\".outbox_claim_v3(10, gen_random_uuid(), now() + interval '30 s', now(), NULL, false)"),
        format!("SELECT \"{schema}\".outbox_settle_v3('{old}', ARRAY[1::bigint], ARRAY[1::smallint], ARRAY[now()], ARRAY[''], true)"),
    ] {
        let err = run(call).await.expect_err("an old relay went on");
        let message = err.to_string();
        assert!(
            message.contains("upgraded to version 5") && message.contains("upgrade it"),
            "{message}"
        );
    }
    // The backlog is due in order; the old claim holds `held` until it ends.
    let first = outbox
        .claim(ClaimRequest::new(100, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(
        outbox_testkit::claimed_versions(&first),
        vec![
            ("free".to_owned(), 1),
            ("free".to_owned(), 2),
            ("free".to_owned(), 3),
        ]
    );
    let mut sent = Settlements::default();
    sent.published = first.events.iter().map(|c| c.receipt).collect();
    assert_eq!(outbox.settle(first.lease, sent).await.expect("settle"), 3);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let second = outbox
        .claim(ClaimRequest::new(100, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(
        outbox_testkit::claimed_versions(&second),
        vec![
            ("dies".to_owned(), 2),
            ("dies".to_owned(), 3),
            ("held".to_owned(), 1),
            ("held".to_owned(), 2),
            ("held".to_owned(), 3)
        ]
    );
    let mut sent = Settlements::default();
    sent.published = second.events.iter().map(|c| c.receipt).collect();
    outbox.settle(second.lease, sent).await.expect("settle");
    // The dead letter kept its error and attempts, and replays.
    let dead = outbox.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("broker refused it"));
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(outbox.replay(ReplaySelector::All).await.expect("replay"), 1);
    let replayed = outbox
        .claim(ClaimRequest::new(100, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(
        outbox_testkit::claimed_versions(&replayed),
        vec![("dies".to_owned(), 1)]
    );
    let mut sent = Settlements::default();
    sent.published = replayed.events.iter().map(|c| c.receipt).collect();
    outbox.settle(replayed.lease, sent).await.expect("settle");
    // Everything published, before and after the upgrade, can be purged.
    let purged = outbox
        .purge_published(chrono::Utc::now() + chrono::Duration::hours(2))
        .await
        .expect("purge");
    assert_eq!(purged, 12);
    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (0, 0, 0), "{s:?}");
}
