//! Plans that no statistics can break. The server's `auto_explain` reports
//! the plan of every statement the store runs (those inside its functions
//! included) to the store's own connections, as they run; this test reads
//! them while writers and relays work, after `ANALYZE` of empty tables and
//! after `ANALYZE` in the middle of a backlog, and requires each one to
//! reach the outbox's tables by key:
//!
//! - no sequential scan of `outbox`, `outbox_queue`, `outbox_dead`,
//!   `outbox_aggregates` or `outbox_published`;
//! - every index scan of them has an index condition, but for the claim's
//!   walk of the queue in position order, which must stop at a limit;
//! - no hash or merge join, and no sort, over them.
//!
//! (`outbox_leases` and `outbox_wake` hold a row per relay: scanning them
//! is bounded by the relays, not by the events.)

mod common;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::DropSchema;
use outbox_core::{
    DeadLetterPolicy, Event, PublishError, PublishRequest, PublishResult, Publisher, Relay,
    RelayConfig, Stats,
};
use outbox_postgres::PostgresOutbox;
use outbox_testkit::order_event;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::AssertSqlSafe;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The outbox's tables whose size grows with the events.
const BY_KEY: &[&str] = &[
    "outbox",
    "outbox_queue",
    "outbox_dead",
    "outbox_aggregates",
    "outbox_published",
];

/// The plans reported to this process's connections, as JSON.
#[derive(Clone, Default)]
struct Plans(Arc<Mutex<Vec<Value>>>);

impl Plans {
    fn take(&self) -> Vec<Value> {
        self.0
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }
}

struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Plans {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "sqlx::postgres::notice" {
            return;
        }
        let mut message = Message(None);
        event.record(&mut message);
        // "duration: 0.012 ms  plan:\n{...}"
        let Some(json) = message.0.as_deref().and_then(|m| m.split_once("plan:")) else {
            return;
        };
        if let (Ok(plan), Ok(mut plans)) = (serde_json::from_str::<Value>(json.1), self.0.lock()) {
            plans.push(plan);
        }
    }
}

/// A store whose connections have every plan reported to them.
async fn explained(schema: &str) -> PostgresOutbox {
    let options = PgConnectOptions::from_str(&common::url())
        .expect("url")
        .options([
            ("session_preload_libraries", "auto_explain"),
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
            ("client_min_messages", "notice"),
        ]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect");
    PostgresOutbox::from_pool(pool)
        .schema(schema)
        .expect("schema")
        .dead_letter_policy(DeadLetterPolicy::Park)
}

/// Fails one event in five once, and the events of type `Poison` for good:
/// retries, backoffs and dead letters all run.
#[derive(Clone, Default)]
struct Flaky(Arc<Mutex<std::collections::HashSet<outbox_core::EventId>>>);

impl Publisher for Flaky {
    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let Ok(mut failed) = self.0.lock() else {
            return Vec::new();
        };
        request
            .events
            .iter()
            .map(|e| {
                if e.event_type == "Poison" {
                    Err(PublishError::permanent("poison"))
                } else if e.aggregate_version % 5 == 3 && failed.insert(e.id) {
                    Err(PublishError::transient("once"))
                } else {
                    Ok(())
                }
            })
            .collect()
    }
}

/// Checks one plan tree; `limited` is whether a Limit is above this node.
fn check(node: &Value, limited: bool, query: &str, problems: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or_default();
    let relation = node["Relation Name"].as_str().unwrap_or_default();
    let on_events = BY_KEY.contains(&relation);
    let mut complain = |what: &str| {
        problems.push(format!(
            "{what} in: {}",
            query.split_whitespace().collect::<Vec<_>>().join(" ")
        ))
    };
    if on_events {
        match kind {
            "Seq Scan" => complain(&format!("sequential scan of {relation}")),
            "Index Scan" | "Index Only Scan" if node.get("Index Cond").is_none() => {
                let walk = relation == "outbox_queue"
                    && node["Index Name"].as_str() == Some("outbox_queue_pkey")
                    && limited;
                if !walk {
                    complain(&format!("index scan of {relation} without a key"));
                }
            }
            _ => {}
        }
    }
    let children = node["Plans"].as_array().cloned().unwrap_or_default();
    let touches_events = |n: &Value| {
        let text = n.to_string();
        BY_KEY
            .iter()
            .any(|t| text.contains(&format!("\"Relation Name\":\"{t}\"")))
    };
    if matches!(kind, "Hash Join" | "Merge Join" | "Sort") && touches_events(node) {
        complain(&format!("{kind} over the outbox's tables"));
    }
    let limited = limited || kind == "Limit";
    for child in &children {
        check(child, limited, query, problems);
    }
}

