//! The store conformance suite. Every outbox store passes it:
//!
//! ```text
//! outbox_testkit::store_conformance!(MyHarness::new, outbox_testkit::StoreFeatures::all());
//! ```
//!
//! Each case takes a fresh, empty harness.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use outbox_core::{
    ClaimRequest, ClaimSource, DeadLetters, Event, EventId, Purge, Relay, RelayConfig,
    ReplaySelector, RetryPolicy, Seen, Settlements, Stats, StoreError,
};

use crate::{order_event, Fault, FaultyPublisher, RecordingPublisher};

/// What a store promises beyond the common contract.
#[derive(Debug, Clone, Copy)]
pub struct StoreFeatures {
    /// Several relays may claim from the store at once.
    pub concurrent_relays: bool,
    /// A second write of an aggregate version is refused as a conflict.
    pub version_conflicts: bool,
    /// `purge_published` deletes published events (a change stream expires
    /// its records by itself and has nothing to purge).
    pub purges_published: bool,
}

impl StoreFeatures {
    pub fn all() -> Self {
        Self {
            concurrent_relays: true,
            version_conflicts: true,
            purges_published: true,
        }
    }
}

/// A store under test, with a business table beside the outbox.
pub trait StoreHarness: Send + Sync + 'static {
    type Store: ClaimSource + Stats + DeadLetters + Purge + Clone + 'static;

    fn store(&self) -> Self::Store;

    /// In ONE transaction: writes business row `key` and appends `events`,
    /// then commits if `commit`, else rolls back. On an append error the
    /// transaction is rolled back and the error returned.
    fn write(
        &self,
        key: &str,
        events: &[Event],
        commit: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn business_row_exists(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records `id` in consumer `consumer`'s inbox in a transaction that
    /// commits if `commit`, else rolls back.
    fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> impl Future<Output = Result<Seen, StoreError>> + Send;

    /// Stores, as a hand edit or another program could, an entry of
    /// aggregate `Order`/`aggregate_id` that cannot be read as an event
    /// (a BLOB payload, a broken id...). `false` if the store has no way to
    /// hold one; the case is then skipped.
    fn write_malformed(
        &self,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = aggregate_id;
        std::future::ready(Ok(false))
    }

    /// The same store with [`outbox_core::DeadLetterPolicy::Park`], if it
    /// offers that policy.
    fn parking_store(&self) -> Option<Self::Store> {
        None
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig::default().batch_size(50).retry(fast_retry())
}

async fn commit<H: StoreHarness>(h: &H, key: &str, events: &[Event]) {
    h.write(key, events, true)
        .await
        .unwrap_or_else(|e| panic!("write of {key} failed: {e}"));
}

async fn stats<H: StoreHarness>(h: &H) -> outbox_core::OutboxStats {
    h.store().stats().await.expect("stats")
}

/// Drains until nothing is pending or `deadline` passes; events backing off
/// are waited for.
async fn drain_until_settled<S: ClaimSource + Stats, P: outbox_core::Publisher>(
    relay: &Relay<S, P>,
    deadline: Duration,
) {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        relay.drain().await.expect("drain");
        if relay.source().stats().await.expect("stats").pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "events still pending after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_in_aggregate_order(versions: &[(String, u64)]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (agg, v) in versions {
        let prev = last.insert(agg, *v).unwrap_or(0);
        assert!(
            *v > prev,
            "aggregate {agg}: version {v} published after {prev}; sequence {versions:?}"
        );
    }
}

/// An event is stored if and only if the business change commits, and reads
/// back exactly as written.
pub async fn atomic_with_business_change<H: StoreHarness>(h: H, _: StoreFeatures) {
    let rolled_back = order_event("o-1", 1, "OrderCreated");
    h.write("o-1", std::slice::from_ref(&rolled_back), false)
        .await
        .expect("write");
    assert!(
        !h.business_row_exists("o-1").await.expect("read"),
        "rolled-back business row is visible"
    );
    assert_eq!(
        stats(&h).await.pending,
        0,
        "an event of a rolled-back transaction was stored"
    );
    let claimed = h
        .store()
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert!(claimed.events.is_empty());

    let mut committed = order_event("o-2", 1, "OrderCreated");
    committed.metadata.traceparent =
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    committed.metadata.causation_id = Some("cmd-1".into());
    commit(&h, "o-2", std::slice::from_ref(&committed)).await;
    assert!(h.business_row_exists("o-2").await.expect("read"));
    let s = stats(&h).await;
    assert_eq!(s.pending, 1);
    assert!(s.oldest_pending_at.is_some());
    let claimed = h
        .store()
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert_eq!(claimed.events.len(), 1);
    assert_eq!(
        claimed.events[0].event, committed,
        "the event did not read back as written"
    );
    assert_eq!(claimed.events[0].attempts, 0);
}

/// A batch holding one invalid event writes nothing at all.
pub async fn invalid_events_write_nothing<H: StoreHarness>(h: H, _: StoreFeatures) {
    let good = order_event("o-1", 1, "OrderCreated");
    let mut bad = order_event("o-1", 2, "OrderPaid");
    bad.aggregate_id = String::new();
    let err = h
        .write("o-1", &[good, bad], true)
        .await
        .expect_err("an event without aggregate id was accepted");
    assert!(
        matches!(err, StoreError::Invalid(_)),
        "expected Invalid, got {err:?}"
    );
    assert!(!h.business_row_exists("o-1").await.expect("read"));
    assert_eq!(stats(&h).await.pending, 0);
}

/// Two writers appending the same aggregate version: the second fails with
/// a conflict and its business change is rolled back. A version below one
/// already stored is refused too, so write order is version order.
pub async fn version_conflict_is_refused<H: StoreHarness>(h: H, features: StoreFeatures) {
    if !features.version_conflicts {
        return;
    }
    commit(
        &h,
        "first",
        &[
            order_event("o-1", 1, "OrderCreated"),
            order_event("o-1", 3, "OrderPaid"),
        ],
    )
    .await;
    for (key, version) in [("same", 3), ("older", 2)] {
        let err = h
            .write(key, &[order_event("o-1", version, "OrderUpdated")], true)
            .await
            .expect_err("a version at or below the stored one was accepted");
        assert!(
            matches!(err, StoreError::Conflict(_)),
            "expected Conflict, got {err:?}"
        );
        assert!(!h.business_row_exists(key).await.expect("read"));
    }
    let err = h
        .write(
            "backwards",
            &[
                order_event("o-2", 2, "OrderPaid"),
                order_event("o-2", 1, "OrderCreated"),
            ],
            true,
        )
        .await
        .expect_err("versions going down within one append were accepted");
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "expected Conflict, got {err:?}"
    );
    assert_eq!(stats(&h).await.pending, 2);
    commit(&h, "next", &[order_event("o-1", 4, "OrderShipped")]).await;
}

