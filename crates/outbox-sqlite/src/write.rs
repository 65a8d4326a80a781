//! Write transactions that take turns inside the process.

use std::ops::{Deref, DerefMut};

use outbox_core::StoreError;
use sqlx::{Sqlite, SqliteConnection, Transaction};
use tokio::sync::OwnedMutexGuard;

use crate::error::map;

/// A write transaction on the outbox's database (`BEGIN IMMEDIATE`), from
/// [`SqliteOutbox::begin`](crate::SqliteOutbox::begin).
///
/// SQLite has one writer at a time. Writers of this process (your services,
/// the relay's claims and settlements) queue for their turn on an async lock,
/// instead of meeting a locked database and sleeping in SQLite's busy handler
/// (1, 2, 5, 10 ms...), which would show as publish latency. Other processes
/// still meet the busy handler.
///
/// Use it as a connection (`&mut *tx`) for your own statements; dropping it
/// without committing rolls back.
pub struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _turn: OwnedMutexGuard<()>,
}

impl WriteTx {
    pub(crate) fn new(tx: Transaction<'static, Sqlite>, turn: OwnedMutexGuard<()>) -> Self {
        Self { tx, _turn: turn }
    }

    /// Commits. Prefer [`SqliteOutbox::commit`](crate::SqliteOutbox::commit)
    /// when events were appended: it also wakes the relay.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(map)
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(map)
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl std::fmt::Debug for WriteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteTx")
    }
}
