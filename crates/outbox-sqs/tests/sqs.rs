//! The SQS publisher and receiver against SQS (moto): what goes on the
//! wire, what comes back, setup idempotency.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sqs::config::{ConfigBag, Intercept, RuntimeComponents};
use outbox_core::{Disposition, PublishRequest, Publisher};
use outbox_sqs::{setup, SqsPublisher, SqsReceiver};
use outbox_testkit::order_event;

/// Keeps the body of every request the client sends.
#[derive(Debug, Clone, Default)]
struct CaptureBodies(Arc<Mutex<Vec<String>>>);

impl Intercept for CaptureBodies {
    fn name(&self) -> &'static str {
        "CaptureBodies"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let body = context.request().body().bytes().unwrap_or_default();
        if let Ok(mut seen) = self.0.lock() {
            seen.push(String::from_utf8_lossy(body).into_owned());
        }
        Ok(())
    }
}

async fn client_with(capture: Option<CaptureBodies>) -> aws_sdk_sqs::Client {
    outbox_aws::testing::require_local_endpoints(&["SQS"]);
    let config = outbox_aws::load_config().await;
    let mut builder = aws_sdk_sqs::config::Builder::from(&config);
    if let Some(c) = capture {
        builder = builder.interceptor(c);
    }
    aws_sdk_sqs::Client::from_conf(builder.build())
}

#[tokio::test]
async fn messages_carry_content_type_and_trace_header() {
    let capture = CaptureBodies::default();
    let client = client_with(Some(capture.clone())).await;
    let queue = setup::ensure_queue(
        &client,
        &outbox_aws::testing::unique_name("outbox-sqs"),
        false,
    )
    .await
    .unwrap();
    let mut event = order_event("o-trace", 1, "OrderCreated");
    event.metadata.traceparent =
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
    let results = SqsPublisher::new(client.clone(), &queue.url)
        .publish(PublishRequest::new(std::slice::from_ref(&event)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");

    // The trace header went out as the AWSTraceHeader system attribute of the entry.
    let bodies = capture.0.lock().unwrap().clone();
    let sent = bodies
        .iter()
        .find(|b| b.contains("\"Entries\""))
        .expect("a SendMessageBatch request");
    let request: serde_json::Value = serde_json::from_str(sent).unwrap();
    let entry = &request["Entries"][0];
    assert_eq!(
        entry["MessageSystemAttributes"]["AWSTraceHeader"]["StringValue"],
        "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
    );

    let deliveries = SqsReceiver::new(client, &queue.url)
        .receive(10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].event.as_ref().unwrap().event, event);
}

#[tokio::test]
async fn content_type_attribute_arrives() {
    let client = client_with(None).await;
    let queue = setup::ensure_queue(
        &client,
        &outbox_aws::testing::unique_name("outbox-sqs"),
        false,
    )
    .await
    .unwrap();
    let event = order_event("o-attr", 1, "OrderCreated");
    let results = SqsPublisher::new(client.clone(), &queue.url)
        .publish(PublishRequest::new(std::slice::from_ref(&event)))
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let out = client
        .receive_message()
        .queue_url(&queue.url)
        .message_attribute_names("All")
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap();
    let message = &out.messages()[0];
    assert_eq!(
        message.message_attributes().unwrap()["content-type"].string_value(),
        Some("application/cloudevents+json")
    );
}

#[tokio::test]
async fn more_than_ten_events_are_split_into_calls_in_order() {
    let client = client_with(None).await;
    let queue = setup::ensure_queue(
        &client,
        &format!("{}.fifo", outbox_aws::testing::unique_name("outbox-sqs")),
        true,
    )
    .await
    .unwrap();
    // 23 events of one aggregate: three calls, one FIFO group, order kept.
    let events: Vec<_> = (1..=23)
        .map(|v| order_event("o-many", v, "OrderUpdated"))
        .collect();
    let results = SqsPublisher::new(client.clone(), &queue.url)
        .publish(PublishRequest::new(&events))
        .await;
    assert_eq!(results.len(), 23);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = SqsReceiver::new(client, &queue.url)
        .collect_events(23, Duration::from_secs(10))
        .await
        .unwrap();
    let versions: Vec<u64> = received.iter().map(|r| r.event.aggregate_version).collect();
    assert_eq!(versions, (1..=23).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_failed_call_fails_every_entry_alike() {
    let client = client_with(None).await;
    let gone = format!(
        "{}/123456789012/{}",
        std::env::var("AWS_ENDPOINT_URL_SQS").unwrap(),
        outbox_aws::testing::unique_name("missing")
    );
    let events = [order_event("a", 1, "X"), order_event("b", 1, "X")];
    let publisher = SqsPublisher::new(client, gone.clone());
    let results = publisher.publish(PublishRequest::new(&events)).await;
    assert_eq!(results.len(), 2);
    let (a, b) = (
        results[0].as_ref().unwrap_err(),
        results[1].as_ref().unwrap_err(),
    );
    assert_eq!(a.message(), b.message());
    // A missing queue is the target's fault, not the events': the relay
    // pauses and probes instead of spending their attempts.
    assert!(a.is_target_failure(), "{a}");
    assert_eq!(a.disposition(), Disposition::Transient, "{a}");
    // And `check` names it at start-up.
    let err = publisher.check().await.unwrap_err().to_string();
    assert!(
        err.contains(&gone) && err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn setup_is_idempotent_and_checks_names() {
    let client = client_with(None).await;
    let name = outbox_aws::testing::unique_name("outbox-sqs");
    let first = setup::ensure_queue(&client, &name, false).await.unwrap();
    let again = setup::ensure_queue(&client, &name, false).await.unwrap();
    assert_eq!(first, again);
    assert!(first.arn.ends_with(&name));
    setup::allow_senders(&client, &first, &["arn:aws:sns:us-east-1:123456789012:t"])
        .await
        .unwrap();
    assert!(setup::ensure_queue(&client, &name, true).await.is_err());
    assert!(setup::ensure_queue(&client, "x.fifo", false).await.is_err());
    setup::purge(&client, &first.url).await.unwrap();
    setup::delete_queue(&client, &first.url).await.unwrap();
}

#[tokio::test]
async fn delete_removes_received_messages() {
    let client = client_with(None).await;
    let queue = setup::ensure_queue(
        &client,
        &outbox_aws::testing::unique_name("outbox-sqs"),
        false,
    )
    .await
    .unwrap();
    let events: Vec<_> = (0..3)
        .map(|i| order_event(&format!("d{i}"), 1, "X"))
        .collect();
    SqsPublisher::new(client.clone(), &queue.url)
        .publish(PublishRequest::new(&events))
        .await;
    let receiver = SqsReceiver::new(client.clone(), &queue.url);
    let got = receiver.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 3);
    receiver.delete(&got).await.unwrap();
    let attrs = client
        .get_queue_attributes()
        .queue_url(&queue.url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let left = attrs.attributes().unwrap();
    use aws_sdk_sqs::types::QueueAttributeName as A;
    assert_eq!(left[&A::ApproximateNumberOfMessages], "0");
    assert_eq!(left[&A::ApproximateNumberOfMessagesNotVisible], "0");
}
