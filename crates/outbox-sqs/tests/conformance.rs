//! The SQS publisher passes the publisher suite against SQS (moto), on a
//! standard queue and on a FIFO queue.

use std::time::Duration;

use outbox_core::cloudevents::Received;
use outbox_sqs::{setup, SqsPublisher, SqsReceiver};
use outbox_testkit::PublisherHarness;
use tokio::sync::Mutex;

#[derive(Debug)]
pub struct QueueHarness {
    publisher: SqsPublisher,
    receiver: SqsReceiver,
    seen: Mutex<Vec<Received>>,
}

impl QueueHarness {
    pub async fn new(fifo: bool) -> Self {
        outbox_aws::testing::require_local_endpoints(&["SQS"]);
        let client = aws_sdk_sqs::Client::new(&outbox_aws::load_config().await);
        let mut name = outbox_aws::testing::unique_name("outbox-sqs");
        if fifo {
            name.push_str(".fifo");
        }
        let queue = setup::ensure_queue(&client, &name, fifo)
            .await
            .expect("queue");
        Self {
            publisher: SqsPublisher::new(client.clone(), &queue.url).source("urn:test:sqs"),
            receiver: SqsReceiver::new(client, &queue.url),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl PublisherHarness for QueueHarness {
    type Publisher = SqsPublisher;

    fn publisher(&self) -> &SqsPublisher {
        &self.publisher
    }

    async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut seen = self.seen.lock().await;
        let missing = n.saturating_sub(seen.len());
        let more = self
            .receiver
            .collect_events(missing, timeout)
            .await
            .expect("receive");
        seen.extend(more);
        seen.clone()
    }

    // No `broker_rejected_event`: the emulator fails an entry of
    // `SendMessageBatch` on its own only for a `DelaySeconds` out of range,
    // which the publisher never sends. It stores bodies SQS would refuse
    // (U+0000, U+FFFF) and checks everything else for the whole call.
}

mod standard {
    use super::*;
    // A standard queue promises no order.
    outbox_testkit::publisher_conformance!(
        || QueueHarness::new(false),
        outbox_testkit::PublisherFeatures::new().max_entry_bytes(outbox_sqs::MAX_MESSAGE_BYTES)
    );
}

mod fifo {
    use super::*;
    // Order within a message group (the aggregate); moto drops a second
    // message with the same MessageDeduplicationId, as SQS does.
    outbox_testkit::publisher_conformance!(
        || QueueHarness::new(true),
        outbox_testkit::PublisherFeatures::new()
            .ordered(true)
            .broker_dedup(true)
            .max_entry_bytes(outbox_sqs::MAX_MESSAGE_BYTES)
    );
}