/// Events of one aggregate are published in version order, across
/// transactions and batches, each exactly once when nothing fails.
pub async fn publishes_in_aggregate_order<H: StoreHarness>(h: H, _: StoreFeatures) {
    for v in 1..=5 {
        for agg in ["a", "b", "c"] {
            commit(
                &h,
                &format!("{agg}{v}"),
                &[order_event(agg, v, "OrderUpdated")],
            )
            .await;
        }
    }
    commit(
        &h,
        "d",
        &(1..=4)
            .map(|v| order_event("d", v, "OrderUpdated"))
            .collect::<Vec<_>>(),
    )
    .await;
    let publisher = RecordingPublisher::new();
    let relay =
        Relay::new(h.store(), publisher.clone(), relay_config().batch_size(7)).expect("relay");
    relay.drain().await.expect("drain");
    let versions = publisher.versions();
    assert_eq!(versions.len(), 19, "{versions:?}");
    assert_in_aggregate_order(&versions);
    let s = stats(&h).await;
    assert_eq!((s.pending, s.published, s.dead), (0, 19, 0));
}

/// A failing event holds back the later events of its own aggregate only;
/// after its backoff it succeeds and the rest follow in order.
pub async fn failure_holds_back_only_its_aggregate<H: StoreHarness>(h: H, _: StoreFeatures) {
    let a: Vec<Event> = (1..=3)
        .map(|v| order_event("a", v, "OrderUpdated"))
        .collect();
    let b: Vec<Event> = (1..=3)
        .map(|v| order_event("b", v, "OrderUpdated"))
        .collect();
    commit(&h, "a", &a).await;
    commit(&h, "b", &b).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(a[0].id, [Fault::Transient, Fault::Transient]);
    let retry = RetryPolicy {
        initial: Duration::from_millis(200),
        max_delay: Duration::from_millis(200),
        ..fast_retry()
    };
    let relay =
        Relay::new(h.store(), publisher.clone(), relay_config().retry(retry)).expect("relay");

    relay.drain().await.expect("drain");
    let versions = publisher.inner().versions();
    assert_eq!(
        versions,
        vec![("b".into(), 1), ("b".into(), 2), ("b".into(), 3)],
        "only b may flow while a backs off"
    );
    assert_eq!(stats(&h).await.pending, 3);

    drain_until_settled(&relay, Duration::from_secs(5)).await;
    let versions = publisher.inner().versions();
    assert_eq!(versions.len(), 6, "{versions:?}");
    assert_in_aggregate_order(&versions);
    assert_eq!(publisher.injected().total(), 2);
}

