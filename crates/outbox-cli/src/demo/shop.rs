//! The seed's two services, as the `orders` example implements them: an
//! Order service that records `OrderCreated` (and friends) with each order,
//! and a Shipping service that consumes them. Here: the demo's random
//! orders and what the demo needs of each store beside the services.

use std::collections::HashSet;
use std::future::Future;

use orders::domain::{chain_causation, Change, LineItem, Meta, Order, OrderError, PlaceOrder};
use orders::service::{self, ServiceError};
use orders::store::OrderStore;
use outbox_core::{ClaimSource, Event, EventId, Stats, StoreError};

pub use orders::store::Shipped;

/// A new order as the Order service receives it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub id: String,
    pub request: PlaceOrder,
    /// Paid at checkout: an `OrderPaid` event follows `OrderCreated`, in
    /// the same transaction.
    pub paid: bool,
}

impl NewOrder {
    pub fn random(n: u64) -> Self {
        let lines = fastrand::u32(1..6);
        Self {
            id: format!("order-{n:06}"),
            request: PlaceOrder {
                customer_id: format!("customer-{}", fastrand::u32(1..500)),
                items: (0..lines)
                    .map(|_| LineItem {
                        sku: format!("SKU-{:03}", fastrand::u32(1..200)),
                        quantity: fastrand::u32(1..4),
                        unit_price_cents: fastrand::u64(100..10_000),
                    })
                    .collect(),
            },
            paid: fastrand::bool(),
        }
    }

    /// The domain's change of placing this order: versions 1 (and 2 if paid).
    pub fn change(&self) -> Result<Change, OrderError> {
        let meta = Meta {
            correlation_id: Some(format!("checkout-{}", self.id)),
            traceparent: None,
        };
        let mut change = Order::create(&self.id, self.request.clone(), &meta)?;
        if self.paid {
            change = change.and_then(|o| o.pay(&meta))?;
        }
        chain_causation(&mut change);
        Ok(change)
    }
}

fn store_error(e: ServiceError) -> StoreError {
    match e {
        ServiceError::Store(e) => e,
        ServiceError::Conflict(m) => StoreError::Conflict(m),
        e => StoreError::Config(e.to_string()),
    }
}

/// The Order service places `order`: the order and its events, one transaction.
pub async fn place<S: OrderStore>(store: &S, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
    let change = order
        .change()
        .map_err(|e| StoreError::Config(e.to_string()))?;
    Ok(service::commit(store, change)
        .await
        .map_err(store_error)?
        .events)
}

/// The Order service cancels an order; `None` if it is already cancelled
/// (or another writer changed it meanwhile).
pub async fn cancel<S: OrderStore>(store: &S, order_id: &str) -> Result<Option<Event>, StoreError> {
    match service::cancel(
        store,
        order_id,
        Some("customer request"),
        None,
        &Meta::default(),
    )
    .await
    {
        Ok(change) => Ok(change.events.into_iter().next()),
        Err(ServiceError::Refused(_) | ServiceError::Conflict(_)) => Ok(None),
        Err(e) => Err(store_error(e)),
    }
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
    /// shipments in one transaction; one outcome per event.
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
