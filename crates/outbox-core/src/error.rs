//! Errors, sorted by what the relay should do about them.

use std::time::Duration;

/// A boxed foreign error (driver, SDK, I/O) kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What to do about a failure: the categories that drive the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// May succeed later: retry with backoff.
    Transient,
    /// Will never succeed as sent: dead-letter now.
    Permanent,
    /// The target asked to wait this long before trying again.
    RetryAfter(Duration),
}

impl Disposition {
    pub fn is_retryable(self) -> bool {
        !matches!(self, Disposition::Permanent)
    }
}

/// Why one event could not be published.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    disposition: Disposition,
    message: String,
}

impl PublishError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            disposition: Disposition::Transient,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            disposition: Disposition::Permanent,
            message: message.into(),
        }
    }

    pub fn retry_after(after: Duration, message: impl Into<String>) -> Self {
        Self {
            disposition: Disposition::RetryAfter(after),
            message: message.into(),
        }
    }

    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// An event that cannot be stored or published as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event: `{field}` {reason}")]
pub struct InvalidEvent {
    field: &'static str,
    reason: String,
}

impl InvalidEvent {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// The envelope field at fault.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// Errors of outbox and inbox stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The events were refused before anything was written.
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),

    /// A limit of the store would be exceeded (size, count); nothing was written.
    #[error("{limit} exceeded: {actual} > {max}")]
    LimitExceeded {
        limit: &'static str,
        actual: u64,
        max: u64,
    },

    /// Another writer got there first, such as the same aggregate version
    /// written twice. Reload and decide again; retrying as is will fail again.
    #[error("concurrency conflict: {0}")]
    Conflict(String),

    /// Bad configuration or a request the store cannot serve.
    #[error("{0}")]
    Config(String),

    /// The store could not be reached or timed out; retrying may help.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),

    /// Any other failure of the backend.
    #[error("store error: {0}")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}
