#![doc = include_str!("../README.md")]

mod attr;
pub mod dead_letters;
pub mod error;
pub mod inbox;
pub mod item;
pub mod limits;
pub mod outbox;
pub mod polling;
pub mod record;
pub mod stream_source;
mod tables;
pub mod transaction;

pub use item::OutboxItem;
pub use record::{
    decode_lambda_record, decode_streams_record, Change, DecodeError, LambdaStreamEvent,
    StreamRecord,
};

pub use error::TransactError;
pub use inbox::DynamoInbox;
pub use limits::Limits;
pub use outbox::{DynamoOutbox, Shape};
pub use polling::{PollingOutbox, PollingReceipt};
pub use transaction::Transaction;

pub use dead_letters::{DeadLetterTable, MalformedRecord};
pub use stream_source::{StartAt, StreamReceipt, StreamSource};
