//! Creates, on the emulators, what the template creates on AWS, under the
//! template's names: the tables, the bus and its rule, the queues. Leftovers
//! of an earlier run are deleted first, so every run starts empty and its
//! summary can be checked against what the tables and queues hold.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_sdk_sqs::types::QueueAttributeName;
use outbox_dynamodb::{DeadLetterTable, DynamoInbox, DynamoOutbox};

use crate::Error;

pub const ORDERS_TABLE: &str = "OrdersTable";
pub const OUTBOX_TABLE: &str = "OutboxTable";
pub const OUTBOX_DEAD_LETTERS_TABLE: &str = "OutboxDeadLettersTable";
pub const SHIPMENTS_TABLE: &str = "ShipmentsTable";
pub const SHIPPING_INBOX_TABLE: &str = "ShippingInboxTable";
pub const BUS: &str = "OrdersBus";
pub const RULE: &str = "OrderEventsToShipping";
pub const SHIPPING_QUEUE: &str = "ShippingQueue";
pub const SHIPPING_DLQ: &str = "ShippingDeadLetterQueue";
pub const FAILURE_QUEUE: &str = "PublishEventsFailureQueue";
/// The CloudEvents source (EventBridge `Source`) of the orders' events.
pub const SOURCE: &str = "urn:outbox:orders";
pub const EVENT_TYPES: [&str; 3] = ["OrderCreated", "OrderPaid", "OrderCancelled"];

const TABLES: [&str; 5] = [
    ORDERS_TABLE,
    OUTBOX_TABLE,
    OUTBOX_DEAD_LETTERS_TABLE,
    SHIPMENTS_TABLE,
    SHIPPING_INBOX_TABLE,
];

/// The rule's event pattern, as the template writes it.
pub fn rule_pattern() -> String {
    serde_json::json!({"source": [SOURCE], "detail-type": EVENT_TYPES}).to_string()
}

/// What the run needs to know about what it created.
#[derive(Debug, Clone)]
pub struct Resources {
    pub stream_arn: String,
    pub shipping_queue_url: String,
    pub shipping_queue_arn: String,
    pub shipping_dlq_url: String,
    pub failure_queue_url: String,
}

/// The AWS clients, pointed at the emulators by the environment.
#[derive(Debug, Clone)]
pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub streams: aws_sdk_dynamodbstreams::Client,
    pub events: aws_sdk_eventbridge::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl Clients {
    pub async fn from_env() -> Self {
        let config = outbox_aws::load_config().await;
        Self {
            dynamodb: aws_sdk_dynamodb::Client::new(&config),
            streams: aws_sdk_dynamodbstreams::Client::new(&config),
            events: aws_sdk_eventbridge::Client::new(&config),
            sqs: aws_sdk_sqs::Client::new(&config),
        }
    }
}

fn setup_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Setup(format!("{what}: {e}"))
}

