#![doc = include_str!("../README.md")]

pub mod aws_publisher;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod emf;
pub mod scheduled;
pub mod stream;
pub mod testing;

pub use aws_publisher::{publish_events_handler, AwsPublisher, PublishEventsHandler};
pub use config::{ConfigError, StreamRelaySettings, Target};
pub use consumer::{EventHandler, HandlerError, IdempotentConsumer, Outcome};
pub use dead_letter::{DeadLetterSink, DeadRecord, MemoryDeadLetters};
pub use scheduled::{run_scheduled, ScheduledRelaySettings};
pub use stream::{
    deadline_from_epoch_ms, BatchItemFailure, HandlerConfig, InvocationReport, StreamBatchResponse,
    StreamRelayHandler, MAX_INVOCATION,
};
