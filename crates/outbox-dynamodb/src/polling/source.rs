//! The relay's side of the polling shape: claim due events, settle them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_sdk_dynamodb::Client;
use futures_util::{stream, StreamExt, TryStreamExt};
use outbox_core::{
    ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetterPolicy, Event, LeaseId, Malformed,
    Settlements, StoreError,
};

use super::*;
use crate::attr::{millis, n, now_ms, number, s, string};
use crate::error::is_condition_failed;
use crate::item::{aggregate_key, decode_event, PK};
use crate::outbox::{DynamoOutbox, Shape};

/// How long published items stay before the table's TTL removes them, unless
/// purged earlier.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Single-item writes in flight at once when settling, and aggregates read
/// at once by a claim.
const CONCURRENCY: usize = 16;

/// Leases in flight at once: a claim leases its events together, not one
/// round trip after another.
const LEASE_CONCURRENCY: usize = 32;

/// Items one query page of an aggregate evaluates, at least and at most: a
/// claim reads about what it can take, not a whole 1 MB page.
const MIN_PAGE: usize = 16;
const MAX_PAGE: usize = 1_000;

fn page_size(want: usize) -> i32 {
    i32::try_from(want.clamp(MIN_PAGE, MAX_PAGE)).unwrap_or(i32::MAX)
}

/// The polling-shape outbox as the relay sees it.
#[derive(Debug, Clone)]
pub struct PollingOutbox {
    outbox: DynamoOutbox,
    retention: Duration,
    policy: DeadLetterPolicy,
}

