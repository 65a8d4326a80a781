//! The idempotent consumer on DynamoDB Local: SQS- and EventBridge-invoked
//! deliveries applied once, with the inbox record in the handler's commit.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, Update,
};
use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_core::Event;
use outbox_dynamodb::{DynamoInbox, Transaction};
use outbox_lambda::{EventHandler, HandlerError, IdempotentConsumer, Outcome};
use serde_json::{json, Value};

const SOURCE: &str = "urn:orders";
const QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:orders";
const FIFO_QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:orders.fifo";

/// Counts each order's applications in a business table; refuses events of
/// type `Refused` while `refuse` is set.
#[derive(Clone)]
struct CountingHandler {
    table: String,
    refuse: Arc<AtomicBool>,
}

impl EventHandler for CountingHandler {
    async fn handle(&self, event: &Event, tx: &mut Transaction) -> Result<(), HandlerError> {
        if event.event_type == "Refused" && self.refuse.load(Ordering::SeqCst) {
            return Err(HandlerError::transient("the pricing service is down"));
        }
        let update = Update::builder()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(event.aggregate_id.clone()))
            .update_expression("ADD applied :one")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .build()
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        tx.push_update(update);
        Ok(())
    }
}

struct Fixture {
    client: aws_sdk_dynamodb::Client,
    business: String,
    inbox: DynamoInbox,
    consumer: IdempotentConsumer<CountingHandler>,
    refuse: Arc<AtomicBool>,
}

async fn fixture() -> Fixture {
    require_local_endpoints(&["DYNAMODB"]);
    let config = outbox_aws::load_config().await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let business = unique_name("orders");
    client
        .create_table()
        .table_name(&business)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let inbox = DynamoInbox::new(client.clone(), unique_name("inbox"));
    inbox.create_table_if_missing().await.unwrap();
    let refuse = Arc::new(AtomicBool::new(false));
    let handler = CountingHandler {
        table: business.clone(),
        refuse: refuse.clone(),
    };
    let consumer = IdempotentConsumer::new("billing", inbox.clone(), handler);
    Fixture {
        client,
        business,
        inbox,
        consumer,
        refuse,
    }
}

impl Fixture {
    /// How often the handler's write for `order` landed.
    async fn applied(&self, order: &str) -> u64 {
        let item = self
            .client
            .get_item()
            .table_name(&self.business)
            .key("pk", AttributeValue::S(order.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        match item.item().and_then(|i| i.get("applied")) {
            Some(AttributeValue::N(n)) => n.parse().unwrap(),
            _ => 0,
        }
    }
}

fn event(order: &str, event_type: &str) -> Event {
    Event::builder("Order", order, 1, event_type)
        .payload(&json!({ "total": 42 }))
        .build()
        .unwrap()
}

/// What an EventBridge rule delivers: the CloudEvent as `detail`.
fn eventbridge_envelope(event: &Event) -> Value {
    let detail: Value =
        serde_json::from_str(&outbox_core::cloudevents::to_json(event, SOURCE)).unwrap();
    json!({
        "version": "0",
        "id": uuid_like(),
        "detail-type": event.event_type,
        "source": SOURCE,
        "account": "123456789012",
        "time": "2026-11-22T12:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": detail,
    })
}

fn uuid_like() -> String {
    outbox_core::EventId::new().to_string()
}

/// An SQS event as Lambda delivers it; each body with its message id.
fn sqs_event(queue_arn: &str, bodies: &[(&str, String)]) -> SqsEvent {
    let records: Vec<Value> = bodies
        .iter()
        .map(|(id, body)| {
            json!({
                "messageId": id,
                "receiptHandle": format!("handle-{id}"),
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1795000000000",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "1795000000001"
                },
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1"
            })
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).unwrap()
}

fn failed_ids(response: &SqsBatchResponse) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

fn body(event: &Event) -> String {
    eventbridge_envelope(event).to_string()
}

#[tokio::test]
async fn sqs_deliveries_apply_once_and_report_failures() {
    let f = fixture().await;
    let created = event("order-1", "OrderCreated");
    let refused = event("order-2", "Refused");
    f.refuse.store(true, Ordering::SeqCst);

    let batch = sqs_event(
        QUEUE_ARN,
        &[
            ("m-1", body(&created)),
            ("m-2", "{\"not\": \"an event\"}".to_owned()),
            ("m-3", body(&refused)),
            ("m-4", body(&created)),
        ],
    );
    let response = f.consumer.handle_sqs(&batch).await;
    // m-4 repeats m-1 inside the batch: a duplicate, acknowledged. On a
    // standard queue the failures do not hold back later messages.
    assert_eq!(failed_ids(&response), ["m-2", "m-3"]);
    assert_eq!(f.applied("order-1").await, 1);
    assert_eq!(f.applied("order-2").await, 0);
    assert!(f.inbox.contains("billing", created.id).await.unwrap());
    assert!(!f.inbox.contains("billing", refused.id).await.unwrap());

    // Redelivered: the applied one is a duplicate, the refused one now applies.
    f.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        f.consumer.apply_body(&body(&created)).await,
        Outcome::Duplicate
    );
    let again = sqs_event(
        QUEUE_ARN,
        &[("m-1", body(&created)), ("m-3", body(&refused))],
    );
    let response = f.consumer.handle_sqs(&again).await;
    assert!(failed_ids(&response).is_empty(), "{response:?}");
    assert_eq!(f.applied("order-1").await, 1);
    assert_eq!(f.applied("order-2").await, 1);
    assert!(f.inbox.contains("billing", refused.id).await.unwrap());
}

#[tokio::test]
async fn fifo_reports_every_message_after_a_failure() {
    let f = fixture().await;
    f.refuse.store(true, Ordering::SeqCst);
    let first = event("order-a", "OrderCreated");
    let refused = event("order-b", "Refused");
    let later = event("order-c", "OrderCreated");
    let batch = sqs_event(
        FIFO_QUEUE_ARN,
        &[
            ("m-1", body(&first)),
            ("m-2", body(&refused)),
            ("m-3", body(&later)),
            ("m-4", "not json".to_owned()),
        ],
    );
    let response = f.consumer.handle_sqs(&batch).await;
    assert_eq!(failed_ids(&response), ["m-2", "m-3", "m-4"]);
    assert_eq!(f.applied("order-a").await, 1);
    // Not even attempted, so not applied and not recorded.
    assert_eq!(f.applied("order-c").await, 0);
    assert!(!f.inbox.contains("billing", later.id).await.unwrap());
}

#[tokio::test]
async fn eventbridge_invocation_applies_once() {
    let f = fixture().await;
    let created = event("order-eb", "OrderCreated");
    let envelope = eventbridge_envelope(&created);
    assert_eq!(
        f.consumer.handle_eventbridge(&envelope).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        f.consumer.handle_eventbridge(&envelope).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(f.applied("order-eb").await, 1);

    let err = f
        .consumer
        .handle_eventbridge(&json!({ "detail-type": "x", "detail": { "no": "event" } }))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");

    f.refuse.store(true, Ordering::SeqCst);
    let refused = eventbridge_envelope(&event("order-eb2", "Refused"));
    let err = f.consumer.handle_eventbridge(&refused).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(f.applied("order-eb2").await, 0);
}
