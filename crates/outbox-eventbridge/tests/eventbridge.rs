//! The EventBridge publisher against EventBridge (moto): the publisher suite
//! through a custom bus and a rule into an SQS queue, whole-call failures,
//! setup idempotency.

use std::time::Duration;

use outbox_core::cloudevents::Received;
use outbox_core::{Disposition, Event, PublishRequest, Publisher};
use outbox_eventbridge::{setup, EventBridgePublisher};
use outbox_sqs::SqsReceiver;
use outbox_testkit::{order_event, PublisherHarness};
use tokio::sync::Mutex;

const SOURCE: &str = "urn:test:eventbridge";

#[derive(Debug)]
struct BusHarness {
    publisher: EventBridgePublisher,
    receiver: SqsReceiver,
    seen: Mutex<Vec<Received>>,
}

async fn clients() -> (aws_sdk_eventbridge::Client, aws_sdk_sqs::Client) {
    outbox_aws::testing::require_local_endpoints(&["EVENTBRIDGE", "SQS"]);
    let config = outbox_aws::load_config().await;
    (
        aws_sdk_eventbridge::Client::new(&config),
        aws_sdk_sqs::Client::new(&config),
    )
}

impl BusHarness {
    async fn new() -> Self {
        let (events, sqs) = clients().await;
        let name = outbox_aws::testing::unique_name("outbox-eb");
        setup::ensure_bus(&events, &name).await.expect("bus");
        let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
            .await
            .expect("queue");
        let pattern = setup::source_pattern(SOURCE);
        setup::ensure_rule_to_queue(&events, &name, &name, &queue.arn, &pattern)
            .await
            .expect("rule");
        Self {
            publisher: EventBridgePublisher::new(events, &name).source(SOURCE),
            receiver: SqsReceiver::new(sqs, &queue.url),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl PublisherHarness for BusHarness {
    type Publisher = EventBridgePublisher;

    fn publisher(&self) -> &EventBridgePublisher {
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

    /// An event whose type was emptied after it was built (the builder
    /// refuses an empty type; the fields are public): the publisher sends it
    /// as an entry without a `DetailType`, which EventBridge refuses as an
    /// entry (`InvalidArgument`, "DetailType is a required argument") while
    /// the call succeeds.
    fn broker_rejected_event(&self) -> Option<Event> {
        let mut event = order_event("no-detail-type", 1, "OrderCreated");
        event.event_type.clear();
        Some(event)
    }
}

// EventBridge promises no order, and the rule's target is a standard queue.
outbox_testkit::publisher_conformance!(
    BusHarness::new,
    outbox_testkit::PublisherFeatures::new().max_entry_bytes(outbox_eventbridge::MAX_ENTRY_BYTES)
);

#[tokio::test]
async fn more_than_ten_events_are_split_into_calls() {
    let h = BusHarness::new().await;
    let events: Vec<_> = (0..25)
        .map(|i| order_event(&format!("split-{i}"), 1, "OrderCreated"))
        .collect();
    let results = h.publisher.publish(PublishRequest::new(&events)).await;
    assert_eq!(results.len(), 25);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = h.receive(25, Duration::from_secs(10)).await;
    let mut ids: Vec<_> = received.iter().map(|r| r.event.id).collect();
    ids.sort();
    let mut sent: Vec<_> = events.iter().map(|e| e.id).collect();
    sent.sort();
    assert_eq!(ids, sent);
}

#[tokio::test]
async fn an_unknown_bus_fails_every_entry_alike() {
    let (events, _) = clients().await;
    let publisher = EventBridgePublisher::new(events, outbox_aws::testing::unique_name("no-bus"));
    let batch = [order_event("a", 1, "X"), order_event("b", 1, "X")];
    let results = publisher.publish(PublishRequest::new(&batch)).await;
    assert_eq!(results.len(), 2);
    let (a, b) = (
        results[0].as_ref().unwrap_err(),
        results[1].as_ref().unwrap_err(),
    );
    assert_eq!(a.message(), b.message());
    assert!(a.message().starts_with("PutEvents: "), "{a}");
    // A missing bus is the target's fault, not the events': the relay pauses
    // and probes instead of spending their attempts.
    assert!(a.is_target_failure(), "{a}");
    assert_eq!(a.disposition(), Disposition::Transient, "{a}");
    // And `check` names it at start-up.
    let err = publisher.check().await.unwrap_err().to_string();
    assert!(
        err.contains(publisher.bus_name()) && err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn setup_is_idempotent() {
    let (events, sqs) = clients().await;
    let name = outbox_aws::testing::unique_name("outbox-eb");
    let arn = setup::ensure_bus(&events, &name).await.unwrap();
    assert!(arn.ends_with(&format!("event-bus/{name}")), "{arn}");
    assert_eq!(setup::ensure_bus(&events, &name).await.unwrap(), arn);
    let default = setup::ensure_bus(&events, "default").await.unwrap();
    assert!(default.ends_with("event-bus/default"), "{default}");

    let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
        .await
        .unwrap();
    let pattern = setup::source_pattern(SOURCE);
    for _ in 0..2 {
        setup::ensure_rule_to_queue(&events, &name, &name, &queue.arn, &pattern)
            .await
            .unwrap();
    }
    let targets = events
        .list_targets_by_rule()
        .rule(&name)
        .event_bus_name(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(targets.targets().len(), 1);
    assert_eq!(targets.targets()[0].arn(), queue.arn);
    assert!(
        setup::ensure_rule_to_queue(&events, &name, &name, &queue.arn, "{not json")
            .await
            .is_err()
    );
}
