#![doc = include_str!("../README.md")]

pub mod fault;
pub mod memory_store;
pub mod proxy;
pub mod publisher;
pub mod recording;
pub mod store;

pub use fault::{Chaos, Fault, FaultyPublisher, InjectedFaults};
pub use memory_store::MemoryOutbox;
pub use proxy::{FaultProxy, ProxyHandle};
pub use publisher::{PublisherFeatures, PublisherHarness};
pub use recording::RecordingPublisher;
pub use store::{StoreFeatures, StoreHarness};

use outbox_core::{Claimed, Event};

/// An event of aggregate `Order`/`aggregate_id` at `version`, with a small payload.
pub fn order_event(aggregate_id: &str, version: u64, event_type: &str) -> Event {
    Event::builder("Order", aggregate_id, version, event_type)
        .payload(&serde_json::json!({ "order": aggregate_id, "version": version }))
        .correlation_id(format!("corr-{aggregate_id}"))
        .build()
        .expect("a well-formed test event")
}

/// A claim's events as `(aggregate id, version)`, in the order handed out.
pub fn claimed_versions<R>(claimed: &Claimed<R>) -> Vec<(String, u64)> {
    claimed
        .events
        .iter()
        .map(|c| (c.event.aggregate_id.clone(), c.event.aggregate_version))
        .collect()
}
