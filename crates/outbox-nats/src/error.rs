//! The crate's one error type.

use outbox_core::{BoxError, InvalidEvent, StoreError};

/// Errors of setting up the publisher and of consuming.
/// (Publish failures are [`outbox_core::PublishError`]s, one per event.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// Bad configuration: fix it, retrying will not help.
    #[error("{0}")]
    Config(String),

    /// The server could not be reached; retrying may help. (`url` with
    /// its password hidden.)
    #[error("cannot connect to NATS at `{url}`: {source}")]
    Connect {
        url: String,
        #[source]
        source: BoxError,
    },

    /// The stream does not exist and the publisher was told not to create it.
    #[error(
        "JetStream stream `{stream}` does not exist (create it, or let the publisher create it)"
    )]
    StreamMissing { stream: String },

    /// The stream exists but does not take the template's subjects.
    #[error(
        "JetStream stream `{stream}` takes subjects {subjects:?}, which do not cover `{wanted}`: \
         add `{wanted}` to the stream's subjects or pick another stream or template"
    )]
    StreamMismatch {
        stream: String,
        subjects: Vec<String>,
        wanted: String,
    },

    /// A JetStream API call failed (timeout, JetStream disabled, ...).
    #[error("JetStream {operation}: {source}")]
    JetStream {
        operation: &'static str,
        retryable: bool,
        #[source]
        source: BoxError,
    },

    /// A delivered message is not an outbox event; it never will be.
    #[error("not an outbox event: {0}")]
    Malformed(#[from] InvalidEvent),

    /// The inbox could not record the event.
    #[error("inbox: {0}")]
    Inbox(#[from] StoreError),

    /// The consumer's own code failed; the message is delivered again.
    #[error("handler: {0}")]
    Handler(#[source] BoxError),

    /// The message was handled but its acknowledgement failed: the next
    /// delivery of it is a duplicate the inbox skips.
    #[error("acknowledging the message: {0}")]
    Ack(#[source] BoxError),
}

impl NatsError {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            NatsError::Connect { .. } | NatsError::Handler(_) | NatsError::Ack(_) => true,
            NatsError::JetStream { retryable, .. } => *retryable,
            NatsError::Inbox(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<outbox_core::inbox::ApplyError> for NatsError {
    fn from(e: outbox_core::inbox::ApplyError) -> Self {
        use outbox_core::inbox::ApplyError;
        match e {
            ApplyError::NotAnEvent(e) => NatsError::Malformed(e),
            ApplyError::Store(e) => NatsError::Inbox(e),
            ApplyError::Handler(e) => NatsError::Handler(e),
            // A kind added later: the consumer's message comes again.
            other => NatsError::Handler(Box::new(other)),
        }
    }
}
