#![doc = include_str!("../README.md")]

mod delivery;
mod publisher;
mod receiver;
pub mod setup;

pub use delivery::parse_delivery;
pub use publisher::{
    message_size, SqsPublisher, CONTENT_TYPE_ATTRIBUTE, MAX_ENTRIES_PER_CALL, MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
};
pub use receiver::{Delivery, SqsReceiver};
