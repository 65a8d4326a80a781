//! The Shipping service's view of an order: a shipment that follows the
//! order's events.
//!
//! EventBridge -> SQS keeps no order, so `OrderPaid` (version 2) may arrive
//! before `OrderCreated` (version 1). A shipment remembers the highest order
//! version applied; an older event changes nothing (the inbox still records
//! it, so a redelivery is a duplicate). The shipment is then the state of
//! the order's newest event, whatever the arrival order.

use outbox_core::Event;
use serde::{Deserialize, Serialize};

use super::order::{AGGREGATE_TYPE, ORDER_CANCELLED, ORDER_CREATED, ORDER_PAID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentStatus {
    AwaitingPayment,
    ReadyToShip,
    Cancelled,
}

impl ShipmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentStatus::AwaitingPayment => "awaiting_payment",
            ShipmentStatus::ReadyToShip => "ready_to_ship",
            ShipmentStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "awaiting_payment" => Some(ShipmentStatus::AwaitingPayment),
            "ready_to_ship" => Some(ShipmentStatus::ReadyToShip),
            "cancelled" => Some(ShipmentStatus::Cancelled),
            _ => None,
        }
    }

    /// The status an order event leads to; `None` for an event Shipping
    /// does not act on.
    pub fn after(event_type: &str) -> Option<Self> {
        match event_type {
            ORDER_CREATED => Some(ShipmentStatus::AwaitingPayment),
            ORDER_PAID => Some(ShipmentStatus::ReadyToShip),
            ORDER_CANCELLED => Some(ShipmentStatus::Cancelled),
            _ => None,
        }
    }
}

/// A shipment: one per order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shipment {
    pub order_id: String,
    pub status: ShipmentStatus,
    /// The highest order version applied.
    pub order_version: u64,
}

/// What an event does to a shipment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The shipment moves to this state. `gap`: versions between the one
    /// applied before and this one have not been seen (yet).
    Advanced { shipment: Shipment, gap: bool },
    /// Older than (or as old as) what is applied: nothing changes.
    Stale,
    /// Not an order event Shipping acts on: nothing changes.
    Ignored,
}

/// Applies `event` to the order's shipment (`None`: none yet).
pub fn apply(current: Option<&Shipment>, event: &Event) -> Applied {
    if event.aggregate_type != AGGREGATE_TYPE {
        return Applied::Ignored;
    }
    let Some(status) = ShipmentStatus::after(&event.event_type) else {
        return Applied::Ignored;
    };
    let applied = current.map_or(0, |s| s.order_version);
    if event.aggregate_version <= applied {
        return Applied::Stale;
    }
    Applied::Advanced {
        shipment: Shipment {
            order_id: event.aggregate_id.clone(),
            status,
            order_version: event.aggregate_version,
        },
        gap: event.aggregate_version != applied.saturating_add(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::{Meta, Order, PlaceOrder};
    use crate::domain::LineItem;

    /// Created, paid, cancelled: versions 1, 2, 3 of one order.
    fn history() -> Vec<Event> {
        let meta = Meta::default();
        let request = PlaceOrder {
            customer_id: "c-1".into(),
            items: vec![LineItem {
                sku: "A1".into(),
                quantity: 1,
                unit_price_cents: 100,
            }],
        };
        let created = Order::create("o-1", request, &meta).expect("valid");
        let paid = created.order.pay(&meta).expect("payable");
        let cancelled = paid.order.cancel(None, &meta).expect("cancellable");
        [created.events, paid.events, cancelled.events].concat()
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for i in 0..=p.len() {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }

    fn run(events: &[Event], order: &[usize]) -> (Option<Shipment>, Vec<Applied>) {
        let mut shipment = None;
        let mut outcomes = Vec::new();
        for &i in order {
            let outcome = apply(shipment.as_ref(), &events[i]);
            if let Applied::Advanced { shipment: s, .. } = &outcome {
                shipment = Some(s.clone());
            }
            outcomes.push(outcome);
        }
        (shipment, outcomes)
    }

    #[test]
    fn every_arrival_order_ends_in_the_newest_events_state() {
        let events = history();
        for order in permutations(events.len()) {
            let (shipment, outcomes) = run(&events, &order);
            assert_eq!(
                shipment,
                Some(Shipment {
                    order_id: "o-1".into(),
                    status: ShipmentStatus::Cancelled,
                    order_version: 3
                }),
                "arrival order {order:?}"
            );
            // Versions never go backwards: an event after a newer one is stale.
            let mut newest = 0;
            for (&i, outcome) in order.iter().zip(&outcomes) {
                let v = events[i].aggregate_version;
                if v > newest {
                    assert!(matches!(outcome, Applied::Advanced { .. }), "{order:?}");
                    newest = v;
                } else {
                    assert_eq!(outcome, &Applied::Stale, "{order:?}");
                }
            }
        }
    }

    #[test]
    fn paid_before_created_is_ready_to_ship_with_a_gap_then_created_is_stale() {
        let events = history();
        let (shipment, outcomes) = run(&events[..2], &[1, 0]);
        assert_eq!(
            shipment.map(|s| (s.status, s.order_version)),
            Some((ShipmentStatus::ReadyToShip, 2))
        );
        assert!(matches!(outcomes[0], Applied::Advanced { gap: true, .. }));
        assert_eq!(outcomes[1], Applied::Stale);
    }

    #[test]
    fn in_order_events_have_no_gap_and_a_repeat_is_stale() {
        let events = history();
        let (_, outcomes) = run(&events, &[0, 1, 1, 2]);
        assert!(matches!(outcomes[0], Applied::Advanced { gap: false, .. }));
        assert!(matches!(outcomes[1], Applied::Advanced { gap: false, .. }));
        assert_eq!(outcomes[2], Applied::Stale);
        assert!(matches!(outcomes[3], Applied::Advanced { gap: false, .. }));
    }

    #[test]
    fn other_events_are_ignored() {
        let other = Event::builder("Order", "o-1", 4, "OrderShipped")
            .build()
            .expect("event");
        assert_eq!(apply(None, &other), Applied::Ignored);
        let foreign = Event::builder("Invoice", "o-1", 1, "OrderCreated")
            .build()
            .expect("event");
        assert_eq!(apply(None, &foreign), Applied::Ignored);
    }
}
