//! The AWS publisher named by a target URL (opened by `outbox-registry`, the
//! one place stores and targets are named), and the DynamoDB dead-letter
//! table as the stream handler's sink.

use outbox_core::{Event, StoreError};
use outbox_dynamodb::dead_letters::DeadLetterTable;
use outbox_registry::TargetOptions;

use crate::config::ConfigError;
use crate::dead_letter::DeadLetterSink;

/// EventBridge, SQS or SNS, chosen at run time: the registry's publisher.
pub type AwsPublisher = outbox_registry::AnyPublisher;

pub use outbox_registry::eventbridge_client;

/// How a Lambda function is given a region: Lambda sets `AWS_REGION`
/// itself, so only a run outside Lambda can lack it.
pub const REGION_HINT: &str = "set AWS_REGION in the function's environment";

/// The AWS configuration of a handler, checked at start: a region and
/// credentials, so a broken setup fails the init instead of every event.
pub async fn load_checked_config() -> Result<aws_config::SdkConfig, ConfigError> {
    Ok(outbox_registry::aws_config(None, REGION_HINT).await?)
}

/// Opens the target of the settings: checks that the bus, queue or topic
/// exists, and looks an SQS queue given by name up (give a queue URL where
/// start-up time matters).
pub async fn open_publisher(
    config: &aws_config::SdkConfig,
    target: &crate::config::Target,
    source: &str,
    max_entry_bytes: Option<usize>,
) -> Result<AwsPublisher, ConfigError> {
    let options = TargetOptions::new(source).max_entry_bytes(max_entry_bytes);
    Ok(target.open(Some(config), &options).await?)
}

impl DeadLetterSink for DeadLetterTable {
    async fn dead_letter_events(&self, dead: &[(Event, u32, String)]) -> Result<(), StoreError> {
        self.put_events(dead).await
    }

    async fn dead_letter_record(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        // The sink does not carry the shard id; the raw record names its
        // stream (eventSourceARN) and the sequence number is kept.
        self.put_malformed("", sequence_number, raw_record, error)
            .await
    }
}

/// The `PublishEvents` handler as deployed: an AWS publisher and the DynamoDB
/// dead-letter table.
pub type PublishEventsHandler = crate::stream::StreamRelayHandler<AwsPublisher, DeadLetterTable>;

/// Builds the deployed handler from settings. Opening the target checks that
/// it exists (one call), so a missing bus or queue fails the init, naming
/// the `OUTBOX_TARGET` value.
pub async fn publish_events_handler(
    config: &aws_config::SdkConfig,
    settings: &crate::config::StreamRelaySettings,
) -> Result<PublishEventsHandler, ConfigError> {
    let publisher = open_publisher(
        config,
        &settings.target,
        &settings.source,
        settings.max_entry_bytes,
    )
    .await?;
    let dead_letters = DeadLetterTable::new(
        aws_sdk_dynamodb::Client::new(config),
        &settings.dead_letter_table,
    );
    Ok(
        crate::stream::StreamRelayHandler::new(publisher, dead_letters)
            .config(settings.handler_config()),
    )
}
