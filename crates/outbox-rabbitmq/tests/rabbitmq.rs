//! The RabbitMQ publisher against the broker on this machine: bad input,
//! the exchange check, an outage through the fault proxy, and the consumer
//! helper with a SQLite inbox.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use outbox_core::{Disposition, Event, PublishRequest, Publisher, Scope, Seen};
use outbox_rabbitmq::lapin;
use outbox_rabbitmq::{InboxConsumer, RabbitError, RabbitPublisher};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};
use outbox_testkit::{order_event, FaultProxy};

use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test]
async fn bad_input_is_refused_before_the_network_naming_the_limit() {
    let exchange = common::unique("outbox.bad");
    let p = common::publisher(&common::url(), &exchange)
        .await
        .max_message_bytes(1000);
    let _sub = common::Subscriber::new(&exchange, &["#"]).await;
    let big = Event::builder("Order", "o-big", 1, "OrderCreated")
        .payload(&serde_json::json!({ "blob": "x".repeat(1000) }))
        .build()
        .expect("event");
    let long_type = Event::builder("Order", "o-long", 1, "T".repeat(300))
        .build()
        .expect("event");
    let fine = order_event(&common::unique("o"), 1, "OrderCreated");
    let results = p
        .publish(PublishRequest::new(&[big, long_type, fine]))
        .await;
    let size = results[0].as_ref().expect_err("too large");
    assert_eq!(size.disposition(), Disposition::Permanent);
    assert_eq!(size.scope(), Scope::Entry);
    assert!(size.message().contains("1000 bytes"), "{size}");
    assert!(size.message().contains("max_message_size"), "{size}");
    let key = results[1].as_ref().expect_err("routing key too long");
    assert_eq!(key.disposition(), Disposition::Permanent);
    assert!(key.message().contains("255-byte"), "{key}");
    assert!(results[2].is_ok(), "{results:?}");
}

