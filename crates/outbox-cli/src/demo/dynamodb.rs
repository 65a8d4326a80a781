//! The demo's services on DynamoDB, as seed 001 draws them: the Order
//! service writes the order and its events with one `TransactWriteItems`, the
//! relay reads the outbox table's stream, and the Shipping service applies
//! deliveries through an inbox kept in its own `TransactWriteItems`.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use orders::store::dynamodb::{DynamoOrders, DynamoShipments, DynamoShipping};
use orders::store::ShipmentStore;
use outbox_core::{DeadLetters, Event, EventId, Stats, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, StreamSource};

use super::shop::{self, Audit, NewOrder, Shipped, Shop};

const CONSUMER: &str = orders::SHIPPING_CONSUMER;

/// The demo's tables, all named after the outbox table.
#[derive(Debug, Clone)]
pub struct DynamoShop {
    client: Client,
    streams: aws_sdk_dynamodbstreams::Client,
    orders: DynamoOrders,
    shipping: DynamoShipping,
    source: StreamSource,
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
        let orders = DynamoOrders::new(
            client.clone(),
            format!("{table}-orders"),
            DynamoOutbox::new(client.clone(), table),
        );
        orders.create_tables_if_missing().await?;
        let source = stream_source(&client, &streams, table);
        source.create_tables_if_missing().await?;
        let shipments = DynamoShipments::new(client.clone(), format!("{table}-shipments"));
        shipments.create_table_if_missing().await?;
        let inbox = DynamoInbox::new(client.clone(), format!("{table}-inbox"));
        inbox.create_table_if_missing().await?;
        let existing = client
            .scan()
            .table_name(orders.table())
            .limit(1)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("Scan", e))?;
        if existing.count() > 0 {
            return Err(StoreError::Config(format!(
                "table {} already holds orders; the demo needs fresh tables (name another outbox table)",
                orders.table()
            )));
        }
        Ok(Self {
            client,
            streams,
            orders,
            shipping: DynamoShipping::new(shipments, inbox),
            source,
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
            self.orders.outbox().table(),
        ))
    }

    async fn place_order(&self, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
        shop::place(&self.orders, order).await
    }

    async fn cancel_order(&self, order_id: &str) -> Result<Option<Event>, StoreError> {
        shop::cancel(&self.orders, order_id).await
    }

    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        self.shipping.ship(events).await
    }

    async fn audit(&self, written: &HashSet<EventId>) -> Result<Audit, StoreError> {
        let orders = self.scan_all(self.orders.table()).await?.len() as u64;
        let inbox = self.scan_all(self.shipping.inbox().table()).await?;
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
            .scan_all(self.orders.outbox().table())
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
