//! The Order aggregate: create, pay, cancel. Each command checks the order's
//! state and returns the new state with the domain events of the change;
//! a store writes both in one transaction.

use outbox_core::{Event, InvalidEvent};
use serde::{Deserialize, Serialize};

/// The aggregate type of every order event.
pub const AGGREGATE_TYPE: &str = "Order";
pub const ORDER_CREATED: &str = "OrderCreated";
pub const ORDER_PAID: &str = "OrderPaid";
pub const ORDER_CANCELLED: &str = "OrderCancelled";

/// Most lines an order may have: keeps one order and its `OrderCreated`
/// far below the stores' item and payload limits.
pub const MAX_LINES: usize = 100;
/// Most units of one line.
pub const MAX_QUANTITY: u32 = 10_000;
/// Longest customer id, SKU or cancellation reason, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LineItem {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

/// `POST /orders`: what a customer asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub items: Vec<LineItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Created,
    Paid,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Created => "created",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(OrderStatus::Created),
            "paid" => Some(OrderStatus::Paid),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }
}

/// An order as the Order service keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    #[serde(rename = "orderId")]
    pub id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total_cents: i64,
    pub status: OrderStatus,
    /// The version of its last event: 1 after creation, +1 a command.
    pub version: u64,
}

/// Why a command was refused. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The request breaks a rule of the domain (an empty order, a zero
    /// quantity, a total beyond what can be counted).
    #[error("invalid order: {0}")]
    Invalid(String),
    #[error("order {0} is cancelled")]
    AlreadyCancelled(String),
    #[error("order {0} is already paid")]
    AlreadyPaid(String),
}

impl From<InvalidEvent> for OrderError {
    fn from(e: InvalidEvent) -> Self {
        OrderError::Invalid(e.to_string())
    }
}

/// Tracing context the events carry (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
}

/// The outcome of a command: the order after it and the events it records.
/// A store writes them on the condition that the stored order is still at
/// `expected_version` (0: does not exist yet).
#[derive(Debug, Clone)]
pub struct Change {
    pub order: Order,
    pub events: Vec<Event>,
    pub expected_version: u64,
}

impl Change {
    /// Runs a further command on the changed order, in the same change:
    /// one transaction, all the events (placing a paid order).
    pub fn and_then(
        self,
        command: impl FnOnce(&Order) -> Result<Change, OrderError>,
    ) -> Result<Change, OrderError> {
        let next = command(&self.order)?;
        let mut events = self.events;
        events.extend(next.events);
        Ok(Change {
            order: next.order,
            events,
            expected_version: self.expected_version,
        })
    }
}

