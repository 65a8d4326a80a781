//! The publisher conformance suite. Every publisher passes it against its
//! real broker:
//!
//! ```text
//! outbox_testkit::publisher_conformance!(
//!     MyHarness::new,
//!     outbox_testkit::PublisherFeatures::new().ordered(true).max_entry_bytes(MAX)
//! );
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use outbox_core::cloudevents::Received;
use outbox_core::{Disposition, Event, PublishRequest, Publisher};

use crate::order_event;

/// What a publisher promises beyond the common contract.
///
/// Build it with [`PublisherFeatures::new`] and the setters, so a promise
/// added later does not break existing suites:
///
/// ```
/// use outbox_testkit::PublisherFeatures;
/// let features = PublisherFeatures::new().ordered(true).max_entry_bytes(256 * 1024);
/// assert!(features.ordered && !features.broker_dedup);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PublisherFeatures {
    /// Events of one aggregate published in sequential calls arrive in that
    /// order (a FIFO queue does; a standard SQS queue promises no order).
    pub ordered: bool,
    /// The broker drops a second message with the same event id.
    pub broker_dedup: bool,
    /// Entries above this size are refused, each as a permanent failure.
    pub max_entry_bytes: Option<usize>,
}

impl PublisherFeatures {
    /// No promise beyond the common contract.
    pub const fn new() -> Self {
        Self {
            ordered: false,
            broker_dedup: false,
            max_entry_bytes: None,
        }
    }

    /// Sets [`ordered`](Self::ordered).
    #[must_use]
    pub const fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Sets [`broker_dedup`](Self::broker_dedup).
    #[must_use]
    pub const fn broker_dedup(mut self, broker_dedup: bool) -> Self {
        self.broker_dedup = broker_dedup;
        self
    }

    /// Sets [`max_entry_bytes`](Self::max_entry_bytes).
    #[must_use]
    pub const fn max_entry_bytes(mut self, max: usize) -> Self {
        self.max_entry_bytes = Some(max);
        self
    }
}

/// A publisher under test and a subscriber on what it publishes to.
pub trait PublisherHarness: Send + Sync + 'static {
    type Publisher: Publisher;

    fn publisher(&self) -> &Self::Publisher;

    /// Messages the subscriber got since the harness was made, parsed from
    /// their CloudEvent bodies, waiting up to `timeout` for at least `n`.
    fn receive(&self, n: usize, timeout: Duration) -> impl Future<Output = Vec<Received>> + Send;

    /// An event the broker itself refuses for good as an entry of a batch
    /// call that succeeds, accepting the call's other entries; `None` (the
    /// default) when the broker has no such input. It must get past the
    /// publisher's own checks (a size limit the publisher enforces before
    /// sending does not count): the case is about reading the broker's
    /// answer entry by entry.
    fn broker_rejected_event(&self) -> Option<Event> {
        None
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// How long to wait for a message that should not come.
const QUIET: Duration = Duration::from_secs(1);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", outbox_core::EventId::new())
}

/// A full batch: one result per entry, every message delivered as a
/// CloudEvent that reads back into the same envelope.
pub async fn batch_is_delivered_whole<H: PublisherHarness>(h: H, _: PublisherFeatures) {
    let n = h.publisher().max_batch_size().min(10);
    let events: Vec<Event> = (0..n)
        .map(|i| {
            let mut e = order_event(&unique("o"), 1, "OrderCreated");
            e.metadata.traceparent = Some(format!(
                "00-4bf92f3577b34da6a3ce929d0e0e47{i:02}-00f067aa0ba902b7-01"
            ));
            e
        })
        .collect();
    let results = h.publisher().publish(PublishRequest::new(&events)).await;
    assert_eq!(results.len(), events.len(), "one result per entry");
    for r in &results {
        assert!(r.is_ok(), "entry failed: {r:?}");
    }
    let received = h.receive(n, WAIT).await;
    let by_id: HashMap<_, _> = received.iter().map(|r| (r.event.id, &r.event)).collect();
    for e in &events {
        let got = by_id
            .get(&e.id)
            .unwrap_or_else(|| panic!("event {} not delivered", e.id));
        assert_eq!(*got, e, "the envelope changed on the way");
    }
}

