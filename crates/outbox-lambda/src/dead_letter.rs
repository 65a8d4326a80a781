//! Where the stream handler puts what it cannot publish.

use std::future::Future;
use std::sync::{Arc, Mutex};

use outbox_core::{Event, StoreError};

/// Keeps what the stream relay gives up on, so nothing is dropped silently.
///
/// A failed call makes the handler report the record as failed, so Lambda
/// hands it over again: an implementation must not claim success for
/// anything it did not store.
pub trait DeadLetterSink: Send + Sync {
    /// Events a broker refused for good: `(event, attempts, last error)`.
    fn dead_letter_events(
        &self,
        dead: &[(Event, u32, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A stream record that could not be decoded, kept as it arrived.
    fn dead_letter_record(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl<S: DeadLetterSink + ?Sized> DeadLetterSink for Arc<S> {
    fn dead_letter_events(
        &self,
        dead: &[(Event, u32, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).dead_letter_events(dead)
    }

    fn dead_letter_record(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).dead_letter_record(sequence_number, raw_record, error)
    }
}

impl<S: DeadLetterSink + ?Sized> DeadLetterSink for &S {
    fn dead_letter_events(
        &self,
        dead: &[(Event, u32, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).dead_letter_events(dead)
    }

    fn dead_letter_record(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).dead_letter_record(sequence_number, raw_record, error)
    }
}

/// A stream record kept by [`MemoryDeadLetters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord {
    pub sequence_number: String,
    pub raw_record: String,
    pub error: String,
}

#[derive(Debug, Default)]
struct Kept {
    events: Vec<(Event, u32, String)>,
    records: Vec<DeadRecord>,
    failing: bool,
}

/// An in-memory sink for tests and local runs; can be told to fail.
#[derive(Debug, Clone, Default)]
pub struct MemoryDeadLetters {
    kept: Arc<Mutex<Kept>>,
}

impl MemoryDeadLetters {
    pub fn new() -> Self {
        Self::default()
    }

    /// While `true`, every call fails as an unreachable store would.
    pub fn set_failing(&self, failing: bool) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.failing = failing;
        }
    }

    pub fn events(&self) -> Vec<(Event, u32, String)> {
        self.kept
            .lock()
            .map(|k| k.events.clone())
            .unwrap_or_default()
    }

    pub fn records(&self) -> Vec<DeadRecord> {
        self.kept
            .lock()
            .map(|k| k.records.clone())
            .unwrap_or_default()
    }

    fn keep(&self, f: impl FnOnce(&mut Kept)) -> Result<(), StoreError> {
        let mut kept = self
            .kept
            .lock()
            .map_err(|_| StoreError::Config("dead-letter memory is poisoned".into()))?;
        if kept.failing {
            return Err(StoreError::Unavailable(
                "dead-letter store unavailable (set to fail)".into(),
            ));
        }
        f(&mut kept);
        Ok(())
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    async fn dead_letter_events(&self, dead: &[(Event, u32, String)]) -> Result<(), StoreError> {
        self.keep(|k| k.events.extend_from_slice(dead))
    }

    async fn dead_letter_record(
        &self,
        sequence_number: &str,
        raw_record: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.keep(|k| {
            k.records.push(DeadRecord {
                sequence_number: sequence_number.to_owned(),
                raw_record: raw_record.to_owned(),
                error: error.to_owned(),
            })
        })
    }
}
