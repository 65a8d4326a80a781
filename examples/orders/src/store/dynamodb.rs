//! Both services on DynamoDB, as seed 001 draws them: the Order service puts
//! the order into its table and its events into the outbox item with one
//! `TransactWriteItems` (stream shape); the Shipping service updates the
//! shipment and records the event in its inbox with another.
//!
//! Tables (key attribute, all strings): orders `id`; shipments `order_id`;
//! the outbox, inbox and dead letters as `outbox-dynamodb` creates them.
//! Order items: `id`, `customer_id`, `items` (JSON text), `total_cents`,
//! `status`, `version`. Shipment items: `order_id`, `status`, `order_version`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, Update,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, Inbox, Seen, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, TransactError, Transaction};
use outbox_lambda::{EventHandler, HandlerError};

use super::{OrderStore, ShipmentStore, Shipped};
use crate::domain::{self, Applied, Change, Order, OrderStatus, Shipment, ShipmentStatus};
use crate::SHIPPING_CONSUMER;

/// Key attribute of the orders table.
pub const ORDER_KEY: &str = "id";
/// Key attribute of the shipments table.
pub const SHIPMENT_KEY: &str = "order_id";

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn built<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Config(format!("cannot build request: {e}")))
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(
        format!("{what} is stored in a form this version cannot read: {detail}").into(),
    )
}

fn text<'a>(item: &'a Item, name: &str, what: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(corrupt(what, format!("no string `{name}`"))),
    }
}

fn number<T: std::str::FromStr>(item: &Item, name: &str, what: &str) -> Result<T, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v
            .parse()
            .map_err(|_| corrupt(what, format!("`{name}` = {v}"))),
        _ => Err(corrupt(what, format!("no number `{name}`"))),
    }
}

/// Creates a table keyed by one string attribute, on demand, unless it exists.
pub async fn create_keyed_table(client: &Client, name: &str, key: &str) -> Result<(), StoreError> {
    if client
        .describe_table()
        .table_name(name)
        .send()
        .await
        .is_ok()
    {
        return Ok(());
    }
    let attr = built(
        AttributeDefinition::builder()
            .attribute_name(key)
            .attribute_type(ScalarAttributeType::S)
            .build(),
    )?;
    let schema = built(
        KeySchemaElement::builder()
            .attribute_name(key)
            .key_type(KeyType::Hash)
            .build(),
    )?;
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

/// Fails, naming `what`, unless `table` exists: a function checks its
/// tables at start-up rather than at its first request.
pub async fn check_table(client: &Client, table: &str, what: &str) -> Result<(), StoreError> {
    match client.describe_table().table_name(table).send().await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Err(StoreError::Config(format!(
                "{what}: table {table} does not exist"
            )))
        }
        Err(e) => Err(outbox_aws::store_error("DescribeTable", e)),
    }
}

/// The Order service's orders table and outbox (stream shape).
#[derive(Debug, Clone)]
pub struct DynamoOrders {
    client: Client,
    table: String,
    outbox: DynamoOutbox,
}

