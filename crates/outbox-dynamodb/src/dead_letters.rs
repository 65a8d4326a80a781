//! The dead-letter store of the stream shape: events that failed for good,
//! replayed events waiting to be published again, stream records that could
//! not be decoded, and stream ranges lost to the stream's retention.
//!
//! ```text
//! state      S  partition key: "dead" | "replay" | "malformed" | "lost" | "skipped"
//! id         S  sort key: the event id (UUIDv7, so oldest first); for
//!               malformed records the sequence number padded to 40 digits;
//!               for lost ranges "<shard>#<last sequence number read>"
//! event      S  the envelope as JSON                    (dead, replay)
//! attempts   N  failed attempts                         (dead, replay)
//! last_error S                                          (dead, replay)
//! shard      S                                          (malformed, lost)
//! sequence_number, raw_record, error  S                 (malformed)
//! raw_size   N  the record's size as JSON, in bytes     (malformed)
//! truncated  BOOL  raw_record was cut to fit the item   (malformed)
//! after_sequence_number, before_sequence_number  S      (lost; before may be absent)
//! error      S                                          (malformed, lost)
//! stored_at  N  milliseconds since the epoch
//! ```
//!
//! A relay writes its dead letters in one transaction with a check that it
//! still holds the stream's lease, like its checkpoints: a relay that lost
//! the stream cannot dead-letter what another one is publishing.
//!
//! Every read is a `Query` of one state, never a `Scan`; writes are keyed by
//! id, so dead-lettering the same event twice leaves one item.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, DeleteRequest, Put, PutRequest, Select,
    TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;

use crate::attr::{item_json, n, now_ms, number, s, string};
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
const SHARD: &str = "shard";
const RAW_SIZE: &str = "raw_size";
const TRUNCATED: &str = "truncated";
const AFTER_SEQUENCE_NUMBER: &str = "after_sequence_number";
const BEFORE_SEQUENCE_NUMBER: &str = "before_sequence_number";

const DEAD: &str = "dead";
const REPLAY: &str = "replay";
const MALFORMED: &str = "malformed";
const LOST: &str = "lost";
const SKIPPED: &str = "skipped";

/// The most of a malformed record's raw text kept: the item must stay under
/// DynamoDB's 400 KB item limit with its other attributes.
pub const MAX_RAW_BYTES: usize = 300 * 1024;
/// The most of an error message kept on a dead letter.
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// `TransactWriteItems` takes at most 100 actions (one is the lease check)
/// and 4 MB (DynamoDB limits); a fenced write stays under both.
const FENCED_ACTIONS: usize = 99;
const FENCED_BYTES: usize = 3 * 1024 * 1024;

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `BatchWriteItem` takes at most 25 requests per call (DynamoDB service limit).
pub const BATCH_WRITE_MAX: usize = 25;
/// How often unprocessed batch-write entries are sent again before giving up.
const UNPROCESSED_RETRIES: u32 = 8;

