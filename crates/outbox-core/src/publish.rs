//! The publisher capability: hand a batch of events to a broker, one result per event.

use std::future::Future;
use std::sync::Arc;

use crate::error::PublishError;
use crate::event::Event;

/// The outcome of one event of a batch.
pub type PublishResult = Result<(), PublishError>;

/// The source attribute used when a publisher is not told otherwise.
pub const DEFAULT_SOURCE: &str = "urn:outbox";

/// One publish call. A struct rather than arguments so it can grow
/// (deadlines, tracing context) without breaking every publisher.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PublishRequest<'a> {
    /// Events to send. The relay never puts two events of one aggregate in
    /// the same request, so a publisher may send them in any order or at once.
    pub events: &'a [Event],
}

impl<'a> PublishRequest<'a> {
    pub fn new(events: &'a [Event]) -> Self {
        Self { events }
    }
}

/// A broker adapter.
///
/// `publish` returns exactly one result per event, in request order: a call
/// can succeed while some of its entries fail (EventBridge `PutEvents`, SQS
/// and SNS batches), and each entry's fate is decided on its own. A failure of
/// the whole call is reported as the same error for every entry.
pub trait Publisher: Send + Sync {
    /// The most events one call accepts (EventBridge: 10).
    fn max_batch_size(&self) -> usize {
        100
    }

    fn publish(
        &self,
        request: PublishRequest<'_>,
    ) -> impl Future<Output = Vec<PublishResult>> + Send;
}

impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    fn max_batch_size(&self) -> usize {
        (**self).max_batch_size()
    }

    fn publish(
        &self,
        request: PublishRequest<'_>,
    ) -> impl Future<Output = Vec<PublishResult>> + Send {
        (**self).publish(request)
    }
}

/// The same error for every entry of a call that failed as a whole.
pub fn fail_all(request: &PublishRequest<'_>, error: PublishError) -> Vec<PublishResult> {
    vec![Err(error); request.events.len()]
}
