//! `outbox demo` on PostgreSQL with two relay processes and chaos, to NATS
//! and to RabbitMQ: the summary's guarantees, then the tables and the
//! broker read back by the test itself. Each run names its schema, stream
//! or exchange, so the demo keeps them for the test to inspect.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::process::Output;

use outbox_core::cloudevents;
use outbox_core::Event;
use outbox_postgres::PostgresOutbox;
use outbox_rabbitmq::lapin;
use serde_json::Value;

use common::{last_json_line, outbox};

const ORDERS: u64 = 300;

fn demo(store: &str, to: &str) -> (Output, Value) {
    let out = outbox(&[
        "demo",
        "--store",
        store,
        "--to",
        to,
        "--relays",
        "2",
        "--chaos",
        "--orders",
        &ORDERS.to_string(),
        "--json",
    ]);
    let summary = last_json_line(&out);
    assert!(
        out.status.success(),
        "demo failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, summary)
}

fn n(summary: &Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {summary}"))
}

/// The summary's guarantees, and chaos that happened.
fn assert_guarantees(s: &Value) {
    assert_eq!(n(s, "orders"), ORDERS);
    assert_eq!(n(s, "lost"), 0, "{s}");
    assert_eq!(n(s, "out_of_order"), 0, "{s}");
    assert_eq!(
        n(s, "delivered_unique") + n(s, "dead_lettered"),
        n(s, "events_written"),
        "{s}"
    );
    assert!(n(s, "events_written") >= ORDERS, "{s}");
    assert_eq!(n(s, "relays"), 2, "{s}");
    assert!(n(s, "relay_restarts") >= 1, "a relay was killed: {s}");
    assert!(n(s, "broker_cuts") >= 1, "the broker was cut off: {s}");
}

/// The tables agree with the summary: every order, every event published
/// or dead, every event not dead in the Shipping inbox, each shipment at
/// its order's version. Returns the ids of the published events.
async fn assert_tables(outbox: &PostgresOutbox, s: &Value) -> HashSet<String> {
    let count = |sql: &'static str| pg::count(outbox, sql);
    assert_eq!(
        count("SELECT count(*) FROM {s}.orders").await,
        ORDERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.outbox").await,
        n(s, "events_written") as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'published'").await,
        n(s, "events_published") as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'dead'").await,
        n(s, "dead_lettered") as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'pending'").await,
        0,
        "nothing pending"
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.inbox WHERE consumer = 'shipping'").await,
        n(s, "delivered_unique") as i64
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM {s}.outbox_events AS o WHERE status != 'dead' AND NOT EXISTS
             (SELECT 1 FROM {s}.inbox AS i WHERE i.event_id::text = o.id)"
        )
        .await,
        0,
        "an event neither delivered nor dead-lettered"
    );
    if n(s, "dead_lettered") == 0 {
        assert_eq!(
            count(
                "SELECT count(*) FROM {s}.orders AS o JOIN {s}.shipments AS sh
                 ON sh.order_id = o.id AND sh.order_version = o.version"
            )
            .await,
            ORDERS as i64,
            "each shipment reflects its order's last event"
        );
    }
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM \"{}\".outbox_events WHERE status = 'published'",
        outbox.schema_name()
    )))
    .fetch_all(outbox.pool())
    .await
    .expect("published ids")
    .into_iter()
    .collect()
}

/// What reached the broker, in order: each published event at least once,
/// nothing else, each aggregate's first deliveries in version order.
fn assert_broker(events: &[Event], published: &HashSet<String>, s: &Value) {
    let arrived: HashSet<String> = pg::assert_in_order(events)
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    let dead = n(s, "dead_lettered") as usize;
    assert!(
        published.is_subset(&arrived),
        "{} published events never reached the broker",
        published.difference(&arrived).count()
    );
    assert!(
        arrived.len() <= published.len() + dead,
        "the broker got events the outbox does not mark published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_postgres_with_nats_two_relays_and_chaos_keeps_the_guarantees() {
    let schema = pg::unique("demo_nats");
    let stream = pg::unique("demo_nats");
    let store = format!("{}?schema={schema}", pg::postgres_url());
    let to = format!(
        "{}?stream={stream}&subject={stream}.{{aggregatetype}}.{{type}}",
        pg::NATS
    );
    // No `outbox migrate` first: the demo creates the tables itself.
    let (_out, s) = tokio::task::spawn_blocking(move || demo(&store, &to))
        .await
        .expect("demo");
    assert_guarantees(&s);

    let outbox = pg::outbox(&schema).await;
    let published = assert_tables(&outbox, &s).await;
    let js = pg::jetstream().await;
    let events = pg::read_stream(
        &js,
        &stream,
        published.len(),
        std::time::Duration::from_secs(5),
    )
    .await;
    // The stream drops a re-published id: each event is stored once.
    assert_eq!(
        events.len() as u64,
        n(&s, "events_published"),
        "stream messages"
    );
    assert_broker(&events, &published, &s);

    let _ = js.delete_stream(&stream).await;
    pg::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_postgres_with_rabbitmq_two_relays_and_chaos_keeps_the_guarantees() {
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;

    let schema = pg::unique("demo_amqp");
    let exchange = pg::unique("demo.amqp");
    let store = format!("{}?schema={schema}", pg::postgres_url());
    let to = format!("{}?exchange={exchange}", pg::AMQP);

    // The test's own queue on the demo's exchange sees everything published.
    let connection = lapin::Connection::connect(pg::AMQP, lapin::ConnectionProperties::default())
        .await
        .expect("rabbitmq");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    let queue = format!("{exchange}.watch");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    // `outbox migrate` first, as an operator would: the demo uses the tables.
    let migrate_store = store.clone();
    let migrated = tokio::task::spawn_blocking(move || {
        outbox(&["migrate", "--store", &migrate_store])
            .status
            .success()
    })
    .await
    .expect("migrate");
    assert!(migrated, "outbox migrate");
    let (_out, s) = tokio::task::spawn_blocking(move || demo(&store, &to))
        .await
        .expect("demo");
    assert_guarantees(&s);

    let outbox = pg::outbox(&schema).await;
    let published = assert_tables(&outbox, &s).await;
    let mut events = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let body = std::str::from_utf8(&message.delivery.data).expect("UTF-8");
        events.push(cloudevents::from_json(body).expect("a CloudEvent").event);
    }
    // Without broker-side de-duplication a re-published event comes twice.
    assert!(events.len() as u64 >= n(&s, "events_published"));
    assert_broker(&events, &published, &s);

    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    pg::drop_schema(&schema).await;
}
