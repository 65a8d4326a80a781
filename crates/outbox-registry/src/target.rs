//! Opening a target named by URL, with the checks that can be made at start.

use outbox_core::publishers::{NullPublisher, StdoutPublisher};
use outbox_core::{PublishRequest, PublishResult, Publisher};
use std::sync::Arc;

use outbox_eventbridge::EventBridgePublisher;
use outbox_nats::NatsPublisher;
use outbox_rabbitmq::RabbitPublisher;
use outbox_sns::SnsPublisher;
use outbox_sqs::SqsPublisher;

use crate::error::RegistryError;
use crate::url::TargetUrl;

/// Loads the AWS configuration (with `region` taking precedence when given)
/// and checks that it has a region and credentials. `region_hint` is how the
/// user of this program gives a region, named in the error when none is set
/// (for the `outbox` command: "pass --region or set AWS_REGION").
pub async fn aws_config(
    region: Option<&str>,
    region_hint: &str,
) -> Result<aws_config::SdkConfig, RegistryError> {
    let config = outbox_aws::load_config_with_region(region).await;
    outbox_aws::check_config(&config, region_hint)
        .await
        .map_err(RegistryError::Aws)?;
    Ok(config)
}

/// How to open a target.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TargetOptions {
    /// The CloudEvents `source` (EventBridge `Source`) of published events.
    pub source: String,
    /// Refuses entries above this size instead of the service's limit.
    pub max_entry_bytes: Option<usize>,
    /// Checks at open that the bus, queue or topic exists (one call).
    pub check: bool,
}

impl TargetOptions {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            max_entry_bytes: None,
            check: true,
        }
    }

    #[must_use]
    pub fn max_entry_bytes(mut self, max: Option<usize>) -> Self {
        self.max_entry_bytes = max;
        self
    }

    /// Whether to check at open that the target exists (default yes).
    #[must_use]
    pub fn check(mut self, check: bool) -> Self {
        self.check = check;
        self
    }
}

/// A publisher chosen at run time.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyPublisher {
    Null(NullPublisher),
    Stdout(StdoutPublisher),
    EventBridge(EventBridgePublisher),
    Sqs(SqsPublisher),
    Sns(SnsPublisher),
    /// Boxed: a NATS client and its JetStream context are large.
    Nats(Box<NatsPublisher>),
    /// Shared: the publisher holds its connection, which clones share.
    Rabbit(Arc<RabbitPublisher>),
}

impl TargetUrl {
    /// Opens the target. `aws` is needed for AWS targets only (see
    /// [`TargetUrl::is_aws`]); with `options.check`, a bus, queue or topic
    /// that does not exist fails here, naming this URL.
    pub async fn open(
        &self,
        aws: Option<&aws_config::SdkConfig>,
        options: &TargetOptions,
    ) -> Result<AnyPublisher, RegistryError> {
        let url = self.to_string();
        let target_error = |source| RegistryError::Target {
            url: url.clone(),
            source,
        };
        let config = match (self.is_aws(), aws) {
            (false, _) => None,
            (true, Some(config)) => Some(config),
            (true, None) => {
                return Err(RegistryError::Unsupported {
                    url: url.clone(),
                    reason: "an AWS target needs the AWS configuration".to_owned(),
                })
            }
        };
        let publisher = match (self, config) {
            (TargetUrl::Null, _) => AnyPublisher::Null(NullPublisher),
            (TargetUrl::Stdout, _) => AnyPublisher::Stdout(StdoutPublisher::new(&options.source)),
            (TargetUrl::Memory, _) => {
                return Err(RegistryError::Unsupported {
                    url,
                    reason: "memory:// lives inside one process: only `outbox demo` can use it"
                        .to_owned(),
                })
            }
            (
                TargetUrl::Nats {
                    server,
                    stream,
                    subject,
                },
                _,
            ) => {
                let nats_error = |source| RegistryError::Nats {
                    url: url.clone(),
                    source,
                };
                let mut publisher = NatsPublisher::connect(server, stream.as_str())
                    .await
                    .map_err(nats_error)?
                    .subject(subject.clone())
                    .source(&options.source);
                if let Some(max) = options.max_entry_bytes {
                    publisher = publisher.max_entry_bytes(max);
                }
                if options.check {
                    // Creates the stream when missing; refuses one that
                    // does not take the template's subjects.
                    publisher.check().await.map_err(nats_error)?;
                }
                return Ok(AnyPublisher::Nats(Box::new(publisher)));
            }
            (TargetUrl::Amqp { uri, exchange }, _) => {
                let rabbit_error = |source| RegistryError::Rabbit {
                    url: url.clone(),
                    source,
                };
                let mut publisher = RabbitPublisher::new(uri.as_str(), exchange)
                    .map_err(rabbit_error)?
                    .source(&options.source);
                if let Some(max) = options.max_entry_bytes {
                    publisher = publisher.max_message_bytes(max);
                }
                if options.check {
                    // Connects and declares the exchange.
                    publisher.check().await.map_err(rabbit_error)?;
                }
                return Ok(AnyPublisher::Rabbit(Arc::new(publisher)));
            }
            (TargetUrl::EventBridge { bus }, Some(config)) => AnyPublisher::EventBridge(
                EventBridgePublisher::new(eventbridge_client(config), bus).source(&options.source),
            ),
            (TargetUrl::Sqs { queue }, Some(config)) => {
                let client = aws_sdk_sqs::Client::new(config);
                let queue_url = if queue.contains("://") {
                    queue.clone()
                } else {
                    queue_url(&client, queue).await.map_err(target_error)?
                };
                AnyPublisher::Sqs(SqsPublisher::new(client, queue_url).source(&options.source))
            }
            (TargetUrl::Sns { topic_arn }, Some(config)) => AnyPublisher::Sns(
                SnsPublisher::new(aws_sdk_sns::Client::new(config), topic_arn)
                    .source(&options.source),
            ),
            (_, None) => {
                return Err(RegistryError::Unsupported {
                    url,
                    reason: "an AWS target needs the AWS configuration".to_owned(),
                })
            }
        };
        let publisher = match options.max_entry_bytes {
            Some(max) => publisher.max_entry_bytes(max),
            None => publisher,
        };
        if options.check {
            publisher.check().await.map_err(target_error)?;
        }
        Ok(publisher)
    }
}

