//! The deployed handler's publisher, through EventBridge on the local
//! emulator: a bus with a rule delivering to an SQS queue.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_lambda::testing::stream_event;
use outbox_lambda::{AwsPublisher, MemoryDeadLetters, StreamBatchResponse, StreamRelayHandler};
use outbox_testkit::FaultProxy;
use serde_json::Value;

fn fixture(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let event: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    event["Records"].as_array().unwrap().clone()
}

#[tokio::test]
async fn stream_batch_reaches_eventbridge_rule_targets_in_order() {
    require_local_endpoints(&["EVENTBRIDGE", "SQS"]);
    let config = outbox_aws::load_config().await;
    let events = aws_sdk_eventbridge::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let name = unique_name("lambda-relay");
    let source = format!("urn:{name}");
    let bus_arn = outbox_eventbridge::setup::ensure_bus(&events, &name)
        .await
        .unwrap();
    let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
        .await
        .unwrap();
    outbox_sqs::setup::allow_senders(&sqs, &queue, &[&bus_arn])
        .await
        .unwrap();
    let pattern = outbox_eventbridge::setup::source_pattern(&source);
    outbox_eventbridge::setup::ensure_rule_to_queue(&events, &name, &name, &queue.arn, &pattern)
        .await
        .unwrap();

    let publisher = AwsPublisher::from_target(&config, &format!("eventbridge://{name}"), &source)
        .await
        .unwrap();
    assert_eq!(outbox_core::Publisher::max_batch_size(&publisher), 10);
    let handler = StreamRelayHandler::new(publisher, MemoryDeadLetters::new());
    let mut records = fixture("insert_one_event");
    records.extend(fixture("ttl_delete"));
    records.extend(fixture("malformed_bad_event_json"));
    records.extend(fixture("modify_several_events"));
    let report = handler.process(&stream_event(records)).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!(
        (report.published, report.ignored, report.malformed),
        (4, 1, 1)
    );
    assert_eq!(handler.dead_letters().records().len(), 1);

    let mut received = Vec::new();
    for _ in 0..20 {
        let out = sqs
            .receive_message()
            .queue_url(&queue.url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            let body: Value = serde_json::from_str(m.body().unwrap()).unwrap();
            received.push(body);
        }
        if received.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received.len(), 4, "{received:?}");
    let mut versions: Vec<(u64, String, String)> = received
        .iter()
        .map(|b| {
            let detail = &b["detail"];
            assert_eq!(b["source"], source.as_str());
            assert_eq!(detail["source"], source.as_str());
            assert_eq!(detail["subject"], "o-1001");
            (
                detail["aggregateversion"].as_u64().unwrap_or_else(|| {
                    detail["aggregateversion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap()
                }),
                b["detail-type"].as_str().unwrap().to_owned(),
                detail["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    versions.sort();
    assert_eq!(
        versions.iter().map(|v| v.1.as_str()).collect::<Vec<_>>(),
        ["OrderCreated", "OrderPaid", "OrderPacked", "OrderShipped"]
    );
    assert_eq!(versions[0].2, "019aaa51-2c3e-7d41-9b1e-5c7f0a3d2e11");

    outbox_sqs::setup::delete_queue(&sqs, &queue.url).await.ok();
}

/// Messages in `queue_url`, waiting up to a few seconds for `expected`.
async fn receive(sqs: &aws_sdk_sqs::Client, queue_url: &str, expected: usize) -> Vec<Value> {
    let mut received = Vec::new();
    for _ in 0..20 {
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            received.push(serde_json::from_str(m.body().unwrap()).unwrap());
        }
        if received.len() >= expected {
            break;
        }
    }
    received
}

#[tokio::test]
async fn an_unreachable_eventbridge_hands_the_batch_back_without_spending_retries() {
    require_local_endpoints(&["EVENTBRIDGE", "SQS"]);
    let config = outbox_aws::load_config().await;
    let events = aws_sdk_eventbridge::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let name = unique_name("lambda-outage");
    let source = format!("urn:{name}");
    let bus_arn = outbox_eventbridge::setup::ensure_bus(&events, &name)
        .await
        .unwrap();
    let queue = outbox_sqs::setup::ensure_queue(&sqs, &name, false)
        .await
        .unwrap();
    outbox_sqs::setup::allow_senders(&sqs, &queue, &[&bus_arn])
        .await
        .unwrap();
    let pattern = outbox_eventbridge::setup::source_pattern(&source);
    outbox_eventbridge::setup::ensure_rule_to_queue(&events, &name, &name, &queue.arn, &pattern)
        .await
        .unwrap();

    // The handler reaches EventBridge through a proxy that can cut the line.
    let endpoint = std::env::var("AWS_ENDPOINT_URL_EVENTBRIDGE").unwrap();
    let upstream =
        tokio::net::lookup_host(endpoint.split("://").nth(1).unwrap().trim_end_matches('/'))
            .await
            .unwrap()
            .next()
            .unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let conf = aws_sdk_eventbridge::config::Builder::from(&config)
        .retry_config(aws_sdk_eventbridge::config::retry::RetryConfig::disabled())
        .endpoint_url(proxy.url_for("http"))
        .build();
    let publisher = AwsPublisher::EventBridge(
        outbox_eventbridge::EventBridgePublisher::new(
            aws_sdk_eventbridge::Client::from_conf(conf),
            &name,
        )
        .source(&source),
    );
    let handler = StreamRelayHandler::new(publisher, MemoryDeadLetters::new());
    let mut records = fixture("insert_one_event");
    records.extend(fixture("modify_several_events"));
    let batch = stream_event(records);

    proxy.refuse();
    let report = handler.process(&batch).await;
    assert_eq!(
        report.response,
        StreamBatchResponse::retry_from("4421584500000000017450439091"),
        "{report:?}"
    );
    assert_eq!(
        (report.published, report.retries, report.dead_lettered),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.outage.is_some(), "{report:?}");
    assert!(handler.dead_letters().events().is_empty());

    // Lambda hands the batch over again once the line is back: all of it flows.
    proxy.restore();
    let report = handler.process(&batch).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!(report.published, 4);
    let received = receive(&sqs, &queue.url, 4).await;
    assert_eq!(received.len(), 4, "{received:?}");

    outbox_sqs::setup::delete_queue(&sqs, &queue.url).await.ok();
}
