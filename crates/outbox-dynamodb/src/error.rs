//! What can go wrong with a transaction, sorted by what the caller does next.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use outbox_core::{BoxError, EventId, InvalidEvent, StoreError};

/// Why a transaction was refused or failed. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransactError {
    /// An event is malformed; refused before any network call.
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),

    /// A DynamoDB limit would be exceeded; refused before any network call.
    #[error("{limit} exceeded: {actual} > {max}")]
    LimitExceeded {
        limit: &'static str,
        actual: u64,
        max: u64,
    },

    /// The condition of one of the caller's own actions failed (a business
    /// conflict, such as the order already existing). `index` is the action's
    /// position in the transaction.
    #[error("condition of transaction action {index} failed: {message}")]
    EntityCondition { index: usize, message: String },

    /// The aggregate is no longer at `expected` (its first new version minus
    /// one): another writer got there first. Reload and decide again.
    #[error(
        "version conflict: {aggregate_type}/{aggregate_id} is no longer at version {expected}"
    )]
    VersionConflict {
        aggregate_type: String,
        aggregate_id: String,
        expected: u64,
    },

    /// Versions of one aggregate do not increase within the transaction.
    #[error("version order: {aggregate_type}/{aggregate_id} version {version} follows {after}; versions must increase")]
    VersionOrder {
        aggregate_type: String,
        aggregate_id: String,
        version: u64,
        after: u64,
    },

    /// The consumer recorded this event in another transaction that committed
    /// first: skip it.
    #[error("consumer {consumer} already processed event {event_id}")]
    InboxDuplicate { consumer: String, event_id: EventId },

    /// Transaction conflict, throttling, network: may succeed if retried.
    #[error("transaction failed, may succeed if retried: {0}")]
    Retryable(#[source] BoxError),

    /// Any other failure; retrying as is will not help.
    #[error("transaction failed: {0}")]
    Backend(#[source] BoxError),
}

impl TransactError {
    /// Whether the same transaction may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransactError::Retryable(_))
    }

    /// An SDK error, classified retryable or not.
    pub(crate) fn sdk<E>(operation: &str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match outbox_aws::store_error(operation, err) {
            StoreError::Unavailable(e) => TransactError::Retryable(e),
            StoreError::Backend(e) => TransactError::Backend(e),
            other => TransactError::Backend(Box::new(other)),
        }
    }
}

impl From<TransactError> for StoreError {
    fn from(e: TransactError) -> Self {
        match e {
            TransactError::Invalid(e) => StoreError::Invalid(e),
            TransactError::LimitExceeded { limit, actual, max } => {
                StoreError::LimitExceeded { limit, actual, max }
            }
            e @ (TransactError::EntityCondition { .. }
            | TransactError::VersionConflict { .. }
            | TransactError::VersionOrder { .. }
            | TransactError::InboxDuplicate { .. }) => StoreError::Conflict(e.to_string()),
            TransactError::Retryable(e) => StoreError::Unavailable(e),
            TransactError::Backend(e) => StoreError::Backend(e),
        }
    }
}

/// A request the SDK refused to build (a missing required field): a bug of
/// the caller's or ours, never helped by a retry.
pub(crate) fn build_error(e: aws_smithy_types::error::operation::BuildError) -> StoreError {
    StoreError::Config(format!("invalid DynamoDB request: {e}"))
}

/// Whether an SDK error is a failed condition of a single-item write.
pub(crate) fn is_condition_failed<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
) -> bool {
    err.code() == Some("ConditionalCheckFailedException")
}
