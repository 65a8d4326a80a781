//! Creating queues and letting EventBridge and SNS send to them,
//! idempotently: for deployment scripts, the demo and tests.

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use outbox_core::StoreError;

/// A queue's two names: the URL the API takes and the ARN policies and
/// subscriptions take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub url: String,
    pub arn: String,
}

/// Creates queue `name` if it does not exist. A FIFO queue's name must end
/// in `.fifo` and a standard queue's must not.
pub async fn ensure_queue(client: &Client, name: &str, fifo: bool) -> Result<Queue, StoreError> {
    if fifo != name.ends_with(".fifo") {
        return Err(StoreError::Config(format!(
            "queue name {name}: FIFO queue names end in `.fifo`, standard ones do not"
        )));
    }
    let mut create = client.create_queue().queue_name(name);
    if fifo {
        create = create.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let url = create
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("CreateQueue", e))?
        .queue_url
        .ok_or_else(|| StoreError::Config(format!("CreateQueue returned no URL for {name}")))?;
    let arn = queue_arn(client, &url).await?;
    Ok(Queue { url, arn })
}

/// The ARN of the queue at `url`.
pub async fn queue_arn(client: &Client, url: &str) -> Result<String, StoreError> {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("GetQueueAttributes", e))?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| StoreError::Config(format!("queue {url} has no ARN")))
}

/// The queue policy that lets EventBridge rules and SNS topics with these
/// ARNs send to `queue_arn`, and nothing else.
pub fn sender_policy(queue_arn: &str, source_arns: &[&str]) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "outbox-senders",
            "Effect": "Allow",
            "Principal": { "Service": ["events.amazonaws.com", "sns.amazonaws.com"] },
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": { "ArnEquals": { "aws:SourceArn": source_arns } }
        }]
    })
    .to_string()
}

/// Sets the queue's policy to [`sender_policy`], replacing any policy it had.
pub async fn allow_senders(
    client: &Client,
    queue: &Queue,
    source_arns: &[&str],
) -> Result<(), StoreError> {
    client
        .set_queue_attributes()
        .queue_url(&queue.url)
        .attributes(
            QueueAttributeName::Policy,
            sender_policy(&queue.arn, source_arns),
        )
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("SetQueueAttributes", e))?;
    Ok(())
}

/// Deletes every message in the queue (SQS allows one purge a minute).
pub async fn purge(client: &Client, queue_url: &str) -> Result<(), StoreError> {
    client
        .purge_queue()
        .queue_url(queue_url)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("PurgeQueue", e))?;
    Ok(())
}

/// Deletes the queue.
pub async fn delete_queue(client: &Client, queue_url: &str) -> Result<(), StoreError> {
    client
        .delete_queue()
        .queue_url(queue_url)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("DeleteQueue", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_the_queue_and_its_senders() {
        let p: serde_json::Value =
            serde_json::from_str(&sender_policy("arn:q", &["arn:rule", "arn:topic"])).unwrap();
        let s = &p["Statement"][0];
        assert_eq!(s["Resource"], "arn:q");
        assert_eq!(s["Condition"]["ArnEquals"]["aws:SourceArn"][1], "arn:topic");
    }
}
