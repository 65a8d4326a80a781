//! Stores and brokers named by URL: `sqlite://FILE`, `null://`, `stdout://`...

use std::path::PathBuf;

use outbox_core::publishers::{NullPublisher, StdoutPublisher};
use outbox_core::{PublishRequest, PublishResult, Publisher};
use outbox_sqlite::SqliteOutbox;

use crate::CliError;

/// A store named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
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
            other => Err(format!(
                "unknown store `{other}://`; supported: sqlite://FILE"
            )),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
        }
    }
}

/// An opened store.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteOutbox),
}

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

    pub async fn open(&self) -> Result<Store, CliError> {
        match self {
            StoreUrl::Sqlite(path) => Ok(Store::Sqlite(SqliteOutbox::open(path).await?)),
        }
    }

    /// Opens a store that must already exist (admin commands never create one).
    pub async fn open_existing(&self) -> Result<Store, CliError> {
        match self {
            StoreUrl::Sqlite(path) if !path.exists() => Err(CliError::Usage(format!(
                "no database at {}",
                path.display()
            ))),
            _ => self.open().await,
        }
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
            other => Err(format!(
                "unknown target `{other}://`; supported: null://, stdout://, memory://"
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
        })
    }
}

/// A publisher chosen at run time.
#[derive(Debug, Clone)]
pub enum AnyPublisher {
    Null(NullPublisher),
    Stdout(StdoutPublisher),
}

impl TargetUrl {
    pub fn publisher(&self, source: &str) -> Result<AnyPublisher, CliError> {
        match self {
            TargetUrl::Null => Ok(AnyPublisher::Null(NullPublisher)),
            TargetUrl::Stdout => Ok(AnyPublisher::Stdout(StdoutPublisher::new(source))),
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
        }
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        match self {
            AnyPublisher::Null(p) => p.publish(request).await,
            AnyPublisher::Stdout(p) => p.publish(request).await,
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
        assert_eq!("null://".parse::<TargetUrl>(), Ok(TargetUrl::Null));
        assert!("kafka://x".parse::<TargetUrl>().is_err());
    }
}