/// A retry-after answer delays the event at least that long.
pub async fn retry_after_is_honoured<H: StoreHarness>(h: H, _: StoreFeatures) {
    let e = order_event("a", 1, "OrderCreated");
    commit(&h, "a", std::slice::from_ref(&e)).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(e.id, [Fault::RetryAfter(Duration::from_millis(400))]);
    let relay = Relay::new(h.store(), publisher.clone(), relay_config()).expect("relay");
    let started = tokio::time::Instant::now();
    relay.drain().await.expect("drain");
    tokio::time::sleep(Duration::from_millis(150)).await;
    relay.drain().await.expect("drain");
    assert!(
        publisher.inner().received().is_empty(),
        "published before its retry-after"
    );
    drain_until_settled(&relay, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(publisher.inner().received().len(), 1);
}

/// A publish call that hangs past the publish timeout counts as a transient
/// failure: the event is retried, not lost and not dead-lettered.
pub async fn publish_timeout_spends_no_attempt<H: StoreHarness>(h: H, _: StoreFeatures) {
    let e = order_event("a", 1, "OrderCreated");
    commit(&h, "a", std::slice::from_ref(&e)).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(e.id, [Fault::Hang(Duration::from_secs(5))]);
    let config = relay_config()
        .publish_timeout(Duration::from_millis(100))
        .settle_margin(Duration::from_millis(100))
        .max_outage_pause(Duration::from_millis(50))
        .lease(Duration::from_secs(2));
    let relay = Relay::new(h.store(), publisher.clone(), config).expect("relay");
    let report = relay.run_once().await.expect("run once");
    // A call that never answers says nothing about the event: the target
    // is down, the event waits, no attempt is spent.
    assert_eq!((report.deferred, report.retried), (1, 0), "{report:?}");
    assert!(relay.outage().is_some());
    assert!(publisher.inner().received().is_empty());
    let waiting = stats(&h).await;
    assert!(
        waiting
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "the outage is not visible in stats: {waiting:?}"
    );
    drain_until_settled(&relay, Duration::from_secs(5)).await;
    assert_eq!(
        publisher.inner().received().len(),
        1,
        "{:?} {:?}",
        stats(&h).await,
        relay.metrics()
    );
    assert!(relay.outage().is_none(), "the outage did not end");
    assert_eq!(stats(&h).await.dead, 0);
}

/// A target that is down for longer than the whole retry budget
/// dead-letters nothing: its events wait, the relay probes, and everything
/// flows, in order, once it is back.
pub async fn outage_dead_letters_nothing<H: StoreHarness>(h: H, _: StoreFeatures) {
    for a in 0..4 {
        let events: Vec<_> = (1..=3)
            .map(|v| order_event(&format!("a{a}"), v, "OrderUpdated"))
            .collect();
        commit(&h, &format!("a{a}"), &events).await;
    }
    let publisher = RecordingPublisher::new();
    publisher.go_down("connection refused");
    let config = relay_config()
        .max_attempts(2)
        .idle_poll(Duration::from_millis(10))
        .max_outage_pause(Duration::from_millis(40));
    let relay = Relay::new(h.store(), publisher.clone(), config).expect("relay");
    let running = async {
        // Twice as many probes as attempts allowed per event.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while publisher.calls_while_down() < 4 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(relay.outage().is_some(), "no outage seen");
        let during = stats(&h).await;
        assert_eq!(during.dead, 0, "an outage dead-lettered events: {during:?}");
        assert_eq!(during.pending, 12);
        assert!(
            during
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("connection refused")),
            "{during:?}"
        );
        assert!(
            publisher.calls_while_down() >= 4,
            "the target was not probed"
        );
        publisher.come_back();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats(&h).await.pending > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        report = relay.run(std::future::pending()) => panic!("relay stopped: {report:?}"),
        () = running => {}
    }
    let s = stats(&h).await;
    assert_eq!((s.pending, s.dead, s.published), (0, 0, 12), "{s:?}");
    assert_in_aggregate_order(&publisher.versions());
    assert!(
        relay
            .metrics()
            .outages
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// No publish call runs past the claim's lease: a batch slower than its
/// lease releases what it has not sent, so a second relay taking the
/// events after the lease never publishes one the first is still sending.
pub async fn batch_never_outlives_its_lease<H: StoreHarness>(h: H, features: StoreFeatures) {
    if !features.concurrent_relays {
        return;
    }
    let events: Vec<_> = (1..=12)
        .map(|v| order_event("deep", v, "OrderUpdated"))
        .collect();
    commit(&h, "deep", &events).await;
    // 12 waves of 100 ms do not fit a 800 ms lease; the margin leaves a
    // store across a network time to settle.
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(100));
    let config = relay_config()
        .lease(Duration::from_millis(800))
        .publish_timeout(Duration::from_millis(200))
        .settle_margin(Duration::from_millis(300));
    let first = Relay::new(h.store(), publisher.clone(), config.clone()).expect("relay");
    let second = Relay::new(h.store(), publisher.clone(), config).expect("relay");
    let started = tokio::time::Instant::now();
    let report = first.run_once().await.expect("run once");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the batch outlived its lease: {:?}",
        started.elapsed()
    );
    assert!(report.released > 0 && report.published >= 2, "{report:?}");
    // Both relays now race for the rest.
    let (a, b) = tokio::join!(
        drain_until_settled(&first, Duration::from_secs(10)),
        drain_until_settled(&second, Duration::from_secs(10))
    );
    let _ = (a, b);
    let versions = publisher.versions();
    assert_eq!(
        versions.len(),
        12,
        "an event was published twice or lost: {versions:?}"
    );
    assert_in_aggregate_order(&versions);
}

