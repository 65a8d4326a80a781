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

/// Logs as Lambda wants them: no colours and no timestamps (CloudWatch adds
/// its own), the level from `RUST_LOG` (`info` by default). Every function
/// binary calls it first.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(false)
        .without_time()
        .init();
}
