//! The DynamoDB adapters on DynamoDB Local (`eval "$(scripts/services env)"`):
//! the API on the orders table and the outbox (stream shape), and the
//! Shipping handler through outbox-lambda's consumer wrapper with SQS
//! deliveries shaped as an EventBridge rule sends them.

#![allow(clippy::unwrap_used)] // tests fail loudly

mod common;

use std::sync::Arc;

use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use orders::domain::{Meta, Order, PlaceOrder, ShipmentStatus};
use orders::store::dynamodb::{DynamoOrders, DynamoShipments, ShippingHandler};
use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_core::Event;
use outbox_dynamodb::{DynamoInbox, DynamoOutbox};
use outbox_lambda::IdempotentConsumer;
use serde_json::{json, Value};

async fn client() -> Client {
    require_local_endpoints(&["DYNAMODB"]);
    Client::new(&outbox_aws::load_config().await)
}

async fn orders() -> DynamoOrders {
    let client = client().await;
    let store = DynamoOrders::new(
        client.clone(),
        unique_name("orders"),
        DynamoOutbox::new(client, unique_name("outbox")),
    );
    store.create_tables_if_missing().await.unwrap();
    store
}

async fn scan(
    client: &Client,
    table: &str,
) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    client
        .scan()
        .table_name(table)
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default()
}

/// Orders, and events in the outbox (each outbox item's version counts its
/// aggregate's events).
async fn counts(store: &DynamoOrders, client: &Client) -> (u64, u64) {
    let orders = scan(client, store.table()).await.len() as u64;
    let events = scan(client, store.outbox().table())
        .await
        .iter()
        .filter_map(|i| match i.get("version") {
            Some(AttributeValue::N(v)) => v.parse::<u64>().ok(),
            _ => None,
        })
        .sum();
    (orders, events)
}

#[tokio::test]
async fn lifecycle_and_refusals() {
    let store = orders().await;
    common::lifecycle(&store).await;
    common::unknown_orders_and_routes(&store).await;
    common::stale_if_match_is_a_conflict(&store).await;
}

#[tokio::test]
async fn bad_input_is_a_400_and_writes_nothing() {
    let store = orders().await;
    let client = client().await;
    let (st, cl) = (&store, &client);
    common::bad_input_writes_nothing(st, || counts(st, cl)).await;
}

#[tokio::test]
async fn a_lost_race_is_a_conflict_never_a_lost_update() {
    let store = orders().await;
    let client = client().await;
    let outbox = store.outbox().table().to_owned();
    common::lost_race_in_the_store_is_a_conflict(&store, move |id| {
        let (client, outbox) = (client.clone(), outbox.clone());
        Box::pin(async move {
            let key = outbox_dynamodb::item::aggregate_key("Order", &id).unwrap();
            let item = client
                .get_item()
                .table_name(outbox)
                .key(outbox_dynamodb::item::PK, AttributeValue::S(key))
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .item
                .unwrap();
            match item.get("version") {
                Some(AttributeValue::N(v)) => v.parse().unwrap(),
                other => panic!("outbox item without a version: {other:?}"),
            }
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pay_and_cancel_one_wins() {
    common::concurrent_pay_and_cancel(Arc::new(orders().await), 5).await;
}

const SOURCE: &str = orders::EVENT_SOURCE;
const QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ShippingQueue";

/// What the `OrderEventsToShipping` rule puts into the queue: an
/// EventBridge event whose `detail` is the CloudEvent.
fn eventbridge_body(event: &Event) -> String {
    let detail: Value =
        serde_json::from_str(&outbox_core::cloudevents::to_json(event, SOURCE)).unwrap();
    json!({
        "version": "0",
        "id": outbox_core::EventId::new().to_string(),
        "detail-type": event.event_type,
        "source": SOURCE,
        "account": "123456789012",
        "time": "2026-11-27T12:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": detail,
    })
    .to_string()
}

/// An SQS-triggered invocation's event, each body with its message id.
fn sqs_event(bodies: &[(&str, String)]) -> SqsEvent {
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
                "eventSourceARN": QUEUE_ARN,
                "awsRegion": "us-east-1"
            })
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).unwrap()
}

fn history(order_id: &str) -> Vec<Event> {
    let meta = Meta::default();
    let request: PlaceOrder = serde_json::from_str(common::VALID).unwrap();
    let created = Order::create(order_id, request, &meta).unwrap();
    let paid = created.order.pay(&meta).unwrap();
    let cancelled = paid.order.cancel(None, &meta).unwrap();
    [created.events, paid.events, cancelled.events].concat()
}

#[tokio::test]
async fn shipping_through_the_consumer_wrapper_in_any_arrival_order() {
    let client = client().await;
    let shipments = DynamoShipments::new(client.clone(), unique_name("shipments"));
    shipments.create_table_if_missing().await.unwrap();
    let inbox = DynamoInbox::new(client.clone(), unique_name("inbox"));
    inbox.create_table_if_missing().await.unwrap();
    let consumer = IdempotentConsumer::new(
        orders::SHIPPING_CONSUMER,
        inbox.clone(),
        ShippingHandler::new(shipments.clone()),
    );

    let arrivals = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]];
    for (n, arrival) in arrivals.iter().enumerate() {
        let order = format!("o-{n}");
        let events = history(&order);
        // One message a batch, in the arrival order; then all three again.
        for &i in arrival {
            let response = consumer
                .handle_sqs(&sqs_event(&[("m", eventbridge_body(&events[i]))]))
                .await;
            assert!(
                response.batch_item_failures.is_empty(),
                "order {n}: event {i} failed"
            );
        }
        let again: Vec<(&str, String)> = events
            .iter()
            .map(|e| ("again", eventbridge_body(e)))
            .collect();
        let response = consumer.handle_sqs(&sqs_event(&again)).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "duplicates are acknowledged"
        );
        let shipment = shipments.get(&order).await.unwrap().unwrap();
        assert_eq!(
            (shipment.status, shipment.order_version),
            (ShipmentStatus::Cancelled, 3),
            "arrival {arrival:?}"
        );
        for e in &events {
            assert!(inbox
                .contains(orders::SHIPPING_CONSUMER, e.id)
                .await
                .unwrap());
        }
    }

    // Paid before created: ready to ship, and created stays recorded only.
    let events = history("o-late");
    let batch = sqs_event(&[
        ("m-paid", eventbridge_body(&events[1])),
        ("m-bad", "{\"not\": \"an event\"}".to_owned()),
        ("m-created", eventbridge_body(&events[0])),
    ]);
    let response = consumer.handle_sqs(&batch).await;
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, ["m-bad"], "only the malformed message is retried");
    let shipment = shipments.get("o-late").await.unwrap().unwrap();
    assert_eq!(
        (shipment.status, shipment.order_version),
        (ShipmentStatus::ReadyToShip, 2)
    );
    assert!(inbox
        .contains(orders::SHIPPING_CONSUMER, events[0].id)
        .await
        .unwrap());
    assert_eq!(
        scan(&client, inbox.table()).await.len(),
        arrivals.len() * 3 + 2,
        "one inbox record per distinct event"
    );
}
