//! The SNS publisher against SNS (moto): the publisher suite through a
//! topic and a raw SQS subscription, a real per-entry failure, the trace
//! header on the wire, non-raw delivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sns::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sns::config::{ConfigBag, Intercept, RuntimeComponents};
use outbox_core::cloudevents::Received;
use outbox_core::{Disposition, Event, PublishRequest, Publisher};
use outbox_sns::{setup, SnsPublisher};
use outbox_sqs::SqsReceiver;
use outbox_testkit::{order_event, PublisherHarness};

const SOURCE: &str = "urn:test:sns";

/// The limit the suite's publisher is given, 1 MiB, above the 256 KiB the
/// test topics take: SNS itself then refuses an entry in between (see
/// `broker_rejected_event`), where the publisher would have refused it first.
const RAISED_LIMIT: usize = 1024 * 1024;

/// Keeps the trace header of every request the client sends.
#[derive(Debug, Clone, Default)]
struct CaptureTrace(Arc<Mutex<Vec<Option<String>>>>);

impl Intercept for CaptureTrace {
    fn name(&self) -> &'static str {
        "CaptureTrace"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let header = context.request().headers().get(outbox_sns::TRACE_HEADER);
        if let Ok(mut seen) = self.0.lock() {
            seen.push(header.map(str::to_owned));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct TopicHarness {
    publisher: SnsPublisher,
    receiver: SqsReceiver,
    seen: tokio::sync::Mutex<Vec<Received>>,
}

impl TopicHarness {
    async fn new() -> Self {
        Self::with(true, None).await
    }

    /// The harness of the publisher suite: its publisher allows
    /// [`RAISED_LIMIT`], the topic does not.
    async fn raised_limit() -> Self {
        let mut h = Self::new().await;
        h.publisher = h.publisher.max_entry_bytes(RAISED_LIMIT);
        h
    }

    async fn with(raw: bool, capture: Option<CaptureTrace>) -> Self {
        outbox_aws::testing::require_local_endpoints(&["SNS", "SQS"]);
        let config = outbox_aws::load_config().await;
        let mut sns_config = aws_sdk_sns::config::Builder::from(&config);
        if let Some(c) = capture {
            sns_config = sns_config.interceptor(c);
        }
        let sns = aws_sdk_sns::Client::from_conf(sns_config.build());
        let sqs = aws_sdk_sqs::Client::new(&config);
        let name = outbox_aws::testing::unique_name("outbox-sns");
        let topic = setup::ensure_topic(&sns, &name).await.expect("topic");
        let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
            .await
            .expect("queue");
        outbox_sqs::setup::allow_senders(&sqs, &queue, &[&topic])
            .await
            .expect("policy");
        setup::subscribe_queue(&sns, &topic, &queue.arn, raw)
            .await
            .expect("subscription");
        Self {
            publisher: SnsPublisher::new(sns, topic).source(SOURCE),
            receiver: SqsReceiver::new(sqs, &queue.url),
            seen: tokio::sync::Mutex::new(Vec::new()),
        }
    }
}

impl PublisherHarness for TopicHarness {
    type Publisher = SnsPublisher;

    fn publisher(&self) -> &SnsPublisher {
        &self.publisher
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut seen = self.seen.lock().await;
        let missing = n.saturating_sub(seen.len());
        let more = self
            .receiver
            .collect_events(missing, timeout)
            .await
            .expect("receive");
        seen.extend(more);
        seen.clone()
    }

    /// 300 KiB: under the publisher's raised limit, over the topic's 256 KiB.
    /// SNS refuses it as an entry (`InvalidParameter`) and the call succeeds.
    fn broker_rejected_event(&self) -> Option<Event> {
        let event = Event::builder("Order", "too-big-for-the-topic", 1, "OrderCreated")
            .payload(&serde_json::json!({ "blob": "x".repeat(300 * 1024) }))
            .build()
            .expect("a well-formed event");
        Some(event)
    }
}

// A standard topic into a standard queue: no order promised.
outbox_testkit::publisher_conformance!(
    TopicHarness::raised_limit,
    outbox_testkit::PublisherFeatures::new().max_entry_bytes(RAISED_LIMIT)
);

#[tokio::test]
async fn a_per_entry_failure_of_the_service_is_read() {
    // Our limit raised to 1 MiB (a topic with a raised MaximumMessageSize),
    // the topic left at 256 KiB: SNS refuses that one entry, not the call.
    let h = TopicHarness::new().await;
    let publisher = h.publisher.clone().max_entry_bytes(RAISED_LIMIT);
    let small = order_event("ok-1", 1, "OrderCreated");
    let big = Event::builder("Order", "big-1", 1, "OrderCreated")
        .payload(&serde_json::json!({ "blob": "x".repeat(300 * 1024) }))
        .build()
        .unwrap();
    let results = publisher
        .publish(PublishRequest::new(&[big, small.clone()]))
        .await;
    let refused = results[0].as_ref().unwrap_err();
    assert_eq!(refused.disposition(), Disposition::Permanent, "{refused}");
    assert!(
        refused
            .message()
            .starts_with("PublishBatch: InvalidParameter"),
        "{refused}"
    );
    assert!(results[1].is_ok(), "{results:?}");
    let received = h.receive(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].event, small);
}

fn traced(agg: &str, trace: &str) -> Event {
    let mut e = order_event(agg, 1, "OrderCreated");
    e.metadata.traceparent = Some(trace.to_owned());
    e
}

#[tokio::test]
async fn the_trace_header_goes_on_calls_whose_events_share_a_trace() {
    let capture = CaptureTrace::default();
    let h = TopicHarness::with(true, Some(capture.clone())).await;
    let t1 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let t2 = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let same = [traced("t-a", t1), traced("t-b", t1)];
    let mixed = [traced("t-c", t1), traced("t-d", t2)];
    capture.0.lock().unwrap().clear(); // the setup calls
    for batch in [&same[..], &mixed[..]] {
        let results = h.publisher.publish(PublishRequest::new(batch)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    let headers = capture.0.lock().unwrap().clone();
    assert_eq!(
        headers,
        vec![
            Some(
                "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
                    .to_owned()
            ),
            None
        ]
    );
    // Each event keeps its own traceparent in its CloudEvent either way.
    let received = h.receive(4, Duration::from_secs(10)).await;
    let d = received
        .iter()
        .find(|r| r.event.aggregate_id == "t-d")
        .unwrap();
    assert_eq!(d.event.metadata.traceparent.as_deref(), Some(t2));
}

#[tokio::test]
async fn non_raw_subscriptions_deliver_notifications_that_parse() {
    let h = TopicHarness::with(false, None).await;
    let event = order_event("note-1", 1, "OrderCreated");
    let results = h
        .publisher
        .publish(PublishRequest::new(std::slice::from_ref(&event)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let deliveries = h
        .receiver
        .receive(10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert!(
        deliveries[0].body.contains("\"Type\""),
        "not a notification: {}",
        deliveries[0].body
    );
    let got = deliveries[0].event.as_ref().unwrap();
    assert_eq!(got.event, event);
    assert_eq!(got.source, SOURCE);
}

#[tokio::test]
async fn fifo_topics_take_group_and_dedup_ids() {
    outbox_aws::testing::require_local_endpoints(&["SNS"]);
    let sns = aws_sdk_sns::Client::new(&outbox_aws::load_config().await);
    let name = format!("{}.fifo", outbox_aws::testing::unique_name("outbox-sns"));
    let topic = setup::ensure_topic(&sns, &name).await.unwrap();
    assert!(topic.ends_with(".fifo"));
    assert_eq!(setup::ensure_topic(&sns, &name).await.unwrap(), topic);
    let publisher = SnsPublisher::new(sns, topic);
    assert!(publisher.is_fifo());
    let events: Vec<_> = (1..=12)
        .map(|v| order_event("fifo-1", v, "OrderUpdated"))
        .collect();
    let results = publisher.publish(PublishRequest::new(&events)).await;
    assert_eq!(results.len(), 12);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test]
async fn a_missing_topic_is_the_targets_failure_and_fails_the_check() {
    let h = TopicHarness::new().await;
    // The harness's own topic passes the start-up check.
    h.publisher.check().await.expect("the topic exists");
    let arn = format!(
        "arn:aws:sns:us-east-1:123456789012:{}",
        outbox_aws::testing::unique_name("no-topic")
    );
    let config = outbox_aws::load_config().await;
    let publisher = SnsPublisher::new(aws_sdk_sns::Client::new(&config), &arn);
    let err = publisher.check().await.unwrap_err().to_string();
    assert!(
        err.contains(&arn) && err.contains("does not exist"),
        "{err}"
    );
    let results = publisher
        .publish(PublishRequest::new(&[order_event("a", 1, "X")]))
        .await;
    let failed = results[0].as_ref().unwrap_err();
    assert!(failed.is_target_failure(), "{failed}");
    assert_eq!(failed.disposition(), Disposition::Transient, "{failed}");
}
