//! The `outbox` command on a PostgreSQL store, publishing to the NATS and
//! RabbitMQ servers on this machine: migrate, relay once, status and dead
//! letters, each test in a schema of its own that is dropped at the end.

use std::process::Output;

use outbox_core::{Event, EventId};
use outbox_nats::async_nats;
use outbox_postgres::PostgresOutbox;
use outbox_rabbitmq::lapin;
use serde_json::Value;

mod common;
use common::{last_json_line, outbox};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

fn postgres_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

const NATS: &str = "nats://127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672";

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", EventId::new().as_uuid().simple())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `outbox` and fails the test, showing its output, unless it succeeds.
fn outbox_ok(args: &[&str]) -> Output {
    let out = outbox(args);
    assert!(
        out.status.success(),
        "outbox {args:?} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// A schema of the test database for one test, dropped when the test ends
/// (passed or failed).
struct Schema {
    name: String,
}

impl Schema {
    fn new() -> Self {
        Self {
            name: unique("cli"),
        }
    }

    /// The store URL the command is given.
    fn store(&self) -> String {
        format!("{}?schema={}", postgres_url(), self.name)
    }

    /// Appends `events` in one transaction, as a service does.
    fn write(&self, events: &[Event]) {
        runtime().block_on(async {
            let outbox = PostgresOutbox::connect(&postgres_url())
                .await
                .expect("connect")
                .schema(&self.name)
                .expect("schema");
            let mut tx = outbox.pool().begin().await.expect("begin");
            outbox.append(&mut tx, events).await.expect("append");
            tx.commit().await.expect("commit");
        });
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        runtime().block_on(async {
            if let Ok(outbox) = PostgresOutbox::connect(&postgres_url()).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(outbox.pool())
                    .await;
            }
        });
    }
}

/// Two orders: one created and paid, one created.
fn orders() -> Vec<Event> {
    let event = |id: &str, version, kind: &str| {
        Event::builder("Order", id, version, kind)
            .payload(&serde_json::json!({ "order": id }))
            .build()
            .expect("event")
    };
    vec![
        event("o-1", 1, "OrderCreated"),
        event("o-1", 2, "OrderPaid"),
        event("o-2", 1, "OrderCreated"),
    ]
}

fn status(store: &str) -> Value {
    last_json_line(&outbox_ok(&["status", "--store", store, "--json"]))
}

#[test]
fn migrate_then_relay_once_to_nats_and_status_shows_them_published() {
    let schema = Schema::new();
    let store = schema.store();

    // Nothing is created implicitly: the user is told what to run.
    let out = outbox(&["status", "--store", &store]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no outbox tables") && err.contains("outbox migrate --store"),
        "{err}"
    );

    // Migrating twice is fine.
    for _ in 0..2 {
        let out = outbox_ok(&["migrate", "--store", &store]);
        assert!(
            stdout(&out).contains(&format!("schema `{}` is at version", schema.name)),
            "{}",
            stdout(&out)
        );
    }
    let s = status(&store);
    assert_eq!(
        (s["pending"].as_u64(), s["published"].as_u64()),
        (Some(0), Some(0))
    );

    schema.write(&orders());
    let s = status(&store);
    assert_eq!(s["pending"], 3, "{s}");

    // A stream and subjects of this test's own: JetStream refuses two
    // streams taking the same subjects.
    let stream = unique("CLI");
    let subject = format!("{stream}.{{aggregatetype}}.{{type}}");
    let target = format!("{NATS}?stream={stream}&subject={subject}");
    outbox_ok(&["relay", "--once", "--store", &store, "--to", &target]);

    let s = status(&store);
    assert_eq!(
        (s["pending"].as_u64(), s["published"].as_u64()),
        (Some(0), Some(3)),
        "{s}"
    );

    // Nothing left to send: a second run publishes nothing more.
    outbox_ok(&["relay", "--once", "--store", &store, "--to", &target]);

    runtime().block_on(async {
        let client = async_nats::connect(NATS).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let mut found = js
            .get_stream(&stream)
            .await
            .expect("the relay made the stream");
        let info = found.info().await.expect("stream info");
        let subjects = &info.config.subjects;
        let messages = info.state.messages;
        js.delete_stream(&stream).await.expect("delete stream");
        assert_eq!(subjects, &vec![format!("{stream}.*.*")]);
        assert_eq!(messages, 3);
    });
}

/// A broker connection with a topic exchange named `exchange`, declared as
/// the publisher declares it, deleted on drop.
struct Rabbit {
    connection: Connection,
    channel: lapin::Channel,
    exchange: String,
}

impl Rabbit {
    async fn new(exchange: &str) -> Self {
        let connection =
            Connection::connect(&format!("{AMQP}/%2f"), ConnectionProperties::default())
                .await
                .expect("rabbitmq");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        Self {
            connection,
            channel,
            exchange: exchange.to_owned(),
        }
    }

    /// An exclusive queue bound to every routing key of the exchange.
    async fn queue(&self) -> String {
        let queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        let name = queue.name().as_str().to_owned();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        name
    }

    async fn message_count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue")
            .message_count()
    }

    async fn delete(self) {
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[test]
fn relay_once_to_rabbitmq_delivers_to_a_bound_queue() {
    let schema = Schema::new();
    let store = schema.store();
    outbox_ok(&["migrate", "--store", &store]);
    schema.write(&orders());

    let exchange = unique("cli.events");
    let rt = runtime();
    let rabbit = rt.block_on(Rabbit::new(&exchange));
    let queue = rt.block_on(rabbit.queue());

    let target = format!("{AMQP}?exchange={exchange}");
    outbox_ok(&["relay", "--once", "--store", &store, "--to", &target]);

    let delivered = rt.block_on(rabbit.message_count(&queue));
    rt.block_on(rabbit.delete());
    assert_eq!(delivered, 3);
    let s = status(&store);
    assert_eq!(
        (s["pending"].as_u64(), s["published"].as_u64()),
        (Some(0), Some(3)),
        "{s}"
    );
}

#[test]
fn dead_letters_are_listed_replayed_and_skipped_on_postgres() {
    let schema = Schema::new();
    let store = schema.store();
    outbox_ok(&["migrate", "--store", &store]);
    schema.write(&orders()[..1]);

    // No queue is bound: RabbitMQ returns the message, and the event
    // fails for good.
    let exchange = unique("cli.unbound");
    let rt = runtime();
    let rabbit = rt.block_on(Rabbit::new(&exchange));
    let target = format!("{AMQP}?exchange={exchange}");
    outbox_ok(&["relay", "--once", "--store", &store, "--to", &target]);
    rt.block_on(rabbit.delete());

    let s = status(&store);
    assert_eq!(
        (s["dead"].as_u64(), s["pending"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    let out = outbox(&["status", "--store", &store, "--fail-on-dead"]);
    assert!(!out.status.success(), "{}", stdout(&out));

    let out = outbox_ok(&["dead-letters", "list", "--store", &store, "--json"]);
    let letter = last_json_line(&out);
    assert_eq!(letter["event"]["event_type"], "OrderCreated", "{letter}");
    let error = letter["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("unroutable"), "{letter}");
    let id = letter["event"]["id"].as_str().expect("event id").to_owned();

    let out = outbox_ok(&["dead-letters", "list", "--store", &store]);
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));
    // A list cut short says so, and how to see the rest.
    let out = outbox_ok(&["dead-letters", "list", "--store", &store, "--limit", "0"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("0 of 1 dead letter(s) shown; pass --limit 1 to see them all"),
        "{said}"
    );

    let out = outbox_ok(&["dead-letters", "replay", "--store", &store, "--id", &id]);
    assert!(stdout(&out).contains("replayed 1"), "{}", stdout(&out));
    let s = status(&store);
    assert_eq!(
        (s["dead"].as_u64(), s["pending"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );

    // Dead again, then given up on.
    let rabbit = rt.block_on(Rabbit::new(&exchange));
    outbox_ok(&["relay", "--once", "--store", &store, "--to", &target]);
    rt.block_on(rabbit.delete());
    let out = outbox_ok(&["dead-letters", "skip", "--store", &store, "--all"]);
    assert!(stdout(&out).contains("skipped 1"), "{}", stdout(&out));
    let out = outbox_ok(&["dead-letters", "list", "--store", &store, "--json"]);
    assert_eq!(stdout(&out).trim(), "");
}

#[test]
fn unreachable_targets_and_bad_urls_fail_the_start_naming_the_url() {
    let schema = Schema::new();
    let store = schema.store();
    outbox_ok(&["migrate", "--store", &store]);

    for (target, says) in [
        ("nats://127.0.0.1:1", "cannot connect to NATS"),
        (
            "amqp://guest:guest@127.0.0.1:1",
            "cannot connect to RabbitMQ",
        ),
        (
            "amqp://guest:s3cr3t-pw@127.0.0.1:5672",
            "target amqp://guest:***@127.0.0.1:5672",
        ),
        ("nats://127.0.0.1:4222?subject=events.>", "subject template"),
    ] {
        let out = outbox(&["relay", "--once", "--store", &store, "--to", target]);
        assert!(!out.status.success(), "{target}");
        let err = stderr(&out);
        assert!(err.contains(says), "{target}: {err}");
        assert!(!err.contains("s3cr3t-pw"), "the password is shown: {err}");
    }

    let out = outbox(&["status", "--store", "postgres://postgres@127.0.0.1:5432"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("names no database"),
        "{}",
        stderr(&out)
    );

    // SQLite has nothing to migrate by hand.
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", dir.path().join("x.db").display());
    let out = outbox_ok(&["migrate", "--store", &sqlite]);
    assert!(
        stdout(&out).contains("when it is opened"),
        "{}",
        stdout(&out)
    );
}
