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

/// Whom a publish failure concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// The broker refused this one entry; it counts toward the entry's attempts.
    Entry,
    /// The target as a whole failed (unreachable, timed out, refused our
    /// credentials, throttled the call, has no such bus or queue). It says
    /// nothing about the event: the relay pauses the target and probes it,
    /// spending no event's attempts, for as long as the outage lasts.
    Target,
}

/// Why one event could not be published.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    disposition: Disposition,
    scope: Scope,
    message: String,
    /// The foreign error behind it, shared because a failed call gives the
    /// same error to every entry.
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl PublishError {
    fn new(disposition: Disposition, message: impl Into<String>) -> Self {
        Self {
            disposition,
            scope: Scope::Entry,
            message: message.into(),
            source: None,
        }
    }

    /// This entry may succeed later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(Disposition::Transient, message)
    }

    /// This entry will never succeed as sent.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(Disposition::Permanent, message)
    }

    /// This entry may be sent again after `after`.
    pub fn retry_after(after: Duration, message: impl Into<String>) -> Self {
        Self::new(Disposition::RetryAfter(after), message)
    }

    /// The target as a whole is unavailable: no event is at fault.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Disposition::Transient, message).target_wide()
    }

    /// Marks the failure as one of the whole target rather than of the entry.
    pub fn target_wide(mut self) -> Self {
        self.scope = Scope::Target;
        self
    }

    /// Keeps the foreign error as the source.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(std::sync::Arc::from(source.into()));
        self
    }

    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Whether the failure is the target's, not the entry's.
    pub fn is_target_failure(&self) -> bool {
        self.scope == Scope::Target
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
