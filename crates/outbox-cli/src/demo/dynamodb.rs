//! The demo's services on DynamoDB, as seed 001 draws them: the Order
//! service writes the order and its events with one `TransactWriteItems`, the
//! relay reads the outbox table's stream, and the Shipping service applies
//! deliveries through an inbox kept in its own `TransactWriteItems`.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, Update,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{DeadLetters, Event, EventId, Inbox, Seen, Stats, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, StreamSource, TransactError};

use super::shop::{cancelled, shipment_status, Audit, NewOrder, Shipped, Shop};

const CONSUMER: &str = "shipping";

/// The demo's tables, all named after the outbox table.
#[derive(Debug, Clone)]
pub struct DynamoShop {
    client: Client,
    streams: aws_sdk_dynamodbstreams::Client,
    outbox: DynamoOutbox,
    source: StreamSource,
    orders: String,
    shipments: String,
    inbox: DynamoInbox,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl DynamoShop {
    /// Creates whatever is missing: the outbox table with its stream, the
    /// relay's checkpoint and dead-letter tables, the orders, shipments and
    /// inbox tables. Refuses an orders table that already holds orders, so
    /// the summary can be checked against the tables afterwards.
    pub async fn open(table: &str) -> Result<Self, StoreError> {
        let config = outbox_aws::load_config().await;
        let client = Client::new(&config);
        let streams = aws_sdk_dynamodbstreams::Client::new(&config);
        let outbox = DynamoOutbox::new(client.clone(), table);
        let source = stream_source(&client, &streams, table);
        outbox.create_table_if_missing().await?;
        source.create_tables_if_missing().await?;
        let orders = format!("{table}-orders");
        let shipments = format!("{table}-shipments");
        create_keyed_table(&client, &orders, "id").await?;
        create_keyed_table(&client, &shipments, "order_id").await?;
        let inbox = DynamoInbox::new(client.clone(), format!("{table}-inbox"));
        inbox.create_table_if_missing().await?;
        let existing = client
            .scan()
            .table_name(&orders)
            .limit(1)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("Scan", e))?;
        if existing.count() > 0 {
            return Err(StoreError::Config(format!(
                "table {orders} already holds orders; the demo needs fresh tables (name another outbox table)"
            )));
        }
        Ok(Self {
            client,
            streams,
            outbox,
            source,
            orders,
            shipments,
            inbox,
        })
    }

    /// Every item of a demo table. A Scan is fine here: the audit reads
    /// everything once, at the end; the relay never scans.
    async fn scan_all(
        &self,
        table: &str,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Scan", e))?;
            items.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(items);
            }
        }
    }
}

async fn create_keyed_table(client: &Client, name: &str, key: &str) -> Result<(), StoreError> {
    let exists = client.describe_table().table_name(name).send().await;
    if exists.is_ok() {
        return Ok(());
    }
    let attr = AttributeDefinition::builder()
        .attribute_name(key)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| StoreError::Config(e.to_string()))?;
    let schema = KeySchemaElement::builder()
        .attribute_name(key)
        .key_type(KeyType::Hash)
        .build()
        .map_err(|e| StoreError::Config(e.to_string()))?;
    let created = client
        .create_table()
        .table_name(name)
        .attribute_definitions(attr)
        .key_schema(schema)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await;
    match created {
        Ok(_) => Ok(()),
        // Another process made it in the meantime.
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(outbox_aws::store_error("CreateTable", e)),
    }
}

/// How long a killed relay keeps the stream: the next one waits this out,
/// as it would after a real crash.
const RELAY_LEASE: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream reader resuming from the checkpoints the last relay left.
fn stream_source(
    client: &Client,
    streams: &aws_sdk_dynamodbstreams::Client,
    table: &str,
) -> StreamSource {
    StreamSource::new(client.clone(), streams.clone(), table)
        .lease_ttl(RELAY_LEASE)
        .wait_for_lease(true)
}

fn built<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Config(format!("cannot build request: {e}")))
}

impl Shop for DynamoShop {
    type Outbox = StreamSource;

    fn outbox(&self) -> StreamSource {
        self.source.clone()
    }

    /// A relay started after a crash first waits out the dead one's lease
    /// on the stream; each then works a second or two before it is killed.
    fn relay_lifetime_ms(&self) -> std::ops::Range<u64> {
        let lease = RELAY_LEASE.as_millis() as u64;
        lease + 1000..lease + 3000
    }

    async fn relay_source(&self) -> Result<StreamSource, StoreError> {
        Ok(stream_source(
            &self.client,
            &self.streams,
            self.outbox.table(),
        ))
    }

    async fn place_order(&self, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
        let events = order.events()?;
        let put = built(
            Put::builder()
                .table_name(&self.orders)
                .item("id", s(&order.id))
                .item("customer", s(&order.customer))
                .item("total_cents", n(order.total_cents))
                .item("items", n(order.items))
                .item("status", s(if order.paid { "paid" } else { "created" }))
                .item("version", n(events.len()))
                .condition_expression("attribute_not_exists(id)")
                .build(),
        )?;
        self.outbox
            .transaction()
            .put(put)
            .events(events.clone())
            .commit()
            .await?;
        Ok(events)
    }

