#![doc = include_str!("../README.md")]

mod publisher;
pub mod setup;

pub use publisher::{
    call_trace_header, message_size, SnsPublisher, CONTENT_TYPE_ATTRIBUTE, MAX_ENTRIES_PER_CALL,
    MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, TRACE_HEADER,
};
