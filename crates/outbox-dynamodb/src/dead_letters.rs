//! The dead-letter store of the stream shape: events that failed for good,
//! replayed events waiting to be published again, and stream records that
//! could not be decoded.
//!
//! ```text
//! state      S  partition key: "dead" | "replay" | "malformed"
//! id         S  sort key: the event id (UUIDv7, so oldest first), or for
//!               malformed records the sequence number padded to 40 digits
//! event      S  the envelope as JSON                    (dead, replay)
//! attempts   N  failed attempts                         (dead, replay)
//! last_error S                                          (dead, replay)
//! sequence_number, raw_record, error  S                 (malformed)
//! stored_at  N  milliseconds since the epoch
//! ```
//!
//! Every read is a `Query` of one state, never a `Scan`; writes are keyed by
//! id, so dead-lettering the same event twice leaves one item.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, DeleteRequest, KeySchemaElement,
    KeyType, Put, PutRequest, ScalarAttributeType, Select, TableStatus, TransactWriteItem,
    WriteRequest,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{DeadLetter, DeadLetters, Event, EventId, ReplaySelector, StoreError};

pub const STATE: &str = "state";
pub const ID: &str = "id";
const EVENT: &str = "event";
const ATTEMPTS: &str = "attempts";
const LAST_ERROR: &str = "last_error";
const SEQUENCE_NUMBER: &str = "sequence_number";
const RAW_RECORD: &str = "raw_record";
const ERROR: &str = "error";
const STORED_AT: &str = "stored_at";

const DEAD: &str = "dead";
const REPLAY: &str = "replay";
const MALFORMED: &str = "malformed";

/// `BatchWriteItem` takes at most 25 requests per call (DynamoDB service limit).
pub const BATCH_WRITE_MAX: usize = 25;
/// How often unprocessed batch-write entries are sent again before giving up.
const UNPROCESSED_RETRIES: u32 = 8;

/// A stream record that could not be decoded, kept as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRecord {
    pub sequence_number: String,
    pub raw_record: String,
    pub error: String,
}

/// The dead-letter table of the stream shape.
#[derive(Debug, Clone)]
pub struct DeadLetterTable {
    client: Client,
    table: String,
}

fn backend(op: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{op}: {message}").into())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn string_attr<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// Creates a table with a string partition key and sort key unless it exists,
/// and waits until it is active.
pub(crate) async fn create_table(
    client: &Client,
    table: &str,
    partition_key: &str,
    sort_key: &str,
) -> Result<(), StoreError> {
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))
    };
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))
    };
    let created = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(partition_key, KeyType::Hash)?)
        .key_schema(key(sort_key, KeyType::Range)?)
        .attribute_definitions(attr(partition_key)?)
        .attribute_definitions(attr(sort_key)?)
        .send()
        .await;
    if let Err(e) = created {
        let exists = e
            .as_service_error()
            .is_some_and(|s| s.is_resource_in_use_exception());
        if !exists {
            return Err(outbox_aws::store_error("CreateTable", e));
        }
    }
    // A new table takes a moment to become usable on AWS.
    for _ in 0..120 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("DescribeTable", e))?;
        if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StoreError::Unavailable(
        format!("table {table} did not become active").into(),
    ))
}

