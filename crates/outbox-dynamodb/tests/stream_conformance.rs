//! The store conformance suite over the DynamoDB Streams source.
//!
//! `write` commits the business item and the aggregate's outbox item update
//! in one `TransactWriteItems` (rollback = not sending it), then waits until
//! the stream shows the events, since a stream delivers them a moment after
//! the commit.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, StreamSpecification, StreamViewType, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, EventId, Seen, StoreError};
use outbox_dynamodb::{item, StreamSource};
use outbox_testkit::{StoreFeatures, StoreHarness};

async fn create_table(client: &Client, name: &str, stream: bool) {
    let mut request = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        );
    if stream {
        request = request.stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()
                .unwrap(),
        );
    }
    request.send().await.unwrap();
}

/// The outbox item update of one transaction, as item.rs describes it.
fn outbox_update(table: &str, events: &[Event]) -> Result<TransactWriteItem, StoreError> {
    for e in events {
        e.validate()?;
    }
    if events
        .windows(2)
        .any(|w| w[1].aggregate_version <= w[0].aggregate_version)
    {
        return Err(StoreError::Conflict("versions must increase".into()));
    }
    let first = &events[0];
    let key = item::aggregate_key(&first.aggregate_type, &first.aggregate_id)?;
    let values = item::item_values(events, chrono::Utc::now().timestamp_millis())?;
    let mut update = Update::builder()
        .table_name(table)
        .key(item::PK, AttributeValue::S(key))
        .condition_expression("attribute_not_exists(#pk) OR #version = :prev")
        .expression_attribute_names("#pk", item::PK)
        .expression_attribute_values(
            ":prev",
            AttributeValue::N((first.aggregate_version - 1).to_string()),
        );
    let mut sets = Vec::new();
    for (name, value) in values {
        sets.push(format!("#{name} = :{name}"));
        update = update
            .expression_attribute_names(format!("#{name}"), name.clone())
            .expression_attribute_values(format!(":{name}"), value);
    }
    let update = update
        .update_expression(format!("SET {}", sets.join(", ")))
        .build()
        .unwrap();
    Ok(TransactWriteItem::builder().update(update).build())
}

struct Harness {
    client: Client,
    outbox: String,
    business: String,
    inbox: String,
    source: StreamSource,
}

impl Harness {
    async fn new() -> Self {
        outbox_aws::testing::require_local_endpoints(&["DYNAMODB", "DYNAMODB_STREAMS"]);
        let config = outbox_aws::load_config().await;
        let client = Client::new(&config);
        let streams = aws_sdk_dynamodbstreams::Client::new(&config);
        let outbox = outbox_aws::testing::unique_name("outbox");
        let business = format!("{outbox}-orders");
        let inbox = format!("{outbox}-inbox");
        create_table(&client, &outbox, true).await;
        create_table(&client, &business, false).await;
        create_table(&client, &inbox, false).await;
        let source = StreamSource::new(client.clone(), streams, &outbox)
            .poll_interval(Duration::from_millis(50));
        source.create_tables_if_missing().await.unwrap();
        Self {
            client,
            outbox,
            business,
            inbox,
            source,
        }
    }
}

impl StoreHarness for Harness {
    type Store = StreamSource;

    fn store(&self) -> StreamSource {
        self.source.clone()
    }

    async fn write(&self, key: &str, events: &[Event], commit: bool) -> Result<(), StoreError> {
        let outbox = outbox_update(&self.outbox, events)?;
        let business = Put::builder()
            .table_name(&self.business)
            .item("pk", AttributeValue::S(key.to_owned()))
            .build()
            .unwrap();
        if !commit {
            return Ok(());
        }
        let sent = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(business).build())
            .transact_items(outbox)
            .send()
            .await;
        if let Err(e) = sent {
            if e.as_service_error()
                .is_some_and(|e| e.is_transaction_canceled_exception())
            {
                return Err(StoreError::Conflict(format!("{e:?}")));
            }
            return Err(outbox_aws::store_error("TransactWriteItems", e));
        }
        // Wait until the stream has delivered the events into the buffer.
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut seen = 0;
        while seen < events.len() {
            assert!(
                tokio::time::Instant::now() < until,
                "events never reached the stream"
            );
            seen += self.source.poll_stream().await?;
            if seen < events.len() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.business)
            .key("pk", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        Ok(out.item.is_some())
    }

    async fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> Result<Seen, StoreError> {
        let key = format!("{consumer}#{id}");
        let exists = self
            .client
            .get_item()
            .table_name(&self.inbox)
            .key("pk", AttributeValue::S(key.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?
            .item
            .is_some();
        if exists {
            return Ok(Seen::Duplicate);
        }
        if commit {
            let put = Put::builder()
                .table_name(&self.inbox)
                .item("pk", AttributeValue::S(key))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .unwrap();
            let sent = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().put(put).build())
                .send()
                .await;
            if let Err(e) = sent {
                if e.as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception())
                {
                    return Ok(Seen::Duplicate);
                }
                return Err(outbox_aws::store_error("TransactWriteItems", e));
            }
        }
        Ok(Seen::First)
    }
}

outbox_testkit::store_conformance!(
    Harness::new,
    StoreFeatures {
        // One process reads a stream per consumer (a lease guards it).
        concurrent_relays: false,
        // Stream records expire by themselves; there is nothing to purge.
        purges_published: false,
        ..StoreFeatures::all()
    }
);
