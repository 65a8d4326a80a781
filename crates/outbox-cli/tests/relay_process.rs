//! The relay as a process: killed with SIGKILL mid-run and started again,
//! then stopped with SIGTERM. Everything the relay wrote to stdout is counted.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outbox_core::cloudevents;
use outbox_core::{Event, EventId};
use outbox_sqlite::SqliteOutbox;
use outbox_testkit::order_event;

const AGGREGATES: u64 = 200;
const VERSIONS: u64 = 10;
const BATCH: usize = 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes the events, one transaction per aggregate version, as a service would.
fn write_events(db: &Path) -> Vec<Event> {
    rt().block_on(async {
        let outbox = SqliteOutbox::open(db).await.expect("open");
        let mut all = Vec::new();
        for v in 1..=VERSIONS {
            for a in 0..AGGREGATES {
                let e = order_event(&format!("agg-{a}"), v, "OrderUpdated");
                let mut tx = outbox.begin().await.expect("begin");
                outbox
                    .append(&mut tx, std::slice::from_ref(&e))
                    .await
                    .expect("append");
                outbox.commit(tx).await.expect("commit");
                all.push(e);
            }
        }
        all
    })
}

fn count(db: &Path, sql: &'static str) -> i64 {
    rt().block_on(async {
        let outbox = SqliteOutbox::open(db).await.expect("open");
        sqlx::query_scalar(sql)
            .fetch_one(outbox.pool())
            .await
            .expect(sql)
    })
}

fn relay(db: &Path, extra: &[&str]) -> Child {
    let store = format!("sqlite://{}", db.display());
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--store",
            &store,
            "--to",
            "stdout://",
            "--batch-size",
            &BATCH.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay")
}

/// Reads the child's stdout lines on a thread, so a kill never blocks the
/// test. With `bound`, the thread waits for the test to take lines, so the
/// relay can run ahead of what the test has read by a pipe's worth at most.
fn lines_of(child: &mut Child, bound: Option<usize>) -> mpsc::Receiver<String> {
    let (tx, rx) = match bound {
        Some(n) => {
            let (tx, rx) = mpsc::sync_channel(n);
            (Sender::Bounded(tx), rx)
        }
        None => {
            let (tx, rx) = mpsc::channel();
            (Sender::Unbounded(tx), rx)
        }
    };
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let sent = match &tx {
                Sender::Bounded(tx) => tx.send(line).is_ok(),
                Sender::Unbounded(tx) => tx.send(line).is_ok(),
            };
            if !sent {
                break;
            }
        }
    });
    rx
}

enum Sender {
    Bounded(mpsc::SyncSender<String>),
    Unbounded(mpsc::Sender<String>),
}

#[test]
fn relay_killed_mid_run_then_restarted_loses_nothing_and_keeps_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("relay.db");
    let written = write_events(&db);

    // First relay: killed without warning once it is well into the backlog.
    // Its lease is short (it must exceed the publish timeout plus the
    // relay's 1 s settle margin), so the restart need not wait long.
    let mut first = relay(&db, &["--lease", "2s", "--publish-timeout", "500ms"]);
    let lines = lines_of(&mut first, Some(1));
    let mut received: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < 600 && Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            received.push(line);
        }
    }
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    // Everything the dead relay wrote before dying, up to the pipe's end.
    received.extend(lines.iter());
    let before_restart = received.len();
    assert!(
        before_restart >= 600,
        "the first relay published too little: {before_restart}"
    );
    assert!(
        before_restart < written.len(),
        "the first relay finished before it was killed"
    );

    // Second relay, after the dead relay's lease ran out: publishes what is due and exits.
    std::thread::sleep(Duration::from_millis(2_200));
    let mut second = relay(&db, &["--once"]);
    let lines = lines_of(&mut second, None);
    let status = second.wait().expect("second relay");
    assert!(status.success(), "second relay failed");
    received.extend(lines.iter());

    let events: Vec<Event> = received
        .iter()
        .map(|l| {
            cloudevents::from_json(l)
                .unwrap_or_else(|e| panic!("not a CloudEvent ({e}): {l}"))
                .event
        })
        .collect();
    let ids: HashSet<EventId> = events.iter().map(|e| e.id).collect();
    let missing = written.iter().filter(|e| !ids.contains(&e.id)).count();
    assert_eq!(missing, 0, "events lost across the kill");
    let duplicates = events.len() - ids.len();
    assert!(
        duplicates <= BATCH,
        "only the killed batch may be published twice, got {duplicates} duplicates"
    );

    // Per aggregate, first deliveries come in version order.
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for e in &events {
        if !seen.insert(e.id) {
            continue;
        }
        let prev = last
            .insert(e.aggregate_id.clone(), e.aggregate_version)
            .unwrap_or(0);
        assert_eq!(
            e.aggregate_version,
            prev + 1,
            "aggregate {} out of order",
            e.aggregate_id
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE status = 'published'"
        ),
        written.len() as i64
    );
}

#[test]
fn sigterm_stops_the_relay_cleanly_and_leaves_no_claims() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("relay.db");
    let written = write_events(&db);
    let mut child = relay(&db, &[]);
    let lines = lines_of(&mut child, None);
    let mut received = 0;
    while received < 50 {
        lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the relay publishes");
        received += 1;
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let started = Instant::now();
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGTERM must be a clean stop: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(stderr.contains("relay stopped"), "{stderr}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE lease_id IS NOT NULL"
        ),
        0,
        "claims left behind"
    );
    let published = count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'published'",
    );
    let pending = count(&db, "SELECT count(*) FROM outbox WHERE status = 'pending'");
    assert_eq!(published + pending, written.len() as i64);
}
