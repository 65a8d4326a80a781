#![doc = include_str!("../README.md")]

mod consumer;
mod error;
mod publisher;
mod subject;

pub use consumer::InboxConsumer;
pub use error::NatsError;
pub use publisher::{
    message_size, NatsPublisher, CONTENT_TYPE_HEADER, DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_BATCH_SIZE,
    EXPECTED_STREAM_HEADER, MSG_ID_HEADER, TRACEPARENT_HEADER,
};
pub use subject::{covers, SubjectTemplate, DEFAULT_SUBJECT_TEMPLATE};

/// The client crate, for building clients, consumers and stream configs.
pub use async_nats;
