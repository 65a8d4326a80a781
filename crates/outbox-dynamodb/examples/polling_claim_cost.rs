//! What a polling-shape claim costs as one aggregate's published history
//! grows, and how fast the relay drains a polling table, on DynamoDB Local
//! (or wherever the AWS variables point: it creates and deletes its own
//! tables).
//!
//! ```text
//! scripts/services start && eval "$(scripts/services env)"
//! cargo run -p outbox-dynamodb --example polling_claim_cost -- claims 1000,10000,100000
//! cargo run -p outbox-dynamodb --example polling_claim_cost -- drain 5000 100
//! ```
//!
//! Every DynamoDB call the store makes goes through a counting interceptor
//! that asks for `ReturnConsumedCapacity=TOTAL` and adds up, per claim, the
//! items each Query scanned (`ScannedCount`, before any filter), the items
//! GetItem/BatchGetItem returned, and the capacity units DynamoDB reported.
//!
//! The history is written in bulk with BatchWriteItem, item for item as the
//! store leaves a published event (and the aggregate's head item as a
//! writer leaves it); then a few events are appended through the library and
//! claimed, published, appended again, for several rounds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextMut,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::batch_get_item::{BatchGetItemInput, BatchGetItemOutput};
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemInput;
use aws_sdk_dynamodb::operation::delete_item::{DeleteItemInput, DeleteItemOutput};
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::{PutItemInput, PutItemOutput};
use aws_sdk_dynamodb::operation::query::{QueryInput, QueryOutput};
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsInput, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::operation::update_item::{UpdateItemInput, UpdateItemOutput};
use aws_sdk_dynamodb::types::{
    AttributeValue, ConsumedCapacity, PutRequest, ReturnConsumedCapacity, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use futures_util::{stream, StreamExt, TryStreamExt};
use outbox_core::publishers::NullPublisher;
use outbox_core::{ClaimRequest, ClaimSource, Event, Relay, RelayConfig, Settlements, Stats};
use outbox_dynamodb::{DynamoOutbox, PollingOutbox, Shape};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Capacity is counted in millionths of a unit, to add it up atomically.
const MICRO: f64 = 1_000_000.0;

/// What the store asked of DynamoDB, added up.
#[derive(Debug, Default)]
struct Meter {
    requests: AtomicU64,
    items_read: AtomicU64,
    read_units: AtomicU64,
    write_units: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    requests: u64,
    items_read: u64,
    read_units: f64,
    write_units: f64,
}

impl Meter {
    fn read(&self) -> Reading {
        Reading {
            requests: self.requests.load(Ordering::Relaxed),
            items_read: self.items_read.load(Ordering::Relaxed),
            read_units: self.read_units.load(Ordering::Relaxed) as f64 / MICRO,
            write_units: self.write_units.load(Ordering::Relaxed) as f64 / MICRO,
        }
    }

    fn add_capacity(&self, units: &AtomicU64, capacity: Option<&ConsumedCapacity>) {
        let used = capacity.and_then(|c| c.capacity_units()).unwrap_or(0.0);
        units.fetch_add((used * MICRO).round() as u64, Ordering::Relaxed);
    }
}

impl std::ops::Sub for Reading {
    type Output = Reading;
    fn sub(self, before: Reading) -> Reading {
        Reading {
            requests: self.requests - before.requests,
            items_read: self.items_read - before.items_read,
            read_units: self.read_units - before.read_units,
            write_units: self.write_units - before.write_units,
        }
    }
}

#[derive(Debug, Clone)]
struct Counting(Arc<Meter>);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "Counting"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let total = Some(ReturnConsumedCapacity::Total);
        let input = context.input_mut();
        if let Some(i) = input.downcast_mut::<QueryInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<GetItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<BatchGetItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<UpdateItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<PutItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<DeleteItemInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<TransactWriteItemsInput>() {
            i.return_consumed_capacity = total;
        } else if let Some(i) = input.downcast_mut::<BatchWriteItemInput>() {
            i.return_consumed_capacity = total;
        }
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let m = &self.0;
        m.requests.fetch_add(1, Ordering::Relaxed);
        let Ok(output) = context.output_or_error() else {
            return Ok(()); // a failed condition reads nothing we count
        };
        if let Some(o) = output.downcast_ref::<QueryOutput>() {
            m.items_read
                .fetch_add(o.scanned_count as u64, Ordering::Relaxed);
            m.add_capacity(&m.read_units, o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<GetItemOutput>() {
            m.items_read
                .fetch_add(u64::from(o.item().is_some()), Ordering::Relaxed);
            m.add_capacity(&m.read_units, o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<BatchGetItemOutput>() {
            let items: usize = o.responses().map_or(0, |r| r.values().map(Vec::len).sum());
            m.items_read.fetch_add(items as u64, Ordering::Relaxed);
            for c in o.consumed_capacity() {
                m.add_capacity(&m.read_units, Some(c));
            }
        } else if let Some(o) = output.downcast_ref::<UpdateItemOutput>() {
            m.add_capacity(&m.write_units, o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<PutItemOutput>() {
            m.add_capacity(&m.write_units, o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<DeleteItemOutput>() {
            m.add_capacity(&m.write_units, o.consumed_capacity());
        } else if let Some(o) = output.downcast_ref::<TransactWriteItemsOutput>() {
            for c in o.consumed_capacity() {
                m.add_capacity(&m.write_units, Some(c));
            }
        }
        Ok(())
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn event(aggregate_id: &str, version: u64) -> Result<Event, Failure> {
    Ok(Event::builder("Order", aggregate_id, version, "OrderUpdated")
        .payload(&serde_json::json!({ "order": aggregate_id, "version": version, "note": "x".repeat(200) }))
        .build()?)
}

/// Versions `1..=count` of `Order/<aggregate_id>`, published, as the store
/// leaves them, and its head item at `count`; 25 items per BatchWriteItem.
async fn write_history(
    client: &Client,
    table: &str,
    aggregate_id: &str,
    count: u64,
) -> Result<(), Failure> {
    let pk = format!("Order#{aggregate_id}");
    let now = chrono::Utc::now().timestamp_millis();
    let expires = now / 1000 + 7 * 24 * 3600;
    let mut items = Vec::with_capacity(count as usize + 1);
    items.push(
        PutRequest::builder()
            .item("pk", s(&pk))
            .item("sk", n(0))
            .item("version", n(count))
            .item("aggregate_type", s("Order"))
            .item("aggregate_id", s(aggregate_id))
            .build()?,
    );
    for version in 1..=count {
        let e = event(aggregate_id, version)?;
        // Written long ago, in version order.
        let created = now - 86_400_000 + version as i64;
        items.push(
            PutRequest::builder()
                .item("pk", s(&pk))
                .item("sk", n(version))
                .item("event", s(serde_json::to_string(&e)?))
                .item("event_id", s(e.id.to_string()))
                .item("status", s("published"))
                .item("position", n(created * 10_000))
                .item("created_at", n(created))
                .item("attempts", n(0))
                .item("published_at", n(created + 5))
                .item("expires_at", n(expires))
                .item("published_key", s("published"))
                .build()?,
        );
    }
    let batches: Vec<Vec<WriteRequest>> = items
        .chunks(25)
        .map(|chunk| {
            chunk
                .iter()
                .map(|p| WriteRequest::builder().put_request(p.clone()).build())
                .collect()
        })
        .collect();
    stream::iter(batches)
        .map(|mut batch| async move {
            // Unprocessed items are sent again until none are left.
            while !batch.is_empty() {
                let out = client
                    .batch_write_item()
                    .request_items(table, batch)
                    .send()
                    .await?;
                batch = out
                    .unprocessed_items()
                    .and_then(|u| u.get(table))
                    .cloned()
                    .unwrap_or_default();
            }
            Ok::<_, Failure>(())
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn new_table(client: &Client, prefix: &str) -> Result<DynamoOutbox, Failure> {
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let outbox = DynamoOutbox::new(client.clone(), name).shape(Shape::Polling);
    outbox.create_table_if_missing().await?;
    Ok(outbox)
}

async fn drop_table(outbox: &DynamoOutbox) {
    let _ = outbox
        .client()
        .delete_table()
        .table_name(outbox.table())
        .send()
        .await;
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// For each history size: `rounds` times, append `pending` events, claim
/// them (one claim), publish them; print what each claim read.
async fn claims(
    client: &Client,
    meter: &Meter,
    sizes: &[u64],
    pending: u64,
    rounds: u64,
) -> Result<(), Failure> {
    println!(
        "| history | round | claimed | items read | read units | write units | requests | ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &history in sizes {
        let outbox = new_table(client, "claim-cost").await?;
        let started = Instant::now();
        write_history(client, outbox.table(), "history", history).await?;
        eprintln!(
            "wrote {history} published events in {:.1} s (load {})",
            started.elapsed().as_secs_f64(),
            uptime()
        );
        let store = PollingOutbox::new(outbox.clone())?;
        let mut version = history;
        for round in 1..=rounds {
            outbox
                .transaction()
                .events(
                    (version + 1..=version + pending).map(|v| event("history", v).expect("event")),
                )
                .commit()
                .await?;
            version += pending;
            let before = meter.read();
            let started = Instant::now();
            let claimed = store
                .claim(ClaimRequest::new(500, Duration::from_secs(60)))
                .await?;
            let took = started.elapsed();
            let cost = meter.read() - before;
            println!(
                "| {history} | {round} | {} | {} | {:.1} | {:.1} | {} | {} |",
                claimed.len(),
                cost.items_read,
                cost.read_units,
                cost.write_units,
                cost.requests,
                took.as_millis()
            );
            if claimed.len() as u64 != pending {
                return Err(format!("claimed {} of {pending}", claimed.len()).into());
            }
            let mut settled = Settlements::default();
            settled.published = claimed.events.iter().map(|c| c.receipt.clone()).collect();
            store.settle(claimed.lease, settled).await?;
        }
        drop_table(&outbox).await;
    }
    Ok(())
}

/// `events` events over `aggregates` aggregates, one transaction per
/// aggregate, then one relay drain to a null publisher, timed.
async fn drain(
    client: &Client,
    meter: &Meter,
    events: u64,
    aggregates: u64,
) -> Result<(), Failure> {
    let outbox = new_table(client, "drain-rate").await?;
    let per_aggregate = events / aggregates;
    stream::iter(0..aggregates)
        .map(|a| {
            let outbox = outbox.clone();
            async move {
                let id = format!("a-{a}");
                let evs = (1..=per_aggregate)
                    .map(|v| event(&id, v))
                    .collect::<Result<Vec<_>, _>>()?;
                outbox.transaction().events(evs).commit().await?;
                Ok::<_, Failure>(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    let total = per_aggregate * aggregates;
    let store = PollingOutbox::new(outbox.clone())?;
    let relay = Relay::new(store.clone(), NullPublisher, RelayConfig::default())?;
    let load = uptime();
    let before = meter.read();
    let started = Instant::now();
    let report = relay.drain().await?;
    let took = started.elapsed().as_secs_f64();
    let cost = meter.read() - before;
    let stats = store.stats().await?;
    if report.published as u64 != total || stats.pending != 0 {
        return Err(format!("drained {report:?}, left {stats:?}").into());
    }
    println!("| events | aggregates | seconds | events/s | batches | requests | items read | read units | write units | load before |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {total} | {aggregates} | {took:.2} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {load} |",
        total as f64 / took,
        relay.metrics().batches.load(Ordering::Relaxed),
        cost.requests,
        cost.items_read,
        cost.read_units,
        cost.write_units,
    );
    drop_table(&outbox).await;
    Ok(())
}

fn numbers(arg: Option<&String>, default: &[u64]) -> Result<Vec<u64>, Failure> {
    match arg {
        None => Ok(default.to_vec()),
        Some(list) => list
            .split(',')
            .map(|v| v.trim().parse::<u64>().map_err(Failure::from))
            .collect(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let meter = Arc::new(Meter::default());
    let config = outbox_aws::load_config().await;
    let client = Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&config)
            .interceptor(Counting(meter.clone()))
            .build(),
    );
    println!("load: {}", uptime());
    match args.first().map(String::as_str) {
        Some("claims") => {
            let sizes = numbers(args.get(1), &[1_000, 10_000, 100_000])?;
            let pending = numbers(args.get(2), &[10])?[0];
            let rounds = numbers(args.get(3), &[3])?[0];
            claims(&client, &meter, &sizes, pending, rounds).await?;
        }
        Some("drain") => {
            let events = numbers(args.get(1), &[5_000])?[0];
            let aggregates = numbers(args.get(2), &[100])?[0].max(1);
            drain(&client, &meter, events, aggregates).await?;
        }
        _ => {
            eprintln!("usage: polling_claim_cost claims [SIZES [PENDING [ROUNDS]]] | drain [EVENTS [AGGREGATES]]");
            std::process::exit(2);
        }
    }
    println!("load: {}", uptime());
    Ok(())
}
