//! Where the services keep their data: the Order service's orders with their
//! events (one transaction through the outbox crates), the Shipping
//! service's shipments with its inbox records (one transaction).

use std::future::Future;

use outbox_core::{Event, StoreError};

use crate::domain::{Change, Order, Shipment};

pub mod dynamodb;
pub mod postgres;
pub mod sqlite;

/// The Order service's storage.
pub trait OrderStore: Send + Sync {
    fn load(&self, id: &str) -> impl Future<Output = Result<Option<Order>, StoreError>> + Send;

    /// Writes the changed order and its events in one transaction, on the
    /// condition that the stored order is still at `change.expected_version`
    /// (0: that it does not exist). Otherwise fails with
    /// [`StoreError::Conflict`] and writes nothing: never a lost update.
    fn save(&self, change: &Change) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What the Shipping service did with one delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Applied, the next version after the one applied before.
    Applied,
    /// Applied, with versions between not (yet) seen: arrived out of order,
    /// or an earlier event was dead-lettered.
    AppliedAfterGap,
    /// Already processed: the inbox absorbed the duplicate.
    Duplicate,
    /// Older than what is applied: recorded in the inbox, changed nothing.
    Stale,
    /// Not an event Shipping acts on: recorded in the inbox, changed nothing.
    Ignored,
}

/// The Shipping service's storage.
pub trait ShipmentStore: Send + Sync {
    /// Applies each event once: inbox records and shipments in one
    /// transaction (per batch on SQL, per event on DynamoDB, which refuses
    /// two actions on one item in a transaction). One outcome per event.
    fn ship(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<Vec<Shipped>, StoreError>> + Send;

    fn shipment(
        &self,
        order_id: &str,
    ) -> impl Future<Output = Result<Option<Shipment>, StoreError>> + Send;
}

/// An order's lines as the SQL stores keep them: JSON text.
fn items_json(order: &Order) -> Result<String, StoreError> {
    serde_json::to_string(&order.items)
        .map_err(|e| StoreError::Backend(format!("cannot encode order {}: {e}", order.id).into()))
}

fn corrupt(what: &str, id: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(
        format!("{what} {id} is stored in a form this version cannot read: {detail}").into(),
    )
}

/// Builds an order from its stored columns.
fn order_from_row(
    id: String,
    customer_id: String,
    items: &str,
    total_cents: i64,
    status: &str,
    version: i64,
) -> Result<Order, StoreError> {
    let items = serde_json::from_str(items).map_err(|e| corrupt("order", &id, e))?;
    let status = crate::domain::OrderStatus::parse(status)
        .ok_or_else(|| corrupt("order", &id, format!("status {status:?}")))?;
    let version = u64::try_from(version).map_err(|_| corrupt("order", &id, "negative version"))?;
    Ok(Order {
        id,
        customer_id,
        items,
        total_cents,
        status,
        version,
    })
}

fn shipment_from_row(order_id: String, status: &str, version: i64) -> Result<Shipment, StoreError> {
    let status = crate::domain::ShipmentStatus::parse(status)
        .ok_or_else(|| corrupt("shipment", &order_id, format!("status {status:?}")))?;
    let order_version =
        u64::try_from(version).map_err(|_| corrupt("shipment", &order_id, "negative version"))?;
    Ok(Shipment {
        order_id,
        status,
        order_version,
    })
}

/// A version as SQL's BIGINT: `Event::validate` and the domain keep them
/// far below `i64::MAX`.
fn sql_version(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Config(format!("version {v} is beyond BIGINT")))
}

fn stale_write(change: &Change) -> StoreError {
    if change.expected_version == 0 {
        StoreError::Conflict(format!("order {} already exists", change.order.id))
    } else {
        StoreError::Conflict(format!(
            "order {} changed concurrently: it is no longer at version {}",
            change.order.id, change.expected_version
        ))
    }
}
