//! What the relay needs from a store: claim due events, settle their fate.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{Event, EventId};

/// Fences one relay's claim: settling with a lease that has expired and
/// been taken over by another relay changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub uuid::Uuid);

impl LeaseId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for LeaseId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which events to claim, and for how long.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClaimRequest {
    pub limit: usize,
    /// How long the claimed events stay reserved for this relay. A relay that
    /// dies holding a claim delays its events by at most this much.
    pub lease: Duration,
    /// Claim only events due at or before this time (and never after now).
    pub due_by: Option<DateTime<Utc>>,
    /// Claim only events written at or before this time: a drain takes what
    /// was written when it started (and comes due while it runs), so writers
    /// that keep writing cannot keep it going forever.
    pub written_before: Option<DateTime<Utc>>,
    /// Whether a claim that finds nothing should say when the next held
    /// event comes due ([`Claimed::next_due`]). A relay that waits for
    /// commits instead does not ask, which spares a store that needs a
    /// query of its own for it that query on every empty claim.
    pub wants_next_due: bool,
}

impl ClaimRequest {
    pub fn new(limit: usize, lease: Duration) -> Self {
        Self {
            limit,
            lease,
            due_by: None,
            written_before: None,
            wants_next_due: true,
        }
    }

    /// Asks for [`Claimed::next_due`] (the default) or not.
    pub fn wants_next_due(mut self, wanted: bool) -> Self {
        self.wants_next_due = wanted;
        self
    }

    pub fn written_before(mut self, at: DateTime<Utc>) -> Self {
        self.written_before = Some(at);
        self
    }

    pub fn due_by(mut self, at: DateTime<Utc>) -> Self {
        self.due_by = Some(at);
        self
    }

    /// The latest due time an event may have to be claimed now.
    pub fn due_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.due_by.map_or(now, |due_by| due_by.min(now))
    }
}

/// An event reserved for one relay.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClaimedEvent<R> {
    pub event: Event,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The store's handle on the event, given back when settling.
    pub receipt: R,
}

impl<R> ClaimedEvent<R> {
    pub fn new(event: Event, attempts: u32, receipt: R) -> Self {
        Self {
            event,
            attempts,
            receipt,
        }
    }
}

/// A stored entry that cannot be read as an event (a BLOB where text
/// belongs, invalid JSON, a non-UUID id, a version of 0...). The relay
/// dead-letters it alone, with the reason, and everything else flows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Malformed<R> {
    pub receipt: R,
    pub reason: String,
}

impl<R> Malformed<R> {
    pub fn new(receipt: R, reason: impl Into<String>) -> Self {
        Self {
            receipt,
            reason: reason.into(),
        }
    }
}

/// The result of a claim.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Claimed<R> {
    pub lease: LeaseId,
    /// Due events that no earlier pending event of their aggregate holds back,
    /// each aggregate's in version order.
    pub events: Vec<ClaimedEvent<R>>,
    /// Entries that could not be read, leased like the events; the relay
    /// settles them as dead.
    pub malformed: Vec<Malformed<R>>,
    /// When the next event held by this source comes due, if the source
    /// knows and nothing is due now. A drain with a deadline waits for it.
    pub next_due: Option<DateTime<Utc>>,
}

impl<R> Claimed<R> {
    pub fn new(lease: LeaseId, events: Vec<ClaimedEvent<R>>) -> Self {
        Self {
            lease,
            events,
            malformed: Vec::new(),
            next_due: None,
        }
    }

    /// Nothing due.
    pub fn empty(lease: LeaseId) -> Self {
        Self::new(lease, Vec::new())
    }

    pub fn with_malformed(mut self, malformed: Vec<Malformed<R>>) -> Self {
        self.malformed = malformed;
        self
    }

    pub fn with_next_due(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.next_due = at;
        self
    }

