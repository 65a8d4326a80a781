//! `SendMessageBatch`: up to ten messages a call, each message's result read.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeNameForSends, MessageSystemAttributeValue,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use outbox_aws::batch::{self, CallLimits};
use outbox_aws::AwsError;
use outbox_core::cloudevents::{self, STRUCTURED_CONTENT_TYPE};
use outbox_core::publish::DEFAULT_SOURCE;
use outbox_core::{Event, PublishError, PublishRequest, PublishResult, Publisher};

/// Most messages one `SendMessageBatch` call takes (SQS Developer Guide,
/// "Amazon SQS message quotas": "a single message batch request can include a
/// maximum of 10 messages").
pub const MAX_ENTRIES_PER_CALL: usize = 10;

/// Largest message SQS accepts, 1 MiB: the SQS API reference of
/// `SendMessageBatch` (since the 2025 increase from 256 KiB) gives "the
/// maximum allowed individual message size and the maximum total payload
/// size ... are both 1 MiB (1,048,576 bytes)". Message attributes (name, type
/// and value) count; the `AWSTraceHeader` system attribute does not. A queue
/// created with a smaller `MaximumMessageSize` needs
/// [`SqsPublisher::max_entry_bytes`] set to match.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Largest sum of message sizes in one `SendMessageBatch` call (same page).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Message attribute naming the body's media type.
pub const CONTENT_TYPE_ATTRIBUTE: &str = "content-type";

const STRING: &str = "String";
const OPERATION: &str = "SendMessageBatch";

/// Size of a message as SQS counts it: body plus each message attribute's
/// name, data type and value, in UTF-8 bytes.
pub fn message_size(entry: &SendMessageBatchRequestEntry) -> usize {
    let attributes: usize = entry
        .message_attributes()
        .into_iter()
        .flatten()
        .map(|(name, value)| {
            name.len()
                + value.data_type().len()
                + value.string_value().map_or(0, str::len)
                + value.binary_value().map_or(0, |b| b.as_ref().len())
        })
        .sum();
    entry.message_body().len() + attributes
}

/// Publishes events to an SQS queue, the CloudEvent JSON as the body.
///
/// FIFO queues (URL ending in `.fifo`) get `MessageGroupId` = the aggregate
/// id and `MessageDeduplicationId` = the event id, so SQS itself drops a
/// re-published event within its five-minute window.
#[derive(Debug, Clone)]
pub struct SqsPublisher {
    client: Client,
    queue_url: String,
    fifo: bool,
    source: String,
    max_entry_bytes: usize,
}

impl SqsPublisher {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        let queue_url = queue_url.into();
        Self {
            client,
            fifo: queue_url.ends_with(".fifo"),
            queue_url,
            source: DEFAULT_SOURCE.to_owned(),
            max_entry_bytes: MAX_MESSAGE_BYTES,
        }
    }

    /// The CloudEvent `source` (default [`DEFAULT_SOURCE`]).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Refuses messages above this size (default [`MAX_MESSAGE_BYTES`]);
    /// set it to the queue's `MaximumMessageSize` when that is smaller.
    #[must_use]
    pub fn max_entry_bytes(mut self, max: usize) -> Self {
        self.max_entry_bytes = max;
        self
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// The batch entry an event becomes, `id` being its batch entry id.
    pub fn entry(
        &self,
        id: usize,
        event: &Event,
    ) -> Result<SendMessageBatchRequestEntry, PublishError> {
        let content_type = MessageAttributeValue::builder()
            .data_type(STRING)
            .string_value(STRUCTURED_CONTENT_TYPE)
            .build()
            .map_err(|e| PublishError::permanent(format!("{OPERATION}: {e}")))?;
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(cloudevents::to_json(event, &self.source))
            .message_attributes(CONTENT_TYPE_ATTRIBUTE, content_type);
        if let Some(header) = event
            .metadata
            .traceparent
            .as_deref()
            .and_then(outbox_aws::xray::trace_header)
        {
            let value = MessageSystemAttributeValue::builder()
                .data_type(STRING)
                .string_value(header)
                .build()
                .map_err(|e| PublishError::permanent(format!("{OPERATION}: {e}")))?;
            entry = entry.message_system_attributes(
                MessageSystemAttributeNameForSends::AwsTraceHeader,
                value,
            );
        }
        if self.fifo {
            entry = entry
                .message_group_id(batch::message_group_id(event))
                .message_deduplication_id(event.id.to_string());
        }
        entry
            .build()
            .map_err(|e| PublishError::permanent(format!("{OPERATION}: {e}")))
    }
}

/// Reads a `SendMessageBatch` response: each entry's result by its id,
/// entry ids being indexes of the request.
fn read_response(output: &SendMessageBatchOutput) -> Vec<(usize, PublishResult)> {
    let mut results = Vec::with_capacity(output.successful().len() + output.failed().len());
    for ok in output.successful() {
        if let Ok(i) = ok.id().parse::<usize>() {
            results.push((i, Ok(())));
        }
    }
    for failed in output.failed() {
        if let Ok(i) = failed.id().parse::<usize>() {
            let error = batch::entry_error(
                OPERATION,
                failed.code(),
                failed.message(),
                failed.sender_fault(),
            );
            results.push((i, Err(error)));
        }
    }
    results
}

