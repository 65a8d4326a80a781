#![doc = include_str!("../README.md")]

pub mod item;
pub mod record;

pub use item::OutboxItem;
pub use record::{
    decode_lambda_record, decode_streams_record, Change, DecodeError, LambdaStreamEvent,
    StreamRecord,
};
