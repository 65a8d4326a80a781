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

/// Why a delivered message could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The body is not an outbox event; it never will be.
    #[error(transparent)]
    NotAnEvent(#[from] crate::error::InvalidEvent),
    /// The transaction could not begin, or the inbox could not record.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The consumer's own code failed.
    #[error("handler: {0}")]
    Handler(#[source] crate::error::BoxError),
}

/// Applies one delivered message body once, whatever the broker: parses
/// the CloudEvent, begins the consumer's transaction with `begin`, records
/// the event in `inbox` under `consumer` inside it, then calls
/// `apply(tx, received, seen)`, which makes its change when `seen` is
/// [`Seen::First`] and commits. Brokers' consumer helpers acknowledge
/// the delivery only after this succeeded.
pub async fn apply_once<I, Tx, B, BF, F, FF, E>(
    inbox: &I,
    consumer: &str,
    body: &[u8],
    begin: B,
    apply: F,
) -> Result<Seen, ApplyError>
where
    I: Inbox,
    B: FnOnce() -> BF,
    BF: Future<Output = Result<Tx, StoreError>>,
    Tx: std::ops::DerefMut<Target = I::Connection>,
    F: FnOnce(Tx, crate::cloudevents::Received, Seen) -> FF,
    FF: Future<Output = Result<(), E>>,
    E: Into<crate::error::BoxError>,
{
    let text = std::str::from_utf8(body)
        .map_err(|e| crate::error::InvalidEvent::new("body", format!("not UTF-8: {e}")))?;
    let received = crate::cloudevents::from_json(text)?;
    let mut tx = begin().await?;
    let seen = inbox.record(&mut *tx, consumer, received.event.id).await?;
    apply(tx, received, seen)
        .await
        .map_err(|e| ApplyError::Handler(e.into()))?;
    Ok(seen)
}
