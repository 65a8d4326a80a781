#![doc = include_str!("../README.md")]

pub mod api;
pub mod config;
pub mod domain;
pub mod service;
pub mod store;

/// The CloudEvents `source` (EventBridge `Source`) of the Order service's events.
pub const EVENT_SOURCE: &str = "urn:outbox:orders";
/// The Shipping service's name in the inbox.
pub const SHIPPING_CONSUMER: &str = "shipping";