/// A drain takes what was due when it started: writers that keep writing
/// do not keep it going.
pub async fn drain_ends_while_writers_keep_writing<H: StoreHarness>(h: H, _: StoreFeatures) {
    for a in 0..20 {
        commit(
            &h,
            &format!("before-{a}"),
            &[order_event(&format!("b{a}"), 1, "OrderCreated")],
        )
        .await;
    }
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(2));
    let relay =
        Relay::new(h.store(), publisher.clone(), relay_config().batch_size(5)).expect("relay");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writer = async {
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            commit(
                &h,
                &format!("during-{n}"),
                &[order_event(&format!("w{n}"), 1, "OrderCreated")],
            )
            .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        n
    };
    let drain = async {
        let report = tokio::time::timeout(Duration::from_secs(20), relay.drain())
            .await
            .expect("drain never ended while writers kept writing")
            .expect("drain");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        report
    };
    let (report, written) = tokio::join!(drain, writer);
    assert!(written > 0);
    assert!(report.published >= 20, "{report:?}");
    let published: std::collections::HashSet<String> =
        publisher.versions().into_iter().map(|(a, _)| a).collect();
    for a in 0..20 {
        assert!(
            published.contains(&format!("b{a}")),
            "b{a} was due at the start and not drained"
        );
    }
}

