//! Waking this process's relays when this process commits events.
//!
//! A relay that found events recently polls every millisecond instead of
//! listening (notifying commits wait for each other in PostgreSQL; see
//! `outbox_wake` in the migrations), and a tokio timer rounds that up to
//! one or two milliseconds. A commit made through
//! [`crate::PostgresTransaction::commit`] also wakes one relay of the
//! process waiting on the same database and schema (every `PostgresOutbox`
//! value there shares one `LocalCommits`), or, if none waits, the next one
//! to wait. One is enough: its claim takes whatever is due. Relays of other
//! processes are not reached this way; they poll, or are notified.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct LocalCommits {
    notify: Notify,
    /// Whether a relay of the process is taking its turn at the short poll
    /// (see [`LocalCommits::poll_turn`]).
    polling: AtomicBool,
}

/// The turn at the short poll, given back when dropped.
pub(crate) struct PollTurn<'a>(&'a AtomicBool);

impl Drop for PollTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One `LocalCommits` per database and schema, while any outbox holds it.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<LocalCommits>>>> =
    LazyLock::new(Mutex::default);

impl LocalCommits {
    /// The one shared by the outboxes of this process on `pool`'s database
    /// and `schema`.
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

    /// A transaction with events committed.
    pub(crate) fn committed(&self) {
        self.notify.notify_one();
    }

    /// Waits up to `max`, less if a commit wakes this relay.
    pub(crate) async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.committed_here()).await;
    }

    /// The turn at the short poll that looks for commits of other
    /// processes while the relays are busy, if no other relay of this
    /// process has it: one poller finds what every poller would, so
    /// several relays in one process do not multiply the claims.
    pub(crate) fn poll_turn(&self) -> Option<PollTurn<'_>> {
        self.polling
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(PollTurn(&self.polling))
    }

    /// Returns when a commit wakes this relay (or woke none before).
    pub(crate) async fn committed_here(&self) {
        self.notify.notified().await;
    }
}
