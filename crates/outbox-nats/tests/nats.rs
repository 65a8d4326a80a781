//! The NATS publisher against the JetStream server on this machine: the
//! stream check, the size limit, an outage through the fault proxy, and the
//! consumer helper with a SQLite inbox.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use outbox_core::{Disposition, Event, PublishRequest, Publisher, Scope, Seen};
use outbox_nats::{async_nats, InboxConsumer, NatsError, NatsPublisher, SubjectTemplate};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};
use outbox_testkit::{order_event, FaultProxy};

async fn publisher(stream: &str) -> NatsPublisher {
    let template =
        SubjectTemplate::parse(&format!("{stream}.{{aggregatetype}}.{{type}}")).expect("template");
    let publisher = NatsPublisher::connect(&common::url(), stream)
        .await
        .expect("connect")
        .subject(template)
        .stream_config(common::test_stream());
    publisher.check().await.expect("stream");
    publisher
}

#[tokio::test]
async fn check_creates_a_missing_stream_and_refuses_one_that_does_not_cover_the_subjects() {
    let stream = common::unique("outbox_check");
    let p = publisher(&stream).await;
    let js = jetstream::new(p.client().clone());
    let info = js.get_stream(&stream).await.expect("created");
    assert_eq!(
        info.cached_info().config.subjects,
        vec![format!("{stream}.*.*")]
    );
    // Checking again finds it and accepts it.
    p.check().await.expect("second check");

    // The same stream with a template it does not take.
    let other = p.clone().subject(SubjectTemplate::default());
    let err = other.check().await.expect_err("mismatch");
    assert!(matches!(err, NatsError::StreamMismatch { .. }), "{err}");
    assert!(err.to_string().contains("events.*.*"), "{err}");
    assert!(!err.is_retryable());

    let missing = NatsPublisher::new(p.client().clone(), common::unique("outbox_missing"))
        .create_stream(false);
    let err = missing.check().await.expect_err("missing");
    assert!(matches!(err, NatsError::StreamMissing { .. }), "{err}");
}

