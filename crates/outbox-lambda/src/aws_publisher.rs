//! The AWS publisher named by a target URL, and the DynamoDB dead-letter table
//! as the stream handler's sink.

use outbox_core::{Event, PublishRequest, PublishResult, Publisher, StoreError};
use outbox_dynamodb::dead_letters::DeadLetterTable;
use outbox_eventbridge::EventBridgePublisher;
use outbox_sns::SnsPublisher;
use outbox_sqs::SqsPublisher;

use crate::config::{ConfigError, Target};
use crate::dead_letter::DeadLetterSink;

/// EventBridge, SQS or SNS, chosen at run time.
#[derive(Debug, Clone)]
pub enum AwsPublisher {
    EventBridge(EventBridgePublisher),
    Sqs(SqsPublisher),
    Sns(SnsPublisher),
}

impl AwsPublisher {
    /// Builds the publisher for `eventbridge://BUS`, `sqs://QUEUE_URL_OR_NAME`
    /// or `sns://TOPIC_ARN`, with `source` as the CloudEvents source.
    ///
    /// Only an SQS queue given by name makes a network call (`GetQueueUrl`);
    /// give a queue URL where start-up time matters, as in a Lambda function.
    pub async fn from_target(
        config: &aws_config::SdkConfig,
        target: &str,
        source: &str,
    ) -> Result<Self, ConfigError> {
        Self::for_target(config, &target.parse()?, source).await
    }

    /// [`AwsPublisher::from_target`] for a parsed target.
    pub async fn for_target(
        config: &aws_config::SdkConfig,
        target: &Target,
        source: &str,
    ) -> Result<Self, ConfigError> {
        Ok(match target {
            Target::EventBridge { bus } => AwsPublisher::EventBridge(
                EventBridgePublisher::new(eventbridge_client(config), bus).source(source),
            ),
            Target::Sqs { queue } => {
                let client = aws_sdk_sqs::Client::new(config);
                let url = if queue.starts_with("https://") || queue.starts_with("http://") {
                    queue.clone()
                } else {
                    queue_url(&client, queue).await?
                };
                AwsPublisher::Sqs(SqsPublisher::new(client, url).source(source))
            }
            Target::Sns { topic_arn } => AwsPublisher::Sns(
                SnsPublisher::new(aws_sdk_sns::Client::new(config), topic_arn).source(source),
            ),
        })
    }

    /// Refuses entries above this size instead of the target's service limit.
    #[must_use]
    pub fn max_entry_bytes(self, max: usize) -> Self {
        match self {
            AwsPublisher::EventBridge(p) => AwsPublisher::EventBridge(p.max_entry_bytes(max)),
            AwsPublisher::Sqs(p) => AwsPublisher::Sqs(p.max_entry_bytes(max)),
            AwsPublisher::Sns(p) => AwsPublisher::Sns(p.max_entry_bytes(max)),
        }
    }
}

/// The EventBridge client of the stream handler, trimmed of per-call work it
/// does not need: the handler retries failed entries itself, with backoff and
/// in order, so SDK retries would only repeat whole calls behind its back; and
/// a `PutEvents` response is a few hundred bytes, read at once, so there is no
/// stalled download to watch for.
pub fn eventbridge_client(config: &aws_config::SdkConfig) -> aws_sdk_eventbridge::Client {
    use aws_sdk_eventbridge::config::{retry::RetryConfig, StalledStreamProtectionConfig};
    let conf = aws_sdk_eventbridge::config::Builder::from(config)
        .retry_config(RetryConfig::disabled())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_eventbridge::Client::from_conf(conf)
}

async fn queue_url(client: &aws_sdk_sqs::Client, name: &str) -> Result<String, ConfigError> {
    let found = client.get_queue_url().queue_name(name).send().await;
    match found {
        Ok(out) => out.queue_url().map(str::to_owned).ok_or_else(|| {
            ConfigError::Unavailable(format!("GetQueueUrl for `{name}` returned no URL"))
        }),
        Err(err) => {
            let message = format!(
                "cannot find the URL of queue `{name}`: {}",
                outbox_aws::describe(&err)
            );
            if outbox_aws::classify(&err).is_retryable() {
                Err(ConfigError::Unavailable(message))
            } else {
                Err(ConfigError::Invalid {
                    var: crate::config::TARGET_VAR,
                    value: format!("sqs://{name}"),
                    reason: message,
                })
            }
        }
    }
}

impl Publisher for AwsPublisher {
    fn max_batch_size(&self) -> usize {
        match self {
            AwsPublisher::EventBridge(p) => p.max_batch_size(),
            AwsPublisher::Sqs(p) => p.max_batch_size(),
            AwsPublisher::Sns(p) => p.max_batch_size(),
        }
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        match self {
            AwsPublisher::EventBridge(p) => p.publish(request).await,
            AwsPublisher::Sqs(p) => p.publish(request).await,
            AwsPublisher::Sns(p) => p.publish(request).await,
        }
    }
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
        self.put_malformed(sequence_number, raw_record, error).await
    }
}

/// The `PublishEvents` handler as deployed: an AWS publisher and the DynamoDB
/// dead-letter table.
pub type PublishEventsHandler = crate::stream::StreamRelayHandler<AwsPublisher, DeadLetterTable>;

/// Builds the deployed handler from settings: clients only, no network call
/// unless the target is an SQS queue given by name.
pub async fn publish_events_handler(
    config: &aws_config::SdkConfig,
    settings: &crate::config::StreamRelaySettings,
) -> Result<PublishEventsHandler, ConfigError> {
    let mut publisher =
        AwsPublisher::for_target(config, &settings.target, &settings.source).await?;
    if let Some(max) = settings.max_entry_bytes {
        publisher = publisher.max_entry_bytes(max);
    }
    let dead_letters = DeadLetterTable::new(
        aws_sdk_dynamodb::Client::new(config),
        &settings.dead_letter_table,
    );
    Ok(
        crate::stream::StreamRelayHandler::new(publisher, dead_letters)
            .config(settings.handler_config()),
    )
}
