//! The seed's two services: an Order service that records `OrderCreated`
//! (and friends) with each order, and a Shipping service that consumes them.

use std::collections::HashSet;
use std::future::Future;

use outbox_core::{ClaimSource, Event, EventId, Stats, StoreError};

/// A new order as the Order service receives it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub id: String,
    pub customer: String,
    pub total_cents: i64,
    pub items: u32,
    /// Paid at checkout: an `OrderPaid` event follows `OrderCreated`.
    pub paid: bool,
}

impl NewOrder {
    pub fn random(n: u64) -> Self {
        Self {
            id: format!("order-{n:06}"),
            customer: format!("customer-{}", fastrand::u32(1..500)),
            total_cents: fastrand::i64(500..50_000),
            items: fastrand::u32(1..6),
            paid: fastrand::bool(),
        }
    }

    /// The domain events of placing this order, versions 1, 2...
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        let correlation = format!("checkout-{}", self.id);
        let mut events = vec![Event::builder("Order", &self.id, 1, "OrderCreated")
            .payload(&serde_json::json!({
                "orderId": self.id, "customerId": self.customer,
                "totalCents": self.total_cents, "items": self.items,
            }))
            .correlation_id(&correlation)
            .build()?];
        if self.paid {
            events.push(
                Event::builder("Order", &self.id, 2, "OrderPaid")
                    .payload(
                        &serde_json::json!({ "orderId": self.id, "amountCents": self.total_cents }),
                    )
                    .correlation_id(&correlation)
                    .causation_id(events[0].id.to_string())
                    .build()?,
            );
        }
        Ok(events)
    }
}

/// `OrderCancelled` at the order's next version.
pub fn cancelled(order_id: &str, version: u64) -> Result<Event, StoreError> {
    Ok(Event::builder("Order", order_id, version, "OrderCancelled")
        .payload(&serde_json::json!({ "orderId": order_id, "reason": "customer request" }))
        .build()?)
}

/// What the Shipping service did with one delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Applied, in order.
    Applied,
    /// Applied after a gap: an earlier event was dead-lettered.
    AppliedAfterGap,
    /// Already processed: the inbox absorbed the duplicate.
    Duplicate,
    /// An older version than one already applied: order was broken.
    OutOfOrder,
}

/// Counts read back from the database at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    pub orders: u64,
    pub events_written: u64,
    /// Events the store marks published; `None` where only the relay knows
    /// (a stream has no per-event status).
    pub published: Option<u64>,
    pub dead: u64,
    /// Distinct events in the Shipping inbox.
    pub delivered_unique: u64,
    /// Written, neither delivered nor dead-lettered.
    pub lost: u64,
}

/// Storage of both services for one backend.
pub trait Shop: Send + Sync + Clone + 'static {
    type Outbox: ClaimSource + Stats + Clone + 'static;

    fn outbox(&self) -> Self::Outbox;

    /// The source a newly started relay reads from: a store shared by every
    /// relay, or a fresh stream reader resuming from its checkpoints.
    fn relay_source(&self) -> impl Future<Output = Result<Self::Outbox, StoreError>> + Send;

    /// With chaos, how long each relay runs before it is killed, in ms.
    fn relay_lifetime_ms(&self) -> std::ops::Range<u64> {
        150..600
    }

    /// The Order service: the order row and its events, one transaction.
    fn place_order(
        &self,
        order: &NewOrder,
    ) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send;

    /// The Order service: cancels an order, one transaction with its event;
    /// `None` if it was already cancelled.
    fn cancel_order(
        &self,
        order_id: &str,
    ) -> impl Future<Output = Result<Option<Event>, StoreError>> + Send;

    /// The Shipping service: applies each event once, inbox records and
    /// shipments of the whole batch in one transaction; one outcome per event.
    fn ship(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<Vec<Shipped>, StoreError>> + Send;

    /// Counts read back from the tables; `written` are the ids the Order
    /// service committed during the run.
    fn audit(
        &self,
        written: &HashSet<EventId>,
    ) -> impl Future<Output = Result<Audit, StoreError>> + Send;
}

/// The shipment status an event leads to.
pub fn shipment_status(event_type: &str) -> &'static str {
    match event_type {
        "OrderCreated" => "awaiting_payment",
        "OrderPaid" => "ready_to_ship",
        "OrderCancelled" => "cancelled",
        _ => "unknown",
    }
}
