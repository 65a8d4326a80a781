//! `PutEvents`: up to ten entries a call, each entry's result read.

use aws_sdk_eventbridge::operation::put_events::PutEventsOutput;
use aws_sdk_eventbridge::primitives::DateTime;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use outbox_aws::batch::{self, CallLimits, Results};
use outbox_aws::AwsError;
use outbox_core::publish::DEFAULT_SOURCE;
use outbox_core::{
    cloudevents, Disposition, Event, PublishError, PublishRequest, PublishResult, Publisher,
};

/// Most entries one `PutEvents` call takes (EventBridge API reference,
/// PutEvents: `Entries` holds 1 to 10 items).
pub const MAX_ENTRIES_PER_CALL: usize = 10;

/// Largest entry EventBridge accepts, 256 KiB, measured as
/// [`entry_size`] does ("Calculating Amazon EventBridge PutEvents event entry
/// size", EventBridge User Guide: "The total entry size must be less than
/// 256KB").
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// Largest sum of entry sizes in one `PutEvents` call: the same page says
/// entries batched into one request must total less than 256 KB.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

const OPERATION: &str = "PutEvents";

/// Size of an entry as EventBridge computes it: 14 bytes for `Time` when set,
/// plus the UTF-8 bytes of `Source`, `DetailType`, `Detail` and each of
/// `Resources` (the bus name and trace header do not count).
pub fn entry_size(entry: &PutEventsRequestEntry) -> usize {
    let text = |s: Option<&str>| s.map_or(0, str::len);
    usize::from(entry.time().is_some()) * 14
        + text(entry.source())
        + text(entry.detail_type())
        + text(entry.detail())
        + entry.resources().iter().map(String::len).sum::<usize>()
}

/// What to do about an entry EventBridge refused, by its `ErrorCode`
/// (`PutEventsResultEntry` in the API reference lists `InternalFailure` and
/// `ThrottlingException` as retryable, the rest as not). A code the
/// reference does not name is treated as transient, so a new failure mode
/// is retried and dead-lettered after the attempt limit rather than at once.
pub fn entry_disposition(code: &str) -> Disposition {
    match code {
        "MalformedDetail"
        | "InvalidArgument"
        | "InvalidAccountIdException"
        | "AccessDeniedException"
        | "NotAuthorizedForSourceException"
        | "NotAuthorizedForDetailTypeException"
        | "RedactionFailure"
        | "ResourceNotFoundException"
        | "ValidationException" => Disposition::Permanent,
        _ => Disposition::Transient,
    }
}

/// One result per entry of a call of `sent` entries, from its response.
/// Entries are matched by position, as `PutEvents` documents; an entry the
/// response leaves out fails transiently.
pub fn read_response(output: &PutEventsOutput, sent: usize) -> Vec<PublishResult> {
    let mut results = Results::new(sent);
    for (i, entry) in output.entries().iter().enumerate().take(sent) {
        let result = match entry.error_code() {
            None if entry.event_id().is_some() => Ok(()),
            None => Err(PublishError::transient(format!(
                "{OPERATION}: entry has neither an event id nor an error code"
            ))),
            Some(code) => {
                let message = format!(
                    "{OPERATION}: {code}: {}",
                    entry.error_message().unwrap_or("no message")
                );
                Err(match entry_disposition(code) {
                    Disposition::Permanent => PublishError::permanent(message),
                    _ => PublishError::transient(message),
                })
            }
        };
        results.set(i, result);
    }
    results.finish(OPERATION)
}

/// Publishes events to an EventBridge bus.
///
/// Each event becomes one entry: `Source` = the configured source,
/// `DetailType` = the event type, `Detail` = the CloudEvent JSON, `Time` =
/// when it occurred, `TraceHeader` from its `traceparent`.
#[derive(Debug, Clone)]
pub struct EventBridgePublisher {
    client: Client,
    bus_name: String,
    source: String,
    max_entry_bytes: usize,
}

impl EventBridgePublisher {
    /// Publishes to `bus_name` (a name or an ARN; `"default"` for the account's default bus).
    pub fn new(client: Client, bus_name: impl Into<String>) -> Self {
        Self {
            client,
            bus_name: bus_name.into(),
            source: DEFAULT_SOURCE.to_owned(),
            max_entry_bytes: MAX_ENTRY_BYTES,
        }
    }

    /// The `Source` of every entry and the CloudEvent `source`.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Refuses entries above this size (default [`MAX_ENTRY_BYTES`]).
    #[must_use]
    pub fn max_entry_bytes(mut self, max: usize) -> Self {
        self.max_entry_bytes = max;
        self
    }

    pub fn bus_name(&self) -> &str {
        &self.bus_name
    }

    /// The entry an event becomes.
    pub fn entry(&self, event: &Event) -> PutEventsRequestEntry {
        let time = DateTime::from_secs_and_nanos(
            event.occurred_at.timestamp(),
            event.occurred_at.timestamp_subsec_nanos(),
        );
        PutEventsRequestEntry::builder()
            .source(&self.source)
            .detail_type(&event.event_type)
            .detail(cloudevents::to_json(event, &self.source))
            .event_bus_name(&self.bus_name)
            .time(time)
            .set_trace_header(
                event
                    .metadata
                    .traceparent
                    .as_deref()
                    .and_then(outbox_aws::xray::trace_header),
            )
            .build()
    }
}

impl EventBridgePublisher {
    /// Checks at start-up that the bus exists and the credentials may see
    /// it, so a typo fails the start instead of pausing the relay forever.
    pub async fn check(&self) -> Result<(), AwsError> {
        match self
            .client
            .describe_event_bus()
            .name(&self.bus_name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Err(AwsError::NotFound {
                    resource: format!("event bus `{}`", self.bus_name),
                })
            }
            Err(err) => Err(AwsError::call("DescribeEventBus", err)),
        }
    }
}

