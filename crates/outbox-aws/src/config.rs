//! SDK configuration, from the environment as every AWS tool reads it.

use aws_config::{BehaviorVersion, SdkConfig};

/// Loads region, credentials and endpoints the standard way: environment
/// variables, profiles, then the container or instance role.
///
/// Endpoints come from `AWS_ENDPOINT_URL_<SERVICE>` (for example
/// `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_EVENTBRIDGE`), so one binary
/// runs against AWS and against local emulators.
pub async fn load_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}
