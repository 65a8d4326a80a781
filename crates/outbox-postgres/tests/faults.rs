//! The PostgreSQL connection cut (through the testkit's fault proxy, the
//! server itself untouched) while relays claim and settle: nothing is lost,
//! no aggregate is reordered, no settlement applies twice.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{db, DropSchema};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, LeaseId, Relay, RelayConfig, Settlements, Stats, StoreError,
};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::{order_event, FaultProxy, RecordingPublisher};

/// The store, counting the published settlements it reports applied.
#[derive(Clone)]
struct Counting {
    inner: PostgresOutbox,
    published_applied: Arc<AtomicU64>,
}

impl ClaimSource for Counting {
    type Receipt = i64;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<i64>, StoreError> {
        self.inner.claim(request).await
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<i64>) -> Result<u64, StoreError> {
        // Published ones apart, so the count is theirs alone.
        let mut published = Settlements::default();
        published.published = s.published.clone();
        let mut rest = s;
        rest.published.clear();
        let applied = self.inner.settle(lease, published).await?;
        self.published_applied.fetch_add(applied, Ordering::Relaxed);
        Ok(applied + self.inner.settle(lease, rest).await?)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        self.inner.wait_for_events(max_wait).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_during_claims_and_settlements_loses_nothing() {
    let outbox = common::outbox("cut", 4).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let aggregates = 40;
    let versions = 25u64;
    for v in 1..=versions {
        for a in 0..aggregates {
            let mut tx = outbox.pool().begin().await.expect("begin");
            outbox
                .append(
                    &mut tx,
                    &[order_event(&format!("agg-{a}"), v, "OrderUpdated")],
                )
                .await
                .expect("append");
            tx.commit().await.map_err(db).expect("commit");
        }
    }
    let total = aggregates as u64 * versions;

    let proxy = FaultProxy::start("127.0.0.1:5432".parse().expect("addr"))
        .await
        .expect("proxy");
    let through_proxy = common::url().replace("127.0.0.1:5432", &proxy.addr().to_string());
    let publisher = RecordingPublisher::new().with_latency(Duration::from_millis(2));
    let applied = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..2 {
        let store = Counting {
            inner: common::same_outbox(&outbox, &through_proxy, 2).await,
            published_applied: applied.clone(),
        };
        let config = RelayConfig::default()
            .batch_size(40)
            .lease(Duration::from_millis(1500))
            .publish_timeout(Duration::from_millis(500))
            .settle_margin(Duration::from_millis(300))
            .idle_poll(Duration::from_millis(20));
        let relay = Relay::new(store, publisher.clone(), config).expect("relay");
        metrics.push(relay.metrics());
        let stop = stop.clone();
        relays.push(tokio::spawn(async move {
            relay
                .run(async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
        }));
    }

    // Cut the line again and again, mid-response too, while they work.
    let mut cuts = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = outbox.stats().await.expect("stats");
        if s.pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "still pending: {s:?}");
        if cuts < 30 {
            tokio::time::sleep(Duration::from_millis(40 + (cuts % 5) * 15)).await;
            if cuts % 3 == 0 {
                proxy.cut_mid_response(64 + cuts as usize * 97);
            } else {
                proxy.cut();
                tokio::time::sleep(Duration::from_millis(15)).await;
                proxy.restore();
            }
            cuts += 1;
        } else {
            proxy.restore();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in relays {
        r.await.expect("relay task").expect("relay");
    }

    let s = outbox.stats().await.expect("stats");
    assert_eq!((s.pending, s.published, s.dead), (0, total, 0), "{s:?}");
    let received = publisher.versions();
    // Every event at least once; a redelivery (a settlement lost with the
    // line) only ever repeats the latest version of its aggregate.
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (agg, v) in &received {
        let prev = last.insert(agg, *v).unwrap_or(0);
        assert!(
            *v >= prev,
            "aggregate {agg}: version {v} published after {prev}"
        );
        assert!(
            *v <= prev + 1,
            "aggregate {agg}: version {v} published before {}",
            prev + 1
        );
    }
    assert_eq!(last.len(), aggregates);
    assert!(last.values().all(|v| *v == versions), "{last:?}");
    // The fence: no event's publication was applied twice.
    let applied = applied.load(Ordering::Relaxed);
    assert!(
        applied <= total,
        "{applied} publications applied for {total} events"
    );
    assert!(
        proxy.stats().accepted > 4,
        "the relays never reconnected: {:?}",
        proxy.stats()
    );
    let store_errors: u64 = metrics
        .iter()
        .map(|m| m.store_errors.load(Ordering::Relaxed))
        .sum();
    assert!(store_errors > 0, "no claim or settlement was ever cut");
    eprintln!(
        "{cuts} cuts, {store_errors} failed claims or settlements; {} publishes for {total} events; {applied} publications applied",
        received.len()
    );
}