/// An entry the relay cannot read is dead-lettered alone, with its reason
/// and raw fields listed; everything else flows.
pub async fn malformed_entry_is_dead_lettered_alone<H: StoreHarness>(h: H, _: StoreFeatures) {
    commit(&h, "a", &[order_event("a", 1, "OrderCreated")]).await;
    if !h.write_malformed("bad").await.expect("write malformed") {
        return;
    }
    commit(
        &h,
        "b",
        &[
            order_event("b", 1, "OrderCreated"),
            order_event("b", 2, "OrderPaid"),
        ],
    )
    .await;
    let publisher = RecordingPublisher::new();
    let relay = Relay::new(h.store(), publisher.clone(), relay_config()).expect("relay");
    let report = relay.drain().await.expect("drain");
    assert_eq!((report.malformed, report.published), (1, 3), "{report:?}");
    let s = stats(&h).await;
    assert_eq!((s.pending, s.dead, s.published), (0, 1, 3), "{s:?}");
    let dead = h.store().dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].event.is_none() && dead[0].raw.is_some(), "{dead:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("malformed:")),
        "{dead:?}"
    );
}

/// With the park policy, an aggregate waits behind its dead letter until
/// the dead letter is replayed (then it goes first) or skipped.
pub async fn parked_aggregate_waits_for_its_dead_letter<H: StoreHarness>(h: H, _: StoreFeatures) {
    let Some(store) = h.parking_store() else {
        return;
    };
    let events: Vec<_> = (1..=3)
        .map(|v| order_event("p", v, "OrderUpdated"))
        .collect();
    commit(&h, "p", &events).await;
    commit(&h, "q", &[order_event("q", 1, "OrderCreated")]).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(events[0].id, [Fault::Permanent]);
    let relay = Relay::new(store.clone(), publisher.clone(), relay_config()).expect("relay");
    relay.drain().await.expect("drain");
    assert_eq!(
        publisher.inner().versions(),
        vec![("q".to_owned(), 1)],
        "parked events flowed"
    );
    assert_eq!(stats(&h).await.pending, 2);
    assert_eq!(
        store
            .replay(ReplaySelector::Ids(vec![events[0].id]))
            .await
            .expect("replay"),
        1
    );
    relay.drain().await.expect("drain");
    let p: Vec<u64> = publisher
        .inner()
        .versions()
        .into_iter()
        .filter(|(a, _)| a == "p")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(p, vec![1, 2, 3], "the replayed dead letter must go first");

    // Skipping lets the aggregate flow without it.
    let more: Vec<_> = (4..=5)
        .map(|v| order_event("p", v, "OrderUpdated"))
        .collect();
    commit(&h, "p2", &more).await;
    publisher.script(more[0].id, [Fault::Permanent]);
    relay.drain().await.expect("drain");
    assert_eq!(stats(&h).await.pending, 1);
    assert_eq!(
        store
            .skip(ReplaySelector::Ids(vec![more[0].id]))
            .await
            .expect("skip"),
        1
    );
    relay.drain().await.expect("drain");
    let s = stats(&h).await;
    assert_eq!((s.pending, s.dead), (0, 0), "{s:?}");
    assert!(publisher.inner().versions().contains(&("p".to_owned(), 5)));
}

/// A permanent failure dead-letters the event at once, with its error; the
/// aggregate's later events still flow; a replay publishes it.
pub async fn dead_letter_then_replay<H: StoreHarness>(h: H, _: StoreFeatures) {
    let events: Vec<Event> = (1..=2)
        .map(|v| order_event("a", v, "OrderUpdated"))
        .collect();
    commit(&h, "a", &events).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(events[0].id, [Fault::Permanent]);
    let relay = Relay::new(h.store(), publisher.clone(), relay_config()).expect("relay");
    drain_until_settled(&relay, Duration::from_secs(5)).await;

    assert_eq!(publisher.inner().versions(), vec![("a".into(), 2)]);
    let s = stats(&h).await;
    assert_eq!((s.pending, s.published, s.dead), (0, 1, 1));
    let dead = h.store().dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.as_ref(), Some(&events[0]));
    assert_eq!(dead[0].attempts, 1);
    let error = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(error.contains("rejected"), "last error not kept: {error:?}");

    let replayed = h
        .store()
        .replay(ReplaySelector::Ids(vec![events[0].id]))
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert_eq!(
        h.store().replay(ReplaySelector::All).await.expect("replay"),
        0
    );
    drain_until_settled(&relay, Duration::from_secs(5)).await;
    assert_eq!(
        publisher.inner().versions(),
        vec![("a".into(), 2), ("a".into(), 1)]
    );
    let s = stats(&h).await;
    assert_eq!((s.pending, s.published, s.dead), (0, 2, 0));
}