/// The EventBridge client of the relays, trimmed of per-call work they do
/// not need: the relay retries failed entries itself, with backoff and in
/// order, so SDK retries would only repeat whole calls behind its back; and
/// a `PutEvents` response is a few hundred bytes, read at once, so there is
/// no stalled download to watch for.
pub fn eventbridge_client(config: &aws_config::SdkConfig) -> aws_sdk_eventbridge::Client {
    use aws_sdk_eventbridge::config::{retry::RetryConfig, StalledStreamProtectionConfig};
    let conf = aws_sdk_eventbridge::config::Builder::from(config)
        .retry_config(RetryConfig::disabled())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_eventbridge::Client::from_conf(conf)
}

/// The URL of the queue named `name`.
async fn queue_url(
    client: &aws_sdk_sqs::Client,
    name: &str,
) -> Result<String, outbox_aws::AwsError> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => {
            out.queue_url()
                .map(str::to_owned)
                .ok_or_else(|| outbox_aws::AwsError::NotFound {
                    resource: format!("queue `{name}` (GetQueueUrl returned no URL)"),
                })
        }
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            Err(outbox_aws::AwsError::NotFound {
                resource: format!("queue `{name}`"),
            })
        }
        Err(err) => Err(outbox_aws::AwsError::call("GetQueueUrl", err)),
    }
}

impl AnyPublisher {
    /// Opens `target` with `source` as the CloudEvents source, checking that
    /// it exists (see [`TargetUrl::open`]).
    pub async fn for_target(
        config: &aws_config::SdkConfig,
        target: &TargetUrl,
        source: &str,
    ) -> Result<Self, RegistryError> {
        target.open(Some(config), &TargetOptions::new(source)).await
    }

    /// [`AnyPublisher::for_target`] for a URL not parsed yet.
    pub async fn from_target(
        config: &aws_config::SdkConfig,
        target: &str,
        source: &str,
    ) -> Result<Self, RegistryError> {
        Self::for_target(config, &target.parse()?, source).await
    }

    /// Refuses entries above this size instead of the target's service
    /// limit; no effect on targets without one.
    #[must_use]
    pub fn max_entry_bytes(self, max: usize) -> Self {
        match self {
            AnyPublisher::EventBridge(p) => AnyPublisher::EventBridge(p.max_entry_bytes(max)),
            AnyPublisher::Sqs(p) => AnyPublisher::Sqs(p.max_entry_bytes(max)),
            AnyPublisher::Sns(p) => AnyPublisher::Sns(p.max_entry_bytes(max)),
            AnyPublisher::Nats(p) => AnyPublisher::Nats(Box::new(p.max_entry_bytes(max))),
            // Set at open (`TargetOptions::max_entry_bytes`); a publisher
            // already shared by clones keeps its limit.
            AnyPublisher::Rabbit(p) => AnyPublisher::Rabbit(
                Arc::try_unwrap(p).map_or_else(|p| p, |p| Arc::new(p.max_message_bytes(max))),
            ),
            other => other,
        }
    }

    /// Checks that the AWS bus, queue or topic exists and may be used
    /// (NATS and RabbitMQ targets are checked by [`TargetUrl::open`]).
    pub async fn check(&self) -> Result<(), outbox_aws::AwsError> {
        match self {
            AnyPublisher::EventBridge(p) => p.check().await,
            AnyPublisher::Sqs(p) => p.check().await,
            AnyPublisher::Sns(p) => p.check().await,
            AnyPublisher::Null(_)
            | AnyPublisher::Stdout(_)
            | AnyPublisher::Nats(_)
            | AnyPublisher::Rabbit(_) => Ok(()),
        }
    }
}

impl Publisher for AnyPublisher {
    fn max_batch_size(&self) -> usize {
        match self {
            AnyPublisher::Null(p) => p.max_batch_size(),
            AnyPublisher::Stdout(p) => p.max_batch_size(),
            AnyPublisher::EventBridge(p) => p.max_batch_size(),
            AnyPublisher::Sqs(p) => p.max_batch_size(),
            AnyPublisher::Sns(p) => p.max_batch_size(),
            // Named: the publishers have builder methods of the same name.
            AnyPublisher::Nats(p) => Publisher::max_batch_size(p.as_ref()),
            AnyPublisher::Rabbit(p) => Publisher::max_batch_size(p.as_ref()),
        }
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        match self {
            AnyPublisher::Null(p) => p.publish(request).await,
            AnyPublisher::Stdout(p) => p.publish(request).await,
            AnyPublisher::EventBridge(p) => p.publish(request).await,
            AnyPublisher::Sqs(p) => p.publish(request).await,
            AnyPublisher::Sns(p) => p.publish(request).await,
            AnyPublisher::Nats(p) => p.as_ref().publish(request).await,
            AnyPublisher::Rabbit(p) => p.as_ref().publish(request).await,
        }
    }
}