/// Events of one aggregate published one call after another arrive in order,
/// where the broker promises order.
pub async fn sequential_calls_keep_order<H: PublisherHarness>(h: H, features: PublisherFeatures) {
    if !features.ordered {
        return;
    }
    let agg = unique("o");
    for v in 1..=5 {
        let e = order_event(&agg, v, "OrderUpdated");
        let results = h
            .publisher()
            .publish(PublishRequest::new(std::slice::from_ref(&e)))
            .await;
        assert!(results[0].is_ok(), "{results:?}");
    }
    let versions: Vec<u64> = h
        .receive(5, WAIT)
        .await
        .into_iter()
        .filter(|r| r.event.aggregate_id == agg)
        .map(|r| r.event.aggregate_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

/// An empty call is answered with no results and sends nothing: a marker
/// published after it is the only message that arrives.
pub async fn empty_batch_is_a_no_op<H: PublisherHarness>(h: H, _: PublisherFeatures) {
    let results = h.publisher().publish(PublishRequest::new(&[])).await;
    assert!(results.is_empty(), "{results:?}");
    let marker = order_event(&unique("marker"), 1, "OrderCreated");
    let results = h
        .publisher()
        .publish(PublishRequest::new(std::slice::from_ref(&marker)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let received = h.receive(1, WAIT).await;
    assert!(
        received.iter().any(|r| r.event.id == marker.id),
        "the marker was not delivered"
    );
    // Anything the empty call sent could also come after the marker.
    let received = h.receive(2, QUIET).await;
    let ids: Vec<_> = received.iter().map(|r| r.event.id).collect();
    assert_eq!(ids, vec![marker.id], "the empty call sent something");
}

/// The same event id published twice is delivered once.
pub async fn broker_drops_duplicates<H: PublisherHarness>(h: H, features: PublisherFeatures) {
    if !features.broker_dedup {
        return;
    }
    let e = order_event(&unique("o"), 1, "OrderCreated");
    for _ in 0..2 {
        let results = h
            .publisher()
            .publish(PublishRequest::new(std::slice::from_ref(&e)))
            .await;
        assert!(results[0].is_ok(), "{results:?}");
    }
    let received = h.receive(2, Duration::from_secs(2)).await;
    assert_eq!(received.iter().filter(|r| r.event.id == e.id).count(), 1);
}

/// An oversized entry fails alone, permanently; the rest of its call succeeds.
pub async fn oversized_entry_fails_alone<H: PublisherHarness>(h: H, features: PublisherFeatures) {
    let Some(max) = features.max_entry_bytes else {
        return;
    };
    let small = order_event(&unique("o"), 1, "OrderCreated");
    let big = Event::builder("Order", unique("o"), 1, "OrderCreated")
        .payload(&serde_json::json!({ "blob": "x".repeat(max) }))
        .build()
        .expect("event");
    let results = h
        .publisher()
        .publish(PublishRequest::new(&[small.clone(), big]))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let err = results[1]
        .as_ref()
        .expect_err("an oversized entry was accepted");
    assert_eq!(err.disposition(), Disposition::Permanent);
    let received = h.receive(1, WAIT).await;
    assert!(received.iter().any(|r| r.event.id == small.id));
}

/// An entry the broker refuses fails alone, permanently: one result per
/// entry, and the entries around it are delivered.
pub async fn broker_rejection_fails_one_entry<H: PublisherHarness>(h: H, _: PublisherFeatures) {
    let Some(rejected) = h.broker_rejected_event() else {
        return;
    };
    let before = order_event(&unique("o"), 1, "OrderCreated");
    let after = order_event(&unique("o"), 1, "OrderCreated");
    let events = [before.clone(), rejected.clone(), after.clone()];
    let results = h.publisher().publish(PublishRequest::new(&events)).await;
    assert_eq!(results.len(), 3, "one result per entry: {results:?}");
    assert!(results[0].is_ok(), "{results:?}");
    assert!(results[2].is_ok(), "{results:?}");
    let err = results[1]
        .as_ref()
        .expect_err("the broker accepted the entry it should refuse");
    assert_eq!(err.disposition(), Disposition::Permanent, "{err}");
    let received = h.receive(2, WAIT).await;
    for e in [&before, &after] {
        assert!(
            received.iter().any(|r| r.event.id == e.id),
            "event {} not delivered",
            e.id
        );
    }
    assert!(
        !received.iter().any(|r| r.event.id == rejected.id),
        "the refused entry was delivered"
    );
}

/// Runs every case of the publisher suite as its own test.
#[macro_export]
macro_rules! publisher_conformance {
    ($make:expr, $features:expr) => {
        $crate::publisher_conformance!(@cases $make, $features;
            batch_is_delivered_whole, sequential_calls_keep_order, empty_batch_is_a_no_op,
            broker_drops_duplicates, oversized_entry_fails_alone,
            broker_rejection_fails_one_entry);
    };
    (@cases $make:expr, $features:expr; $($case:ident),+) => {
        mod publisher_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = ($make)().await;
                    $crate::publisher::$case(harness, $features).await;
                }
            )+
        }
    };
}