/// Transient failures past `max_attempts` dead-letter the event.
pub async fn attempts_run_out<H: StoreHarness>(h: H, _: StoreFeatures) {
    let e = order_event("a", 1, "OrderCreated");
    commit(&h, "a", std::slice::from_ref(&e)).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(e.id, std::iter::repeat_n(Fault::Transient, 10));
    let relay =
        Relay::new(h.store(), publisher.clone(), relay_config().max_attempts(3)).expect("relay");
    drain_until_settled(&relay, Duration::from_secs(5)).await;
    let dead = h.store().dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0]
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("gave up after 3 attempts"));
    assert_eq!(
        publisher
            .injected()
            .transient
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

/// A relay that dies holding a claim delays its events by the lease only;
/// its late settlement is ignored once another relay has taken over.
pub async fn expired_lease_is_reclaimed<H: StoreHarness>(h: H, _: StoreFeatures) {
    commit(
        &h,
        "a",
        &[
            order_event("a", 1, "OrderCreated"),
            order_event("a", 2, "OrderPaid"),
        ],
    )
    .await;
    let store = h.store();
    let first = store
        .claim(ClaimRequest::new(10, Duration::from_millis(300)))
        .await
        .expect("claim");
    assert_eq!(first.events.len(), 2);
    let again = store
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    assert!(
        again.events.is_empty(),
        "claimed events were handed out twice"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = store
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    let versions: Vec<u64> = second
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect();
    assert_eq!(
        versions,
        vec![1, 2],
        "expired claim not handed out again in order"
    );

    let mut stale = Settlements::default();
    stale.published = first.events.iter().map(|c| c.receipt.clone()).collect();
    assert_eq!(
        store.settle(first.lease, stale).await.expect("settle"),
        0,
        "a stale lease settled events"
    );
    let mut fresh = Settlements::default();
    fresh.published = second.events.iter().map(|c| c.receipt.clone()).collect();
    assert_eq!(store.settle(second.lease, fresh).await.expect("settle"), 2);
    assert_eq!(stats(&h).await.published, 2);
}

/// Released events are due again at once, with no attempt counted.
pub async fn released_events_are_due_again<H: StoreHarness>(h: H, _: StoreFeatures) {
    commit(&h, "a", &[order_event("a", 1, "OrderCreated")]).await;
    let store = h.store();
    let claimed = store
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    let mut released = Settlements::default();
    released.released = claimed.events.iter().map(|c| c.receipt.clone()).collect();
    assert_eq!(
        store.settle(claimed.lease, released).await.expect("settle"),
        1
    );
    let again = store
        .claim(ClaimRequest::new(10, Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(again.events.len(), 1);
    assert_eq!(again.events[0].attempts, 0);
}

/// On shutdown the relay finishes its publish call in flight and releases
/// the rest of its batch, so the next relay starts at once.
pub async fn shutdown_releases_in_flight_work<H: StoreHarness>(h: H, _: StoreFeatures) {
    commit(
        &h,
        "a",
        &(1..=3)
            .map(|v| order_event("a", v, "OrderUpdated"))
            .collect::<Vec<_>>(),
    )
    .await;
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(300));
    let relay = Relay::new(h.store(), publisher.clone(), relay_config()).expect("relay");
    // An async block, like a signal handler: it must not be polled once it has completed.
    let shutdown = async { tokio::time::sleep(Duration::from_millis(100)).await };
    let report = relay.run(shutdown).await.expect("run");
    assert_eq!(
        report.published, 1,
        "the call in flight should finish: {report:?}"
    );
    assert_eq!(report.released, 2, "{report:?}");
    let next = h
        .store()
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    let versions: Vec<u64> = next
        .events
        .iter()
        .map(|c| c.event.aggregate_version)
        .collect();
    assert_eq!(versions, vec![2, 3], "released events must be due at once");
}

/// Several relays share the work without reordering any aggregate or
/// publishing anything twice.
pub async fn concurrent_relays_keep_order<H: StoreHarness>(h: H, features: StoreFeatures) {
    if !features.concurrent_relays {
        return;
    }
    let aggregates = 12;
    let versions_each = 8;
    for v in 1..=versions_each {
        for a in 0..aggregates {
            commit(
                &h,
                &format!("{a}-{v}"),
                &[order_event(&format!("agg-{a}"), v, "OrderUpdated")],
            )
            .await;
        }
    }
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(2));
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay =
            Relay::new(h.store(), publisher.clone(), relay_config().batch_size(5)).expect("relay");
        relays.push(tokio::spawn(async move { relay.drain().await }));
    }
    for r in relays {
        r.await.expect("relay task").expect("drain");
    }
    let relay = Relay::new(h.store(), publisher.clone(), relay_config()).expect("relay");
    drain_until_settled(&relay, Duration::from_secs(10)).await;
    let versions = publisher.versions();
    assert_eq!(
        versions.len() as u64,
        aggregates * versions_each,
        "lost or duplicated events"
    );
    assert_in_aggregate_order(&versions);
}

/// Purging removes published events older than the cut-off, nothing else.
pub async fn purge_removes_only_old_published<H: StoreHarness>(h: H, features: StoreFeatures) {
    if !features.purges_published {
        return;
    }
    let events: Vec<Event> = (1..=3)
        .map(|v| order_event("a", v, "OrderUpdated"))
        .collect();
    commit(&h, "a", &events).await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new());
    publisher.script(events[1].id, [Fault::Permanent]);
    let relay = Relay::new(h.store(), publisher, relay_config()).expect("relay");
    relay.drain().await.expect("drain");
    commit(&h, "b", &[order_event("b", 1, "OrderCreated")]).await;

    let store = h.store();
    assert_eq!(
        store
            .purge_published(Utc::now() - chrono::Duration::hours(1))
            .await
            .expect("purge"),
        0
    );
    // Published a moment ago: a cut-off of now + 1 s covers them.
    assert_eq!(
        store
            .purge_published(Utc::now() + chrono::Duration::seconds(1))
            .await
            .expect("purge"),
        2
    );
    let s = stats(&h).await;
    assert_eq!((s.pending, s.published, s.dead), (1, 0, 1));
}