#[tokio::test]
async fn an_exchange_of_another_type_is_a_clear_configuration_error() {
    let exchange = common::unique("outbox.fanout");
    let sub = common::Subscriber::new("amq.topic", &[]).await;
    sub.channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("fanout");
    let err = RabbitPublisher::connect(common::url(), &exchange)
        .await
        .expect_err("a fanout exchange of that name exists");
    assert!(matches!(err, RabbitError::Config(_)), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&exchange), "{err}");

    let missing = common::unique("outbox.missing");
    let err = RabbitPublisher::new(common::url(), &missing)
        .expect("publisher")
        .declare_exchange(false)
        .check()
        .await
        .expect_err("no such exchange");
    assert!(matches!(err, RabbitError::Config(_)), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_a_target_failure_and_the_next_call_reconnects() {
    let exchange = common::unique("outbox.cut");
    // The subscriber (and the exchange) live on a direct connection.
    let direct = common::publisher(&common::url(), &exchange).await;
    let mut sub = common::Subscriber::new(&exchange, &["#"]).await;
    let upstream: SocketAddr = "127.0.0.1:5672".parse().expect("address");
    let proxy = FaultProxy::start(upstream).await.expect("proxy");
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let p = RabbitPublisher::new(url, &exchange)
        .expect("publisher")
        .exchange_auto_delete(true)
        .timeout(Duration::from_secs(2));
    p.check().await.expect("connect through the proxy");
    let agg = common::unique("o");
    let first = order_event(&agg, 1, "OrderCreated");
    assert!(p
        .publish(PublishRequest::new(std::slice::from_ref(&first)))
        .await[0]
        .is_ok());
    let connections = proxy.stats().accepted;

    proxy.cut();
    let during = order_event(&agg, 2, "OrderUpdated");
    let mut failure = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while failure.is_none() && tokio::time::Instant::now() < deadline {
        let results = p
            .publish(PublishRequest::new(std::slice::from_ref(&during)))
            .await;
        if let Err(e) = &results[0] {
            failure = Some(e.clone());
        }
    }
    let failure = failure.expect("no failure while the line was cut");
    assert_eq!(failure.scope(), Scope::Target, "{failure}");
    assert!(failure.disposition().is_retryable());

    proxy.restore();
    let results = p
        .publish(PublishRequest::new(std::slice::from_ref(&during)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    assert!(proxy.stats().accepted > connections, "no new connection");
    let after = order_event(&agg, 3, "OrderUpdated");
    assert!(p
        .publish(PublishRequest::new(std::slice::from_ref(&after)))
        .await[0]
        .is_ok());

    // Every event arrived, in order; one published before the cut was
    // noticed may come twice (at least once), which consumers' inboxes absorb.
    let got = sub.collect(4, Duration::from_secs(2)).await;
    let mut versions: Vec<u64> = got.iter().map(|r| r.event.aggregate_version).collect();
    versions.dedup();
    assert_eq!(versions, vec![1, 2, 3]);
    drop(direct);
}

async fn sqlite() -> (tempfile::TempDir, SqliteOutbox) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteOutbox::open(&dir.path().join("consumer.db"))
        .await
        .expect("sqlite");
    sqlx::query("CREATE TABLE shipments (order_id TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("table");
    (dir, store)
}

async fn shipments(store: &SqliteOutbox) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM shipments")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_applies_a_redelivered_message_once() {
    let exchange = common::unique("outbox.consume");
    let p = common::publisher(&common::url(), &exchange).await;
    let mut sub = common::Subscriber::new(&exchange, &["#"]).await;
    let (_dir, store) = sqlite().await;
    let consumer = InboxConsumer::new("shipping", SqliteInbox);
    let apply = |mut tx: outbox_sqlite::WriteTx,
                 received: outbox_core::cloudevents::Received,
                 seen: Seen| async move {
        if seen == Seen::First {
            sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
                .bind(&received.event.aggregate_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<_, BoxError>(())
    };
    let event = order_event(&common::unique("o"), 1, "OrderPlaced");
    assert!(p
        .publish(PublishRequest::new(std::slice::from_ref(&event)))
        .await[0]
        .is_ok());

    // 1. The handler fails: nothing is kept, the delivery is requeued.
    let delivery = sub.consumer.next().await.expect("delivery").expect("ok");
    let err = consumer
        .handle(
            &delivery,
            || store.begin(),
            |_tx, _r, _s| async { Err::<(), BoxError>("the warehouse is down".into()) },
        )
        .await
        .expect_err("handler failure");
    assert!(matches!(err, RabbitError::Handler(_)), "{err}");
    assert_eq!(shipments(&store).await, 0);

    // 2. Redelivered: applied and committed, but never acknowledged; the
    //    consumer's channel then goes away.
    let delivery = sub.consumer.next().await.expect("redelivery").expect("ok");
    assert!(delivery.redelivered);
    let seen = consumer
        .apply(&delivery.data, || store.begin(), apply)
        .await
        .expect("applied");
    assert_eq!(seen, Seen::First);
    assert_eq!(shipments(&store).await, 1);
    sub.channel.close(200, "gone".into()).await.expect("close");

    // 3. Delivered again on a new channel: a duplicate, skipped and acked.
    let channel = sub.connection.create_channel().await.expect("channel");
    let mut again = channel
        .basic_consume(
            sub.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = again.next().await.expect("third delivery").expect("ok");
    assert!(delivery.redelivered);
    let seen = consumer
        .handle(&delivery, || store.begin(), apply)
        .await
        .expect("handled");
    assert_eq!(seen, Seen::Duplicate);
    assert_eq!(shipments(&store).await, 1);
    let more = tokio::time::timeout(Duration::from_millis(500), again.next()).await;
    assert!(more.is_err(), "delivered again after the ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rejects_a_body_that_is_not_an_event() {
    let exchange = common::unique("outbox.poison");
    let _p = common::publisher(&common::url(), &exchange).await;
    let mut sub = common::Subscriber::new(&exchange, &["#"]).await;
    sub.channel
        .basic_publish(
            exchange.as_str().into(),
            "Garbage".into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    let (_dir, store) = sqlite().await;
    let consumer = InboxConsumer::new("shipping", SqliteInbox);
    let delivery = sub.consumer.next().await.expect("delivery").expect("ok");
    let err = consumer
        .handle(
            &delivery,
            || store.begin(),
            |tx: outbox_sqlite::WriteTx, _r, _s| async move { tx.commit().await },
        )
        .await
        .expect_err("not an event");
    assert!(matches!(err, RabbitError::Malformed(_)), "{err}");
    assert!(!err.is_retryable());
    let more = tokio::time::timeout(Duration::from_millis(500), sub.consumer.next()).await;
    assert!(more.is_err(), "a rejected message came again");
}
