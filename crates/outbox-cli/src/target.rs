//! Stores and brokers named by URL, as `outbox-registry` parses and opens
//! them; this module only adds what is the command line's own: the
//! `--region` flag, and a temporary database for the demo and the bench.

use std::sync::OnceLock;

use outbox_registry::TargetOptions;
pub use outbox_registry::{AnyPublisher, DynamoShape, Store, StoreUrl, TargetUrl};

use crate::CliError;

/// How a user of the `outbox` command gives a region.
pub const REGION_HINT: &str = "pass --region or set AWS_REGION";

static REGION: OnceLock<Option<String>> = OnceLock::new();

/// Records the `--region` flag, once, before any store or target is opened.
pub fn set_region(region: Option<String>) {
    let _ = REGION.set(region);
}

/// The AWS configuration, checked (region, credentials), when `needed`.
pub async fn aws_config(needed: bool) -> Result<Option<aws_config::SdkConfig>, CliError> {
    if !needed {
        return Ok(None);
    }
    let region = REGION.get().and_then(|r| r.as_deref());
    Ok(Some(
        outbox_registry::aws_config(region, REGION_HINT).await?,
    ))
}

/// `url`, or else a SQLite file named `name` in a temporary directory that
/// lives as long as the returned guard.
pub fn or_temporary(
    url: Option<&StoreUrl>,
    name: &str,
) -> Result<(StoreUrl, tempfile::TempDir), CliError> {
    let temp = tempfile::tempdir()
        .map_err(|e| CliError::Usage(format!("cannot make a temporary directory: {e}")))?;
    let url = url
        .cloned()
        .unwrap_or_else(|| StoreUrl::sqlite(temp.path().join(name)));
    Ok((url, temp))
}

/// Opens the store, creating its database or tables when missing.
pub async fn open_store(url: &StoreUrl) -> Result<Store, CliError> {
    let aws = aws_config(url.is_aws()).await?;
    Ok(url.open(aws.as_ref()).await?)
}

/// Opens a store that must already exist.
pub async fn open_existing(url: &StoreUrl) -> Result<Store, CliError> {
    let aws = aws_config(url.is_aws()).await?;
    Ok(url.open_existing(aws.as_ref()).await?)
}

/// Opens the target, checking that it exists.
pub async fn open_target(url: &TargetUrl, source: &str) -> Result<AnyPublisher, CliError> {
    let aws = aws_config(url.is_aws()).await?;
    Ok(url.open(aws.as_ref(), &TargetOptions::new(source)).await?)
}
