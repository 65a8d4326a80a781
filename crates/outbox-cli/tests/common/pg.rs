//! What the PostgreSQL + broker tests share: service addresses, throwaway
//! schemas and streams, reading a JetStream stream back, relay processes.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::cloudevents;
use outbox_core::{Event, EventId};
use outbox_nats::async_nats::{self, jetstream};
use outbox_postgres::PostgresOutbox;

pub fn postgres_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub const NATS: &str = "nats://127.0.0.1:4222";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name no other test uses: lower case, valid as a schema, a stream and a
/// subject token.
pub fn unique(prefix: &str) -> String {
    let id = EventId::new().as_uuid().simple().to_string();
    format!("{prefix}_{}", &id[id.len() - 12..])
}

/// Connects to the test database with the outbox in `schema`.
pub async fn outbox(schema: &str) -> PostgresOutbox {
    PostgresOutbox::connect(&postgres_url())
        .await
        .expect("connect to PostgreSQL")
        .schema(schema)
        .expect("schema name")
}

/// One number from the test database.
pub async fn count(outbox: &PostgresOutbox, sql: &str) -> i64 {
    let sql = sql.replace("{s}", &format!("\"{}\"", outbox.schema_name()));
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
        .fetch_one(outbox.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub async fn drop_schema(schema: &str) {
    if let Ok(outbox) = PostgresOutbox::connect(&postgres_url()).await {
        let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(outbox.pool())
            .await;
    }
}

pub async fn jetstream() -> jetstream::Context {
    jetstream::new(async_nats::connect(NATS).await.expect("connect to NATS"))
}

/// Every message of `stream` in stream order, as events, waiting up to
/// `timeout` for at least `want` of them.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    want: usize,
    timeout: Duration,
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut handle = js.get_stream(stream).await.expect("stream");
    while Instant::now() < deadline {
        let stored = handle.info().await.expect("stream info").state.messages;
        if stored as usize >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = handle
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut events = Vec::new();
    for sequence in 1..=last {
        let Ok(message) = handle.get_raw_message(sequence).await else {
            continue;
        };
        let body = std::str::from_utf8(&message.payload).expect("UTF-8 body");
        events.push(cloudevents::from_json(body).expect("a CloudEvent").event);
    }
    events
}

/// Messages stored in `stream` so far.
pub async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// First deliveries in each aggregate come in version order, 1, 2, 3...;
/// returns the distinct event ids.
pub fn assert_in_order(events: &[Event]) -> HashSet<EventId> {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in events {
        if !seen.insert(e.id) {
            continue;
        }
        let prev = last
            .insert(&e.aggregate_id, e.aggregate_version)
            .unwrap_or(0);
        assert_eq!(
            e.aggregate_version,
            prev + 1,
            "aggregate {} out of order: version {} after {prev}",
            e.aggregate_id,
            e.aggregate_version
        );
    }
    seen
}

/// `outbox relay` as a process of its own, its output in a log file.
pub fn relay(store: &str, to: &str, extra: &[&str], log: &std::path::Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("relay log");
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["relay", "--store", store, "--to", to])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start relay")
}

/// SIGTERM, then waits: the relay must stop cleanly within ten seconds.
pub fn stop(mut child: Child, log: &std::path::Path) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(
                status.success(),
                "SIGTERM must be a clean stop: {status}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return;
        }
        assert!(Instant::now() < deadline, "the relay did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
