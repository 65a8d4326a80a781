//! The polling shape: one item per event, found through sparse indexes and
//! read in version order from the base table (seed 000 on DynamoDB).
//!
//! ```text
//! table key: pk S "<aggregate type>#<aggregate id>", sk N
//!
//! head item (sk = 0), one per aggregate, rewritten by every transaction:
//!   version          N   the aggregate's last stored version (the optimistic lock)
//!   aggregate_type   S
//!   aggregate_id     S
//!
//! mark item (sk = -1), one per aggregate, written by the relay (see `mark`):
//!   clear_through    N   no pending event at or below this version
//!   settled_through  N   no pending or dead event at or below this version
//!   reopened         N   dead events made pending again (fences the two above)
//!
//! event item (sk = aggregate version):
//!   event            S   the envelope as JSON
//!   event_id         S
//!   status           S   pending | published | dead | skipped
//!   position         N   commit time in ms * 10_000 + index in the transaction (write order)
//!   created_at       N   ms since the epoch
//!   attempts         N   failed attempts so far
//!   next_attempt_at  N   ms; when pending: due at or after this (a lease pushes it out)
//!   lease_id         S   the relay claim holding it, while leased
//!   last_error       S   after a failure
//!   published_at     N   ms, once published
//!   expires_at       N   seconds since the epoch, once published: the table's TTL attribute
//!   pending_key      S   "pending" while pending, else absent  ─┐ sparse GSI keys: an item is
//!   dead_key         S   "dead" while dead, else absent          │ in exactly one of the three
//!   published_key    S   "published" once published             ─┘ indexes (the head in none)
//!
//! GSI "pending":   pending_key + position,       keys only (where work is: never a Scan)
//! GSI "dead":      dead_key + position,          all attributes (dead letters, oldest first)
//! GSI "published": published_key + published_at, keys only (purge by age)
//! ```
//!
//! GSIs are eventually consistent, so the poller uses the pending index only
//! to learn which aggregates have work, then reads each aggregate's pending
//! items with a consistent query on the base table in `sk` order: that read
//! is what keeps the order. It starts after the aggregate's mark, so a claim
//! reads what is pending (and what was published since the last claim), not
//! the aggregate's whole published history. Every index key holds one constant value, so each
//! index is one partition key: simple and ordered, and enough up to that
//! partition's throughput (about 1,000 writes a second).

mod admin;
mod mark;
mod source;

#[doc(hidden)]
pub use source::read_event;
pub use source::{PollingOutbox, PollingReceipt};

pub(crate) const SK: &str = "sk";
pub(crate) const HEAD_SK: &str = "0";
/// The sort key of an aggregate's mark item: below the head, so a query
/// for events (`sk > version`) never reads it.
pub(crate) const MARK_VERSION: i64 = -1;
pub(crate) const CLEAR_THROUGH: &str = "clear_through";
pub(crate) const SETTLED_THROUGH: &str = "settled_through";
pub(crate) const REOPENED: &str = "reopened";
pub(crate) const EVENT: &str = "event";
pub(crate) const EVENT_ID: &str = "event_id";
pub(crate) const STATUS: &str = "status";
pub(crate) const POSITION: &str = "position";
pub(crate) const CREATED_AT: &str = "created_at";
pub(crate) const ATTEMPTS: &str = "attempts";
pub(crate) const NEXT_ATTEMPT_AT: &str = "next_attempt_at";
pub(crate) const LEASE_ID: &str = "lease_id";
pub(crate) const LAST_ERROR: &str = "last_error";
pub(crate) const PUBLISHED_AT: &str = "published_at";
pub(crate) const EXPIRES_AT: &str = "expires_at";
pub(crate) const PENDING_KEY: &str = "pending_key";
pub(crate) const DEAD_KEY: &str = "dead_key";
pub(crate) const PUBLISHED_KEY: &str = "published_key";

pub(crate) const PENDING_INDEX: &str = "pending";
pub(crate) const DEAD_INDEX: &str = "dead";
pub(crate) const PUBLISHED_INDEX: &str = "published";

pub(crate) const PENDING: &str = "pending";
pub(crate) const DEAD: &str = "dead";
pub(crate) const PUBLISHED: &str = "published";
/// A dead letter given up for good (`dead-letters skip`).
pub(crate) const SKIPPED: &str = "skipped";

/// Positions are `commit ms * POSITION_SCALE + index`: an index stays below
/// the 100 actions of one transaction, and ms * 10^4 fits in an i64 for
/// millennia.
pub(crate) const POSITION_SCALE: i64 = 10_000;
