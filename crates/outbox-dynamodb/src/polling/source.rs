//! The relay's side of the polling shape: claim due events, settle them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_sdk_dynamodb::Client;
use futures_util::{stream, StreamExt, TryStreamExt};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, LeaseId, Settlements, StoreError,
};

use super::*;
use crate::error::is_condition_failed;
use crate::item::{decode_event, PK};
use crate::outbox::{DynamoOutbox, Shape};

/// How long published items stay before the table's TTL removes them, unless
/// purged earlier.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Single-item writes in flight at once when settling or purging.
const CONCURRENCY: usize = 16;

/// The polling-shape outbox as the relay sees it.
#[derive(Debug, Clone)]
pub struct PollingOutbox {
    outbox: DynamoOutbox,
    retention: Duration,
}

/// Where a claimed event lives: its aggregate's key and its version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PollingReceipt {
    pub pk: String,
    pub version: u64,
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

pub(crate) fn string<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PollingOutbox {
    /// A query on one partition of a sparse index: the items whose `key`
    /// attribute holds `value` (pending, dead or published ones).
    pub(super) fn index_query(
        &self,
        index: &str,
        key: &str,
        value: &str,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        self.client()
            .query()
            .table_name(self.table())
            .index_name(index)
            .key_condition_expression("#k = :k")
            .expression_attribute_names("#k", key)
            .expression_attribute_values(":k", s(value))
    }

    /// The relay's view of a polling-shape outbox; refused for the stream shape,
    /// whose relay reads the table's stream instead.
    pub fn new(outbox: DynamoOutbox) -> Result<Self, StoreError> {
        if outbox.shape_kind() != Shape::Polling {
            return Err(StoreError::Config(format!(
                "table {} uses the stream shape; polling needs Shape::Polling",
                outbox.table()
            )));
        }
        Ok(Self {
            outbox,
            retention: DEFAULT_RETENTION,
        })
    }

    /// How long published items are kept before TTL deletes them.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    pub fn outbox(&self) -> &DynamoOutbox {
        &self.outbox
    }

    pub(crate) fn client(&self) -> &Client {
        self.outbox.client()
    }

    pub(crate) fn table(&self) -> &str {
        self.outbox.table()
    }

    pub(crate) fn key(pk: &str, version: u64) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), n(version))])
    }

    /// Leases the due prefix of one aggregate's pending events, in order,
    /// stopping at the first one held (backing off or leased elsewhere).
    async fn claim_aggregate(
        &self,
        pk: &str,
        now: i64,
        until: i64,
        lease: &LeaseId,
        room: usize,
        out: &mut Vec<ClaimedEvent<PollingReceipt>>,
    ) -> Result<(), StoreError> {
        let mut start = None;
        let mut taken = 0;
        loop {
            // Consistent and in `sk` order: the index only said where to look.
            let page = self
                .client()
                .query()
                .table_name(self.table())
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND #sk > :head")
                .filter_expression("attribute_exists(#pending)")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_names("#pending", PENDING_KEY)
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":head", n(HEAD_SK))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (aggregate)", e))?;
            for item in page.items() {
                if taken >= room {
                    return Ok(());
                }
                let Some(version) = number(item, SK).and_then(|v| u64::try_from(v).ok()) else {
                    continue;
                };
                if number(item, NEXT_ATTEMPT_AT).unwrap_or(0) > now {
                    return Ok(()); // held: nothing after it may go
                }
                match self.lease(pk, version, now, until, lease).await? {
                    None => return Ok(()), // taken or settled meanwhile
                    Some(leased) => {
                        let receipt = PollingReceipt {
                            pk: pk.to_owned(),
                            version,
                        };
                        match string(&leased, EVENT).map(decode_event) {
                            Some(Ok(event)) => {
                                out.push(ClaimedEvent::new(
                                    event,
                                    number(&leased, ATTEMPTS)
                                        .and_then(|a| u32::try_from(a).ok())
                                        .unwrap_or(0),
                                    receipt,
                                ));
                                taken += 1;
                            }
                            bad => {
                                // An item that cannot be decoded would block its aggregate
                                // forever: dead-letter it, visibly, and go on.
                                let reason = match bad {
                                    Some(Err(e)) => e.to_string(),
                                    _ => "the `event` attribute is missing".to_owned(),
                                };
                                tracing::error!(pk, version, %reason, "outbox: dead-lettering malformed item");
                                self.settle_one(*lease, &receipt, Outcome::Dead(reason), now)
                                    .await?;
                            }
                        }
                    }
                }
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(()),
            }
        }
    }

    /// The item as leased, or `None` if it is no longer pending and due.
    async fn lease(
        &self,
        pk: &str,
        version: u64,
        now: i64,
        until: i64,
        lease: &LeaseId,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let result = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(Self::key(pk, version)))
            .update_expression("SET #next = :until, #lease = :lease")
            .condition_expression("attribute_exists(#pending) AND #next <= :now")
            .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
            .expression_attribute_names("#lease", LEASE_ID)
            .expression_attribute_names("#pending", PENDING_KEY)
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":lease", s(lease.to_string()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(outbox_aws::store_error("UpdateItem (lease)", e)),
        }
    }

    /// Applies one settlement if the lease still holds; whether it did.
    async fn settle_one(
        &self,
        lease: LeaseId,
        receipt: &PollingReceipt,
        outcome: Outcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(Self::key(&receipt.pk, receipt.version)))
            .condition_expression("#lease = :lease AND attribute_exists(#pending)")
            .expression_attribute_names("#lease", LEASE_ID)
            .expression_attribute_names("#pending", PENDING_KEY)
            .expression_attribute_values(":lease", s(lease.to_string()));
        request = match outcome {
            Outcome::Published => {
                let expires = (now / 1000).saturating_add(
                    i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX / 2),
                );
                request
                    .update_expression(
                        "SET #status = :published, #pkey = :published, #at = :now, #expires = :expires \
                         REMOVE #pending, #lease, #next",
                    )
                    .expression_attribute_names("#status", STATUS)
                    .expression_attribute_names("#pkey", PUBLISHED_KEY)
                    .expression_attribute_names("#at", PUBLISHED_AT)
                    .expression_attribute_names("#expires", EXPIRES_AT)
                    .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                    .expression_attribute_values(":published", s(PUBLISHED))
                    .expression_attribute_values(":now", n(now))
                    .expression_attribute_values(":expires", n(expires))
            }
            Outcome::Released => request
                .update_expression("SET #next = :now REMOVE #lease")
                .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                .expression_attribute_values(":now", n(now)),
            Outcome::Retry(at, error) => request
                .update_expression(
                    "SET #attempts = #attempts + :one, #next = :at, #error = :error REMOVE #lease",
                )
                .expression_attribute_names("#attempts", ATTEMPTS)
                .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                .expression_attribute_names("#error", LAST_ERROR)
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":at", n(at))
                .expression_attribute_values(":error", s(error)),
            Outcome::Dead(error) => request
                .update_expression(
                    "SET #status = :dead, #dkey = :dead, #attempts = #attempts + :one, #error = :error \
                     REMOVE #pending, #lease, #next",
                )
                .expression_attribute_names("#status", STATUS)
                .expression_attribute_names("#dkey", DEAD_KEY)
                .expression_attribute_names("#attempts", ATTEMPTS)
                .expression_attribute_names("#error", LAST_ERROR)
                .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                .expression_attribute_values(":dead", s(DEAD))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":error", s(error)),
        };
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(outbox_aws::store_error("UpdateItem (settle)", e)),
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    Published,
    Released,
    Retry(i64, String),
    Dead(String),
}