/// A stream record that could not be decoded, kept as it arrived (cut to
/// [`MAX_RAW_BYTES`] if it was larger: `raw_size` tells the original size).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MalformedRecord {
    pub shard: Option<String>,
    pub sequence_number: String,
    pub raw_record: String,
    pub raw_size: u64,
    pub truncated: bool,
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
        crate::tables::create_string_key_table(&self.client, &self.table, STATE, ID, None).await
    }

    /// Dead-letters events with their failed attempts and last error.
    pub async fn put_events(&self, dead: &[(Event, u32, String)]) -> Result<(), StoreError> {
        let requests = dead
            .iter()
            .map(|(event, attempts, error)| put_request(event_item(event, *attempts, error)?))
            .collect::<Result<Vec<_>, _>>()?;
        self.batch_write(requests).await
    }

    /// Keeps a stream record that could not be decoded, so nothing is dropped
    /// silently. The same record stored twice is one item; a record too large
    /// for an item is kept cut, with its size.
    pub async fn put_malformed(
        &self,
        shard: &str,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(malformed_item(
                shard,
                sequence_number,
                raw_record,
                error,
            )))
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("PutItem", e))?;
        Ok(())
    }

    /// Writes items only while `fence` holds (the writer still owns the
    /// stream), in transactions under DynamoDB's limits. False when the
    /// fence failed: nothing of that transaction was written.
    pub(crate) async fn put_fenced(
        &self,
        items: Vec<HashMap<String, AttributeValue>>,
        fence: &ConditionCheck,
    ) -> Result<bool, StoreError> {
        let mut chunk: Vec<TransactWriteItem> = Vec::new();
        let mut bytes = 0;
        let mut items = items.into_iter().peekable();
        while let Some(item) = items.next() {
            bytes += crate::limits::item_size(&item);
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .build()
                .map_err(crate::error::build_error)?;
            chunk.push(TransactWriteItem::builder().put(put).build());
            let next_size = items.peek().map_or(0, crate::limits::item_size);
            let full = chunk.len() >= FENCED_ACTIONS || bytes + next_size > FENCED_BYTES;
            if full || items.peek().is_none() {
                let mut actions = vec![TransactWriteItem::builder()
                    .condition_check(fence.clone())
                    .build()];
                actions.append(&mut chunk);
                let sent = self
                    .client
                    .transact_write_items()
                    .set_transact_items(Some(actions))
                    .send()
                    .await;
                bytes = 0;
                if let Err(e) = sent {
                    // The fence is the first action: its reason says whether
                    // the lease was lost.
                    let fenced = match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
                            .cancellation_reasons()
                            .first()
                            .is_some_and(|r| r.code() == Some("ConditionalCheckFailed")),
                        _ => false,
                    };
                    if fenced {
                        return Ok(false);
                    }
                    return Err(outbox_aws::store_error(
                        "TransactWriteItems (dead letters)",
                        e,
                    ));
                }
            }
        }
        Ok(true)
    }

    /// Malformed records, in sequence-number order.
    pub async fn malformed(&self, limit: usize) -> Result<Vec<MalformedRecord>, StoreError> {
        let items = self.query(MALFORMED, limit).await?;
        Ok(items
            .iter()
            .map(|item| {
                let raw_record = string(item, RAW_RECORD).unwrap_or_default().to_owned();
                MalformedRecord {
                    shard: string(item, SHARD).map(str::to_owned),
                    sequence_number: string(item, SEQUENCE_NUMBER).unwrap_or_default().to_owned(),
                    raw_size: number(item, RAW_SIZE)
                        .and_then(|n| u64::try_from(n).ok())
                        .unwrap_or(raw_record.len() as u64),
                    truncated: matches!(item.get(TRUNCATED), Some(AttributeValue::Bool(true))),
                    raw_record,
                    error: string(item, ERROR).unwrap_or_default().to_owned(),
                }
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

    /// How many malformed stream records are kept.
    pub async fn count_malformed(&self) -> Result<u64, StoreError> {
        self.count(MALFORMED).await
    }

    /// How many stream ranges were lost to the stream's retention.
    pub async fn count_lost(&self) -> Result<u64, StoreError> {
        self.count(LOST).await
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

    /// Moves one dead item to `to` (replay, or skipped); false if it was not
    /// dead any more.
    async fn move_dead(
        &self,
        item: HashMap<String, AttributeValue>,
        to: &str,
    ) -> Result<bool, StoreError> {
        let id = string(&item, ID).unwrap_or_default().to_owned();
        let mut replay = item;
        replay.insert(STATE.to_owned(), s(to));
        if to == REPLAY {
            replay.insert(ATTEMPTS.to_owned(), AttributeValue::N("0".into()));
        }
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

impl DeadLetterTable {
    async fn move_selected(&self, which: ReplaySelector, to: &str) -> Result<u64, StoreError> {
        let mut moved_total = 0;
        match which {
            ReplaySelector::Ids(ids) => {
                for id in ids {
                    if let Some(item) = self.get_dead(id).await? {
                        moved_total += u64::from(self.move_dead(item, to).await?);
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
                    moved += u64::from(self.move_dead(item, to).await?);
                }
                if moved == 0 {
                    break;
                }
                moved_total += moved;
            },
        }
        Ok(moved_total)
    }
}

fn put_request(item: HashMap<String, AttributeValue>) -> Result<WriteRequest, StoreError> {
    PutRequest::builder()
        .set_item(Some(item))
        .build()
        .map(|p| WriteRequest::builder().put_request(p).build())
        .map_err(|e| StoreError::Config(e.to_string()))
}

/// The dead-letter item of an event.
pub(crate) fn event_item(
    event: &Event,
    attempts: u32,
    error: &str,
) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let json = serde_json::to_string(event).map_err(|e| backend("encode dead letter", e))?;
    Ok(HashMap::from([
        (STATE.to_owned(), s(DEAD)),
        (ID.to_owned(), s(event.id.to_string())),
        (EVENT.to_owned(), s(json)),
        (ATTEMPTS.to_owned(), n(attempts)),
        (LAST_ERROR.to_owned(), s(truncate(error, MAX_ERROR_BYTES))),
        (STORED_AT.to_owned(), n(now_ms())),
    ]))
}

/// The dead-letter item of a stream record that could not be decoded; the
/// raw text is cut to [`MAX_RAW_BYTES`], keeping its size.
pub(crate) fn malformed_item(
    shard: &str,
    sequence_number: &str,
    raw_record: &str,
    error: &str,
) -> HashMap<String, AttributeValue> {
    let kept = truncate(raw_record, MAX_RAW_BYTES);
    HashMap::from([
        (STATE.to_owned(), s(MALFORMED)),
        (ID.to_owned(), s(format!("{sequence_number:0>40}"))),
        (SHARD.to_owned(), s(shard)),
        (SEQUENCE_NUMBER.to_owned(), s(sequence_number)),
        (RAW_RECORD.to_owned(), s(kept)),
        (RAW_SIZE.to_owned(), n(raw_record.len())),
        (
            TRUNCATED.to_owned(),
            AttributeValue::Bool(kept.len() < raw_record.len()),
        ),
        (ERROR.to_owned(), s(truncate(error, MAX_ERROR_BYTES))),
        (STORED_AT.to_owned(), n(now_ms())),
    ])
}

/// The record of a stream range lost before it was read: the records of
/// `shard` after `after` (and before `before`, when known).
pub(crate) fn lost_item(
    shard: &str,
    after: &str,
    before: Option<&str>,
    error: &str,
) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        (STATE.to_owned(), s(LOST)),
        (ID.to_owned(), s(format!("{shard}#{after}"))),
        (SHARD.to_owned(), s(shard)),
        (AFTER_SEQUENCE_NUMBER.to_owned(), s(after)),
        (ERROR.to_owned(), s(truncate(error, MAX_ERROR_BYTES))),
        (STORED_AT.to_owned(), n(now_ms())),
    ]);
    if let Some(before) = before {
        item.insert(BEFORE_SEQUENCE_NUMBER.to_owned(), s(before));
    }
    item
}

/// A malformed record or a lost range as a dead letter.
fn stream_letter(item: &HashMap<String, AttributeValue>) -> DeadLetter {
    let shard = string(item, SHARD).unwrap_or("?");
    let error = string(item, ERROR).unwrap_or_default();
    if string(item, STATE) == Some(LOST) {
        let after = string(item, AFTER_SEQUENCE_NUMBER).unwrap_or_default();
        let before = string(item, BEFORE_SEQUENCE_NUMBER);
        let range = match before {
            Some(b) => format!("{after}..{b}"),
            None => format!("{after}.."),
        };
        return DeadLetter::malformed(
            format!("lost {shard}/{range}"),
            serde_json::json!({
                "shard": shard,
                "after_sequence_number": after,
                "before_sequence_number": before,
            }),
            Some(format!("lost: {error}")),
        );
    }
    let seq = string(item, SEQUENCE_NUMBER).unwrap_or_default();
    let raw = string(item, RAW_RECORD).unwrap_or_default();
    let truncated = matches!(item.get(TRUNCATED), Some(AttributeValue::Bool(true)));
    let raw = match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(value) if !truncated => value,
        _ => serde_json::json!({
            "truncated": truncated,
            "size": number(item, RAW_SIZE),
            "text": raw,
        }),
    };
    DeadLetter::malformed(
        format!("{shard}/{seq}"),
        raw,
        Some(format!("malformed: {error}")),
    )
}

fn decode_letter_event(item: &HashMap<String, AttributeValue>) -> Result<Event, StoreError> {
    let json = string(item, EVENT)
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
        string(item, LAST_ERROR).map(str::to_owned),
    ))
}

impl DeadLetters for DeadLetterTable {
    /// Events first, then malformed records, then lost ranges.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = Vec::new();
        for item in self.query(DEAD, limit).await? {
            letters.push(decode_letter(&item).unwrap_or_else(|e| {
                // An item this table cannot read is listed, not a failure.
                let reference = string(&item, ID).unwrap_or("?").to_owned();
                DeadLetter::malformed(reference, item_json(&item), Some(format!("malformed: {e}")))
            }));
        }
        for state in [MALFORMED, LOST] {
            let room = limit.saturating_sub(letters.len());
            if room == 0 {
                break;
            }
            letters.extend(self.query(state, room).await?.iter().map(stream_letter));
        }
        Ok(letters)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.move_selected(which, REPLAY).await
    }

    /// Gives dead events up: they move to the `skipped` state, out of the
    /// listing and the counts, and are never published.
    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.move_selected(which, SKIPPED).await
    }
}
