//! SDK configuration, from the environment as every AWS tool reads it, and
//! the checks that make a missing setting fail the start, by its name.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;

use crate::error::AwsError;

/// Loads region, credentials and endpoints the standard way: environment
/// variables, profiles, then the container or instance role.
///
/// Endpoints come from `AWS_ENDPOINT_URL_<SERVICE>` (for example
/// `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_EVENTBRIDGE`), so one binary
/// runs against AWS and against local emulators.
pub async fn load_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// Loads the configuration as [`load_config`] does, with `region` (when
/// given) taking precedence over the environment and profiles.
pub async fn load_config_with_region(region: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    loader.load().await
}

/// Fails unless `config` has a region and credentials can be loaded, so a
/// relay refuses to start instead of failing every call (and, before the
/// relay knew better, dead-lettering every event). `region_hint` tells the
/// user how to give a region, in the terms of the program they ran (a flag,
/// an environment variable).
pub async fn check_config(config: &SdkConfig, region_hint: &str) -> Result<(), AwsError> {
    if config.region().is_none() {
        return Err(AwsError::NoRegion {
            hint: region_hint.to_owned(),
        });
    }
    let Some(provider) = config.credentials_provider() else {
        return Err(AwsError::NoCredentials {
            reason: "no credentials provider is configured".to_owned(),
        });
    };
    provider
        .provide_credentials()
        .await
        .map(|_| ())
        .map_err(|e| AwsError::NoCredentials {
            reason: one_line(&e),
        })
}

/// An error and its sources on one line.
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}
