#![doc = include_str!("../README.md")]

mod consumer;
mod error;
mod publisher;
mod routing;

pub use consumer::InboxConsumer;
pub use error::RabbitError;
pub use publisher::{
    RabbitPublisher, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGE_BYTES,
    MAX_SHORT_STRING_BYTES,
};
pub use routing::RoutingKey;

/// The client crate, for consumers and topology of your own.
pub use lapin;