fn check_text(field: &str, value: &str) -> Result<(), OrderError> {
    if value.trim().is_empty() {
        return Err(OrderError::Invalid(format!("{field} must not be empty")));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(OrderError::Invalid(format!(
            "{field} is {} bytes, at most {MAX_TEXT_BYTES} allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(OrderError::Invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

impl PlaceOrder {
    /// Checks the request and sums it, with checked arithmetic: an absurd
    /// quantity or price is refused, never wrapped.
    pub fn total_cents(&self) -> Result<i64, OrderError> {
        check_text("customerId", &self.customer_id)?;
        if self.items.is_empty() {
            return Err(OrderError::Invalid(
                "an order needs at least one item".into(),
            ));
        }
        if self.items.len() > MAX_LINES {
            return Err(OrderError::Invalid(format!(
                "an order has at most {MAX_LINES} items, this one {}",
                self.items.len()
            )));
        }
        let too_much = || OrderError::Invalid("the order's total is too large to count".into());
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            check_text(&format!("items[{i}].sku"), &item.sku)?;
            if item.quantity == 0 || item.quantity > MAX_QUANTITY {
                return Err(OrderError::Invalid(format!(
                    "items[{i}].quantity must be between 1 and {MAX_QUANTITY}, not {}",
                    item.quantity
                )));
            }
            let price = i64::try_from(item.unit_price_cents).map_err(|_| too_much())?;
            let line = price
                .checked_mul(i64::from(item.quantity))
                .ok_or_else(too_much)?;
            total = total.checked_add(line).ok_or_else(too_much)?;
        }
        Ok(total)
    }
}

fn event(
    order: &Order,
    event_type: &str,
    payload: &serde_json::Value,
    meta: &Meta,
) -> Result<Event, OrderError> {
    let mut builder =
        Event::builder(AGGREGATE_TYPE, &order.id, order.version, event_type).payload(payload);
    if let Some(c) = &meta.correlation_id {
        builder = builder.correlation_id(c);
    }
    if let Some(t) = &meta.traceparent {
        builder = builder.traceparent(t);
    }
    Ok(builder.build()?)
}

impl Order {
    /// `CreateOrder`: a new order at version 1 and its `OrderCreated`.
    pub fn create(id: &str, request: PlaceOrder, meta: &Meta) -> Result<Change, OrderError> {
        check_text("orderId", id)?;
        let total_cents = request.total_cents()?;
        let order = Order {
            id: id.to_owned(),
            customer_id: request.customer_id,
            items: request.items,
            total_cents,
            status: OrderStatus::Created,
            version: 1,
        };
        let created = event(
            &order,
            ORDER_CREATED,
            &serde_json::json!({
                "orderId": order.id,
                "customerId": order.customer_id,
                "items": order.items,
                "totalCents": order.total_cents,
            }),
            meta,
        )?;
        Ok(Change {
            order,
            events: vec![created],
            expected_version: 0,
        })
    }

    fn next(&self, status: OrderStatus) -> Result<Order, OrderError> {
        let version = self
            .version
            .checked_add(1)
            .ok_or_else(|| OrderError::Invalid(format!("order {} has no next version", self.id)))?;
        Ok(Order {
            status,
            version,
            ..self.clone()
        })
    }

    /// `PayOrder`: only a created order can be paid.
    pub fn pay(&self, meta: &Meta) -> Result<Change, OrderError> {
        match self.status {
            OrderStatus::Created => {}
            OrderStatus::Paid => return Err(OrderError::AlreadyPaid(self.id.clone())),
            OrderStatus::Cancelled => return Err(OrderError::AlreadyCancelled(self.id.clone())),
        }
        let order = self.next(OrderStatus::Paid)?;
        let paid = event(
            &order,
            ORDER_PAID,
            &serde_json::json!({ "orderId": order.id, "amountCents": order.total_cents }),
            meta,
        )?;
        Ok(Change {
            order,
            events: vec![paid],
            expected_version: self.version,
        })
    }

    /// `CancelOrder`: a created or paid order can be cancelled, once.
    pub fn cancel(&self, reason: Option<&str>, meta: &Meta) -> Result<Change, OrderError> {
        if self.status == OrderStatus::Cancelled {
            return Err(OrderError::AlreadyCancelled(self.id.clone()));
        }
        let reason = reason.unwrap_or("customer request");
        check_text("reason", reason)?;
        let order = self.next(OrderStatus::Cancelled)?;
        let cancelled = event(
            &order,
            ORDER_CANCELLED,
            &serde_json::json!({ "orderId": order.id, "reason": reason }),
            meta,
        )?;
        Ok(Change {
            order,
            events: vec![cancelled],
            expected_version: self.version,
        })
    }
}

/// Sets each later event's causation to the first event of the change
/// (placing a paid order: `OrderPaid` is caused by `OrderCreated`).
pub fn chain_causation(change: &mut Change) {
    let Some(first) = change.events.first().map(|e| e.id.to_string()) else {
        return;
    };
    for e in change.events.iter_mut().skip(1) {
        if e.metadata.causation_id.is_none() {
            e.metadata.causation_id = Some(first.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: Vec<LineItem>) -> PlaceOrder {
        PlaceOrder {
            customer_id: "c-1".into(),
            items,
        }
    }

    fn line(quantity: u32, unit_price_cents: u64) -> LineItem {
        LineItem {
            sku: "A1".into(),
            quantity,
            unit_price_cents,
        }
    }

    fn created() -> Order {
        Order::create("o-1", request(vec![line(2, 1250)]), &Meta::default())
            .expect("valid")
            .order
    }

    #[test]
    fn create_sums_the_lines_and_records_order_created() {
        let change = Order::create(
            "o-1",
            request(vec![line(2, 1250), line(1, 99)]),
            &Meta::default(),
        )
        .expect("valid");
        assert_eq!(change.order.total_cents, 2599);
        assert_eq!(change.order.status, OrderStatus::Created);
        assert_eq!(change.order.version, 1);
        assert_eq!(change.expected_version, 0);
        assert_eq!(change.events.len(), 1);
        let e = &change.events[0];
        assert_eq!(
            (e.aggregate_type.as_str(), e.aggregate_id.as_str()),
            ("Order", "o-1")
        );
        assert_eq!(
            (e.aggregate_version, e.event_type.as_str()),
            (1, ORDER_CREATED)
        );
        let payload: serde_json::Value =
            serde_json::from_str(e.payload.as_str()).expect("json payload");
        assert_eq!(payload["totalCents"], 2599);
        assert_eq!(payload["customerId"], "c-1");
    }

    #[test]
    fn create_refuses_invalid_orders() {
        let cases = [
            request(vec![]),
            request(vec![line(0, 100)]),
            request(vec![line(MAX_QUANTITY + 1, 100)]),
            request(vec![line(1, u64::MAX)]),
            request(vec![line(MAX_QUANTITY, i64::MAX as u64 / 2)]),
            request(vec![line(1, i64::MAX as u64), line(1, 1)]),
            PlaceOrder {
                customer_id: " ".into(),
                items: vec![line(1, 1)],
            },
            request(vec![LineItem {
                sku: "a\nb".into(),
                quantity: 1,
                unit_price_cents: 1,
            }]),
            request((0..=MAX_LINES as u32).map(|_| line(1, 1)).collect()),
        ];
        for case in cases {
            let got = Order::create("o-1", case.clone(), &Meta::default());
            assert!(
                matches!(got, Err(OrderError::Invalid(_))),
                "{case:?} gave {got:?}"
            );
        }
    }

    #[test]
    fn pay_then_cancel_counts_versions_and_refuses_repeats() {
        let order = created();
        let paid = order.pay(&Meta::default()).expect("payable");
        assert_eq!(paid.expected_version, 1);
        assert_eq!(paid.order.version, 2);
        assert_eq!(paid.order.status, OrderStatus::Paid);
        assert_eq!(paid.events[0].event_type, ORDER_PAID);
        assert_eq!(paid.events[0].aggregate_version, 2);
        assert_eq!(
            paid.order.pay(&Meta::default()).unwrap_err(),
            OrderError::AlreadyPaid("o-1".into())
        );
        let cancelled = paid
            .order
            .cancel(Some("changed my mind"), &Meta::default())
            .expect("cancellable");
        assert_eq!(cancelled.order.version, 3);
        assert_eq!(cancelled.events[0].event_type, ORDER_CANCELLED);
        assert_eq!(
            cancelled.order.cancel(None, &Meta::default()).unwrap_err(),
            OrderError::AlreadyCancelled("o-1".into())
        );
        assert_eq!(
            cancelled.order.pay(&Meta::default()).unwrap_err(),
            OrderError::AlreadyCancelled("o-1".into())
        );
    }

    #[test]
    fn and_then_keeps_one_change_with_both_events() {
        let meta = Meta {
            correlation_id: Some("checkout-o-1".into()),
            traceparent: None,
        };
        let mut change = Order::create("o-1", request(vec![line(1, 5)]), &meta)
            .expect("valid")
            .and_then(|o| o.pay(&meta))
            .expect("payable");
        chain_causation(&mut change);
        assert_eq!(change.expected_version, 0);
        assert_eq!(change.order.version, 2);
        let versions: Vec<u64> = change.events.iter().map(|e| e.aggregate_version).collect();
        assert_eq!(versions, [1, 2]);
        assert_eq!(
            change.events[1].metadata.causation_id,
            Some(change.events[0].id.to_string())
        );
        assert_eq!(
            change.events[1].metadata.correlation_id.as_deref(),
            Some("checkout-o-1")
        );
    }

    #[test]
    fn cancel_refuses_a_control_character_reason() {
        let got = created().cancel(Some("x\u{0}"), &Meta::default());
        assert!(matches!(got, Err(OrderError::Invalid(_))), "{got:?}");
    }
}
