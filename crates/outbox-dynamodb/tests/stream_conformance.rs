//! The store conformance suite over the DynamoDB Streams source.
//!
//! `write` commits the business item and the aggregate's outbox item update
//! through the library's `Transaction` (rollback = not sending it), then
//! waits until the stream shows the events, since a stream delivers them a
//! moment after the commit; the inbox is `DynamoInbox`.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, Put};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, EventId, Inbox, Seen, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, StreamSource};
use outbox_testkit::{StoreFeatures, StoreHarness};

struct Harness {
    client: Client,
    outbox: DynamoOutbox,
    business: String,
    inbox: DynamoInbox,
    source: StreamSource,
}

impl Harness {
    async fn new() -> Self {
        outbox_aws::testing::require_local_endpoints(&["DYNAMODB", "DYNAMODB_STREAMS"]);
        let config = outbox_aws::load_config().await;
        let client = Client::new(&config);
        let streams = aws_sdk_dynamodbstreams::Client::new(&config);
        let outbox = DynamoOutbox::new(client.clone(), outbox_aws::testing::unique_name("outbox"));
        outbox.create_table_if_missing().await.unwrap();
        let business = format!("{}-orders", outbox.table());
        DynamoOutbox::new(client.clone(), &business)
            .create_table_if_missing()
            .await
            .unwrap();
        let inbox = DynamoInbox::new(client.clone(), format!("{}-inbox", outbox.table()));
        inbox.create_table_if_missing().await.unwrap();
        let source = StreamSource::new(client.clone(), streams, outbox.table())
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
        // The library's write path: the business put and the aggregate's
        // outbox item update in one transaction.
        let business = Put::builder()
            .table_name(&self.business)
            .item("pk", AttributeValue::S(key.to_owned()))
            .build()
            .unwrap();
        let tx = self
            .outbox
            .transaction()
            .put(business)
            .events(events.iter().cloned());
        if !commit {
            // Not sending it is DynamoDB's rollback.
            return tx.build().map(drop).map_err(StoreError::from);
        }
        let before = self.source.events_read();
        tx.commit().await.map_err(StoreError::from)?;
        // Wait until the stream has delivered the events into the buffer
        // (read here or by a relay's claim meanwhile).
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.source.events_read() < before + events.len() as u64 {
            assert!(
                tokio::time::Instant::now() < until,
                "events never reached the stream"
            );
            if self.source.poll_stream().await? == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
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
        let mut tx = self.inbox.transaction();
        let seen = self.inbox.record(&mut tx, consumer, id).await?;
        if commit {
            tx.commit().await?;
        }
        Ok(seen)
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
