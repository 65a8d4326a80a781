//! Relay processes on one PostgreSQL outbox publishing to NATS JetStream:
//! several side by side, one killed with SIGKILL mid-run and started again,
//! and the broker cut off and restored mid-run through a fault proxy. Each
//! test reads the stream back and checks that nothing is lost and that each
//! aggregate's events arrive in version order.

#[path = "common/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use outbox_core::{Event, EventId};
use outbox_nats::async_nats::jetstream;
use outbox_postgres::PostgresOutbox;
use outbox_testkit::order_event;
use outbox_testkit::proxy::FaultProxy;

/// A schema and a stream of one test's own, removed when it ends.
struct Setup {
    schema: String,
    stream: String,
    outbox: PostgresOutbox,
    js: jetstream::Context,
    logs: tempfile::TempDir,
}

impl Setup {
    async fn new(name: &str) -> Self {
        let schema = pg::unique(name);
        let outbox = pg::outbox(&schema).await;
        outbox.migrate().await.expect("migrate");
        let js = pg::jetstream().await;
        // The stream's name doubles as its subjects' first token.
        let stream = schema.clone();
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            storage: jetstream::stream::StorageType::Memory,
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("create stream");
        Self {
            schema,
            stream,
            outbox,
            js,
            logs: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn store(&self) -> String {
        format!("{}?schema={}", pg::postgres_url(), self.schema)
    }

    /// The relays' target: `server` (NATS itself, or a proxy in front of it).
    fn target(&self, server: &str) -> String {
        format!(
            "{server}?stream={}&subject={}.{{aggregatetype}}.{{type}}",
            self.stream, self.stream
        )
    }

    fn log(&self, name: &str) -> std::path::PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// Appends `events` in one transaction, as a service does.
    async fn write(&self, events: &[Event]) {
        let mut tx = self.outbox.pool().begin().await.expect("begin");
        self.outbox.append(&mut tx, events).await.expect("append");
        tx.commit().await.expect("commit");
    }

    async fn count(&self, sql: &str) -> i64 {
        pg::count(&self.outbox, sql).await
    }

    /// Waits until the stream holds `want` messages, or `timeout`.
    async fn wait_stored(&self, want: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let stored = pg::stored(&self.js, &self.stream).await;
            if stored >= want || Instant::now() > deadline {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the stream back: everything written arrived, once each (the
    /// stream drops re-published ids), each aggregate in version order;
    /// the outbox marks all of it published and none dead.
    async fn assert_all_delivered(&self, written: &[Event]) {
        let events = pg::read_stream(
            &self.js,
            &self.stream,
            written.len(),
            Duration::from_secs(30),
        )
        .await;
        let arrived = pg::assert_in_order(&events);
        let missing = written.iter().filter(|e| !arrived.contains(&e.id)).count();
        assert_eq!(missing, 0, "{missing} of {} events lost", written.len());
        let ids: HashSet<EventId> = written.iter().map(|e| e.id).collect();
        assert!(arrived.iter().all(|id| ids.contains(id)), "unknown events");
        assert_eq!(
            events.len(),
            written.len(),
            "the stream stores each event once"
        );
        assert_eq!(
            self.count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'published'")
                .await,
            written.len() as i64
        );
        assert_eq!(
            self.count("SELECT count(*) FROM {s}.outbox_events WHERE status != 'published'")
                .await,
            0,
            "nothing pending or dead-lettered"
        );
    }

    async fn remove(self) {
        let _ = self.js.delete_stream(&self.stream).await;
        pg::drop_schema(&self.schema).await;
    }
}

/// Version `version` of aggregates `0..aggregates`.
fn round(prefix: &str, aggregates: u64, version: u64) -> Vec<Event> {
    (0..aggregates)
        .map(|a| order_event(&format!("{prefix}-{a}"), version, "OrderUpdated"))
        .collect()
}

/// What `relay stopped: published N, ...` says a relay published.
fn published_by(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("relay stopped: published ").nth(1))
        .filter_map(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_relay_processes_share_one_outbox_keep_order_and_lose_nothing() {
    const RELAYS: usize = 3;
    const AGGREGATES: u64 = 100;
    const VERSIONS: u64 = 8;
    let setup = Setup::new("relays").await;
    let (store, target) = (setup.store(), setup.target(pg::NATS));
    let flags = [
        "--batch-size",
        "20",
        "--poll",
        "50ms",
        "--lease",
        "3s",
        "--publish-timeout",
        "1s",
    ];
    let relays: Vec<_> = (0..RELAYS)
        .map(|n| {
            let log = setup.log(&format!("relay-{n}"));
            (pg::relay(&store, &target, &flags, &log), log)
        })
        .collect();

    // Written while the relays run: each version of every aggregate is its
    // own transaction, so the relays race for the heads of many aggregates.
    let mut written = Vec::new();
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let event = order_event(&format!("shared-{a}"), version, "OrderUpdated");
            setup.write(std::slice::from_ref(&event)).await;
            written.push(event);
        }
    }
    let stored = setup
        .wait_stored(written.len() as u64, Duration::from_secs(30))
        .await;
    assert_eq!(stored, written.len() as u64, "the stream holds every event");
    let mut shares = Vec::new();
    for (child, log) in relays {
        pg::stop(child, &log);
        shares.push(published_by(&log));
    }
    setup.assert_all_delivered(&written).await;
    assert!(
        shares.iter().filter(|&&n| n > 0).count() >= 2,
        "the relays share the work: {shares:?}"
    );
    setup.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_and_started_again_loses_nothing() {
    const AGGREGATES: u64 = 200;
    const VERSIONS: u64 = 10;
    let setup = Setup::new("killed").await;
    let mut written = Vec::new();
    for version in 1..=VERSIONS {
        let events = round("killed", AGGREGATES, version);
        setup.write(&events).await;
        written.extend(events);
    }
    let (store, target) = (setup.store(), setup.target(pg::NATS));
    // Small batches and a short lease: the killed relay's claims come free
    // two seconds after it dies.
    let flags = [
        "--batch-size",
        "20",
        "--lease",
        "2s",
        "--publish-timeout",
        "500ms",
    ];
    let log = setup.log("first");
    let mut first = pg::relay(&store, &target, &flags, &log);
    let before_kill = setup.wait_stored(300, Duration::from_secs(30)).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    assert!(before_kill >= 300, "the first relay published too little");
    let at_kill = pg::stored(&setup.js, &setup.stream).await;
    assert!(
        at_kill < written.len() as u64,
        "the first relay finished before it was killed"
    );

    let log = setup.log("second");
    let second = pg::relay(&store, &target, &flags, &log);
    let stored = setup
        .wait_stored(written.len() as u64, Duration::from_secs(30))
        .await;
    assert_eq!(
        stored,
        written.len() as u64,
        "every event reached the stream"
    );
    pg::stop(second, &log);
    setup.assert_all_delivered(&written).await;
    eprintln!("killed after {at_kill} of {} events", written.len());
    setup.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_cut_off_and_restored_mid_run_loses_nothing_and_dead_letters_nothing() {
    const AGGREGATES: u64 = 100;
    let setup = Setup::new("cut").await;
    let proxy = FaultProxy::start("127.0.0.1:4222".parse().expect("address"))
        .await
        .expect("proxy");
    let (store, target) = (setup.store(), setup.target(&proxy.url_for("nats")));
    let log = setup.log("relay");
    let relay = pg::relay(
        &store,
        &target,
        &[
            "--batch-size",
            "20",
            "--poll",
            "50ms",
            "--publish-timeout",
            "1s",
        ],
        &log,
    );
    let mut written = Vec::new();
    for version in 1..=2 {
        let events = round("cut", AGGREGATES, version);
        setup.write(&events).await;
        written.extend(events);
    }
    let stored = setup.wait_stored(200, Duration::from_secs(30)).await;
    assert_eq!(stored, 200, "delivered before the cut");
    // Stored is not yet settled: the relay marks a batch published once
    // its acks are back. A cut before that would leave the batch pending
    // (to be sent again, a duplicate the stream drops).
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup
        .count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'pending'")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "the first 200 never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cut off: what is written meanwhile waits in the outbox.
    proxy.cut();
    for version in 3..=4 {
        let events = round("cut", AGGREGATES, version);
        setup.write(&events).await;
        written.extend(events);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pg::stored(&setup.js, &setup.stream).await,
        200,
        "nothing gets through a cut connection"
    );
    let waiting = setup
        .count("SELECT count(*) FROM {s}.outbox_events WHERE status = 'pending'")
        .await;
    assert_eq!(waiting, 200, "the events written during the cut wait");

    // Restored: they flow, with what is written afterwards.
    proxy.restore();
    for version in 5..=6 {
        let events = round("cut", AGGREGATES, version);
        setup.write(&events).await;
        written.extend(events);
    }
    let stored = setup
        .wait_stored(written.len() as u64, Duration::from_secs(30))
        .await;
    assert_eq!(
        stored,
        written.len() as u64,
        "everything arrives after the restore"
    );
    pg::stop(relay, &log);
    setup.assert_all_delivered(&written).await;
    setup.remove().await;
}
