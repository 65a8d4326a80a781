//! The in-process broker passes the publisher suite; the fault injector does
//! what it says.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::cloudevents::{self, Received};
use outbox_core::publishers::{memory_broker, MemoryPublisher, MemorySubscriber};
use outbox_core::{Disposition, PublishRequest, Publisher};
use outbox_testkit::{
    order_event, Chaos, Fault, FaultyPublisher, PublisherFeatures, PublisherHarness,
    RecordingPublisher,
};
use tokio::sync::Mutex;

struct Memory {
    publisher: MemoryPublisher,
    subscriber: Arc<Mutex<(MemorySubscriber, Vec<Received>)>>,
}

impl Memory {
    async fn new() -> Self {
        let (publisher, subscriber) = memory_broker("urn:test");
        Self {
            publisher,
            subscriber: Arc::new(Mutex::new((subscriber, Vec::new()))),
        }
    }
}

impl PublisherHarness for Memory {
    type Publisher = MemoryPublisher;

    fn publisher(&self) -> &MemoryPublisher {
        &self.publisher
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut guard = self.subscriber.lock().await;
        let (sub, seen) = &mut *guard;
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < n {
            match tokio::time::timeout_at(deadline, sub.recv()).await {
                Ok(Some(d)) => seen.push(cloudevents::from_json(&d.body).expect("a CloudEvent")),
                _ => break,
            }
        }
        seen.clone()
    }
}

// One in-process FIFO channel: order is kept; nothing is ever refused.
outbox_testkit::publisher_conformance!(Memory::new, PublisherFeatures::new().ordered(true));

#[tokio::test]
async fn scripted_faults_come_in_order_then_stop() {
    let faulty = FaultyPublisher::new(RecordingPublisher::new());
    let e = order_event("a", 1, "OrderCreated");
    faulty.script(
        e.id,
        [
            Fault::Transient,
            Fault::RetryAfter(Duration::from_secs(3)),
            Fault::LostAck,
        ],
    );
    let events = [e.clone(), order_event("b", 1, "OrderCreated")];
    let mut dispositions = Vec::new();
    for _ in 0..4 {
        let results = faulty.publish(PublishRequest::new(&events)).await;
        assert!(results[1].is_ok(), "the other entry must not be affected");
        dispositions.push(results[0].as_ref().err().map(|e| e.disposition()));
    }
    assert_eq!(
        dispositions,
        vec![
            Some(Disposition::Transient),
            Some(Disposition::RetryAfter(Duration::from_secs(3))),
            Some(Disposition::Transient),
            None
        ]
    );
    // The lost acknowledgement still reached the broker: a duplicate to come.
    let to_a = faulty
        .inner()
        .versions()
        .iter()
        .filter(|(agg, _)| agg == "a")
        .count();
    assert_eq!(to_a, 2);
    let injected = faulty.injected();
    assert_eq!(injected.lost_acks.load(Ordering::Relaxed), 1);
    assert_eq!(injected.total(), 3);
}

#[tokio::test]
async fn poison_events_are_always_rejected_and_never_delivered() {
    let faulty = FaultyPublisher::new(RecordingPublisher::new()).with_chaos(Chaos {
        poison_rate: 0.2,
        ..Chaos::default()
    });
    let events: Vec<_> = (0..500)
        .map(|i| order_event(&format!("o{i}"), 1, "OrderCreated"))
        .collect();
    let first = faulty.publish(PublishRequest::new(&events)).await;
    let second = faulty.publish(PublishRequest::new(&events)).await;
    let rejected: Vec<bool> = first.iter().map(|r| r.is_err()).collect();
    assert_eq!(
        rejected,
        second.iter().map(|r| r.is_err()).collect::<Vec<_>>(),
        "poison must be stable"
    );
    let count = rejected.iter().filter(|r| **r).count();
    assert!(
        (50..150).contains(&count),
        "about 20% expected, got {count}"
    );
    assert_eq!(faulty.inner().received().len(), 2 * (500 - count));
    assert!(first.iter().flatten().count() + count == 500);
    assert!(first
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.disposition() == Disposition::Permanent));
}