    /// Events and malformed entries together.
    pub fn len(&self) -> usize {
        self.events.len() + self.malformed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What became of the events of one claim.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settlements<R> {
    pub published: Vec<R>,
    /// Failed, to be tried again at the given time; counts an attempt.
    pub retry: Vec<(R, DateTime<Utc>, String)>,
    /// Failed for good: kept with their last error, replayable.
    pub dead: Vec<(R, String)>,
    /// Not attempted (held back behind a failure, a shutdown, or the end of
    /// the lease): due again now, without counting an attempt.
    pub released: Vec<R>,
    /// Not delivered because the target as a whole was down: due again at
    /// the given time, the error recorded (so `status` shows the outage),
    /// without counting an attempt.
    pub deferred: Vec<(R, DateTime<Utc>, String)>,
}

impl<R> Default for Settlements<R> {
    fn default() -> Self {
        Self {
            published: Vec::new(),
            retry: Vec::new(),
            dead: Vec::new(),
            released: Vec::new(),
            deferred: Vec::new(),
        }
    }
}

impl<R> Settlements<R> {
    pub fn len(&self) -> usize {
        self.published.len()
            + self.retry.len()
            + self.dead.len()
            + self.released.len()
            + self.deferred.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A store the relay can poll: the one thing every way of reading events
/// (SQL and DynamoDB claims, the DynamoDB Streams API, the records of one
/// Lambda invocation) implements under the one relay engine.
///
/// # The ordering contract
///
/// Writers append each aggregate's events in version order and commit them
/// in that order (a later version never commits before an earlier one: the
/// stores serialize an aggregate's writers under a version condition).
///
/// `claim` then returns, for each aggregate, a *prefix* of its pending events
/// in version order, and only when none of its earlier pending events is held
/// (backing off after a failure, claimed by another relay, or parked behind a
/// dead letter where the store is configured to park). That is the whole of a
/// source's ordering duty: the relay publishes each aggregate's prefix one
/// event at a time, retries, backs off and dead-letters; a source never
/// schedules publishing itself.
pub trait ClaimSource: Send + Sync {
    type Receipt: Clone + Send + Sync + std::fmt::Debug + 'static;

    fn claim(
        &self,
        request: ClaimRequest,
    ) -> impl Future<Output = Result<Claimed<Self::Receipt>, StoreError>> + Send;

    /// Records the outcome; entries whose lease was lost are left alone.
    /// Returns how many entries were applied.
    fn settle(
        &self,
        lease: LeaseId,
        settlements: Settlements<Self::Receipt>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Waits until new events may be due, at most `max_wait`. Stores with a
    /// commit notification wake early; the default simply sleeps (polling).
    fn wait_for_events(&self, max_wait: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(max_wait)
    }

    /// Hands back whatever the source holds for this relay (a stream's
    /// ownership lease, say), so the next relay takes over at once. Called
    /// when a relay stops; the default holds nothing.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Whether a relay may claim its next batch while it still publishes
    /// the last one. The source must then treat the last claim's lease as
    /// another relay's: hand out nothing of the aggregates it holds. With a
    /// backlog, the claim's round trip and the store's work then overlap
    /// the publishing instead of adding to it. The default is no.
    fn claims_ahead(&self) -> bool {
        false
    }
}

/// What a dead letter does to the later events of its aggregate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterPolicy {
    /// Later events flow past it; a replayed dead letter is then published
    /// after them. Nothing waits on an operator.
    #[default]
    Continue,
    /// The aggregate is parked behind its dead letter: nothing later is
    /// published until the dead letter is replayed or skipped, so consumers
    /// see every aggregate's events in version order, always.
    Park,
}

/// Counts for monitoring unpublished events.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct OutboxStats {
    pub pending: u64,
    pub published: u64,
    pub dead: u64,
    /// When the oldest pending event was written.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Events known to be lost before a relay could read them (a change
    /// stream trimmed past its checkpoint). Anything but 0 needs a person.
    pub lost: u64,
    /// The latest error recorded on a pending event: an outage of the
    /// target shows here while its events wait.
    pub last_error: Option<String>,
    /// Pending events whose stored creation time was ahead of the store's
    /// clock when they were written (a writer's clock, or a hand-edited
    /// row). Their age is counted from when they were written.
    pub created_in_future: u64,
}

pub trait Stats: Send + Sync {
    fn stats(&self) -> impl Future<Output = Result<OutboxStats, StoreError>> + Send;
}

/// An entry that failed for good: an event, or a stored entry that could
/// not be read as one (kept with its raw fields and the reason).
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Where the store keeps it: the event id, or the position, key or
    /// stream sequence number of an entry that has none.
    pub reference: String,
    /// The event, when the entry could be read.
    pub event: Option<Event>,
    /// The stored fields as found, for an entry that could not be read.
    pub raw: Option<serde_json::Value>,
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl DeadLetter {
    pub fn event(event: Event, attempts: u32, last_error: Option<String>) -> Self {
        Self {
            reference: event.id.to_string(),
            event: Some(event),
            raw: None,
            attempts,
            last_error,
        }
    }

    pub fn malformed(
        reference: impl Into<String>,
        raw: serde_json::Value,
        last_error: Option<String>,
    ) -> Self {
        Self {
            reference: reference.into(),
            event: None,
            raw: Some(raw),
            attempts: 0,
            last_error,
        }
    }
}

/// Which dead letters to replay or skip.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplaySelector {
    All,
    Ids(Vec<EventId>),
}

pub trait DeadLetters: Send + Sync {
    /// Dead letters, oldest first, malformed entries included.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// Makes dead letters pending again, due now, with their attempts reset.
    /// Returns how many were replayed.
    fn replay(&self, which: ReplaySelector)
        -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Gives up on dead letters for good, so an aggregate parked behind one
    /// (see [`DeadLetterPolicy::Park`]) flows again. Returns how many.
    fn skip(&self, which: ReplaySelector) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = which;
        std::future::ready(Err(StoreError::Config(
            "this store cannot skip dead letters".into(),
        )))
    }
}

pub trait Purge: Send + Sync {
    /// Deletes published events published before `before`; returns how many.
    fn purge_published(
        &self,
        before: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
