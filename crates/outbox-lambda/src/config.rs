//! Settings of the Lambda handlers, read from environment variables.

use crate::stream::HandlerConfig;

/// Where events go: `eventbridge://BUS`, `sqs://QUEUE_URL_OR_NAME`, `sns://TOPIC_ARN`.
pub const TARGET_VAR: &str = "OUTBOX_TARGET";
/// The CloudEvents `source` (EventBridge `Source`) of published events.
pub const SOURCE_VAR: &str = "OUTBOX_SOURCE";
/// The DynamoDB table that keeps dead letters; required by the stream handler.
pub const DEAD_LETTER_TABLE_VAR: &str = "OUTBOX_DEAD_LETTER_TABLE";
/// Retries of an event after a transient failure within one invocation.
pub const ENTRY_RETRIES_VAR: &str = "OUTBOX_ENTRY_RETRIES";
/// Largest entry the target accepts, overriding the publisher's service limit.
pub const MAX_ENTRY_BYTES_VAR: &str = "OUTBOX_MAX_ENTRY_BYTES";

pub const DEFAULT_TARGET: &str = "eventbridge://default";
pub const DEFAULT_SOURCE: &str = outbox_core::publish::DEFAULT_SOURCE;
/// More retries than this would keep a shard waiting longer than Lambda's
/// own retry of the record would.
pub const MAX_ENTRY_RETRIES: u32 = 10;

/// Bad or missing configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// A lookup the configuration needs (such as a queue URL) failed; it may
    /// succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The function's AWS setup is incomplete (no region, no credentials).
    #[error("{0}")]
    Setup(String),
}

impl ConfigError {
    /// Whether starting again later may help; otherwise the settings must change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfigError::Unavailable(_))
    }
}

/// A publish target named by URL, as the registry parses it:
/// `eventbridge://BUS`, `sqs://QUEUE_URL_OR_NAME`, `sns://TOPIC_ARN`.
pub type Target = outbox_registry::TargetUrl;

/// Reads `OUTBOX_TARGET`'s value: an AWS target, since a Lambda function
/// publishes nowhere else.
pub fn parse_target(value: &str) -> Result<Target, ConfigError> {
    let target: Target = value.parse()?;
    if !target.is_aws() {
        return Err(ConfigError::Invalid {
            var: TARGET_VAR,
            value: value.to_owned(),
            reason: "a Lambda function publishes to eventbridge://, sqs:// or sns://".to_owned(),
        });
    }
    Ok(target)
}

/// The registry's errors in the Lambda's terms: a URL or a target that
/// cannot be used is the `OUTBOX_TARGET` setting's fault.
impl From<outbox_registry::RegistryError> for ConfigError {
    fn from(e: outbox_registry::RegistryError) -> Self {
        use outbox_registry::RegistryError as R;
        match e {
            R::InvalidUrl { url, reason } => ConfigError::Invalid {
                var: TARGET_VAR,
                value: url,
                reason,
            },
            e if e.is_retryable() => ConfigError::Unavailable(e.to_string()),
            R::Target { url, source } => ConfigError::Invalid {
                var: TARGET_VAR,
                value: url,
                reason: source.to_string(),
            },
            other => ConfigError::Setup(other.to_string()),
        }
    }
}

/// What the `PublishEvents` handler reads from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRelaySettings {
    pub target: Target,
    pub source: String,
    pub dead_letter_table: String,
    pub entry_retries: u32,
    pub max_entry_bytes: Option<usize>,
}