    async fn cancel_order(&self, order_id: &str) -> Result<Option<Event>, StoreError> {
        let current = self
            .client
            .get_item()
            .table_name(&self.orders)
            .key("id", s(order_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        let Some(item) = current.item else {
            return Ok(None);
        };
        if matches!(item.get("status"), Some(AttributeValue::S(st)) if st == "cancelled") {
            return Ok(None);
        }
        let version: u64 = match item.get("version") {
            Some(AttributeValue::N(v)) => v
                .parse()
                .map_err(|_| StoreError::Config(format!("order {order_id}: bad version {v}")))?,
            _ => {
                return Err(StoreError::Config(format!(
                    "order {order_id} has no version"
                )))
            }
        };
        let event = cancelled(order_id, version + 1)?;
        let update = built(
            Update::builder()
                .table_name(&self.orders)
                .key("id", s(order_id))
                .update_expression("SET #status = :cancelled, version = :next")
                .condition_expression("version = :current AND #status <> :cancelled")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":cancelled", s("cancelled"))
                .expression_attribute_values(":next", n(version + 1))
                .expression_attribute_values(":current", n(version))
                .build(),
        )?;
        match self
            .outbox
            .transaction()
            .update(update)
            .events([event.clone()])
            .commit()
            .await
        {
            Ok(()) => Ok(Some(event)),
            // Cancelled or changed since it was read: nothing to do this time.
            Err(TransactError::EntityCondition { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        // One transaction per delivery: DynamoDB refuses two actions on one
        // item in a transaction, and two events of an order may arrive together.
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            outcomes.push(self.ship_one(event).await?);
        }
        Ok(outcomes)
    }

    async fn audit(&self, written: &HashSet<EventId>) -> Result<Audit, StoreError> {
        let orders = self.scan_all(&self.orders).await?.len() as u64;
        let inbox = self.scan_all(self.inbox.table()).await?;
        let delivered: HashSet<String> = inbox
            .iter()
            .filter(|i| matches!(i.get("pk"), Some(AttributeValue::S(c)) if c == CONSUMER))
            .filter_map(|i| match i.get("sk") {
                Some(AttributeValue::S(id)) => Some(id.clone()),
                _ => None,
            })
            .collect();
        let dead: HashSet<String> = self
            .source
            .dead_letters(usize::MAX)
            .await?
            .into_iter()
            .map(|d| d.reference)
            .collect();
        // The outbox keeps one item per order whose version counts its events.
        let events_written: u64 = self
            .scan_all(self.outbox.table())
            .await?
            .iter()
            .filter_map(|i| match i.get("version") {
                Some(AttributeValue::N(v)) => v.parse::<u64>().ok(),
                _ => None,
            })
            .sum();
        let stats = self.source.stats().await?;
        let lost = written
            .iter()
            .map(EventId::to_string)
            .filter(|id| !delivered.contains(id) && !dead.contains(id))
            .count() as u64;
        Ok(Audit {
            orders,
            events_written,
            published: None,
            dead: stats.dead,
            delivered_unique: delivered.len() as u64,
            lost,
        })
    }
}

impl DynamoShop {
    async fn ship_one(&self, event: &Event) -> Result<Shipped, StoreError> {
        let mut tx = self.outbox.transaction();
        if self.inbox.record(&mut tx, CONSUMER, event.id).await? == Seen::Duplicate {
            return Ok(Shipped::Duplicate);
        }
        let current = self
            .client
            .get_item()
            .table_name(&self.shipments)
            .key("order_id", s(&event.aggregate_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        let applied: u64 = match current.item.as_ref().and_then(|i| i.get("order_version")) {
            Some(AttributeValue::N(v)) => v.parse().unwrap_or(0),
            _ => 0,
        };
        let version = event.aggregate_version;
        if version <= applied {
            // Recorded in the inbox all the same, so a redelivery is a duplicate.
            return match tx.commit().await {
                Ok(()) => Ok(Shipped::OutOfOrder),
                Err(TransactError::InboxDuplicate { .. }) => Ok(Shipped::Duplicate),
                Err(e) => Err(e.into()),
            };
        }
        let condition = if applied == 0 {
            "attribute_not_exists(order_id)"
        } else {
            "order_version = :applied"
        };
        let mut update = Update::builder()
            .table_name(&self.shipments)
            .key("order_id", s(&event.aggregate_id))
            .update_expression("SET #status = :status, order_version = :version")
            .condition_expression(condition)
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":status", s(shipment_status(&event.event_type)))
            .expression_attribute_values(":version", n(version));
        if applied > 0 {
            update = update.expression_attribute_values(":applied", n(applied));
        }
        tx = tx.update(built(update.build())?);
        match tx.commit().await {
            Ok(()) => Ok(if version == applied + 1 {
                Shipped::Applied
            } else {
                Shipped::AppliedAfterGap
            }),
            Err(TransactError::InboxDuplicate { .. }) => Ok(Shipped::Duplicate),
            Err(e) => Err(e.into()),
        }
    }
}
