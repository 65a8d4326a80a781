//! The relay's mark on each aggregate: how far its events are known to be
//! done, so a claim reads from there and never the published history.
//!
//! ```text
//! mark item (sk = -1), one per aggregate a relay has claimed from:
//!   clear_through    N   no pending event at or below this version
//!   settled_through  N   no pending or dead event at or below this version
//!   reopened         N   how many dead events of the aggregate were made pending again
//! ```
//!
//! Claims move the mark, from what a consistent read has just shown, on the
//! condition that `reopened` is still what they read before that read. A
//! replay makes a dead event pending and lowers the mark below it, bumping
//! `reopened`, in one transaction: a claim that read before the replay
//! cannot then move the mark past the reopened event. Nothing else makes an
//! event pending again (published and skipped are final; new events come
//! after the head's version).
//!
//! No mark, or no attribute, reads as 0: from the start. Tables written
//! before the mark existed need no migration; their first claim per
//! aggregate reads its history once and leaves a mark.
//!
//! The mark is an item of its own rather than attributes of the head:
//! writers' transactions update the head, and a relay's single-item write to
//! the same item would make them conflict.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{TransactWriteItem, Update};
use outbox_core::StoreError;

use super::source::PollingOutbox;
use super::*;
use crate::attr::{n, number, s, Item};
use crate::error::{build_error, is_condition_failed};
use crate::item::{PK, VERSION};

/// Times a replay reads the mark again after another replay of the same
/// aggregate moved it first.
const REOPEN_ATTEMPTS: usize = 10;

/// An aggregate's mark and head version, as read together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Mark {
    pub clear: u64,
    pub settled: u64,
    /// `None` while the attribute is absent (no replay yet, or no mark).
    pub reopened: Option<i64>,
    /// The aggregate's last stored version, from its head item.
    pub head_version: Option<u64>,
}

/// A version attribute; anything unreadable counts as 0 (from the start),
/// which costs reads but never skips an event.
fn version(item: &Item, name: &str) -> u64 {
    number(item, name)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0)
}

impl Mark {
    fn from_items(items: &[Item]) -> Self {
        let mut mark = Mark::default();
        for item in items {
            match number(item, SK) {
                Some(MARK_VERSION) => {
                    mark.clear = version(item, CLEAR_THROUGH);
                    mark.settled = version(item, SETTLED_THROUGH);
                    mark.reopened = item
                        .get(REOPENED)
                        .map(|_| number(item, REOPENED).unwrap_or(-1));
                }
                Some(0) => {
                    mark.head_version = number(item, VERSION).and_then(|v| u64::try_from(v).ok());
                }
                _ => {}
            }
        }
        mark
    }

    /// The condition that no replay moved the mark since it was read.
    fn unchanged(&self) -> &'static str {
        if self.reopened.is_some() {
            "#reopened = :reopened"
        } else {
            "attribute_not_exists(#reopened)"
        }
    }
}

impl PollingOutbox {
    /// The mark and the head of one aggregate, in one consistent read.
    pub(super) async fn read_mark(&self, pk: &str) -> Result<Mark, StoreError> {
        let page = self
            .client()
            .query()
            .table_name(self.table())
            .consistent_read(true)
            .key_condition_expression("#pk = :pk AND #sk BETWEEN :mark AND :head")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":mark", n(MARK_VERSION))
            .expression_attribute_values(":head", n(HEAD_SK))
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("Query (mark)", e))?;
        Ok(Mark::from_items(page.items()))
    }

    /// Sets the mark to what a claim has just read, unless a replay came
    /// between; whether it did.
    pub(super) async fn move_mark(
        &self,
        pk: &str,
        read: &Mark,
        clear: u64,
        settled: u64,
    ) -> Result<bool, StoreError> {
        let mut request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(Self::key_at(pk, MARK_VERSION)))
            .update_expression("SET #clear = :clear, #settled = :settled")
            .condition_expression(read.unchanged())
            .expression_attribute_names("#clear", CLEAR_THROUGH)
            .expression_attribute_names("#settled", SETTLED_THROUGH)
            .expression_attribute_names("#reopened", REOPENED)
            .expression_attribute_values(":clear", n(clear))
            .expression_attribute_values(":settled", n(settled));
        if let Some(reopened) = read.reopened {
            request = request.expression_attribute_values(":reopened", n(reopened));
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(outbox_aws::store_error("UpdateItem (mark)", e)),
        }
    }

    /// Makes one dead event pending again and lowers its aggregate's mark
    /// below it, in one transaction; `false` if the event is not dead.
    pub(super) async fn reopen(
        &self,
        pk: &str,
        version: u64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let event = Update::builder()
            .table_name(self.table())
            .set_key(Some(Self::key(pk, version)))
            .update_expression(
                "SET #status = :pending, #pkey = :pending, #attempts = :zero, #next = :now \
                 REMOVE #dkey, #lease",
            )
            .condition_expression("attribute_exists(#dkey)")
            .expression_attribute_names("#status", STATUS)
            .expression_attribute_names("#pkey", PENDING_KEY)
            .expression_attribute_names("#attempts", ATTEMPTS)
            .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
            .expression_attribute_names("#dkey", DEAD_KEY)
            .expression_attribute_names("#lease", LEASE_ID)
            .expression_attribute_values(":pending", s(PENDING))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now))
            .build()
            .map_err(build_error)?;
        let below = version.saturating_sub(1);
        for _ in 0..REOPEN_ATTEMPTS {
            let read = self.read_mark(pk).await?;
            let mut mark = Update::builder()
                .table_name(self.table())
                .set_key(Some(Self::key_at(pk, MARK_VERSION)))
                .update_expression("SET #clear = :clear, #settled = :settled, #reopened = :next")
                .condition_expression(read.unchanged())
                .expression_attribute_names("#clear", CLEAR_THROUGH)
                .expression_attribute_names("#settled", SETTLED_THROUGH)
                .expression_attribute_names("#reopened", REOPENED)
                .expression_attribute_values(":clear", n(read.clear.min(below)))
                .expression_attribute_values(":settled", n(read.settled.min(below)))
                .expression_attribute_values(
                    ":next",
                    n(read.reopened.unwrap_or(0).max(0).saturating_add(1)),
                );
            if let Some(reopened) = read.reopened {
                mark = mark.expression_attribute_values(":reopened", n(reopened));
            }
            let result = self
                .client()
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(event.clone()).build())
                .transact_items(
                    TransactWriteItem::builder()
                        .update(mark.build().map_err(build_error)?)
                        .build(),
                )
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(true),
                Err(err) => err,
            };
            let codes: Vec<String> = match err.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(canceled)) => canceled
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().unwrap_or("None").to_owned())
                    .collect(),
                _ => Vec::new(),
            };
            let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
            match codes.as_slice() {
                ["ConditionalCheckFailed", ..] => return Ok(false),
                // Another replay (or a claim's write) got there first: read
                // the mark again.
                [_, "ConditionalCheckFailed" | "TransactionConflict"]
                | ["TransactionConflict", _] => continue,
                _ => return Err(outbox_aws::store_error("TransactWriteItems (replay)", err)),
            }
        }
        Err(StoreError::Unavailable(
            format!("replay of {pk} version {version}: its mark kept changing").into(),
        ))
    }
}
