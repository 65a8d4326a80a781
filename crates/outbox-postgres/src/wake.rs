//! Waking this process's relays when this process commits events.
//!
//! A relay that found events recently polls every millisecond instead of
//! listening (notifying commits wait for each other in PostgreSQL; see
//! `outbox_wake` in the migrations), and a tokio timer rounds that up to
//! one or two milliseconds. A commit made through
//! [`crate::PostgresTransaction::commit`] also bumps a counter shared by
//! every `PostgresOutbox` of the process on the same database and schema,
//! so a relay waiting in this process claims at once. Relays of other
//! processes are not reached this way; they poll, or are notified.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct LocalCommits {
    /// Commits of events made through this process, ever.
    count: AtomicU64,
    notify: Notify,
}

/// One `LocalCommits` per database and schema, while any outbox holds it.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<LocalCommits>>>> =
    LazyLock::new(Mutex::default);

impl LocalCommits {
    /// The counter shared by the outboxes of this process on `pool`'s
    /// database and `schema`.
    pub(crate) fn of(pool: &PgPool, schema: &str) -> Arc<Self> {
        let options = pool.connect_options();
        let key = format!(
            "{}:{}/{}/{schema}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let Ok(mut registry) = REGISTRY.lock() else {
            return Arc::default();
        };
        if let Some(shared) = registry.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        registry.retain(|_, w| w.strong_count() > 0);
        let shared = Arc::new(Self::default());
        registry.insert(key, Arc::downgrade(&shared));
        shared
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// A transaction with events committed.
    pub(crate) fn committed(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Waits up to `max`, less if a commit comes after the count `seen`
    /// (or came already).
    pub(crate) async fn wait(&self, seen: u64, max: Duration) {
        let _ = tokio::time::timeout(max, self.since(seen)).await;
    }

    /// Returns once a commit came after the count `seen`.
    pub(crate) async fn since(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the count is read again: no commit is missed.
            notified.as_mut().enable();
            if self.count() != seen {
                return;
            }
            notified.await;
        }
    }
}
