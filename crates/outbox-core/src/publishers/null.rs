use crate::publish::{PublishRequest, PublishResult, Publisher};

/// Accepts every event and sends it nowhere: measures the relay and store alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullPublisher;

impl Publisher for NullPublisher {
    fn max_batch_size(&self) -> usize {
        usize::MAX
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        vec![Ok(()); request.events.len()]
    }
}