impl Publisher for EventBridgePublisher {
    fn max_batch_size(&self) -> usize {
        MAX_ENTRIES_PER_CALL
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let limits = CallLimits {
            operation: OPERATION,
            target: &self.bus_name,
            max_entry_bytes: self.max_entry_bytes,
            entry_limit_name: "EventBridge entry limit",
            max_entries: MAX_ENTRIES_PER_CALL,
            max_request_bytes: MAX_REQUEST_BYTES,
        };
        let client = &self.client;
        batch::publish_in_calls(
            request.events,
            limits,
            |_, event| Ok(self.entry(event)),
            entry_size,
            |chunk| async move {
                let indexes: Vec<usize> = chunk.iter().map(|a| a.index).collect();
                let entries = chunk.into_iter().map(|a| a.entry).collect();
                let output = client
                    .put_events()
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|err| outbox_aws::publish_error(OPERATION, err))?;
                if output.failed_entry_count() > 0 {
                    tracing::debug!(
                        failed = output.failed_entry_count(),
                        "PutEvents refused some entries"
                    );
                }
                // Entries are answered by position.
                let results = read_response(&output, indexes.len());
                Ok(indexes.into_iter().zip(results).collect())
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_eventbridge::types::PutEventsResultEntry;

    fn client() -> Client {
        let config = aws_sdk_eventbridge::Config::builder()
            .behavior_version(aws_sdk_eventbridge::config::BehaviorVersion::latest())
            .region(aws_sdk_eventbridge::config::Region::new("us-east-1"))
            .build();
        Client::from_conf(config)
    }

    #[test]
    fn entry_size_follows_the_documented_rule() {
        let entry = |time: Option<DateTime>| {
            PutEventsRequestEntry::builder()
                .source("urn:ö")
                .detail_type("T")
                .detail("{}")
                .resources("arn:a")
                .event_bus_name("a-long-bus-name-that-does-not-count")
                .trace_header("Root=1-00000000-000000000000000000000000")
                .set_time(time)
                .build()
        };
        // "urn:ö" is 6 UTF-8 bytes; a Time counts 14 whatever its value.
        assert_eq!(entry_size(&entry(None)), 6 + 1 + 2 + 5);
        assert_eq!(
            entry_size(&entry(Some(DateTime::from_secs(0)))),
            6 + 1 + 2 + 5 + 14
        );
    }

    #[test]
    fn entry_carries_the_cloudevent_and_the_trace() {
        let event = Event::builder("Order", "o-1", 2, "OrderPaid")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .build()
            .unwrap();
        let publisher = EventBridgePublisher::new(client(), "orders").source("urn:shop");
        let entry = publisher.entry(&event);
        assert_eq!(entry.source(), Some("urn:shop"));
        assert_eq!(entry.detail_type(), Some("OrderPaid"));
        assert_eq!(entry.event_bus_name(), Some("orders"));
        assert_eq!(
            entry.trace_header(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert_eq!(
            entry.time().map(|t| t.secs()),
            Some(event.occurred_at.timestamp())
        );
        let detail = cloudevents::from_json(entry.detail().unwrap()).unwrap();
        assert_eq!(detail.event, event);
        assert_eq!(detail.source, "urn:shop");

        let untraced = Event::builder("Order", "o-1", 3, "OrderPaid")
            .build()
            .unwrap();
        assert_eq!(publisher.entry(&untraced).trace_header(), None);
    }

    #[test]
    fn codes_map_to_retry_or_dead_letter() {
        for code in ["ThrottlingException", "InternalFailure", "SomethingNew"] {
            assert_eq!(entry_disposition(code), Disposition::Transient, "{code}");
        }
        for code in [
            "MalformedDetail",
            "InvalidArgument",
            "AccessDeniedException",
            "NotAuthorizedForSourceException",
            "NotAuthorizedForDetailTypeException",
            "ResourceNotFoundException",
        ] {
            assert_eq!(entry_disposition(code), Disposition::Permanent, "{code}");
        }
    }

    #[test]
    fn every_entry_of_a_response_is_read() {
        let output = PutEventsOutput::builder()
            .failed_entry_count(2)
            .entries(PutEventsResultEntry::builder().event_id("e-1").build())
            .entries(
                PutEventsResultEntry::builder()
                    .error_code("MalformedDetail")
                    .error_message("Detail is malformed.")
                    .build(),
            )
            .entries(
                PutEventsResultEntry::builder()
                    .error_code("ThrottlingException")
                    .build(),
            )
            .build();
        let results = read_response(&output, 4);
        assert_eq!(results.len(), 4);
        assert!(results[0].is_ok());
        let malformed = results[1].as_ref().unwrap_err();
        assert_eq!(malformed.disposition(), Disposition::Permanent);
        assert_eq!(
            malformed.message(),
            "PutEvents: MalformedDetail: Detail is malformed."
        );
        assert_eq!(
            results[2].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
        // Not mentioned by the response: retried.
        assert_eq!(
            results[3].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
    }

    #[tokio::test]
    async fn oversize_entries_are_refused_before_the_network() {
        // No endpoint is reachable from this client: only a refusal can answer.
        let publisher = EventBridgePublisher::new(client(), "orders").max_entry_bytes(100);
        let big = Event::builder("Order", "o-1", 1, "OrderCreated")
            .payload(&serde_json::json!({ "blob": "x".repeat(200) }))
            .build()
            .unwrap();
        let results = publisher.publish(PublishRequest::new(&[big])).await;
        let err = results[0].as_ref().unwrap_err();
        assert_eq!(err.disposition(), Disposition::Permanent);
        assert!(err.message().contains("above the 100-byte"), "{err}");
    }
}