impl DynamoOrders {
    pub fn new(client: Client, orders_table: impl Into<String>, outbox: DynamoOutbox) -> Self {
        Self {
            client,
            table: orders_table.into(),
            outbox,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn outbox(&self) -> &DynamoOutbox {
        &self.outbox
    }

    /// Creates the orders and outbox tables when missing (local runs, tests;
    /// the SAM template creates them in AWS).
    pub async fn create_tables_if_missing(&self) -> Result<(), StoreError> {
        self.outbox.create_table_if_missing().await?;
        create_keyed_table(&self.client, &self.table, ORDER_KEY).await
    }

    fn item(order: &Order) -> Result<Item, StoreError> {
        let items = serde_json::to_string(&order.items).map_err(|e| {
            StoreError::Backend(format!("cannot encode order {}: {e}", order.id).into())
        })?;
        Ok(HashMap::from([
            (ORDER_KEY.to_owned(), s(&order.id)),
            ("customer_id".to_owned(), s(&order.customer_id)),
            ("items".to_owned(), s(items)),
            ("total_cents".to_owned(), n(order.total_cents)),
            ("status".to_owned(), s(order.status.as_str())),
            ("version".to_owned(), n(order.version)),
        ]))
    }

    fn order(item: &Item) -> Result<Order, StoreError> {
        let id = text(item, ORDER_KEY, "an order")?;
        let what = format!("order {id}");
        let status = text(item, "status", &what)?;
        Ok(Order {
            id: id.to_owned(),
            customer_id: text(item, "customer_id", &what)?.to_owned(),
            items: serde_json::from_str(text(item, "items", &what)?)
                .map_err(|e| corrupt(&what, e))?,
            total_cents: number(item, "total_cents", &what)?,
            status: OrderStatus::parse(status)
                .ok_or_else(|| corrupt(&what, format!("status {status:?}")))?,
            version: number(item, "version", &what)?,
        })
    }
}

impl OrderStore for DynamoOrders {
    async fn load(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(ORDER_KEY, s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        got.item.as_ref().map(Self::order).transpose()
    }

    async fn save(&self, change: &Change) -> Result<(), StoreError> {
        let mut put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(Self::item(&change.order)?));
        put = if change.expected_version == 0 {
            put.condition_expression("attribute_not_exists(#id)")
                .expression_attribute_names("#id", ORDER_KEY)
        } else {
            put.condition_expression("#v = :expected")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":expected", n(change.expected_version))
        };
        // The outbox item's own version condition guards the events too.
        match self
            .outbox
            .transaction()
            .put(built(put.build())?)
            .events(change.events.clone())
            .commit()
            .await
        {
            Ok(()) => Ok(()),
            Err(TransactError::EntityCondition { .. } | TransactError::VersionConflict { .. }) => {
                Err(super::stale_write(change))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The Shipping service's shipments table.
#[derive(Debug, Clone)]
pub struct DynamoShipments {
    client: Client,
    table: String,
}

impl DynamoShipments {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        create_keyed_table(&self.client, &self.table, SHIPMENT_KEY).await
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<Shipment>, StoreError> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(SHIPMENT_KEY, s(order_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        let Some(item) = got.item else {
            return Ok(None);
        };
        let what = format!("shipment {order_id}");
        let status = text(&item, "status", &what)?;
        Ok(Some(Shipment {
            order_id: order_id.to_owned(),
            status: ShipmentStatus::parse(status)
                .ok_or_else(|| corrupt(&what, format!("status {status:?}")))?,
            order_version: number(&item, "order_version", &what)?,
        }))
    }

    /// Adds to `tx` what `event` does to its shipment: an update on the
    /// condition that nobody moved the shipment since it was read, or
    /// nothing for a stale or foreign event (the inbox record alone).
    pub async fn stage(&self, event: &Event, tx: &mut Transaction) -> Result<Applied, StoreError> {
        let current = self.get(&event.aggregate_id).await?;
        let applied = domain::apply(current.as_ref(), event);
        if let Applied::Advanced { shipment, .. } = &applied {
            let mut update = Update::builder()
                .table_name(&self.table)
                .key(SHIPMENT_KEY, s(&shipment.order_id))
                .update_expression("SET #status = :status, order_version = :version")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":status", s(shipment.status.as_str()))
                .expression_attribute_values(":version", n(shipment.order_version));
            update = match &current {
                None => update.condition_expression("attribute_not_exists(order_version)"),
                Some(c) => update
                    .condition_expression("order_version = :applied")
                    .expression_attribute_values(":applied", n(c.order_version)),
            };
            tx.push_update(built(update.build())?);
        }
        Ok(applied)
    }
}

/// The Shipping service for outbox-lambda's consumer wrapper, which records
/// the event in the inbox in the same transaction.
#[derive(Debug, Clone)]
pub struct ShippingHandler {
    shipments: DynamoShipments,
}

impl ShippingHandler {
    pub fn new(shipments: DynamoShipments) -> Self {
        Self { shipments }
    }

    pub fn shipments(&self) -> &DynamoShipments {
        &self.shipments
    }
}

impl EventHandler for ShippingHandler {
    async fn handle(&self, event: &Event, tx: &mut Transaction) -> Result<(), HandlerError> {
        match self.shipments.stage(event, tx).await? {
            Applied::Advanced { gap: true, .. } => tracing::info!(
                order = %event.aggregate_id,
                version = event.aggregate_version,
                "shipping: applied ahead of an earlier event"
            ),
            Applied::Stale => tracing::info!(
                order = %event.aggregate_id,
                version = event.aggregate_version,
                event_type = %event.event_type,
                "shipping: older than the shipment, recorded only"
            ),
            Applied::Ignored => tracing::info!(
                event_type = %event.event_type,
                "shipping: not an event it acts on, recorded only"
            ),
            Applied::Advanced { .. } => {}
        }
        Ok(())
    }
}

/// Shipping on DynamoDB outside Lambda (the demo): the inbox record and the
/// shipment in one transaction per event.
#[derive(Debug, Clone)]
pub struct DynamoShipping {
    shipments: DynamoShipments,
    inbox: DynamoInbox,
}

impl DynamoShipping {
    pub fn new(shipments: DynamoShipments, inbox: DynamoInbox) -> Self {
        Self { shipments, inbox }
    }

    pub fn inbox(&self) -> &DynamoInbox {
        &self.inbox
    }

    pub fn shipments(&self) -> &DynamoShipments {
        &self.shipments
    }

    async fn ship_one(&self, event: &Event) -> Result<Shipped, StoreError> {
        let mut tx = self.inbox.transaction();
        if self
            .inbox
            .record(&mut tx, SHIPPING_CONSUMER, event.id)
            .await?
            == Seen::Duplicate
        {
            return Ok(Shipped::Duplicate);
        }
        let outcome = match self.shipments.stage(event, &mut tx).await? {
            Applied::Advanced { gap: false, .. } => Shipped::Applied,
            Applied::Advanced { gap: true, .. } => Shipped::AppliedAfterGap,
            Applied::Stale => Shipped::Stale,
            Applied::Ignored => Shipped::Ignored,
        };
        match tx.commit().await {
            Ok(()) => Ok(outcome),
            Err(TransactError::InboxDuplicate { .. }) => Ok(Shipped::Duplicate),
            // The shipment moved since it was read: a concurrent delivery;
            // retrying reads it again.
            Err(TransactError::EntityCondition { index, message }) => Err(StoreError::Unavailable(
                format!(
                    "shipment {} changed meanwhile (action {index}: {message})",
                    event.aggregate_id
                )
                .into(),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

impl ShipmentStore for DynamoShipping {
    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        // One transaction per event: DynamoDB refuses two actions on one
        // item in a transaction, and two events of an order may come together.
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            outcomes.push(self.ship_one(event).await?);
        }
        Ok(outcomes)
    }

    async fn shipment(&self, order_id: &str) -> Result<Option<Shipment>, StoreError> {
        self.shipments.get(order_id).await
    }
}