/// Where a claimed event lives: its aggregate's key and its version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PollingReceipt {
    pub pk: String,
    pub version: u64,
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
            policy: DeadLetterPolicy::default(),
        })
    }

    /// What a dead letter does to its aggregate's later events: flow past it
    /// (`Continue`, the default) or wait behind it until it is replayed or
    /// skipped (`Park`).
    pub fn dead_letter_policy(mut self, policy: DeadLetterPolicy) -> Self {
        self.policy = policy;
        self
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

    /// The key of any item of an aggregate, the mark's (-1) included.
    pub(crate) fn key_at(pk: &str, sk: i64) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), n(sk))])
    }

    /// Claims from a few aggregates at once: reads each from its mark,
    /// leases the due prefixes together, gives back what a race cut off.
    async fn claim_aggregates(
        &self,
        aggregates: &[Lead],
        claim: &mut Claim,
    ) -> Result<(), StoreError> {
        let want = claim.room();
        // Owned items: a stream of borrowed ones trips the compiler's
        // `Send` check of the claim future.
        let scans: Vec<Result<Scan, StoreError>> = stream::iter(aggregates.to_vec())
            .map(|lead| self.scan(lead, want, claim))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let mut failure = None;
        let mut room = want;
        let mut found = Vec::with_capacity(scans.len());
        for scan in scans {
            match scan {
                Ok(mut scan) => {
                    if let Some(due) = scan.next_due {
                        claim.note_due(due);
                    }
                    scan.candidates.truncate(room);
                    room -= scan.candidates.len();
                    found.push(scan);
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        // Every candidate of every aggregate at once, answers in order.
        let wanted: Vec<(String, u64)> = found
            .iter()
            .flat_map(|scan| scan.candidates.iter().map(|v| (scan.pk.clone(), *v)))
            .collect();
        let shared: &Claim = claim;
        let mut leased = stream::iter(wanted)
            .map(|(pk, version)| async move { self.lease(&pk, version, shared).await })
            .buffered(LEASE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter();
        let mut give_back = Vec::new();
        for scan in &found {
            let mut prefix = true;
            for &version in &scan.candidates {
                let receipt = PollingReceipt {
                    pk: scan.pk.clone(),
                    version,
                };
                let item = match leased.next() {
                    Some(Ok(Some(item))) => item,
                    Some(Ok(None)) => {
                        prefix = false; // taken or settled meanwhile
                        continue;
                    }
                    Some(Err(e)) => {
                        failure = failure.or(Some(e));
                        prefix = false;
                        continue;
                    }
                    None => break,
                };
                if !prefix {
                    // Leased after a gap: not this claim's to hand out.
                    give_back.push(receipt);
                    continue;
                }
                match read_event(&item, &scan.pk, version) {
                    Ok(event) => {
                        let attempts = number(&item, ATTEMPTS)
                            .and_then(|a| u32::try_from(a).ok())
                            .unwrap_or(0);
                        claim
                            .events
                            .push(ClaimedEvent::new(event, attempts, receipt));
                    }
                    Err(reason) => {
                        // Dead-lettered alone by the relay, its fields kept.
                        tracing::error!(pk = scan.pk, version, %reason, "outbox: item cannot be read as an event");
                        claim.malformed.push(Malformed::new(receipt, reason));
                        if self.policy == DeadLetterPolicy::Park {
                            prefix = false;
                        }
                    }
                }
            }
        }
        if !give_back.is_empty() {
            let now = now_ms();
            let lease = claim.lease;
            // Best effort: a lease not given back just runs out.
            let released: Vec<Result<bool, StoreError>> = stream::iter(give_back)
                .map(|receipt| async move {
                    self.settle_one(lease, &receipt, Outcome::Released, now)
                        .await
                })
                .buffer_unordered(LEASE_CONCURRENCY)
                .collect()
                .await;
            for e in released.into_iter().filter_map(Result::err) {
                tracing::warn!(error = %e, "outbox: could not give back a lease");
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads one aggregate from its mark: which of its events this claim may
    /// lease (a due prefix, up to `want`), and moves the mark up to its first
    /// open event.
    async fn scan(&self, lead: Lead, want: usize, claim: &Claim) -> Result<Scan, StoreError> {
        let park = self.policy == DeadLetterPolicy::Park;
        let pk = lead.pk.as_str();
        let mark = self.read_mark(pk).await?;
        let mut from = if park { mark.settled } else { mark.clear };
        // The index saw a pending event at `first_seen`: a mark above it
        // (moved by a replay of an older version of this library) is wrong.
        if let Some(seen) = lead.first_seen {
            from = from.min(seen.saturating_sub(1));
        }
        let filter = if park {
            "attribute_exists(#pending) OR attribute_exists(#dead)"
        } else {
            "attribute_exists(#pending)"
        };
        let mut scan = Scan {
            pk: lead.pk.clone(),
            candidates: Vec::new(),
            next_due: None,
        };
        // The first pending (or, parking, dead) event: everything between
        // `from` and it is done.
        let mut first_open: Option<(u64, bool)> = None;
        let mut start = None;
        'pages: loop {
            // Consistent and in `sk` order: the index only said where to look.
            let mut query = self
                .client()
                .query()
                .table_name(self.table())
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND #sk > :from")
                .filter_expression(filter)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_names("#pending", PENDING_KEY)
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":from", n(from))
                .limit(page_size(want))
                .set_exclusive_start_key(start);
            if park {
                query = query.expression_attribute_names("#dead", DEAD_KEY);
            }
            let page = query
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (aggregate)", e))?;
            for item in page.items() {
                let Some(version) = number(item, SK).and_then(|v| u64::try_from(v).ok()) else {
                    continue;
                };
                let dead = item.contains_key(DEAD_KEY);
                first_open.get_or_insert((version, dead));
                if dead {
                    break 'pages; // parked behind its dead letter
                }
                if scan.candidates.len() >= want {
                    break 'pages;
                }
                if number(item, POSITION).is_some_and(|p| p > claim.max_position) {
                    break 'pages; // written after a drain started
                }
                let due = number(item, NEXT_ATTEMPT_AT).unwrap_or(0);
                if due > claim.cutoff {
                    scan.next_due = Some(due);
                    break 'pages; // held: nothing after it may go
                }
                scan.candidates.push(version);
                if park && read_event(item, pk, version).is_err() {
                    break 'pages; // parks its aggregate once dead-lettered
                }
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => break,
            }
        }
        // What the read showed: done up to the first open event, or, read to
        // the end, up to the head's version as read before.
        let done = match first_open {
            Some((version, _)) => Some(version.saturating_sub(1)),
            None => mark.head_version,
        };
        if let Some(done) = done {
            let (clear, settled) = if park {
                let first_is_dead = first_open.is_some_and(|(_, dead)| dead);
                let clear = if first_is_dead {
                    mark.clear.max(done)
                } else {
                    done
                };
                (clear, done)
            } else {
                (done, mark.settled)
            };
            if (clear, settled) != (mark.clear, mark.settled) {
                // Best effort: a mark not moved costs the next claim reads, no more.
                if let Err(e) = self.move_mark(pk, &mark, clear, settled).await {
                    tracing::warn!(pk, error = %e, "outbox: could not move the aggregate's mark");
                }
            }
        }
        Ok(scan)
    }

    /// The item as leased, or `None` if it is no longer pending and due.
    async fn lease(
        &self,
        pk: &str,
        version: u64,
        claim: &Claim,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let result = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(Self::key(pk, version)))
            .update_expression("SET #next = :until, #lease = :lease")
            // A due time missing or not a number (a hand-written item)
            // must not jam its aggregate: it counts as due.
            .condition_expression(
                "attribute_exists(#pending) AND (attribute_not_exists(#next) \
                 OR NOT attribute_type(#next, :num) OR #next <= :cutoff)",
            )
            .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
            .expression_attribute_names("#lease", LEASE_ID)
            .expression_attribute_names("#pending", PENDING_KEY)
            .expression_attribute_values(":until", n(claim.until))
            .expression_attribute_values(":cutoff", n(claim.cutoff))
            .expression_attribute_values(":num", s("N"))
            .expression_attribute_values(":lease", s(claim.lease.to_string()))
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
                    "SET #attempts = if_not_exists(#attempts, :zero) + :one, #next = :at, \
                     #error = :error REMOVE #lease",
                )
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_names("#attempts", ATTEMPTS)
                .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                .expression_attribute_names("#error", LAST_ERROR)
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":at", n(at))
                .expression_attribute_values(":error", s(error)),
            Outcome::Deferred(at, error) => request
                .update_expression("SET #next = :at, #error = :error REMOVE #lease")
                .expression_attribute_names("#next", NEXT_ATTEMPT_AT)
                .expression_attribute_names("#error", LAST_ERROR)
                .expression_attribute_values(":at", n(at))
                .expression_attribute_values(":error", s(error)),
            Outcome::Dead(error) => request
                .update_expression(
                    "SET #status = :dead, #dkey = :dead, \
                     #attempts = if_not_exists(#attempts, :zero) + :one, #error = :error \
                     REMOVE #pending, #lease, #next",
                )
                .expression_attribute_values(":zero", n(0))
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
    Deferred(i64, String),
    Dead(String),
}

/// One claim in progress.
struct Claim {
    lease: LeaseId,
    /// Lease end, ms.
    until: i64,
    /// Latest due time that may be claimed, ms.
    cutoff: i64,
    /// Highest write position that may be claimed (a drain's start).
    max_position: i64,
    limit: usize,
    events: Vec<ClaimedEvent<PollingReceipt>>,
    malformed: Vec<Malformed<PollingReceipt>>,
    /// The earliest due time seen on an event held back by its due time.
    next_due: Option<i64>,
}

impl Claim {
    fn is_full(&self) -> bool {
        self.room() == 0
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.malformed.is_empty()
    }

    /// How many more events this claim may take.
    fn room(&self) -> usize {
        self.limit
            .saturating_sub(self.events.len() + self.malformed.len())
    }

    fn note_due(&mut self, at: i64) {
        self.next_due = Some(self.next_due.map_or(at, |d| d.min(at)));
    }
}

/// An aggregate the pending index listed, and the version of its pending
/// event the index showed first (its oldest, unless clocks disagree).
#[derive(Debug, Clone)]
struct Lead {
    pk: String,
    first_seen: Option<u64>,
}

/// What a claim may lease of one aggregate, as read from its mark.
struct Scan {
    pk: String,
    /// The due prefix, in version order.
    candidates: Vec<u64>,
    /// The due time of the event that ended the prefix, if that is what did.
    next_due: Option<i64>,
}

/// The event of an item, checked by the rules a writer is held to, and
/// against the item's own key.
#[doc(hidden)] // public for the fuzz targets, which must run this very code
pub fn read_event(
    item: &HashMap<String, AttributeValue>,
    pk: &str,
    version: u64,
) -> Result<Event, String> {
    let json = match item.get(EVENT) {
        Some(AttributeValue::S(json)) => json,
        Some(_) => return Err("the `event` attribute is not a string (S)".to_owned()),
        None => return Err("the `event` attribute is missing".to_owned()),
    };
    let event = decode_event(json).map_err(|e| e.to_string())?;
    let key =
        aggregate_key(&event.aggregate_type, &event.aggregate_id).map_err(|e| e.to_string())?;
    if key != pk || event.aggregate_version != version {
        return Err(format!(
            "the event is {key} version {}, but the item is {pk} version {version}",
            event.aggregate_version
        ));
    }
    Ok(event)
}

impl ClaimSource for PollingOutbox {
    type Receipt = PollingReceipt;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<PollingReceipt>, StoreError> {
        let now = chrono::Utc::now();
        let mut claim = Claim {
            lease: LeaseId::new(),
            until: now.timestamp_millis().saturating_add(millis(request.lease)),
            cutoff: request.due_cutoff(now).timestamp_millis(),
            max_position: request.written_before.map_or(i64::MAX, |at| {
                at.timestamp_millis()
                    .saturating_mul(POSITION_SCALE)
                    .saturating_add(POSITION_SCALE - 1)
            }),
            limit: request.limit,
            events: Vec::new(),
            malformed: Vec::new(),
            next_due: None,
        };
        let mut seen = HashSet::new();
        let mut start = None;
        'pages: while !claim.is_full() {
            // The sparse index says which aggregates have pending work, oldest
            // first; it may lag, the per-aggregate read does not.
            // Positions are write order: a drain never looks past its start.
            let page = self
                .client()
                .query()
                .table_name(self.table())
                .index_name(PENDING_INDEX)
                .key_condition_expression("#k = :k AND #pos <= :max")
                .expression_attribute_names("#k", PENDING_KEY)
                .expression_attribute_names("#pos", POSITION)
                .expression_attribute_values(":k", s(PENDING))
                .expression_attribute_values(":max", n(claim.max_position))
                .limit(page_size(claim.room().max(100)))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query (pending index)", e))?;
            let mut leads = Vec::new();
            for item in page.items() {
                let Some(pk) = string(item, PK) else { continue };
                if seen.insert(pk.to_owned()) {
                    leads.push(Lead {
                        pk: pk.to_owned(),
                        first_seen: number(item, SK).and_then(|v| u64::try_from(v).ok()),
                    });
                }
            }
            let mut rest = leads.as_slice();
            while !rest.is_empty() {
                // No more aggregates at once than events the claim may take.
                let (chunk, tail) = rest.split_at(rest.len().min(CONCURRENCY).min(claim.room()));
                rest = tail;
                if let Err(e) = self.claim_aggregates(chunk, &mut claim).await {
                    if claim.is_empty() {
                        return Err(e);
                    }
                    // What is leased already goes out; the rest waits for the next claim.
                    tracing::warn!(error = %e, "outbox: claim cut short");
                    break 'pages;
                }
                if claim.is_full() {
                    break 'pages;
                }
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => break,
            }
        }
        let next_due = if claim.events.is_empty() && claim.malformed.is_empty() {
            claim
                .next_due
                .and_then(chrono::DateTime::from_timestamp_millis)
        } else {
            None
        };
        Ok(Claimed::new(claim.lease, claim.events)
            .with_malformed(claim.malformed)
            .with_next_due(next_due))
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
                .deferred
                .into_iter()
                .map(|(r, at, e)| (r, Outcome::Deferred(at.timestamp_millis(), e))),
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