fn check_all(plans: &[Value], phase: &str) {
    let mut problems = Vec::new();
    let mut on_events = 0;
    for plan in plans {
        let query = plan["Query Text"].as_str().unwrap_or_default();
        if BY_KEY.iter().any(|t| {
            plan["Plan"]
                .to_string()
                .contains(&format!("\"Relation Name\":\"{t}\""))
        }) {
            on_events += 1;
        }
        check(&plan["Plan"], false, query, &mut problems);
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{phase}:\n{}", problems.join("\n"));
    // The capture works: the claims, settlements and appends were seen.
    assert!(
        on_events > 20,
        "{phase}: only {on_events} plans on the outbox's tables"
    );
}

async fn analyze(outbox: &PostgresOutbox) {
    let s = outbox.schema_name();
    for table in BY_KEY.iter().chain(&["outbox_leases"]) {
        sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE \"{s}\".{table}")))
            .execute(outbox.pool())
            .await
            .expect("analyze");
    }
}

/// `aggregates` aggregates of `per` events each, one transaction per
/// aggregate, half carried by the commit and half by the statement; one
/// aggregate in ten starts with an event no target takes.
async fn backlog(outbox: &PostgresOutbox, run: &str, aggregates: usize, per: u64) {
    for a in 0..aggregates {
        let key = format!("{run}-{a}");
        let events: Vec<Event> = (1..=per)
            .map(|v| {
                let kind = if a % 10 == 0 && v == 1 {
                    "Poison"
                } else {
                    "OrderUpdated"
                };
                order_event(&key, v, kind)
            })
            .collect();
        if a % 2 == 0 {
            let mut tx = outbox.begin().await.expect("begin");
            tx.append(&events).expect("append");
            tx.commit().await.expect("commit");
        } else {
            let mut tx = outbox.pool().begin().await.expect("begin");
            outbox.append(&mut tx, &events).await.expect("append");
            tx.commit().await.expect("commit");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hot_statement_goes_by_key_after_any_analyze() {
    let plans = Plans::default();
    let subscriber = tracing_subscriber::registry().with(plans.clone());
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let schema = common::unique_schema("plans");
    let _drop = DropSchema(schema.clone());
    let plain = PostgresOutbox::from_pool(common::pool(&common::url(), 2).await)
        .schema(&schema)
        .expect("schema")
        .dead_letter_policy(DeadLetterPolicy::Park);
    plain.migrate().await.expect("migrate");
    let outbox = explained(&schema).await;
    let mut config = RelayConfig::default()
        .batch_size(100)
        .idle_poll(Duration::from_millis(20))
        .max_attempts(3);
    config.retry.initial = Duration::from_millis(5);
    config.retry.max_delay = Duration::from_millis(20);
    let relay = Relay::new(outbox.clone(), Flaky::default(), config).expect("relay");

    // 1. Statistics taken while every table was empty, as a routine ANALYZE
    // or autovacuum takes them just before a backlog arrives.
    analyze(&plain).await;
    plans.take();
    backlog(&outbox, "a", 300, 3).await;
    drain_all(&relay, &plain).await;
    check_all(&plans.take(), "after ANALYZE of empty tables");

    // 2. Statistics taken in the middle of a backlog.
    backlog(&outbox, "b", 300, 3).await;
    relay.run_once().await.expect("one batch");
    analyze(&plain).await;
    plans.take();
    backlog(&outbox, "c", 100, 3).await;
    drain_all(&relay, &plain).await;
    check_all(&plans.take(), "after ANALYZE mid-backlog");

    // The poison events, one per tenth aggregate, each parking two more.
    let s = plain.stats().await.expect("stats");
    assert_eq!((s.dead, s.pending), (70, 140), "{s:?}");
}

/// Drains until nothing is pending but the aggregates parked behind their
/// dead letters (the retries back off for a few milliseconds).
async fn drain_all(relay: &Relay<PostgresOutbox, Flaky>, plain: &PostgresOutbox) {
    for _ in 0..500 {
        relay.drain().await.expect("drain");
        let s = plain.stats().await.expect("stats");
        // Each poisoned aggregate parks its two later events.
        if s.pending <= 2 * s.dead {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the backlog did not drain");
}

/// The aggregate key, computed for every appended and hand-written row, is
/// inlined into the statements that use it: PostgreSQL inlines a SQL
/// function only when its body is as immutable as it is declared, and runs
/// one that is not as a call with an executor of its own per row (the
/// key's `int || text`, only STABLE, once cost every append about 40 us).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregate_key_is_inlined() {
    let outbox = common::outbox("inline", 2).await;
    let _drop = DropSchema(outbox.schema_name().to_owned());
    let schema = outbox.schema_name();
    let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (VERBOSE, COSTS OFF)
         SELECT \"{schema}\".outbox_aggregate_key(aggregate_type, aggregate_id)
         FROM \"{schema}\".outbox"
    )))
    .fetch_all(outbox.pool())
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(
        plan.contains("hashtextextended") && !plan.contains("outbox_aggregate_key"),
        "{plan}"
    );
}
