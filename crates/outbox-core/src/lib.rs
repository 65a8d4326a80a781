#![doc = include_str!("../README.md")]

pub mod cloudevents;
pub mod error;
pub mod event;
pub mod inbox;
pub mod metrics;
pub mod publish;
pub mod publishers;
pub mod relay;
pub mod retry;
pub mod secret;
pub mod source;
pub mod time;

pub use error::{BoxError, Disposition, InvalidEvent, PublishError, Scope, StoreError};
pub use event::{Event, EventBuilder, EventId, Metadata, Payload};
pub use inbox::{Inbox, Seen};
pub use publish::{PublishRequest, PublishResult, Publisher};
pub use relay::{BatchReport, Outage, Relay, RelayConfig, RelayMetrics};
pub use retry::RetryPolicy;
pub use source::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetter, DeadLetterPolicy, DeadLetters,
    LeaseId, Malformed, OutboxStats, Purge, ReplaySelector, Settlements, Stats,
};
