//! The Order and Shipping domain: commands, their events, and the
//! shipment each event leads to. No database or AWS type in here.

pub mod order;
pub mod shipping;

pub use order::{
    chain_causation, Change, LineItem, Meta, Order, OrderError, OrderStatus, PlaceOrder,
    AGGREGATE_TYPE, ORDER_CANCELLED, ORDER_CREATED, ORDER_PAID,
};
pub use shipping::{apply, Applied, Shipment, ShipmentStatus};