impl DeadLetterTable {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        create_table(&self.client, &self.table, STATE, ID).await
    }

    /// Dead-letters events with their failed attempts and last error.
    pub async fn put_events(&self, dead: &[(Event, u32, String)]) -> Result<(), StoreError> {
        let mut requests = Vec::with_capacity(dead.len());
        for (event, attempts, error) in dead {
            let json =
                serde_json::to_string(event).map_err(|e| backend("encode dead letter", e))?;
            let item = HashMap::from([
                (STATE.to_owned(), s(DEAD)),
                (ID.to_owned(), s(event.id.to_string())),
                (EVENT.to_owned(), s(json)),
                (ATTEMPTS.to_owned(), AttributeValue::N(attempts.to_string())),
                (LAST_ERROR.to_owned(), s(error.clone())),
                (
                    STORED_AT.to_owned(),
                    AttributeValue::N(now_ms().to_string()),
                ),
            ]);
            requests.push(put_request(item)?);
        }
        self.batch_write(requests).await
    }

    /// Keeps a stream record that could not be decoded, so nothing is dropped
    /// silently. The same record stored twice is one item.
    pub async fn put_malformed(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item(STATE, s(MALFORMED))
            .item(ID, s(format!("{sequence_number:0>40}")))
            .item(SEQUENCE_NUMBER, s(sequence_number))
            .item(RAW_RECORD, s(raw_record))
            .item(ERROR, s(error))
            .item(STORED_AT, AttributeValue::N(now_ms().to_string()))
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("PutItem", e))?;
        Ok(())
    }

    /// Malformed records, in sequence-number order.
    pub async fn malformed(&self, limit: usize) -> Result<Vec<MalformedRecord>, StoreError> {
        let items = self.query(MALFORMED, limit).await?;
        Ok(items
            .iter()
            .map(|item| MalformedRecord {
                sequence_number: string_attr(item, SEQUENCE_NUMBER)
                    .unwrap_or_default()
                    .to_owned(),
                raw_record: string_attr(item, RAW_RECORD).unwrap_or_default().to_owned(),
                error: string_attr(item, ERROR).unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// Replayed events waiting to be published, oldest first. They stay in the
    /// table until [`finish_replays`](Self::finish_replays).
    pub async fn take_replays(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.query(REPLAY, limit)
            .await?
            .iter()
            .map(decode_letter_event)
            .collect()
    }

    /// Forgets replayed events once they are published (or dead again).
    pub async fn finish_replays(&self, ids: &[EventId]) -> Result<(), StoreError> {
        let requests = ids
            .iter()
            .map(|id| {
                DeleteRequest::builder()
                    .key(STATE, s(REPLAY))
                    .key(ID, s(id.to_string()))
                    .build()
                    .map(|d| WriteRequest::builder().delete_request(d).build())
                    .map_err(|e| StoreError::Config(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.batch_write(requests).await
    }

    /// How many dead letters there are.
    pub async fn count_dead(&self) -> Result<u64, StoreError> {
        self.count(DEAD).await
    }

    /// How many replayed events wait to be published.
    pub async fn count_replays(&self) -> Result<u64, StoreError> {
        self.count(REPLAY).await
    }

    async fn count(&self, state: &str) -> Result<u64, StoreError> {
        let mut total = 0u64;
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#s = :s")
                .expression_attribute_names("#s", STATE)
                .expression_attribute_values(":s", s(state))
                .select(Select::Count)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query", e))?;
            total += u64::try_from(out.count()).unwrap_or(0);
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(total),
            }
        }
    }

    async fn query(
        &self,
        state: &str,
        limit: usize,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        while items.len() < limit {
            let page = i32::try_from(limit - items.len()).unwrap_or(i32::MAX);
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#s = :s")
                .expression_attribute_names("#s", STATE)
                .expression_attribute_values(":s", s(state))
                .consistent_read(true)
                .limit(page)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query", e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(items)
    }

    async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        for chunk in requests.chunks(BATCH_WRITE_MAX) {
            let mut pending = chunk.to_vec();
            let mut round = 0u32;
            while !pending.is_empty() {
                if round > UNPROCESSED_RETRIES {
                    return Err(StoreError::Unavailable(
                        format!(
                            "BatchWriteItem on {}: {} entries still unprocessed",
                            self.table,
                            pending.len()
                        )
                        .into(),
                    ));
                }
                if round > 0 {
                    tokio::time::sleep(Duration::from_millis(20 << round.min(6))).await;
                }
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| outbox_aws::store_error("BatchWriteItem", e))?;
                pending = out
                    .unprocessed_items
                    .and_then(|mut u| u.remove(&self.table))
                    .unwrap_or_default();
                round += 1;
            }
        }
        Ok(())
    }

    async fn get_dead(
        &self,
        id: EventId,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(STATE, s(DEAD))
            .key(ID, s(id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        Ok(out.item)
    }

    /// Moves one dead item to the replay state; false if it was not dead.
    async fn move_to_replay(
        &self,
        item: HashMap<String, AttributeValue>,
    ) -> Result<bool, StoreError> {
        let id = string_attr(&item, ID).unwrap_or_default().to_owned();
        let mut replay = item;
        replay.insert(STATE.to_owned(), s(REPLAY));
        replay.insert(ATTEMPTS.to_owned(), AttributeValue::N("0".into()));
        replay.insert(
            STORED_AT.to_owned(),
            AttributeValue::N(now_ms().to_string()),
        );
        let config = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Config(e.to_string());
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(replay))
            .build()
            .map_err(config)?;
        let delete = Delete::builder()
            .table_name(&self.table)
            .key(STATE, s(DEAD))
            .key(ID, s(id))
            .condition_expression("attribute_exists(#id)")
            .expression_attribute_names("#id", ID)
            .build()
            .map_err(config)?;
        let sent = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception()) =>
            {
                // Replayed by someone else in the meantime.
                Ok(false)
            }
            Err(e) => Err(outbox_aws::store_error("TransactWriteItems", e)),
        }
    }
}

fn put_request(item: HashMap<String, AttributeValue>) -> Result<WriteRequest, StoreError> {
    PutRequest::builder()
        .set_item(Some(item))
        .build()
        .map(|p| WriteRequest::builder().put_request(p).build())
        .map_err(|e| StoreError::Config(e.to_string()))
}

fn decode_letter_event(item: &HashMap<String, AttributeValue>) -> Result<Event, StoreError> {
    let json = string_attr(item, EVENT)
        .ok_or_else(|| backend("dead letter", "item has no `event` attribute"))?;
    serde_json::from_str(json).map_err(|e| backend("dead letter", format!("bad event: {e}")))
}

fn decode_letter(item: &HashMap<String, AttributeValue>) -> Result<DeadLetter, StoreError> {
    let event = decode_letter_event(item)?;
    let attempts = item
        .get(ATTEMPTS)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(DeadLetter::event(
        event,
        attempts,
        string_attr(item, LAST_ERROR).map(str::to_owned),
    ))
}

impl DeadLetters for DeadLetterTable {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.query(DEAD, limit)
            .await?
            .iter()
            .map(decode_letter)
            .collect()
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        let mut replayed = 0;
        match which {
            ReplaySelector::Ids(ids) => {
                for id in ids {
                    if let Some(item) = self.get_dead(id).await? {
                        replayed += u64::from(self.move_to_replay(item).await?);
                    }
                }
            }
            _ => loop {
                let page = self.query(DEAD, 100).await?;
                if page.is_empty() {
                    break;
                }
                let mut moved = 0;
                for item in page {
                    moved += u64::from(self.move_to_replay(item).await?);
                }
                if moved == 0 {
                    break;
                }
                replayed += moved;
            },
        }
        Ok(replayed)
    }
}
