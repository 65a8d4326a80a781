//! `parse_delivery` reads the three body shapes a queue receives, from
//! fixtures of real payload shapes, into the same event.

use outbox_core::cloudevents::Received;
use outbox_sqs::parse_delivery;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn check(received: &Received) {
    let e = &received.event;
    assert_eq!(received.source, "urn:orders");
    assert_eq!(e.id.to_string(), "0192e4a0-7c3e-7a11-8f00-1b2c3d4e5f60");
    assert_eq!(
        (e.aggregate_type.as_str(), e.aggregate_id.as_str()),
        ("Order", "order-42")
    );
    assert_eq!(e.aggregate_version, 1);
    assert_eq!(e.event_type, "OrderCreated");
    assert_eq!(
        e.occurred_at.to_rfc3339(),
        "2024-11-05T10:15:30.123456+00:00"
    );
    assert_eq!(
        e.metadata.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(e.metadata.correlation_id.as_deref(), Some("req-7"));
    // Compact, in the order written, whatever whitespace the carrier added.
    assert_eq!(
        e.payload.as_str(),
        r#"{"order":"order-42","total":99.5,"lines":[{"sku":"A-1","qty":2}]}"#
    );
}

#[test]
fn structured_cloudevent() {
    check(&parse_delivery(&fixture("cloudevent.json")).unwrap());
}

#[test]
fn eventbridge_event_delivered_by_a_rule() {
    check(&parse_delivery(&fixture("eventbridge-event.json")).unwrap());
}

#[test]
fn sns_notification_without_raw_delivery() {
    check(&parse_delivery(&fixture("sns-notification.json")).unwrap());
}

#[test]
fn all_three_shapes_give_the_same_event() {
    let shapes = [
        "cloudevent.json",
        "eventbridge-event.json",
        "sns-notification.json",
    ]
    .map(|f| parse_delivery(&fixture(f)).unwrap());
    assert_eq!(shapes[0], shapes[1]);
    assert_eq!(shapes[0], shapes[2]);
}

#[test]
fn an_eventbridge_event_without_a_cloudevent_is_refused() {
    let body = r#"{"version":"0","detail-type":"T","source":"aws.s3","detail":{"bucket":"b"}}"#;
    assert!(parse_delivery(body).is_err());
}
