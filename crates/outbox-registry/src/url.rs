//! Store and target URLs, parsed once into typed values.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use outbox_core::DeadLetterPolicy;

use crate::error::RegistryError;

/// A store named by URL: `sqlite://FILE` or `dynamodb://TABLE`, with options
/// after `?` (`shape=polling`, `dead_letters=park`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    Sqlite {
        path: PathBuf,
        dead_letters: DeadLetterPolicy,
    },
    /// The outbox table on DynamoDB, in the stream shape (read through
    /// DynamoDB Streams) or the polling shape (`?shape=polling`).
    DynamoDb {
        table: String,
        shape: DynamoShape,
        dead_letters: DeadLetterPolicy,
    },
}

/// Which DynamoDB storage shape a `dynamodb://` store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamoShape {
    Stream,
    Polling,
}

/// DynamoDB table names: 3 to 255 of `a-z A-Z 0-9 _ - .`.
fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const STORES: &str = "sqlite://FILE, dynamodb://TABLE[?shape=polling]";

impl StoreUrl {
    /// A SQLite store at `path`, with the default dead-letter policy.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        StoreUrl::Sqlite {
            path: path.into(),
            dead_letters: DeadLetterPolicy::default(),
        }
    }

    /// Whether opening the store needs the AWS configuration.
    pub fn is_aws(&self) -> bool {
        matches!(self, StoreUrl::DynamoDb { .. })
    }

    pub fn dead_letter_policy(&self) -> DeadLetterPolicy {
        match self {
            StoreUrl::Sqlite { dead_letters, .. } | StoreUrl::DynamoDb { dead_letters, .. } => {
                *dead_letters
            }
        }
    }
}

