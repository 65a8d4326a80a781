//! `PublishBatch`: up to ten messages a call, each message's result read.

use aws_sdk_sns::operation::publish_batch::PublishBatchOutput;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;
use outbox_aws::batch::{self, CallLimits};
use outbox_aws::AwsError;
use outbox_core::cloudevents::{self, STRUCTURED_CONTENT_TYPE};
use outbox_core::publish::DEFAULT_SOURCE;
use outbox_core::{Event, PublishError, PublishRequest, PublishResult, Publisher};

/// Most messages one `PublishBatch` call takes (SNS API reference,
/// PublishBatch: "Publishes up to 10 messages to the specified topic in a
/// single batch").
pub const MAX_ENTRIES_PER_CALL: usize = 10;

/// Largest message a topic accepts by default, 256 KiB, attributes
/// included (SNS API reference, PublishBatch: "By default, the maximum
/// allowed individual message size and the maximum total payload size ...
/// are both 256 KiB (262,144 bytes)"). A topic whose `MaximumMessageSize`
/// was raised (up to 1 MiB) needs [`SnsPublisher::max_entry_bytes`] to match.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Largest sum of message sizes in one `PublishBatch` call (same page).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Message attribute naming the body's media type.
pub const CONTENT_TYPE_ATTRIBUTE: &str = "content-type";

/// The HTTP header SNS reads the X-Ray trace context from and passes on to
/// subscribers (X-Ray Developer Guide, "Amazon SNS and AWS X-Ray"; unlike
/// SQS, `PublishBatch` entries have no per-message system attributes).
pub const TRACE_HEADER: &str = "X-Amzn-Trace-Id";

const STRING: &str = "String";
const OPERATION: &str = "PublishBatch";

/// Size of a message as SNS counts it: body plus each message attribute's
/// name, data type and value, in UTF-8 bytes.
pub fn message_size(entry: &PublishBatchRequestEntry) -> usize {
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
    entry.message().len() + attributes
}

/// The X-Ray header for one `PublishBatch` call: SNS takes one per request,
/// so a call gets one only when all its events carry the same trace.
/// Otherwise each event's `traceparent` still travels in its CloudEvent.
pub fn call_trace_header<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<String> {
    let mut headers = events.into_iter().map(|e| {
        e.metadata
            .traceparent
            .as_deref()
            .and_then(outbox_aws::xray::trace_header)
    });
    let first = headers.next()??;
    headers
        .all(|h| h.as_deref() == Some(first.as_str()))
        .then_some(first)
}

/// Publishes events to an SNS topic, the CloudEvent JSON as the message.
///
/// FIFO topics (ARN ending in `.fifo`) get `MessageGroupId` = the aggregate
/// id and `MessageDeduplicationId` = the event id.
#[derive(Debug, Clone)]
pub struct SnsPublisher {
    client: Client,
    topic_arn: String,
    fifo: bool,
    source: String,
    max_entry_bytes: usize,
}

