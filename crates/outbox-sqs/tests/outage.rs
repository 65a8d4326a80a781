//! An outage is not the events' fault: a relay from a SQLite outbox to an
//! SQS queue (moto) through the testkit's fault proxy, with the line cut for
//! far longer than the whole retry budget. Nothing may be dead-lettered;
//! the outage must show (on the relay and in the store's `last_error`); and
//! once the line is back every event must arrive.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_core::{Relay, RelayConfig, RetryPolicy, Stats};
use outbox_sqlite::SqliteOutbox;
use outbox_sqs::{SqsPublisher, SqsReceiver};
use outbox_testkit::{order_event, FaultProxy};

const AGGREGATES: u64 = 5;
const VERSIONS: u64 = 4;

/// Where moto's SQS listens, from `AWS_ENDPOINT_URL_SQS`.
fn sqs_address() -> SocketAddr {
    let url = std::env::var("AWS_ENDPOINT_URL_SQS").expect("AWS_ENDPOINT_URL_SQS");
    let host_port = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    host_port
        .to_socket_addrs()
        .expect("a host:port")
        .next()
        .expect("an address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_retry_budget_dead_letters_nothing() {
    require_local_endpoints(&["SQS"]);
    let config = outbox_aws::load_config().await;
    let direct = aws_sdk_sqs::Client::new(&config);
    let queue = outbox_sqs::setup::ensure_queue(&direct, &unique_name("outage"), false)
        .await
        .expect("queue");

    // The relay's client reaches moto only through the proxy, and gives up
    // on a call quickly (the relay, not the SDK, decides about retries).
    let proxy = FaultProxy::start(sqs_address()).await.expect("proxy");
    let through_proxy = aws_sdk_sqs::config::Builder::from(&config)
        .endpoint_url(proxy.url_for("http"))
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(500))
                .operation_timeout(Duration::from_secs(2))
                .build(),
        )
        .build();
    let publisher = SqsPublisher::new(aws_sdk_sqs::Client::from_conf(through_proxy), &queue.url);

    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = SqliteOutbox::open(&dir.path().join("outbox.db"))
        .await
        .expect("open");
    let mut written = HashSet::new();
    let mut tx = outbox.begin().await.expect("begin");
    for version in 1..=VERSIONS {
        for agg in 0..AGGREGATES {
            let event = order_event(&format!("o-{agg}"), version, "OrderUpdated");
            written.insert(event.id);
            outbox.append(&mut tx, &[event]).await.expect("append");
        }
    }
    outbox.commit(tx).await.expect("commit");

    // Three attempts, 50 ms then 100 ms apart: the whole budget is spent in
    // well under a second if an outage counted against the events.
    let retry = RetryPolicy {
        initial: Duration::from_millis(50),
        multiplier: 2.0,
        max_delay: Duration::from_millis(100),
        jitter: 0.0,
        max_attempts: 3,
    };
    let relay_config = RelayConfig::default()
        .retry(retry)
        .idle_poll(Duration::from_millis(50))
        .publish_timeout(Duration::from_secs(3))
        .max_outage_pause(Duration::from_millis(200));
    let relay = Relay::new(outbox.clone(), publisher, relay_config).expect("relay");

    proxy.cut();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drive = async {
        // Twenty times the retry budget, with the relay probing all along.
        let cut_for = Duration::from_secs(3);
        let until = tokio::time::Instant::now() + cut_for;
        let mut outage_seen = None;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(outage) = relay.outage() {
                outage_seen = Some(outage);
            }
        }
        let outage = outage_seen.expect("the relay must report the outage");
        assert!(outage.failures >= 2, "the relay keeps probing: {outage:?}");
        let stats = outbox.stats().await.expect("stats");
        assert_eq!(stats.dead, 0, "an outage dead-lettered events: {stats:?}");
        assert_eq!(stats.published, 0);
        assert_eq!(stats.pending, AGGREGATES * VERSIONS);
        let last_error = stats.last_error.expect("the store shows the outage");
        assert!(last_error.contains("SendMessageBatch"), "{last_error}");

        proxy.restore();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stats = outbox.stats().await.expect("stats");
            if stats.published == AGGREGATES * VERSIONS {
                assert_eq!(stats.dead, 0);
                assert_eq!(stats.pending, 0);
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "not everything flowed after the outage: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(relay.outage().is_none(), "the outage is over");
        let _ = stop.send(());
    };
    let (report, ()) = tokio::join!(
        relay.run(async {
            let _ = stopped.await;
        }),
        drive
    );
    report.expect("relay");
    let metrics = relay.metrics();
    assert_eq!(
        metrics
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(metrics.outages.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // Every event is at the queue, counted there.
    let receiver = SqsReceiver::new(direct, queue.url.clone());
    let received = receiver
        .collect_events(written.len(), Duration::from_secs(30))
        .await
        .expect("receive");
    let ids: HashSet<_> = received.iter().map(|r| r.event.id).collect();
    assert_eq!(ids, written, "every event arrives once the line is back");
}