impl SqsPublisher {
    /// Checks at start-up that the queue exists and the credentials may
    /// see it, so a typo fails the start instead of pausing the relay forever.
    pub async fn check(&self) -> Result<(), AwsError> {
        let found = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await;
        match found {
            Ok(_) => Ok(()),
            Err(err) if is_missing_queue(&err) => Err(AwsError::NotFound {
                resource: format!("queue `{}`", self.queue_url),
            }),
            Err(err) => Err(AwsError::call("GetQueueAttributes", err)),
        }
    }
}

/// Whether SQS answered that the queue does not exist (the query and JSON
/// protocols name it differently).
pub(crate) fn is_missing_queue<E: ProvideErrorMetadata>(
    err: &aws_sdk_sqs::error::SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
) -> bool {
    matches!(
        err.code(),
        Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist" | "NonExistentQueue")
    )
}

impl Publisher for SqsPublisher {
    fn max_batch_size(&self) -> usize {
        MAX_ENTRIES_PER_CALL
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let limits = CallLimits {
            operation: OPERATION,
            target: &self.queue_url,
            max_entry_bytes: self.max_entry_bytes,
            entry_limit_name: "SQS message limit",
            max_entries: MAX_ENTRIES_PER_CALL,
            max_request_bytes: MAX_REQUEST_BYTES,
        };
        let (client, queue_url) = (&self.client, &self.queue_url);
        batch::publish_in_calls(
            request.events,
            limits,
            |i, event| self.entry(i, event),
            message_size,
            |chunk| async move {
                let entries = chunk.into_iter().map(|a| a.entry).collect();
                let output = client
                    .send_message_batch()
                    .queue_url(queue_url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|err| outbox_aws::publish_error(OPERATION, err))?;
                Ok(read_response(&output))
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::{BatchResultErrorEntry, SendMessageBatchResultEntry};
    use outbox_aws::batch::Results;
    use outbox_core::Disposition;

    fn publisher(url: &str) -> SqsPublisher {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .build();
        SqsPublisher::new(Client::from_conf(config), url)
    }

    fn traced() -> Event {
        Event::builder("Order", "o-1", 1, "OrderCreated")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .build()
            .unwrap()
    }

    #[test]
    fn entry_carries_body_attribute_and_trace_header() {
        let event = traced();
        let entry = publisher("http://q/123/orders")
            .source("urn:shop")
            .entry(3, &event)
            .unwrap();
        assert_eq!(entry.id(), "3");
        let back = cloudevents::from_json(entry.message_body()).unwrap();
        assert_eq!(back.event, event);
        assert_eq!(back.source, "urn:shop");
        let attrs = entry.message_attributes().unwrap();
        assert_eq!(
            attrs[CONTENT_TYPE_ATTRIBUTE].string_value(),
            Some("application/cloudevents+json")
        );
        let system = entry.message_system_attributes().unwrap();
        assert_eq!(
            system[&MessageSystemAttributeNameForSends::AwsTraceHeader].string_value(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert_eq!(entry.message_group_id(), None);
        assert_eq!(entry.message_deduplication_id(), None);
    }

    #[test]
    fn fifo_entries_get_group_and_dedup_ids() {
        let event = traced();
        let p = publisher("http://q/123/orders.fifo");
        assert!(p.is_fifo());
        let entry = p.entry(0, &event).unwrap();
        assert_eq!(entry.message_group_id(), Some("o-1"));
        assert_eq!(
            entry.message_deduplication_id(),
            Some(event.id.to_string().as_str())
        );
    }

    #[test]
    fn size_counts_body_and_attributes_but_not_the_trace_header() {
        let event = traced();
        let entry = publisher("http://q/123/orders").entry(0, &event).unwrap();
        let expected = entry.message_body().len()
            + "content-type".len()
            + "String".len()
            + "application/cloudevents+json".len();
        assert_eq!(message_size(&entry), expected);
    }

    #[test]
    fn failed_entries_are_read_by_id() {
        let output = SendMessageBatchOutput::builder()
            .successful(
                SendMessageBatchResultEntry::builder()
                    .id("0")
                    .message_id("m")
                    .md5_of_message_body("x")
                    .build()
                    .unwrap(),
            )
            .failed(
                BatchResultErrorEntry::builder()
                    .id("2")
                    .sender_fault(true)
                    .code("InvalidMessageContents")
                    .message("bad characters")
                    .build()
                    .unwrap(),
            )
            .failed(
                BatchResultErrorEntry::builder()
                    .id("1")
                    .sender_fault(false)
                    .code("InternalError")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let mut results = Results::new(4);
        for (i, r) in read_response(&output) {
            results.set(i, r);
        }
        let results = results.finish(OPERATION);
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
        let bad = results[2].as_ref().unwrap_err();
        assert_eq!(bad.disposition(), Disposition::Permanent);
        assert_eq!(
            bad.message(),
            "SendMessageBatch: InvalidMessageContents: bad characters"
        );
        assert_eq!(
            results[3].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
    }
}
