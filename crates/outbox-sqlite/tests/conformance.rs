//! The SQLite store against the store conformance suite.

use outbox_core::{DeadLetterPolicy, Event, EventId, Inbox, Seen, StoreError};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};
use outbox_testkit::{StoreFeatures, StoreHarness};

struct Sqlite {
    outbox: SqliteOutbox,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = SqliteOutbox::open(&dir.path().join("outbox.db"))
            .await
            .expect("open");
        sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
            .execute(outbox.pool())
            .await
            .expect("business table");
        Self { outbox, _dir: dir }
    }
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl StoreHarness for Sqlite {
    type Store = SqliteOutbox;

    fn store(&self) -> SqliteOutbox {
        self.outbox.clone()
    }

    async fn write(&self, key: &str, events: &[Event], commit: bool) -> Result<(), StoreError> {
        let mut tx = self.outbox.begin().await?;
        sqlx::query("INSERT INTO orders (id) VALUES (?)")
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        // On error `tx` is dropped, which rolls it back.
        self.outbox.append(&mut tx, events).await?;
        if commit {
            self.outbox.commit(tx).await
        } else {
            tx.rollback().await
        }
    }

    async fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ?")
            .bind(key)
            .fetch_one(self.outbox.pool())
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> Result<Seen, StoreError> {
        let mut tx = self.outbox.begin().await?;
        let seen = SqliteInbox.record(&mut tx, consumer, id).await?;
        if commit {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(seen)
    }

    async fn write_malformed(&self, aggregate_id: &str) -> Result<bool, StoreError> {
        // A BLOB where the schema promises text: before, one such row made
        // every claim fail.
        let mut tx = self.outbox.begin().await?;
        sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, aggregate_version, event_type,
                payload, occurred_at, next_attempt_at, created_at)
             VALUES (?1, 'Order', ?2, 1, 'OrderCreated', X'00FF10', '2026-01-01T00:00:00Z', 0, 0)",
        )
        .bind(EventId::new().to_string())
        .bind(aggregate_id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        self.outbox.commit(tx).await?;
        Ok(true)
    }

    fn parking_store(&self) -> Option<SqliteOutbox> {
        Some(
            self.outbox
                .clone()
                .dead_letter_policy(DeadLetterPolicy::Park),
        )
    }
}

outbox_testkit::store_conformance!(Sqlite::new, StoreFeatures::all());
