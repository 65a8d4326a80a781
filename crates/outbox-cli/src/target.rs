//! Stores and brokers named by URL: `sqlite://FILE`, `dynamodb://TABLE`,
//! `eventbridge://BUS`, `sqs://QUEUE`, `sns://TOPIC_ARN`, `null://`, `stdout://`...

use std::path::PathBuf;

use outbox_core::publishers::{NullPublisher, StdoutPublisher};
use outbox_core::{PublishRequest, PublishResult, Publisher};
use outbox_dynamodb::{DynamoOutbox, PollingOutbox, Shape, StreamSource};
use outbox_lambda::AwsPublisher;
use outbox_sqlite::SqliteOutbox;

use crate::CliError;

/// A store named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    /// The outbox table on DynamoDB, in the stream shape (read through
    /// DynamoDB Streams) or the polling shape (`?shape=polling`).
    DynamoDb {
        table: String,
        shape: DynamoShape,
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

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("`{url}` is not a store URL; expected e.g. sqlite://outbox.db")
        })?;
        match scheme {
            "sqlite" if rest.is_empty() => {
                Err("sqlite:// needs a file, as in sqlite://outbox.db".into())
            }
            "sqlite" => Ok(StoreUrl::Sqlite(PathBuf::from(rest))),
            "dynamodb" => {
                let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
                if !valid_table_name(table) {
                    return Err(format!(
                        "`{table}` is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"
                    ));
                }
                let shape = match query {
                    "" | "shape=stream" => DynamoShape::Stream,
                    "shape=polling" => DynamoShape::Polling,
                    other => {
                        return Err(format!(
                            "unknown option `{other}` in {url}; expected shape=stream or shape=polling"
                        ))
                    }
                };
                Ok(StoreUrl::DynamoDb {
                    table: table.to_owned(),
                    shape,
                })
            }
            other => Err(format!(
                "unknown store `{other}://`; supported: sqlite://FILE, dynamodb://TABLE[?shape=polling]"
            )),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::DynamoDb {
                table,
                shape: DynamoShape::Stream,
            } => write!(f, "dynamodb://{table}"),
            StoreUrl::DynamoDb {
                table,
                shape: DynamoShape::Polling,
            } => write!(f, "dynamodb://{table}?shape=polling"),
        }
    }
}

/// An opened store.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteOutbox),
    DynamoStream(StreamSource),
    DynamoPolling(PollingOutbox),
}

/// Runs `$body` with `$s` bound to whichever store `$store` holds.
macro_rules! with_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            $crate::target::Store::Sqlite($s) => $body,
            $crate::target::Store::DynamoStream($s) => $body,
            $crate::target::Store::DynamoPolling($s) => $body,
        }
    };
}
pub(crate) use with_store;

impl StoreUrl {
    /// `url`, or else a SQLite file named `name` in a temporary directory
    /// that lives as long as the returned guard.
    pub fn or_temporary(
        url: Option<&StoreUrl>,
        name: &str,
    ) -> Result<(StoreUrl, tempfile::TempDir), CliError> {
        let temp = tempfile::tempdir()
            .map_err(|e| CliError::Usage(format!("cannot make a temporary directory: {e}")))?;
        let url = url
            .cloned()
            .unwrap_or_else(|| StoreUrl::Sqlite(temp.path().join(name)));
        Ok((url, temp))
    }

    /// Opens the store, creating its database or tables when missing.
    pub async fn open(&self) -> Result<Store, CliError> {
        self.open_with(true).await
    }

    /// Opens a store that must already exist (the relay and admin commands
    /// never create one: a mistyped name would idle forever).
    pub async fn open_existing(&self) -> Result<Store, CliError> {
        self.open_with(false).await
    }

    async fn open_with(&self, create: bool) -> Result<Store, CliError> {
        match self {
            StoreUrl::Sqlite(path) if !create && !path.exists() => Err(CliError::Usage(format!(
                "no database at {}",
                path.display()
            ))),
            StoreUrl::Sqlite(path) => Ok(Store::Sqlite(SqliteOutbox::open(path).await?)),
            StoreUrl::DynamoDb { table, shape } => {
                let config = outbox_aws::load_config().await;
                let dynamodb = aws_sdk_dynamodb::Client::new(&config);
                let outbox = DynamoOutbox::new(dynamodb.clone(), table);
                match shape {
                    DynamoShape::Stream => {
                        let streams = aws_sdk_dynamodbstreams::Client::new(&config);
                        let source = StreamSource::new(dynamodb.clone(), streams, table);
                        if create {
                            outbox.create_table_if_missing().await?;
                        } else {
                            require_table(&dynamodb, table).await?;
                        }
                        // The relay's own bookkeeping: checkpoints and dead letters.
                        source.create_tables_if_missing().await?;
                        Ok(Store::DynamoStream(source))
                    }
                    DynamoShape::Polling => {
                        let outbox = outbox.shape(Shape::Polling);
                        if create {
                            outbox.create_table_if_missing().await?;
                        } else {
                            require_table(outbox.client(), table).await?;
                        }
                        Ok(Store::DynamoPolling(PollingOutbox::new(outbox)?))
                    }
                }
            }
        }
    }
}

