//! Creating topics and subscriptions, idempotently: for deployment
//! scripts, the demo and tests.

use aws_sdk_sns::Client;
use outbox_core::StoreError;

/// The ARN of topic `name`, creating it if it does not exist; a name ending
/// in `.fifo` makes a FIFO topic.
pub async fn ensure_topic(client: &Client, name: &str) -> Result<String, StoreError> {
    let mut create = client.create_topic().name(name);
    if name.ends_with(".fifo") {
        create = create.attributes("FifoTopic", "true");
    }
    create
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("CreateTopic", e))?
        .topic_arn
        .ok_or_else(|| StoreError::Config(format!("CreateTopic returned no ARN for {name}")))
}

/// Subscribes the SQS queue `queue_arn` to the topic and returns the
/// subscription's ARN. With `raw`, the queue gets the message itself (the
/// CloudEvent); without, an SNS notification wrapping it. Either shape is
/// read by `outbox_sqs::parse_delivery`. The queue must allow the topic to
/// send to it (`outbox_sqs::setup::allow_senders`).
pub async fn subscribe_queue(
    client: &Client,
    topic_arn: &str,
    queue_arn: &str,
    raw: bool,
) -> Result<String, StoreError> {
    client
        .subscribe()
        .topic_arn(topic_arn)
        .protocol("sqs")
        .endpoint(queue_arn)
        .attributes("RawMessageDelivery", if raw { "true" } else { "false" })
        .return_subscription_arn(true)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("Subscribe", e))?
        .subscription_arn
        .ok_or_else(|| StoreError::Config(format!("Subscribe returned no ARN for {queue_arn}")))
}
