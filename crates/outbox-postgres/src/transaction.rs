//! A transaction whose COMMIT carries its events.

use std::ops::{Deref, DerefMut};

use outbox_core::{Event, StoreError};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, PgConnection, Postgres};

use crate::append::{Batch, Wake};
use crate::error::map;
use crate::PostgresOutbox;

/// A transaction on a connection of the outbox's pool, from
/// [`PostgresOutbox::begin`]. Run your statements on it (`&mut *tx` is a
/// `&mut PgConnection`), add events with [`PostgresTransaction::append`],
/// then [`PostgresTransaction::commit`]: the events are written in the same
/// message as the `COMMIT`, so they cost the transaction no round trip of
/// their own, and the relays of this process are woken at once.
///
/// Dropped without a commit or a rollback, it closes its connection, which
/// rolls the transaction back on the server.
#[derive(Debug)]
pub struct PostgresTransaction {
    conn: PoolConnection<Postgres>,
    outbox: PostgresOutbox,
    events: Vec<Event>,
    /// Until `COMMIT` or `ROLLBACK` succeeded: the connection must not go
    /// back to the pool inside this transaction.
    open: bool,
}

impl PostgresOutbox {
    /// Begins a transaction on a connection of the pool; see
    /// [`PostgresTransaction`].
    pub async fn begin(&self) -> Result<PostgresTransaction, StoreError> {
        let conn = self.pool.acquire().await.map_err(map)?;
        // Made before BEGIN is sent: if this future is dropped midway, the
        // transaction's drop closes the connection.
        let mut tx = PostgresTransaction {
            conn,
            outbox: self.clone(),
            events: Vec::new(),
            open: true,
        };
        sqlx::raw_sql("BEGIN")
            .execute(&mut *tx.conn)
            .await
            .map_err(map)?;
        Ok(tx)
    }
}

impl PostgresTransaction {
    /// Adds `events` to those the commit writes. They are checked now, as
    /// [`PostgresOutbox::append`] checks them, against the events added
    /// before too; version conflicts with stored events surface at commit.
    pub fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let mut all = self.events.clone();
        all.extend_from_slice(events);
        Batch::check(&all, self.outbox.max_payload_bytes)?;
        self.events = all;
        Ok(())
    }

    /// Writes the events and commits, in one round trip. A stale aggregate
    /// version fails with [`StoreError::Conflict`], and any failure the
    /// server reports rolls the transaction back: nothing is written. A
    /// connection lost while the message is on its way leaves the outcome
    /// unknown, as for any `COMMIT`: look before writing again (a second
    /// try of the same events then fails with a conflict if the first
    /// landed).
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let batch = Batch::check(&self.events, self.outbox.max_payload_bytes)?;
        let sql = if batch.is_empty() {
            "COMMIT".to_owned()
        } else {
            let wake = self.outbox.wake(Wake::Now);
            format!("{};COMMIT", batch.call_sql(&self.outbox.schema, wake))
        };
        let appended = !batch.is_empty();
        match sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *self.conn)
            .await
        {
            Ok(_) => {
                self.open = false;
                if appended {
                    self.outbox.local_commits.committed();
                }
                Ok(())
            }
            Err(e) => {
                // The append failed (the COMMIT was then not run) or the
                // COMMIT did: either way the transaction is over or aborted.
                let _ = self.end("ROLLBACK").await;
                Err(map(e))
            }
        }
    }

    /// Rolls the transaction back; nothing of it is written.
    pub async fn rollback(mut self) -> Result<(), StoreError> {
        self.end("ROLLBACK").await
    }

    async fn end(&mut self, statement: &'static str) -> Result<(), StoreError> {
        sqlx::raw_sql(statement)
            .execute(&mut *self.conn)
            .await
            .map_err(map)?;
        self.open = false;
        Ok(())
    }
}

impl Deref for PostgresTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for PostgresTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}
