//! The consumer side: record processed event ids in the consumer's own
//! transaction, so an event delivered twice takes effect once.

use std::future::Future;

use crate::error::StoreError;
use crate::event::EventId;

/// Whether an event is new to a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Recorded now: apply the event in the same transaction.
    First,
    /// Already processed: skip it and acknowledge the delivery.
    Duplicate,
}

/// An inbox usable inside the consumer's own transaction.
///
/// `Connection` is what the store's transactions look like: `SqliteConnection`
/// (a `Transaction` derefs to it) for SQL stores, a list of transaction items
/// for DynamoDB. The record only takes effect if that transaction commits.
pub trait Inbox: Send + Sync {
    type Connection: ?Sized + Send;

    fn record(
        &self,
        conn: &mut Self::Connection,
        consumer: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Seen, StoreError>> + Send;
}
