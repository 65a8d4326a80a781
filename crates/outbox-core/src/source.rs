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
}

impl ClaimRequest {
    pub fn new(limit: usize, lease: Duration) -> Self {
        Self { limit, lease }
    }
}

/// An event reserved for one relay.
#[derive(Debug, Clone)]
pub struct ClaimedEvent<R> {
    pub event: Event,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The store's handle on the event, given back when settling.
    pub receipt: R,
}

/// The result of a claim.
#[derive(Debug, Clone)]
pub struct Claimed<R> {
    pub lease: LeaseId,
    /// Due events that no earlier pending event of their aggregate holds back,
    /// each aggregate's in version order.
    pub events: Vec<ClaimedEvent<R>>,
}

/// What became of the events of one claim.
#[derive(Debug, Clone)]
pub struct Settlements<R> {
    pub published: Vec<R>,
    /// Failed, to be tried again at the given time.
    pub retry: Vec<(R, DateTime<Utc>, String)>,
    /// Failed for good: kept with their last error, replayable.
    pub dead: Vec<(R, String)>,
    /// Not attempted (held back behind a failure, or a shutdown): due again now,
    /// without counting an attempt.
    pub released: Vec<R>,
}

impl<R> Default for Settlements<R> {
    fn default() -> Self {
        Self {
            published: Vec::new(),
            retry: Vec::new(),
            dead: Vec::new(),
            released: Vec::new(),
        }
    }
}

impl<R> Settlements<R> {
    pub fn len(&self) -> usize {
        self.published.len() + self.retry.len() + self.dead.len() + self.released.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A store the relay can poll.
///
/// `claim` returns, for each aggregate, a prefix of its pending events in
/// version order, and only when none of its earlier pending events is held
/// (backing off after a failure, or claimed by another relay). This is what
/// keeps per-aggregate order with several relays and failures.
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
}

/// Counts for monitoring unpublished events.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    pub pending: u64,
    pub published: u64,
    pub dead: u64,
    /// When the oldest pending event was written.
    pub oldest_pending_at: Option<DateTime<Utc>>,
}

pub trait Stats: Send + Sync {
    fn stats(&self) -> impl Future<Output = Result<OutboxStats, StoreError>> + Send;
}

/// An event that failed for good.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub event: Event,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplaySelector {
    All,
    Ids(Vec<EventId>),
}

pub trait DeadLetters: Send + Sync {
    /// Dead letters, oldest first.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// Makes dead letters pending again, due now, with their attempts reset.
    /// Returns how many were replayed.
    fn replay(&self, which: ReplaySelector)
        -> impl Future<Output = Result<u64, StoreError>> + Send;
}

pub trait Purge: Send + Sync {
    /// Deletes published events published before `before`; returns how many.
    fn purge_published(
        &self,
        before: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