#[tokio::test]
async fn an_event_above_max_payload_is_refused_before_the_network_naming_the_limit() {
    let stream = common::unique("outbox_size");
    let p = publisher(&stream).await;
    let max = p.client().server_info().max_payload;
    assert_eq!(p.max_message_bytes(), max);
    let big = Event::builder("Order", "o-big", 1, "OrderCreated")
        .payload(&serde_json::json!({ "blob": "x".repeat(max) }))
        .build()
        .expect("event");
    let small = order_event(&common::unique("o"), 1, "OrderCreated");
    let results = p.publish(PublishRequest::new(&[big, small])).await;
    let err = results[0].as_ref().expect_err("too large");
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert_eq!(err.scope(), Scope::Entry);
    assert!(err.message().contains("max_payload"), "{err}");
    assert!(err.message().contains(&max.to_string()), "{err}");
    assert!(results[1].is_ok(), "{results:?}");

    // A smaller limit of the publisher's own applies too.
    let p = p.max_entry_bytes(300);
    let results = p
        .publish(PublishRequest::new(&[order_event(
            "o-1",
            1,
            "OrderCreated",
        )
        .clone()]))
        .await;
    let err = results[0].as_ref().expect_err("above the own limit");
    assert!(err.message().contains("300 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_a_target_failure_and_publishing_resumes_after_restore() {
    let stream = common::unique("outbox_cut");
    // Create the stream directly, then publish through the proxy.
    publisher(&stream).await;
    let upstream: SocketAddr = common::url()
        .trim_start_matches("nats://")
        .parse()
        .expect("address");
    let proxy = FaultProxy::start(upstream).await.expect("proxy");
    let template =
        SubjectTemplate::parse(&format!("{stream}.{{aggregatetype}}.{{type}}")).expect("template");
    let p = NatsPublisher::connect(&proxy.url_for("nats"), &stream)
        .await
        .expect("connect through the proxy")
        .subject(template)
        .ack_timeout(Duration::from_secs(1));
    let agg = common::unique("o");
    let first = order_event(&agg, 1, "OrderCreated");
    let results = p
        .publish(PublishRequest::new(std::slice::from_ref(&first)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let connections = proxy.stats().accepted;

    proxy.cut();
    let during = order_event(&agg, 2, "OrderUpdated");
    let mut failure = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while failure.is_none() && tokio::time::Instant::now() < deadline {
        let results = p
            .publish(PublishRequest::new(std::slice::from_ref(&during)))
            .await;
        // The first call may still go out before the client sees the cut;
        // the duplicate window makes the later retry harmless then.
        if let Err(e) = &results[0] {
            failure = Some(e.clone());
        }
    }
    let failure = failure.expect("no failure while the line was cut");
    assert_eq!(failure.scope(), Scope::Target, "{failure}");
    assert!(failure.disposition().is_retryable());

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let results = p
            .publish(PublishRequest::new(std::slice::from_ref(&during)))
            .await;
        match &results[0] {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.scope(), Scope::Target, "{e}");
                assert!(tokio::time::Instant::now() < deadline, "still failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(proxy.stats().accepted > connections, "no new connection");
    let after = order_event(&agg, 3, "OrderUpdated");
    let results = p
        .publish(PublishRequest::new(std::slice::from_ref(&after)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");

    // Everything is in the stream once, in order.
    let js = jetstream::new(p.client().clone());
    let reader = common::reader(&js, &stream, Duration::from_secs(30)).await;
    let got = common::drain(&reader, 4, Duration::from_secs(3)).await;
    let versions: Vec<u64> = got.iter().map(|r| r.event.aggregate_version).collect();
    assert_eq!(versions, vec![1, 2, 3]);
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_applies_a_redelivered_message_once() {
    use futures_util::StreamExt;
    let stream = common::unique("outbox_consume");
    let p = publisher(&stream).await;
    let js = jetstream::new(p.client().clone());
    let reader = common::reader(&js, &stream, Duration::from_secs(1)).await;
    let (_dir, store) = sqlite().await;
    let consumer =
        InboxConsumer::new("shipping", SqliteInbox).nak_delay(Duration::from_millis(100));
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
    let mut messages = reader.messages().await.expect("messages");

    // 1. The handler fails: nothing is kept, the message is nak'ed.
    let message = messages.next().await.expect("delivery").expect("message");
    let err = consumer
        .handle(
            &message,
            || store.begin(),
            |_tx, _r, _s| async { Err::<(), BoxError>("the warehouse is down".into()) },
        )
        .await
        .expect_err("handler failure");
    assert!(matches!(err, NatsError::Handler(_)), "{err}");
    assert_eq!(shipments(&store).await, 0);

    // 2. Redelivered: applied, committed, but the ack is lost (never sent).
    let message = messages.next().await.expect("redelivery").expect("message");
    let seen = consumer
        .apply(&message.payload, || store.begin(), apply)
        .await
        .expect("applied");
    assert_eq!(seen, Seen::First);
    assert_eq!(shipments(&store).await, 1);

    // 3. Redelivered after the ack wait: a duplicate, skipped and acked.
    let message = messages
        .next()
        .await
        .expect("third delivery")
        .expect("message");
    assert!(message.info().expect("info").delivered >= 3);
    let seen = consumer
        .handle(&message, || store.begin(), apply)
        .await
        .expect("handled");
    assert_eq!(seen, Seen::Duplicate);
    assert_eq!(shipments(&store).await, 1);

    // Acked: nothing more comes.
    let more = tokio::time::timeout(Duration::from_millis(1500), messages.next()).await;
    assert!(more.is_err(), "delivered again after the ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_terminates_a_body_that_is_not_an_event() {
    use futures_util::StreamExt;
    let stream = common::unique("outbox_poison");
    let p = publisher(&stream).await;
    let js = jetstream::new(p.client().clone());
    js.publish(format!("{stream}.Order.Garbage"), "not json".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let reader = common::reader(&js, &stream, Duration::from_secs(1)).await;
    let (_dir, store) = sqlite().await;
    let consumer = InboxConsumer::new("shipping", SqliteInbox);
    let mut messages = reader.messages().await.expect("messages");
    let message = messages.next().await.expect("delivery").expect("message");
    let err = consumer
        .handle(
            &message,
            || store.begin(),
            |tx: outbox_sqlite::WriteTx, _r, _s| async move { tx.commit().await },
        )
        .await
        .expect_err("not an event");
    assert!(matches!(err, NatsError::Malformed(_)), "{err}");
    assert!(!err.is_retryable());
    let more = tokio::time::timeout(Duration::from_millis(2000), messages.next()).await;
    assert!(more.is_err(), "a terminated message came again");
}
