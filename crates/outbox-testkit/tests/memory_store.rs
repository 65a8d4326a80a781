//! The reference in-memory store passes the store conformance suite: the
//! relay's behaviour is checked here in milliseconds, and every real store
//! passes the same cases.

use outbox_core::{DeadLetterPolicy, Event, EventId, Seen, StoreError};
use outbox_testkit::{MemoryOutbox, StoreFeatures, StoreHarness};

struct Memory {
    outbox: MemoryOutbox,
}

impl Memory {
    async fn new() -> Self {
        Self {
            outbox: MemoryOutbox::new(),
        }
    }
}

impl StoreHarness for Memory {
    type Store = MemoryOutbox;

    fn store(&self) -> MemoryOutbox {
        self.outbox.clone()
    }

    async fn write(&self, key: &str, events: &[Event], commit: bool) -> Result<(), StoreError> {
        if !commit {
            // A rolled-back transaction leaves nothing; still refuse what
            // the write would have refused.
            for event in events {
                event.validate()?;
            }
            return Ok(());
        }
        self.outbox.write(key, events)
    }

    async fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        self.outbox.business_row_exists(key)
    }

    async fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> Result<Seen, StoreError> {
        if commit {
            self.outbox.inbox_record(consumer, id)
        } else {
            Ok(Seen::First)
        }
    }

    async fn write_malformed(&self, aggregate_id: &str) -> Result<bool, StoreError> {
        self.outbox.write_malformed(
            Some(("Order", aggregate_id)),
            serde_json::json!({ "id": "not-a-uuid", "aggregate_id": aggregate_id }),
            "id `not-a-uuid` is not a UUID",
        )?;
        Ok(true)
    }

    fn parking_store(&self) -> Option<MemoryOutbox> {
        Some(
            self.outbox
                .clone()
                .dead_letter_policy(DeadLetterPolicy::Park),
        )
    }
}

outbox_testkit::store_conformance!(Memory::new, StoreFeatures::all());