impl StreamRelaySettings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads settings through `var`; empty values count as unset, as a
    /// template parameter left blank does.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let target = parse_target(get(TARGET_VAR).as_deref().unwrap_or(DEFAULT_TARGET))?;
        let source = get(SOURCE_VAR).unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
        let dead_letter_table = get(DEAD_LETTER_TABLE_VAR).ok_or(ConfigError::Missing {
            var: DEAD_LETTER_TABLE_VAR,
            hint: "name the DynamoDB table that keeps events and records the relay gives up on",
        })?;
        let entry_retries = match get(ENTRY_RETRIES_VAR) {
            None => HandlerConfig::default().entry_retries,
            Some(value) => match value.trim().parse::<u32>() {
                Ok(n) if n <= MAX_ENTRY_RETRIES => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: ENTRY_RETRIES_VAR,
                        reason: format!("expected a whole number from 0 to {MAX_ENTRY_RETRIES}"),
                        value,
                    })
                }
            },
        };
        let max_entry_bytes = match get(MAX_ENTRY_BYTES_VAR) {
            None => None,
            Some(value) => match value.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(ConfigError::Invalid {
                        var: MAX_ENTRY_BYTES_VAR,
                        reason: "expected a positive number of bytes".to_owned(),
                        value,
                    })
                }
            },
        };
        Ok(Self {
            target,
            source,
            dead_letter_table,
            entry_retries,
            max_entry_bytes,
        })
    }

    /// The handler configuration these settings imply.
    pub fn handler_config(&self) -> HandlerConfig {
        HandlerConfig::default().entry_retries(self.entry_retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<StreamRelaySettings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StreamRelaySettings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_and_required() {
        let s = settings(&[(DEAD_LETTER_TABLE_VAR, "dead")]).unwrap();
        assert_eq!(
            s.target,
            Target::EventBridge {
                bus: "default".into()
            }
        );
        assert_eq!(s.source, "urn:outbox");
        assert_eq!(s.entry_retries, 3);
        assert_eq!(s.max_entry_bytes, None);
        let err = settings(&[]).unwrap_err();
        assert!(err.to_string().contains(DEAD_LETTER_TABLE_VAR), "{err}");
        assert!(!err.is_retryable());
        assert!(settings(&[(DEAD_LETTER_TABLE_VAR, "  ")]).is_err());
    }

    #[test]
    fn reads_every_variable() {
        let s = settings(&[
            (DEAD_LETTER_TABLE_VAR, "dead"),
            (
                TARGET_VAR,
                "sqs://https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo",
            ),
            (SOURCE_VAR, "urn:orders"),
            (ENTRY_RETRIES_VAR, "5"),
            (MAX_ENTRY_BYTES_VAR, "1000"),
        ])
        .unwrap();
        assert_eq!(
            s.target,
            Target::Sqs {
                queue: "https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo".into()
            }
        );
        assert_eq!(
            (s.source.as_str(), s.entry_retries, s.max_entry_bytes),
            ("urn:orders", 5, Some(1000))
        );
        assert_eq!(s.handler_config().entry_retries, 5);
    }

    #[test]
    fn refuses_bad_values_by_name() {
        for (var, value) in [
            (ENTRY_RETRIES_VAR, "-1"),
            (ENTRY_RETRIES_VAR, "many"),
            (ENTRY_RETRIES_VAR, "11"),
            (MAX_ENTRY_BYTES_VAR, "0"),
            (MAX_ENTRY_BYTES_VAR, "1kb"),
            (TARGET_VAR, "kafka://orders"),
            (TARGET_VAR, "eventbridge://"),
            (TARGET_VAR, "sns://orders"),
            (TARGET_VAR, "orders"),
            (TARGET_VAR, "stdout://"),
        ] {
            let err = settings(&[(DEAD_LETTER_TABLE_VAR, "dead"), (var, value)]).unwrap_err();
            assert!(
                err.to_string().contains(var) && err.to_string().contains(value),
                "{err}"
            );
        }
    }

    #[test]
    fn targets_round_trip() {
        for url in [
            "eventbridge://orders-bus",
            "sqs://orders",
            "sns://arn:aws:sns:us-east-1:123456789012:orders",
        ] {
            assert_eq!(url.parse::<Target>().unwrap().to_string(), url);
        }
    }
}
