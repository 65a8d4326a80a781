//! The crate's one error type.

use outbox_core::{BoxError, InvalidEvent, StoreError};

/// Errors of setting up the publisher and of consuming.
/// (Publish failures are [`outbox_core::PublishError`]s, one per event.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// Bad configuration: fix it, retrying will not help.
    #[error("{0}")]
    Config(String),

    /// The broker could not be reached or refused the connection; retrying
    /// may help (unless the credentials are wrong).
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(#[source] BoxError),

    /// An AMQP operation failed.
    #[error("AMQP {operation}: {source}")]
    Amqp {
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

impl RabbitError {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            RabbitError::Connect(_) | RabbitError::Handler(_) | RabbitError::Ack(_) => true,
            RabbitError::Amqp { retryable, .. } => *retryable,
            RabbitError::Inbox(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// An AMQP failure: a channel-level refusal (406 PRECONDITION_FAILED,
    /// 403 ACCESS_REFUSED, 404 NOT_FOUND) will happen again; anything else
    /// (I/O, a closed connection) may pass.
    pub(crate) fn amqp(operation: &'static str, err: lapin::Error) -> Self {
        let retryable = !err.is_amqp_soft_error();
        RabbitError::Amqp {
            operation,
            retryable,
            source: Box::new(err),
        }
    }
}

impl From<outbox_core::inbox::ApplyError> for RabbitError {
    fn from(e: outbox_core::inbox::ApplyError) -> Self {
        use outbox_core::inbox::ApplyError;
        match e {
            ApplyError::NotAnEvent(e) => RabbitError::Malformed(e),
            ApplyError::Store(e) => RabbitError::Inbox(e),
            ApplyError::Handler(e) => RabbitError::Handler(e),
            // A kind added later: the consumer's message comes again.
            other => RabbitError::Handler(Box::new(other)),
        }
    }
}