impl SnsPublisher {
    pub fn new(client: Client, topic_arn: impl Into<String>) -> Self {
        let topic_arn = topic_arn.into();
        Self {
            client,
            fifo: topic_arn.ends_with(".fifo"),
            topic_arn,
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
    /// set it to the topic's `MaximumMessageSize` when that differs.
    #[must_use]
    pub fn max_entry_bytes(mut self, max: usize) -> Self {
        self.max_entry_bytes = max;
        self
    }

    pub fn topic_arn(&self) -> &str {
        &self.topic_arn
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// The batch entry an event becomes, `id` being its batch entry id.
    pub fn entry(
        &self,
        id: usize,
        event: &Event,
    ) -> Result<PublishBatchRequestEntry, PublishError> {
        let content_type = MessageAttributeValue::builder()
            .data_type(STRING)
            .string_value(STRUCTURED_CONTENT_TYPE)
            .build()
            .map_err(|e| PublishError::permanent(format!("{OPERATION}: {e}")))?;
        let mut entry = PublishBatchRequestEntry::builder()
            .id(id.to_string())
            .message(cloudevents::to_json(event, &self.source))
            .message_attributes(CONTENT_TYPE_ATTRIBUTE, content_type);
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

/// Reads a `PublishBatch` response: each entry's result by its id, entry
/// ids being indexes of the request.
fn read_response(output: &PublishBatchOutput) -> Vec<(usize, PublishResult)> {
    let mut results = Vec::with_capacity(output.successful().len() + output.failed().len());
    for ok in output.successful() {
        if let Some(i) = ok.id().and_then(|id| id.parse::<usize>().ok()) {
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

impl SnsPublisher {
    /// Checks at start-up that the topic exists and the credentials may
    /// see it, so a typo fails the start instead of pausing the relay forever.
    pub async fn check(&self) -> Result<(), AwsError> {
        match self
            .client
            .get_topic_attributes()
            .topic_arn(&self.topic_arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_not_found_exception()) =>
            {
                Err(AwsError::NotFound {
                    resource: format!("topic `{}`", self.topic_arn),
                })
            }
            Err(err) => Err(AwsError::call("GetTopicAttributes", err)),
        }
    }
}

impl Publisher for SnsPublisher {
    fn max_batch_size(&self) -> usize {
        MAX_ENTRIES_PER_CALL
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let limits = CallLimits {
            operation: OPERATION,
            target: &self.topic_arn,
            max_entry_bytes: self.max_entry_bytes,
            entry_limit_name: "SNS message limit",
            max_entries: MAX_ENTRIES_PER_CALL,
            max_request_bytes: MAX_REQUEST_BYTES,
        };
        let (client, topic_arn) = (&self.client, &self.topic_arn);
        batch::publish_in_calls(
            request.events,
            limits,
            |i, event| self.entry(i, event),
            message_size,
            |chunk| async move {
                let header = call_trace_header(chunk.iter().map(|a| a.event));
                let entries = chunk.into_iter().map(|a| a.entry).collect();
                let mut send = client
                    .publish_batch()
                    .topic_arn(topic_arn)
                    .set_publish_batch_request_entries(Some(entries))
                    .customize();
                if let Some(header) = header {
                    send = send.mutate_request(move |req| {
                        req.headers_mut().insert(TRACE_HEADER, header.clone());
                    });
                }
                let output = send
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
    use aws_sdk_sns::types::{BatchResultErrorEntry, PublishBatchResultEntry};
    use outbox_aws::batch::Results;
    use outbox_core::Disposition;

    fn publisher(arn: &str) -> SnsPublisher {
        let config = aws_sdk_sns::Config::builder()
            .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
            .region(aws_sdk_sns::config::Region::new("us-east-1"))
            .build();
        SnsPublisher::new(Client::from_conf(config), arn)
    }

    fn event(trace: Option<&str>) -> Event {
        let mut e = Event::builder("Order", "o-1", 1, "OrderCreated")
            .build()
            .unwrap();
        e.metadata.traceparent = trace.map(str::to_owned);
        e
    }

    const T1: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const T2: &str = "00-4bf92f3577b34da6a3ce929d0e0e4799-00f067aa0ba902b7-01";

    #[test]
    fn a_call_carries_a_trace_only_when_all_its_events_share_it() {
        let (a, b, none) = (event(Some(T1)), event(Some(T2)), event(None));
        assert_eq!(
            call_trace_header([&a, &a.clone()]).as_deref(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert_eq!(call_trace_header([&a, &b]), None);
        assert_eq!(call_trace_header([&a, &none]), None);
        assert_eq!(call_trace_header([&none]), None);
        assert_eq!(call_trace_header(std::iter::empty()), None);
    }

    #[test]
    fn entry_carries_body_attribute_and_fifo_ids() {
        let e = event(Some(T1));
        let standard = publisher("arn:aws:sns:us-east-1:1:orders")
            .entry(4, &e)
            .unwrap();
        assert_eq!(standard.id(), "4");
        assert_eq!(cloudevents::from_json(standard.message()).unwrap().event, e);
        assert_eq!(
            standard.message_attributes().unwrap()[CONTENT_TYPE_ATTRIBUTE].string_value(),
            Some("application/cloudevents+json")
        );
        assert_eq!(standard.message_group_id(), None);
        let fifo = publisher("arn:aws:sns:us-east-1:1:orders.fifo")
            .entry(0, &e)
            .unwrap();
        assert_eq!(fifo.message_group_id(), Some("o-1"));
        assert_eq!(
            fifo.message_deduplication_id(),
            Some(e.id.to_string().as_str())
        );
        assert_eq!(
            message_size(&fifo),
            fifo.message().len()
                + "content-type".len()
                + "String".len()
                + "application/cloudevents+json".len()
        );
    }

    #[test]
    fn failed_entries_are_read_by_id() {
        let output = PublishBatchOutput::builder()
            .successful(
                PublishBatchResultEntry::builder()
                    .id("1")
                    .message_id("m")
                    .build(),
            )
            .failed(
                BatchResultErrorEntry::builder()
                    .id("0")
                    .code("InvalidParameter")
                    .message("Message too long")
                    .sender_fault(true)
                    .build()
                    .unwrap(),
            )
            .failed(
                BatchResultErrorEntry::builder()
                    .id("2")
                    .code("Throttling")
                    .sender_fault(true)
                    .build()
                    .unwrap(),
            )
            .build();
        let mut results = Results::new(3);
        for (i, r) in read_response(&output) {
            results.set(i, r);
        }
        let results = results.finish(OPERATION);
        assert_eq!(
            results[0].as_ref().unwrap_err().disposition(),
            Disposition::Permanent
        );
        assert!(results[1].is_ok());
        assert_eq!(
            results[2].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
    }
}
