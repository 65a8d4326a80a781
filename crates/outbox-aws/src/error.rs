//! SDK errors sorted into what the relay should do about them.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use outbox_core::{BoxError, Disposition, PublishError, StoreError};

/// Error codes that mean "slow down" or "try again" whatever the service.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "TransactionInProgressException",
    "TransactionConflictException",
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "InternalException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "KMSThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Whether an error code names a failure that may pass on its own.
pub fn is_retryable_code(code: &str) -> bool {
    RETRYABLE_CODES.contains(&code)
}

/// Transient for network failures, timeouts, throttling and 5xx; permanent
/// for requests the service refused as they are (validation, access,
/// missing resources) or that could not even be built.
pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Disposition {
    match err {
        SdkError::ConstructionFailure(_) => Disposition::Permanent,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Disposition::Transient
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or_default();
            if is_retryable_code(code) || status >= 500 || status == 429 {
                Disposition::Transient
            } else {
                Disposition::Permanent
            }
        }
        _ => Disposition::Transient,
    }
}

/// A one-line description: the service's code and message when it sent one.
pub fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            // The outer error says only "dispatch failure"; its sources say why.
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// The same failure as a publish error, for every entry of a failed call.
pub fn publish_error<E>(operation: &str, err: &SdkError<E, HttpResponse>) -> PublishError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = format!("{operation}: {}", describe(err));
    match classify(err) {
        Disposition::Permanent => PublishError::permanent(message),
        Disposition::RetryAfter(after) => PublishError::retry_after(after, message),
        _ => PublishError::transient(message),
    }
}

/// As a store error: `Unavailable` (retryable) or `Backend`.
pub fn store_error<E>(operation: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = classify(&err).is_retryable();
    let boxed: BoxError = format!("{operation}: {}", describe(&err)).into();
    if retryable {
        StoreError::Unavailable(boxed)
    } else {
        StoreError::Backend(boxed)
    }
}
