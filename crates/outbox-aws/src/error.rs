//! SDK errors sorted into what the relay should do about them.
//!
//! The one question that matters for an outbox: does a failure say something
//! about the *entry*, or about the *target as a whole*? A failure of the call
//! (network, timeout, throttling, 5xx, credentials, a bus or queue that does
//! not exist) says nothing about the events in it: the relay pauses the
//! target and spends no event's attempts. Only what the service reports for
//! one entry, or a call it refuses because of what the entries contain, counts
//! toward an entry's attempts.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use outbox_core::{BoxError, Disposition, PublishError, StoreError};

/// Errors of the AWS helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AwsError {
    /// A service call failed. `description` is one readable line (the
    /// service's code and message, or the network failure); the SDK's own
    /// error stays the source.
    #[error("{operation}: {description}")]
    Call {
        operation: String,
        description: String,
        retryable: bool,
        #[source]
        source: BoxError,
    },
    /// The bus, queue or topic a target names does not exist.
    #[error("{resource} does not exist")]
    NotFound { resource: String },
    /// The SDK configuration has no region. `hint` names the setting to give.
    #[error("no AWS region: {hint}")]
    NoRegion { hint: String },
    /// No credentials could be found or loaded.
    #[error("no AWS credentials: {reason}")]
    NoCredentials { reason: String },
}

impl AwsError {
    /// Whether the same call may succeed later as it is.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AwsError::Call {
                retryable: true,
                ..
            }
        )
    }

    /// A failed call, the SDK error kept as the source.
    pub fn call<E>(operation: &str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        AwsError::Call {
            operation: operation.to_owned(),
            description: describe(&err),
            retryable: classify(&err).is_retryable(),
            source: Box::new(err),
        }
    }
}

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

/// Error codes of a whole call that are the target's or the caller's setup,
/// not the entries': credentials and permissions, and a bus, queue or topic
/// that does not exist. They last until someone fixes the setup, and no
/// event is at fault.
const TARGET_CODES: &[&str] = &[
    // Credentials and signatures.
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "IncompleteSignatureException",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "InvalidSecurity",
    // Permissions.
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "AuthorizationErrorException",
    "NotAuthorized",
    "KmsAccessDenied",
    "KMSAccessDeniedException",
    "KMS.AccessDeniedException",
    "KMSDisabledException",
    "KmsDisabled",
    "KMSInvalidStateException",
    "KMSNotFoundException",
    "KmsNotFound",
    "OptInRequired",
    // No such bus, queue or topic.
    "ResourceNotFoundException",
    "ResourceNotFound",
    "NonExistentQueue",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "QueueDeletedRecently",
    "NotFound",
    "NotFoundException",
    "InvalidAddress",
];

/// Whether an error code names a failure that may pass on its own.
pub fn is_retryable_code(code: &str) -> bool {
    RETRYABLE_CODES.contains(&code)
}

/// Whether an error code names a failure of the target or its setup rather
/// than of the entries sent.
pub fn is_target_code(code: &str) -> bool {
    TARGET_CODES.contains(&code)
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

/// Whether a failed call is the target's as a whole (see the module docs):
/// anything but a service answer refusing the request for its content.
/// A request that could not be built (no region, no credentials, no
/// endpoint) is the setup's fault too: the entries were fine.
pub fn is_target_failure<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or_default();
            is_retryable_code(code)
                || is_target_code(code)
                || status >= 500
                || matches!(status, 401 | 403 | 404 | 408 | 429)
        }
        _ => true,
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
                let s_text = s.to_string();
                // Wrappers often repeat their inner error; say each once.
                if !text.contains(&s_text) {
                    text.push_str(": ");
                    text.push_str(&s_text);
                }
                source = s.source();
            }
            text.replace('\n', " ")
        }
    }
}

/// The failure of a whole call as a publish error, for every entry of it.
///
/// A failure of the target (see [`is_target_failure`]) is target-wide and
/// transient: the relay pauses and probes, spending no attempts, however long
/// it lasts. A call refused for its content stays the entries' and
/// permanent, so one bad batch cannot jam the relay forever.
pub fn publish_error<E>(operation: &str, err: SdkError<E, HttpResponse>) -> PublishError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = format!("{operation}: {}", describe(&err));
    let error = if is_target_failure(&err) {
        PublishError::unavailable(message)
    } else {
        match classify(&err) {
            Disposition::Permanent => PublishError::permanent(message),
            Disposition::RetryAfter(after) => PublishError::retry_after(after, message),
            _ => PublishError::transient(message),
        }
    };
    error.with_source(err)
}

