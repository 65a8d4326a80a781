//! The operator's side of the polling shape: counts, dead letters, purging.
//! Everything reads a sparse index, never the whole table.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::Select;
use chrono::{DateTime, Utc};
use futures_util::{stream, StreamExt, TryStreamExt};
use outbox_core::{DeadLetter, DeadLetters, OutboxStats, Purge, ReplaySelector, Stats, StoreError};

use super::source::{read_event, PollingOutbox};
use super::*;
use crate::attr::{item_json, n, now_ms, number, s, string, Item};
use crate::error::is_condition_failed;
use crate::item::PK;

/// Single-item writes in flight at once when replaying or purging.
const CONCURRENCY: usize = 16;

impl PollingOutbox {
    /// How many items an index holds, counted by DynamoDB (`Select=COUNT`).
    async fn count(&self, index: &str, key: &str, value: &str) -> Result<u64, StoreError> {
        let mut total = 0u64;
        let mut start = None;
        loop {
            let page = self
                .index_query(index, key, value)
                .select(Select::Count)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (count)", e))?;
            total += u64::try_from(page.count()).unwrap_or(0);
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(total),
            }
        }
    }

    /// Dead items, oldest first, a page at a time, until `keep` says stop.
    async fn each_dead(&self, mut keep: impl FnMut(&Item) -> bool) -> Result<(), StoreError> {
        let mut start = None;
        loop {
            let page = self
                .index_query(DEAD_INDEX, DEAD_KEY, DEAD)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (dead index)", e))?;
            for item in page.items() {
                if !keep(item) {
                    return Ok(());
                }
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(()),
            }
        }
    }

    async fn purge_one(&self, pk: String, version: u64, cutoff: i64) -> Result<bool, StoreError> {
        let result = self
            .client()
            .delete_item()
            .table_name(self.table())
            .set_key(Some(Self::key(&pk, version)))
            .condition_expression("attribute_exists(#pkey) AND #at < :cutoff")
            .expression_attribute_names("#pkey", PUBLISHED_KEY)
            .expression_attribute_names("#at", PUBLISHED_AT)
            .expression_attribute_values(":cutoff", n(cutoff))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(outbox_aws::store_error("DeleteItem (purge)", e)),
        }
    }
}

fn item_key(item: &Item) -> Option<(String, u64)> {
    let pk = string(item, PK)?.to_owned();
    let version = u64::try_from(number(item, SK)?).ok()?;
    Some((pk, version))
}

impl Stats for PollingOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let pending = self.count(PENDING_INDEX, PENDING_KEY, PENDING).await?;
        let published = self
            .count(PUBLISHED_INDEX, PUBLISHED_KEY, PUBLISHED)
            .await?;
        let dead = self.count(DEAD_INDEX, DEAD_KEY, DEAD).await?;
        let oldest = self
            .index_query(PENDING_INDEX, PENDING_KEY, PENDING)
            .limit(1)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("Query (oldest pending)", e))?;
        let oldest_item = oldest.items().first();
        let oldest_pending_at = oldest_item
            .and_then(|item| number(item, POSITION))
            .and_then(|p| DateTime::from_timestamp_millis(p / POSITION_SCALE));
        // The index holds keys only: the oldest pending event's error (an
        // outage shows there first) is one more read.
        let last_error = match oldest_item.and_then(item_key) {
            Some((pk, version)) => self
                .client()
                .get_item()
                .table_name(self.table())
                .set_key(Some(Self::key(&pk, version)))
                .projection_expression("#e")
                .expression_attribute_names("#e", LAST_ERROR)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("GetItem (last error)", e))?
                .item
                .and_then(|item| string(&item, LAST_ERROR).map(str::to_owned)),
            None => None,
        };
        let mut stats = OutboxStats::default();
        stats.pending = pending;
        stats.published = published;
        stats.dead = dead;
        stats.oldest_pending_at = oldest_pending_at;
        stats.last_error = last_error;
        Ok(stats)
    }
}