/// Deletes what an earlier run left, then creates everything anew.
pub async fn create(
    clients: &Clients,
    visibility: Duration,
    max_receive_count: u32,
) -> Result<Resources, Error> {
    delete_leftovers(clients).await?;
    let db = &clients.dynamodb;
    let outbox = DynamoOutbox::new(db.clone(), OUTBOX_TABLE);
    outbox
        .create_table_if_missing()
        .await
        .map_err(|e| setup_error(OUTBOX_TABLE, e))?;
    DeadLetterTable::new(db.clone(), OUTBOX_DEAD_LETTERS_TABLE)
        .create_table_if_missing()
        .await
        .map_err(|e| setup_error(OUTBOX_DEAD_LETTERS_TABLE, e))?;
    DynamoInbox::new(db.clone(), SHIPPING_INBOX_TABLE)
        .create_table_if_missing()
        .await
        .map_err(|e| setup_error(SHIPPING_INBOX_TABLE, e))?;
    create_keyed_table(db, ORDERS_TABLE, "id").await?;
    create_keyed_table(db, SHIPMENTS_TABLE, "order_id").await?;
    let stream_arn = db
        .describe_table()
        .table_name(OUTBOX_TABLE)
        .send()
        .await
        .map_err(|e| setup_error("DescribeTable OutboxTable", outbox_aws::describe(&e)))?
        .table
        .and_then(|t| t.latest_stream_arn)
        .ok_or_else(|| Error::Setup(format!("{OUTBOX_TABLE} has no stream")))?;

    let sqs = &clients.sqs;
    let dlq = outbox_sqs::setup::ensure_queue(sqs, SHIPPING_DLQ, false)
        .await
        .map_err(|e| setup_error(SHIPPING_DLQ, e))?;
    let failure = outbox_sqs::setup::ensure_queue(sqs, FAILURE_QUEUE, false)
        .await
        .map_err(|e| setup_error(FAILURE_QUEUE, e))?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq.arn,
        "maxReceiveCount": max_receive_count,
    })
    .to_string();
    let url = sqs
        .create_queue()
        .queue_name(SHIPPING_QUEUE)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.as_secs().to_string(),
        )
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .send()
        .await
        .map_err(|e| setup_error("CreateQueue ShippingQueue", outbox_aws::describe(&e)))?
        .queue_url
        .ok_or_else(|| Error::Setup("CreateQueue returned no URL for ShippingQueue".into()))?;
    let arn = outbox_sqs::setup::queue_arn(sqs, &url)
        .await
        .map_err(|e| setup_error(SHIPPING_QUEUE, e))?;
    let queue = outbox_sqs::setup::Queue {
        url: url.clone(),
        arn: arn.clone(),
    };

    let bus_arn = outbox_eventbridge::setup::ensure_bus(&clients.events, BUS)
        .await
        .map_err(|e| setup_error(BUS, e))?;
    outbox_eventbridge::setup::ensure_rule_to_queue(
        &clients.events,
        BUS,
        RULE,
        &arn,
        &rule_pattern(),
    )
    .await
    .map_err(|e| setup_error(RULE, e))?;
    let prefix = bus_arn.split("event-bus/").next().unwrap_or(&bus_arn);
    let rule_arn = format!("{prefix}rule/{BUS}/{RULE}");
    outbox_sqs::setup::allow_senders(sqs, &queue, &[&rule_arn])
        .await
        .map_err(|e| setup_error("SetQueueAttributes ShippingQueue", e))?;

    Ok(Resources {
        stream_arn,
        shipping_queue_url: url,
        shipping_queue_arn: arn,
        shipping_dlq_url: dlq.url,
        failure_queue_url: failure.url,
    })
}

async fn create_keyed_table(
    db: &aws_sdk_dynamodb::Client,
    name: &str,
    key: &str,
) -> Result<(), Error> {
    let attr = AttributeDefinition::builder()
        .attribute_name(key)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| setup_error(name, e))?;
    let schema = KeySchemaElement::builder()
        .attribute_name(key)
        .key_type(KeyType::Hash)
        .build()
        .map_err(|e| setup_error(name, e))?;
    db.create_table()
        .table_name(name)
        .attribute_definitions(attr)
        .key_schema(schema)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| setup_error(&format!("CreateTable {name}"), outbox_aws::describe(&e)))?;
    Ok(())
}

/// Deletes the run's tables, rule, bus and queues where they exist.
pub async fn delete_leftovers(clients: &Clients) -> Result<(), Error> {
    let db = &clients.dynamodb;
    for table in TABLES {
        match db.delete_table().table_name(table).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(setup_error(
                    &format!("DeleteTable {table}"),
                    outbox_aws::describe(&e),
                ))
            }
        }
    }
    // DynamoDB Local deletes at once; AWS takes a while: wait until gone.
    for table in TABLES {
        for _ in 0..120 {
            if db.describe_table().table_name(table).send().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let events = &clients.events;
    if events.describe_event_bus().name(BUS).send().await.is_ok() {
        let _ = events
            .remove_targets()
            .rule(RULE)
            .event_bus_name(BUS)
            .ids("queue")
            .send()
            .await;
        let _ = events
            .delete_rule()
            .name(RULE)
            .event_bus_name(BUS)
            .send()
            .await;
        events
            .delete_event_bus()
            .name(BUS)
            .send()
            .await
            .map_err(|e| setup_error("DeleteEventBus", outbox_aws::describe(&e)))?;
    }
    for name in [SHIPPING_QUEUE, SHIPPING_DLQ, FAILURE_QUEUE] {
        if let Ok(out) = clients.sqs.get_queue_url().queue_name(name).send().await {
            if let Some(url) = out.queue_url {
                outbox_sqs::setup::delete_queue(&clients.sqs, &url)
                    .await
                    .map_err(|e| setup_error(name, e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_matches_the_contract() {
        let p: serde_json::Value = serde_json::from_str(&rule_pattern()).unwrap();
        assert_eq!(p["source"][0], SOURCE);
        assert_eq!(p["detail-type"].as_array().unwrap().len(), 3);
    }
}