/// As a store error: `Unavailable` (retryable) or `Backend`, the SDK error
/// kept as the source under a one-line message.
pub fn store_error<E>(operation: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let error = AwsError::call(operation, err);
    if error.is_retryable() {
        StoreError::Unavailable(Box::new(error))
    } else {
        StoreError::Backend(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::result::{ConnectorError, ServiceError};
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;
    use outbox_core::Scope;

    /// A service error as the SDK hands it over: code, message and status.
    #[derive(Debug)]
    struct Service(ErrorMetadata);

    impl std::fmt::Display for Service {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("service error")
        }
    }

    impl std::error::Error for Service {}

    impl ProvideErrorMetadata for Service {
        fn meta(&self) -> &ErrorMetadata {
            &self.0
        }
    }

    fn service(status: u16, code: &str) -> SdkError<Service, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("it said no")
            .build();
        let raw = HttpResponse::new(
            StatusCode::try_from(status).expect("a valid status"),
            SdkBody::empty(),
        );
        SdkError::ServiceError(
            ServiceError::builder()
                .source(Service(meta))
                .raw(raw)
                .build(),
        )
    }

    fn scope_of(err: SdkError<Service, HttpResponse>) -> (Scope, Disposition) {
        let e = publish_error("Op", err);
        (e.scope(), e.disposition())
    }

    #[test]
    fn whole_call_failures_are_the_targets() {
        for (status, code) in [
            (400, "ThrottlingException"),
            (400, "UnrecognizedClientException"),
            (400, "InvalidSignatureException"),
            (403, "ExpiredToken"),
            (403, "AccessDenied"),
            (400, "AccessDeniedException"),
            (400, "ResourceNotFoundException"),
            (400, "AWS.SimpleQueueService.NonExistentQueue"),
            (400, "QueueDoesNotExist"),
            (404, "NotFound"),
            (500, "InternalFailure"),
            (503, "Whatever"),
            (429, "SlowDown"),
        ] {
            assert_eq!(
                scope_of(service(status, code)),
                (Scope::Target, Disposition::Transient),
                "{status} {code}"
            );
        }
        let network: SdkError<Service, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
        assert_eq!(scope_of(network), (Scope::Target, Disposition::Transient));
        let timeout: SdkError<Service, HttpResponse> = SdkError::timeout_error("took too long");
        assert_eq!(scope_of(timeout), (Scope::Target, Disposition::Transient));
        // "Missing Region" and friends: the setup, never the events.
        let unbuilt: SdkError<Service, HttpResponse> =
            SdkError::construction_failure("Missing Region");
        assert_eq!(scope_of(unbuilt), (Scope::Target, Disposition::Transient));
    }

    #[test]
    fn calls_refused_for_their_content_stay_the_entries() {
        for code in [
            "InvalidParameterValue",
            "ValidationException",
            "BatchRequestTooLong",
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
            "InvalidParameter",
        ] {
            assert_eq!(
                scope_of(service(400, code)),
                (Scope::Entry, Disposition::Permanent),
                "{code}"
            );
        }
    }

    #[test]
    fn errors_keep_their_source_under_one_line() {
        let e = publish_error("SendMessageBatch", service(400, "AccessDenied"));
        assert_eq!(e.message(), "SendMessageBatch: AccessDenied: it said no");
        assert!(std::error::Error::source(&e).is_some());

        let s = store_error("PutItem", service(500, "InternalError"));
        assert!(s.is_retryable());
        assert_eq!(
            s.to_string(),
            "store unavailable: PutItem: InternalError: it said no"
        );
        let inner = std::error::Error::source(&s).expect("the AWS error");
        assert!(
            std::error::Error::source(inner).is_some(),
            "the SDK error stays"
        );
        let s = store_error("PutItem", service(400, "ValidationException"));
        assert!(!s.is_retryable());
    }
}