/// Fails clearly when the outbox table does not exist.
async fn require_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), CliError> {
    match client.describe_table().table_name(table).send().await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Err(CliError::Usage(format!("no DynamoDB table named {table}")))
        }
        Err(e) => Err(outbox_aws::store_error("DescribeTable", e).into()),
    }
}

/// A broker named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// Accepts everything, sends nothing: for benchmarks.
    Null,
    /// CloudEvent JSON lines on standard output.
    Stdout,
    /// The in-process broker of the demo.
    Memory,
    /// An AWS target as `outbox-lambda` names them: `eventbridge://BUS`,
    /// `sqs://QUEUE_URL_OR_NAME`, `sns://TOPIC_ARN`.
    Aws(String),
}

impl std::str::FromStr for TargetUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let (scheme, _) = url
            .split_once("://")
            .ok_or_else(|| format!("`{url}` is not a target URL; expected e.g. stdout://"))?;
        match scheme {
            "null" => Ok(TargetUrl::Null),
            "stdout" => Ok(TargetUrl::Stdout),
            "memory" => Ok(TargetUrl::Memory),
            "eventbridge" | "sqs" | "sns" => Ok(TargetUrl::Aws(url.to_owned())),
            other => Err(format!(
                "unknown target `{other}://`; supported: eventbridge://BUS, sqs://QUEUE, sns://TOPIC_ARN, null://, stdout://, memory://"
            )),
        }
    }
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetUrl::Null => "null://",
            TargetUrl::Stdout => "stdout://",
            TargetUrl::Memory => "memory://",
            TargetUrl::Aws(url) => url,
        })
    }
}

/// A publisher chosen at run time.
#[derive(Debug, Clone)]
pub enum AnyPublisher {
    Null(NullPublisher),
    Stdout(StdoutPublisher),
    Aws(AwsPublisher),
}

impl TargetUrl {
    pub async fn publisher(&self, source: &str) -> Result<AnyPublisher, CliError> {
        match self {
            TargetUrl::Null => Ok(AnyPublisher::Null(NullPublisher)),
            TargetUrl::Stdout => Ok(AnyPublisher::Stdout(StdoutPublisher::new(source))),
            TargetUrl::Aws(url) => {
                let config = outbox_aws::load_config().await;
                AwsPublisher::from_target(&config, url, source)
                    .await
                    .map(AnyPublisher::Aws)
                    .map_err(|e| CliError::Usage(e.to_string()))
            }
            TargetUrl::Memory => Err(CliError::Usage(
                "memory:// lives inside one process: only `outbox demo` can use it".into(),
            )),
        }
    }
}

impl Publisher for AnyPublisher {
    fn max_batch_size(&self) -> usize {
        match self {
            AnyPublisher::Null(p) => p.max_batch_size(),
            AnyPublisher::Stdout(p) => p.max_batch_size(),
            AnyPublisher::Aws(p) => p.max_batch_size(),
        }
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        match self {
            AnyPublisher::Null(p) => p.publish(request).await,
            AnyPublisher::Stdout(p) => p.publish(request).await,
            AnyPublisher::Aws(p) => p.publish(request).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            "sqlite://a/b.db".parse::<StoreUrl>(),
            Ok(StoreUrl::Sqlite("a/b.db".into()))
        );
        assert_eq!(
            "sqlite:///tmp/x.db".parse::<StoreUrl>(),
            Ok(StoreUrl::Sqlite("/tmp/x.db".into()))
        );
        assert!("sqlite://".parse::<StoreUrl>().is_err());
        assert!("mysql://x"
            .parse::<StoreUrl>()
            .unwrap_err()
            .contains("unknown store"));
        assert!("outbox.db".parse::<StoreUrl>().is_err());
        assert_eq!(
            "dynamodb://Outbox".parse::<StoreUrl>(),
            Ok(StoreUrl::DynamoDb {
                table: "Outbox".into(),
                shape: DynamoShape::Stream
            })
        );
        let polling = "dynamodb://Outbox?shape=polling"
            .parse::<StoreUrl>()
            .unwrap();
        assert_eq!(polling.to_string(), "dynamodb://Outbox?shape=polling");
        assert!("dynamodb://x".parse::<StoreUrl>().is_err());
        assert!("dynamodb://Outbox?shape=queue".parse::<StoreUrl>().is_err());
        assert_eq!(
            "eventbridge://orders"
                .parse::<TargetUrl>()
                .unwrap()
                .to_string(),
            "eventbridge://orders"
        );
        assert_eq!("null://".parse::<TargetUrl>(), Ok(TargetUrl::Null));
        assert!("kafka://x".parse::<TargetUrl>().is_err());
    }
}
