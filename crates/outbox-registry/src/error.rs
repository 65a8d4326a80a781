//! What can go wrong naming or opening a store or target.

use outbox_core::StoreError;

/// Errors of the registry: each names the URL or setting the user gave.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A URL that does not name a store or target this program knows.
    #[error("`{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The store a URL names does not exist (the relay and the operator's
    /// commands never create one: a mistyped name would idle forever).
    #[error("{url}: {reason}")]
    NoStore { url: String, reason: String },

    /// An option the store cannot honour.
    #[error("{url}: {reason}")]
    Unsupported { url: String, reason: String },

    /// The AWS setup (region, credentials) is incomplete.
    #[error(transparent)]
    Aws(outbox_aws::AwsError),

    /// The target cannot be used as named: it does not exist, or the call
    /// checking it failed.
    #[error("target {url}: {source}")]
    Target {
        url: String,
        #[source]
        source: outbox_aws::AwsError,
    },

    /// The NATS server cannot be reached, or the stream cannot be used as
    /// named (a stream of that name taking other subjects, ...).
    #[error("target {url}: {source}")]
    Nats {
        url: String,
        #[source]
        source: outbox_nats::NatsError,
    },

    /// The RabbitMQ broker cannot be reached, refused the credentials, or
    /// the exchange cannot be declared as named.
    #[error("target {url}: {source}")]
    Rabbit {
        url: String,
        #[source]
        source: outbox_rabbitmq::RabbitError,
    },

    /// Opening the store failed.
    #[error("store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
}

impl RegistryError {
    /// Whether trying again later may help; otherwise the settings must change.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Target { source, .. } => source.is_retryable(),
            RegistryError::Store { source, .. } => source.is_retryable(),
            RegistryError::Nats { source, .. } => source.is_retryable(),
            RegistryError::Rabbit { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}