impl PollingOutbox {
    /// The keys of the dead items `which` selects.
    async fn dead_keys(&self, which: &ReplaySelector) -> Result<Vec<(String, u64)>, StoreError> {
        let wanted: Option<Vec<String>> = match which {
            ReplaySelector::All => None,
            ReplaySelector::Ids(ids) => Some(ids.iter().map(|id| id.to_string()).collect()),
            _ => {
                return Err(StoreError::Config(
                    "unsupported dead-letter selector".into(),
                ))
            }
        };
        let mut keys = Vec::new();
        self.each_dead(|item| {
            let selected = match &wanted {
                None => true,
                Some(ids) => string(item, EVENT_ID).is_some_and(|id| ids.iter().any(|w| w == id)),
            };
            if selected {
                keys.extend(item_key(item));
            }
            true
        })
        .await?;
        Ok(keys)
    }

    /// Gives one dead item up: it leaves the dead index and no longer parks
    /// its aggregate. It stays in the table, `status` = skipped.
    async fn skip_one(&self, pk: String, version: u64) -> Result<bool, StoreError> {
        let result = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(Self::key(&pk, version)))
            .update_expression("SET #status = :skipped REMOVE #dkey")
            .condition_expression("attribute_exists(#dkey)")
            .expression_attribute_names("#status", STATUS)
            .expression_attribute_names("#dkey", DEAD_KEY)
            .expression_attribute_values(":skipped", s(SKIPPED))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(outbox_aws::store_error("UpdateItem (skip)", e)),
        }
    }
}

/// A dead item as a dead letter; one whose event cannot be read is listed
/// with its raw attributes and the reason.
fn dead_letter(item: &Item) -> DeadLetter {
    let attempts = number(item, ATTEMPTS)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(0);
    let last_error = string(item, LAST_ERROR).map(str::to_owned);
    let key = item_key(item);
    let read = match &key {
        Some((pk, version)) => read_event(item, pk, *version),
        None => Err("the item has no readable key".to_owned()),
    };
    match read {
        Ok(event) => DeadLetter::event(event, attempts, last_error),
        Err(reason) => {
            let reference = key.map_or_else(|| "?".to_owned(), |(pk, v)| format!("{pk}/{v}"));
            let error = match last_error {
                Some(e) if e.starts_with("malformed") => e,
                Some(e) => format!("{e}; malformed: {reason}"),
                None => format!("malformed: {reason}"),
            };
            let mut letter = DeadLetter::malformed(reference, item_json(item), Some(error));
            letter.attempts = attempts;
            letter
        }
    }
}

impl DeadLetters for PollingOutbox {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters = Vec::new();
        if limit == 0 {
            return Ok(letters);
        }
        self.each_dead(|item| {
            letters.push(dead_letter(item));
            letters.len() < limit
        })
        .await?;
        Ok(letters)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        let keys = self.dead_keys(&which).await?;
        let now = now_ms();
        // Each replay lowers its aggregate's mark: one aggregate's in turn,
        // oldest first, aggregates side by side.
        let mut by_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (pk, version) in keys {
            by_aggregate.entry(pk).or_default().push(version);
        }
        let replayed: Vec<u64> = stream::iter(by_aggregate)
            .map(|(pk, mut versions)| async move {
                versions.sort_unstable();
                let mut replayed = 0;
                for version in versions {
                    if self.reopen(&pk, version, now).await? {
                        replayed += 1;
                    }
                }
                Ok::<u64, StoreError>(replayed)
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(replayed.into_iter().sum())
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        let keys = self.dead_keys(&which).await?;
        let skipped: Vec<bool> = stream::iter(keys)
            .map(|(pk, version)| self.skip_one(pk, version))
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(skipped.into_iter().filter(|r| *r).count() as u64)
    }
}

impl Purge for PollingOutbox {
    async fn purge_published(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let cutoff = before.timestamp_millis();
        let mut purged = 0u64;
        let mut start = None;
        loop {
            let page = self
                .client()
                .query()
                .table_name(self.table())
                .index_name(PUBLISHED_INDEX)
                .key_condition_expression("#k = :k AND #at < :cutoff")
                .expression_attribute_names("#k", PUBLISHED_KEY)
                .expression_attribute_names("#at", PUBLISHED_AT)
                .expression_attribute_values(":k", s(PUBLISHED))
                .expression_attribute_values(":cutoff", n(cutoff))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (published index)", e))?;
            let deleted: Vec<bool> = stream::iter(page.items().iter().filter_map(item_key))
                .map(|(pk, version)| self.purge_one(pk, version, cutoff))
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
            purged += deleted.into_iter().filter(|d| *d).count() as u64;
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(purged),
            }
        }
    }
}
