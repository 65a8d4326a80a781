//! The demo's services on the embedded SQLite default.

use std::collections::HashSet;

use orders::store::sqlite::SqliteStore;
use orders::store::ShipmentStore;
use outbox_core::{Event, EventId, StoreError};
use outbox_sqlite::SqliteOutbox;

use super::shop::{self, Audit, NewOrder, Shipped, Shop};

const CONSUMER: &str = orders::SHIPPING_CONSUMER;

#[derive(Debug, Clone)]
pub struct SqliteShop {
    store: SqliteStore,
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl SqliteShop {
    /// Creates the services' tables; refuses a database that already holds events,
    /// so the summary can be checked against the tables afterwards.
    pub async fn new(outbox: SqliteOutbox) -> Result<Self, StoreError> {
        let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(outbox.pool())
            .await
            .map_err(db)?;
        if existing > 0 {
            return Err(StoreError::Config(format!(
                "this database already holds {existing} events; the demo needs a fresh one (delete the file or name another)"
            )));
        }
        Ok(Self {
            store: SqliteStore::open(outbox).await?,
        })
    }
}

impl Shop for SqliteShop {
    type Outbox = SqliteOutbox;

    fn outbox(&self) -> SqliteOutbox {
        self.store.outbox().clone()
    }

    async fn relay_source(&self) -> Result<SqliteOutbox, StoreError> {
        Ok(self.store.outbox().clone())
    }

    async fn place_order(&self, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
        shop::place(&self.store, order).await
    }

    async fn cancel_order(&self, order_id: &str) -> Result<Option<Event>, StoreError> {
        shop::cancel(&self.store, order_id).await
    }

    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        self.store.ship(events).await
    }

    async fn audit(&self, _written: &HashSet<EventId>) -> Result<Audit, StoreError> {
        let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders),
                    (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM outbox WHERE status = 'published'),
                    (SELECT count(*) FROM outbox WHERE status = 'dead'),
                    (SELECT count(*) FROM inbox WHERE consumer = ?1),
                    (SELECT count(*) FROM outbox AS o WHERE o.status != 'dead' AND NOT EXISTS
                        (SELECT 1 FROM inbox AS i WHERE i.consumer = ?1 AND i.event_id = o.id))",
        )
        .bind(CONSUMER)
        .fetch_one(self.store.outbox().pool())
        .await
        .map_err(db)?;
        let n = |v: i64| v as u64;
        Ok(Audit {
            orders: n(row.0),
            events_written: n(row.1),
            published: Some(n(row.2)),
            dead: n(row.3),
            delivered_unique: n(row.4),
            lost: n(row.5),
        })
    }
}