impl ClaimSource for PollingOutbox {
    type Receipt = PollingReceipt;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<PollingReceipt>, StoreError> {
        let lease = LeaseId::new();
        let now = now_ms();
        let until = now.saturating_add(millis(request.lease));
        let mut events = Vec::new();
        let mut seen = HashSet::new();
        let mut start = None;
        'pages: while events.len() < request.limit {
            // The sparse index says which aggregates have pending work, oldest
            // first; it may lag, the per-aggregate read does not.
            let page = self
                .index_query(PENDING_INDEX, PENDING_KEY, PENDING)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (pending index)", e))?;
            for item in page.items() {
                let Some(pk) = string(item, PK) else { continue };
                if !seen.insert(pk.to_owned()) {
                    continue;
                }
                let room = request.limit - events.len();
                let claimed = self
                    .claim_aggregate(pk, now, until, &lease, room, &mut events)
                    .await;
                if let Err(e) = claimed {
                    if events.is_empty() {
                        return Err(e);
                    }
                    // What is leased already goes out; the rest waits for the next claim.
                    tracing::warn!(error = %e, "outbox: claim cut short");
                    break 'pages;
                }
                if events.len() >= request.limit {
                    break 'pages;
                }
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => break,
            }
        }
        Ok(Claimed::new(lease, events))
    }

    async fn settle(
        &self,
        lease: LeaseId,
        settlements: Settlements<PollingReceipt>,
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut work: Vec<(PollingReceipt, Outcome)> = Vec::with_capacity(settlements.len());
        work.extend(
            settlements
                .published
                .into_iter()
                .map(|r| (r, Outcome::Published)),
        );
        work.extend(
            settlements
                .released
                .into_iter()
                .map(|r| (r, Outcome::Released)),
        );
        work.extend(
            settlements
                .retry
                .into_iter()
                .map(|(r, at, e)| (r, Outcome::Retry(at.timestamp_millis(), e))),
        );
        work.extend(
            settlements
                .dead
                .into_iter()
                .map(|(r, e)| (r, Outcome::Dead(e))),
        );
        // Any order is safe: until its own settlement lands, a leased item
        // holds back everything after it in its aggregate.
        let applied: Vec<bool> = stream::iter(work)
            .map(|(receipt, outcome)| async move {
                self.settle_one(lease, &receipt, outcome, now).await
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(applied.into_iter().filter(|a| *a).count() as u64)
    }
}
