//! The relay engine's deadline behaviour, on the reference store.

use std::time::Duration;

use outbox_core::{Relay, RelayConfig, RetryPolicy, Stats};
use outbox_testkit::{order_event, Fault, FaultyPublisher, MemoryOutbox, RecordingPublisher};
use tokio::time::Instant;

fn config() -> RelayConfig {
    RelayConfig::default()
        .settle_margin(Duration::from_millis(100))
        .publish_timeout(Duration::from_secs(1))
        .retry(RetryPolicy {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(50),
            jitter: 0.0,
            ..RetryPolicy::default()
        })
}

/// With a deadline, the relay starts no call it cannot finish: it answers
/// in time, having published a prefix of the aggregate and released the rest.
#[tokio::test]
async fn drain_until_answers_before_its_deadline() {
    let store = MemoryOutbox::new();
    let events: Vec<_> = (1..=20).map(|v| order_event("deep", v, "E")).collect();
    store.write("deep", &events).unwrap();
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(150));
    let relay = Relay::new(store.clone(), publisher.clone(), config()).unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(800);
    let report = relay.drain_until(deadline).await.unwrap();
    assert!(
        Instant::now() <= deadline,
        "answered {:?} late",
        Instant::now() - deadline
    );
    let versions: Vec<u64> = publisher.versions().into_iter().map(|(_, v)| v).collect();
    assert!(!versions.is_empty() && versions.len() < 20, "{versions:?}");
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    assert_eq!(report.published, versions.len());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.pending, 20 - versions.len() as u64);
}

/// Retries that come due before the deadline are made in the same run.
#[tokio::test]
async fn drain_until_waits_for_retries_due_before_its_deadline() {
    let store = MemoryOutbox::new();
    let e = order_event("a", 1, "E");
    store.write("a", std::slice::from_ref(&e)).unwrap();
    store.write("a2", &[order_event("a", 2, "E")]).unwrap();
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(e.id, [Fault::Transient, Fault::Transient]);
    let relay = Relay::new(store.clone(), publisher.clone(), config()).unwrap();
    let report = relay
        .drain_until(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((report.published, report.retried), (2, 2), "{report:?}");
    assert_eq!(
        publisher.inner().versions(),
        vec![("a".to_owned(), 1), ("a".to_owned(), 2)]
    );
    // A deadline already past publishes nothing and holds nothing.
    store.write("b", &[order_event("b", 1, "E")]).unwrap();
    let report = relay.drain_until(Instant::now()).await.unwrap();
    assert_eq!(report.claimed, 0);
    assert_eq!(store.stats().await.unwrap().pending, 1);
}
