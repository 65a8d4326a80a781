//! The consumer's inbox on DynamoDB, recorded inside the consumer's own
//! `TransactWriteItems`.
//!
//! ```text
//! pk           S   the consumer's name           (table key)
//! sk           S   the event id                  (table key)
//! recorded_at  N   ms since the epoch
//! expires_at   N   seconds since the epoch, when a retention is set: the table's TTL attribute
//! ```

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, Put};
use aws_sdk_dynamodb::Client;
use outbox_core::{EventId, Inbox, Seen, StoreError};

use crate::error::build_error;
use crate::item::PK;
use crate::transaction::Transaction;

const SK: &str = "sk";
const RECORDED_AT: &str = "recorded_at";
const EXPIRES_AT: &str = "expires_at";

/// Processed event ids per consumer.
#[derive(Debug, Clone)]
pub struct DynamoInbox {
    client: Client,
    table: String,
    retention: Option<Duration>,
}

impl DynamoInbox {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            retention: None,
        }
    }

    /// Lets the table's TTL delete records this long after they were written.
    /// Keep it well beyond the longest time a duplicate can still arrive.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table (key `pk` S + `sk` S, TTL on `expires_at`) unless it
    /// exists, and waits until it is ACTIVE.
    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        crate::tables::create_string_key_table(&self.client, &self.table, PK, SK, Some(EXPIRES_AT))
            .await
    }

    /// A transaction for a consumer that emits no events; one from
    /// [`crate::DynamoOutbox::transaction`] carries inbox records just as well.
    pub fn transaction(&self) -> Transaction {
        Transaction::new(self.client.clone())
    }

    fn key(consumer: &str, event_id: EventId) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (PK.to_owned(), AttributeValue::S(consumer.to_owned())),
            (SK.to_owned(), AttributeValue::S(event_id.to_string())),
        ])
    }

    /// Whether the consumer has committed a record of this event.
    pub async fn contains(&self, consumer: &str, event_id: EventId) -> Result<bool, StoreError> {
        let found = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(consumer, event_id)))
            .consistent_read(true)
            .projection_expression("#pk")
            .expression_attribute_names("#pk", PK)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem (inbox)", e))?;
        Ok(found.item().is_some())
    }
}

impl DynamoInbox {
    /// Deletes `consumer`'s records written before `before`; returns how many.
    /// It queries that consumer's partition (never a Scan) and reads all of
    /// its records to filter them: [`DynamoInbox::retention`] with the
    /// table's TTL does the same at no read cost.
    pub async fn purge_older_than(
        &self,
        consumer: &str,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        use futures_util::{stream, StreamExt, TryStreamExt};
        let cutoff = AttributeValue::N(before.timestamp_millis().to_string());
        let mut purged = 0u64;
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :consumer")
                .filter_expression("#at < :cutoff")
                .projection_expression("#pk, #sk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_names("#at", RECORDED_AT)
                .expression_attribute_values(":consumer", AttributeValue::S(consumer.to_owned()))
                .expression_attribute_values(":cutoff", cutoff.clone())
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (inbox purge)", e))?;
            let deleted: Vec<()> = stream::iter(page.items().iter().cloned())
                .map(|key| async move {
                    self.client
                        .delete_item()
                        .table_name(&self.table)
                        .set_key(Some(key))
                        .send()
                        .await
                        .map(drop)
                        .map_err(|e| outbox_aws::store_error("DeleteItem (inbox purge)", e))
                })
                .buffer_unordered(16)
                .try_collect()
                .await?;
            purged += deleted.len() as u64;
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(purged),
            }
        }
    }
}

impl Inbox for DynamoInbox {
    type Connection = Transaction;

    /// A consistent read first, so a redelivery is skipped without a
    /// transaction; then a conditional `Put` joins the caller's transaction.
    /// If another delivery commits first, that commit fails with
    /// [`crate::TransactError::InboxDuplicate`].
    async fn record(
        &self,
        conn: &mut Transaction,
        consumer: &str,
        event_id: EventId,
    ) -> Result<Seen, StoreError> {
        if consumer.is_empty() {
            return Err(StoreError::Config(
                "the consumer name must not be empty".into(),
            ));
        }
        if self.contains(consumer, event_id).await? {
            return Ok(Seen::Duplicate);
        }
        let now = chrono::Utc::now();
        let mut item = Self::key(consumer, event_id);
        item.insert(
            RECORDED_AT.to_owned(),
            AttributeValue::N(now.timestamp_millis().to_string()),
        );
        if let Some(retention) = self.retention {
            let expires = now
                .timestamp()
                .saturating_add(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 2));
            item.insert(
                EXPIRES_AT.to_owned(),
                AttributeValue::N(expires.to_string()),
            );
        }
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(build_error)?;
        conn.push_inbox(put, consumer, event_id);
        Ok(Seen::First)
    }
}