fn parse_policy(url: &str, value: &str) -> Result<DeadLetterPolicy, RegistryError> {
    match value {
        "continue" => Ok(DeadLetterPolicy::Continue),
        "park" => Ok(DeadLetterPolicy::Park),
        other => Err(invalid(
            url,
            format!("dead_letters={other}: expected dead_letters=continue or dead_letters=park"),
        )),
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

impl FromStr for StoreUrl {
    type Err = RegistryError;

    fn from_str(url: &str) -> Result<Self, RegistryError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid(
                url,
                "not a store URL; expected e.g. sqlite://outbox.db or dynamodb://Outbox",
            )
        })?;
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut dead_letters = DeadLetterPolicy::default();
        let mut shape = None;
        for option in query.split('&').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("dead_letters", value)) => dead_letters = parse_policy(url, value)?,
                Some(("shape", "stream")) if scheme == "dynamodb" => {
                    shape = Some(DynamoShape::Stream)
                }
                Some(("shape", "polling")) if scheme == "dynamodb" => {
                    shape = Some(DynamoShape::Polling)
                }
                Some(("shape", other)) if scheme == "dynamodb" => {
                    return Err(invalid(
                        url,
                        format!("shape={other}: expected shape=stream or shape=polling"),
                    ))
                }
                _ => {
                    let known = if scheme == "dynamodb" {
                        "shape=stream|polling, dead_letters=continue|park"
                    } else {
                        "dead_letters=continue|park"
                    };
                    return Err(invalid(
                        url,
                        format!("unknown option `{option}`; known options: {known}"),
                    ));
                }
            }
        }
        match scheme {
            "sqlite" if name.is_empty() => Err(invalid(
                url,
                "sqlite:// needs a file, as in sqlite://outbox.db",
            )),
            "sqlite" => Ok(StoreUrl::Sqlite {
                path: PathBuf::from(name),
                dead_letters,
            }),
            "dynamodb" if !valid_table_name(name) => Err(invalid(
                url,
                format!("`{name}` is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"),
            )),
            "dynamodb" => Ok(StoreUrl::DynamoDb {
                table: name.to_owned(),
                shape: shape.unwrap_or(DynamoShape::Stream),
                dead_letters,
            }),
            other => Err(invalid(
                url,
                format!("unknown store `{other}://`; supported: {STORES}"),
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut options = Vec::new();
        match self {
            StoreUrl::Sqlite { path, .. } => write!(f, "sqlite://{}", path.display())?,
            StoreUrl::DynamoDb { table, shape, .. } => {
                write!(f, "dynamodb://{table}")?;
                if *shape == DynamoShape::Polling {
                    options.push("shape=polling");
                }
            }
        }
        if self.dead_letter_policy() == DeadLetterPolicy::Park {
            options.push("dead_letters=park");
        }
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

/// A broker named by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetUrl {
    /// Accepts everything, sends nothing: for benchmarks.
    Null,
    /// CloudEvent JSON lines on standard output.
    Stdout,
    /// The in-process broker of the demo.
    Memory,
    /// An event bus name or ARN.
    EventBridge {
        bus: String,
    },
    /// A queue URL, or a name to look its URL up by.
    Sqs {
        queue: String,
    },
    Sns {
        topic_arn: String,
    },
}

const TARGETS: &str =
    "eventbridge://BUS, sqs://QUEUE_URL_OR_NAME, sns://TOPIC_ARN, null://, stdout://, memory://";

impl TargetUrl {
    /// Whether opening the target needs the AWS configuration.
    pub fn is_aws(&self) -> bool {
        matches!(
            self,
            TargetUrl::EventBridge { .. } | TargetUrl::Sqs { .. } | TargetUrl::Sns { .. }
        )
    }
}

/// Whether `queue` is a complete queue URL: scheme, host, account, name.
fn complete_queue_url(queue: &str) -> bool {
    let rest = queue
        .strip_prefix("https://")
        .or_else(|| queue.strip_prefix("http://"))
        .unwrap_or("");
    let parts: Vec<&str> = rest.split('/').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty())
}

impl FromStr for TargetUrl {
    type Err = RegistryError;

    fn from_str(url: &str) -> Result<Self, RegistryError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(url, format!("not a target URL; expected one of {TARGETS}")))?;
        let rest = rest.trim();
        let needs_name = || invalid(url, "names no bus, queue or topic after `://`");
        match scheme {
            "null" => Ok(TargetUrl::Null),
            "stdout" => Ok(TargetUrl::Stdout),
            "memory" => Ok(TargetUrl::Memory),
            "eventbridge" | "sqs" | "sns" if rest.is_empty() => Err(needs_name()),
            "eventbridge" => Ok(TargetUrl::EventBridge {
                bus: rest.to_owned(),
            }),
            "sqs" if rest.contains("://") && !complete_queue_url(rest) => Err(invalid(
                url,
                "an SQS queue URL has a host, an account and a queue name, as in \
                 sqs://https://sqs.us-east-1.amazonaws.com/123456789012/orders",
            )),
            "sqs" => Ok(TargetUrl::Sqs {
                queue: rest.to_owned(),
            }),
            "sns" if rest.starts_with("arn:") && rest.split(':').count() == 6 => {
                Ok(TargetUrl::Sns {
                    topic_arn: rest.to_owned(),
                })
            }
            "sns" => Err(invalid(
                url,
                "sns:// takes a topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
            )),
            other => Err(invalid(
                url,
                format!("unknown target `{other}://`; supported: {TARGETS}"),
            )),
        }
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetUrl::Null => f.write_str("null://"),
            TargetUrl::Stdout => f.write_str("stdout://"),
            TargetUrl::Memory => f.write_str("memory://"),
            TargetUrl::EventBridge { bus } => write!(f, "eventbridge://{bus}"),
            TargetUrl::Sqs { queue } => write!(f, "sqs://{queue}"),
            TargetUrl::Sns { topic_arn } => write!(f, "sns://{topic_arn}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str) -> Result<StoreUrl, String> {
        url.parse::<StoreUrl>().map_err(|e| e.to_string())
    }

    #[test]
    fn parses_store_urls_and_their_options() {
        assert_eq!(store("sqlite://a/b.db"), Ok(StoreUrl::sqlite("a/b.db")));
        assert_eq!(
            store("sqlite:///tmp/x.db"),
            Ok(StoreUrl::sqlite("/tmp/x.db"))
        );
        assert_eq!(
            store("sqlite://x.db?dead_letters=park"),
            Ok(StoreUrl::Sqlite {
                path: "x.db".into(),
                dead_letters: DeadLetterPolicy::Park
            })
        );
        assert_eq!(
            store("dynamodb://Outbox"),
            Ok(StoreUrl::DynamoDb {
                table: "Outbox".into(),
                shape: DynamoShape::Stream,
                dead_letters: DeadLetterPolicy::Continue,
            })
        );
        for url in [
            "sqlite://x.db",
            "sqlite://x.db?dead_letters=park",
            "dynamodb://Outbox",
            "dynamodb://Outbox?shape=polling",
            "dynamodb://Outbox?shape=polling&dead_letters=park",
            "dynamodb://Outbox?dead_letters=park",
        ] {
            assert_eq!(store(url).unwrap().to_string(), url);
        }
        assert_eq!(
            store("dynamodb://Outbox?dead_letters=park&shape=polling")
                .unwrap()
                .to_string(),
            "dynamodb://Outbox?shape=polling&dead_letters=park"
        );
    }

    #[test]
    fn refuses_bad_store_urls_with_the_reason() {
        for (url, says) in [
            ("sqlite://", "needs a file"),
            ("mysql://x", "unknown store"),
            ("outbox.db", "not a store URL"),
            ("dynamodb://x", "not a DynamoDB table name"),
            ("dynamodb://Outbox?shape=queue", "shape=queue"),
            ("dynamodb://Outbox?dead_letters=drop", "dead_letters=drop"),
            (
                "sqlite://x.db?shape=polling",
                "unknown option `shape=polling`",
            ),
            ("sqlite://x.db?wal", "unknown option `wal`"),
        ] {
            let err = store(url).unwrap_err();
            assert!(err.contains(says) && err.contains(url), "{url}: {err}");
        }
    }

    #[test]
    fn parses_target_urls() {
        for url in [
            "eventbridge://orders-bus",
            "sqs://orders",
            "sqs://https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo",
            "sns://arn:aws:sns:us-east-1:123456789012:orders",
            "null://",
            "stdout://",
            "memory://",
        ] {
            assert_eq!(url.parse::<TargetUrl>().unwrap().to_string(), url);
        }
        assert!("sqs://orders".parse::<TargetUrl>().unwrap().is_aws());
        assert!(!"null://".parse::<TargetUrl>().unwrap().is_aws());
        for (url, says) in [
            ("kafka://x", "unknown target"),
            ("orders", "not a target URL"),
            ("eventbridge://", "names no bus"),
            ("sqs://  ", "names no bus"),
            ("sns://orders", "topic ARN"),
            (
                "sqs://http://127.0.0.1:5000/",
                "host, an account and a queue name",
            ),
        ] {
            let err = url.parse::<TargetUrl>().unwrap_err().to_string();
            assert!(err.contains(says) && err.contains(url), "{url}: {err}");
        }
    }
}