/// The inbox records an id once per consumer, and only if the consumer's
/// transaction commits.
pub async fn inbox_deduplicates<H: StoreHarness>(h: H, _: StoreFeatures) {
    let id = EventId::new();
    assert_eq!(
        h.inbox_record("shipping", id, true).await.expect("record"),
        Seen::First
    );
    assert_eq!(
        h.inbox_record("shipping", id, true).await.expect("record"),
        Seen::Duplicate
    );
    assert_eq!(
        h.inbox_record("billing", id, true).await.expect("record"),
        Seen::First,
        "consumers are independent"
    );
    let other = EventId::new();
    assert_eq!(
        h.inbox_record("shipping", other, false)
            .await
            .expect("record"),
        Seen::First
    );
    assert_eq!(
        h.inbox_record("shipping", other, true)
            .await
            .expect("record"),
        Seen::First,
        "a rolled-back record was kept"
    );
}

/// Runs every case of the store suite as its own test.
#[macro_export]
macro_rules! store_conformance {
    ($make:expr, $features:expr) => {
        $crate::store_conformance!(@cases $make, $features;
            atomic_with_business_change, invalid_events_write_nothing, version_conflict_is_refused,
            publishes_in_aggregate_order, failure_holds_back_only_its_aggregate, retry_after_is_honoured,
            publish_timeout_spends_no_attempt, outage_dead_letters_nothing,
            batch_never_outlives_its_lease, drain_ends_while_writers_keep_writing,
            malformed_entry_is_dead_lettered_alone, parked_aggregate_waits_for_its_dead_letter,
            dead_letter_then_replay, attempts_run_out, expired_lease_is_reclaimed,
            released_events_are_due_again, shutdown_releases_in_flight_work,
            concurrent_relays_keep_order, purge_removes_only_old_published, inbox_deduplicates);
    };
    (@cases $make:expr, $features:expr; $($case:ident),+) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = ($make)().await;
                    $crate::store::$case(harness, $features).await;
                }
            )+
        }
    };
}
