#![doc = include_str!("../README.md")]

mod publisher;
pub mod setup;

pub use publisher::{
    entry_disposition, entry_size, read_response, EventBridgePublisher, MAX_ENTRIES_PER_CALL,
    MAX_ENTRY_BYTES, MAX_REQUEST_BYTES,
};
