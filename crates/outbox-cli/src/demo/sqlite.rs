//! The demo's services on the embedded SQLite default.

use std::collections::HashSet;

use outbox_core::{Event, EventId, Inbox, Seen, StoreError};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};

use super::shop::{cancelled, shipment_status, Audit, NewOrder, Shipped, Shop};

const CONSUMER: &str = "shipping";

#[derive(Debug, Clone)]
pub struct SqliteShop {
    outbox: SqliteOutbox,
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
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS orders (
                id TEXT PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL,
                items INTEGER NOT NULL, status TEXT NOT NULL, version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS shipments (
                order_id TEXT PRIMARY KEY, status TEXT NOT NULL, order_version INTEGER NOT NULL);",
        )
        .execute(outbox.pool())
        .await
        .map_err(db)?;
        Ok(Self { outbox })
    }
}

impl Shop for SqliteShop {
    type Outbox = SqliteOutbox;

    fn outbox(&self) -> SqliteOutbox {
        self.outbox.clone()
    }

    async fn relay_source(&self) -> Result<SqliteOutbox, StoreError> {
        Ok(self.outbox.clone())
    }

    async fn place_order(&self, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
        let events = order.events()?;
        let mut tx = self.outbox.begin().await?;
        sqlx::query("INSERT INTO orders (id, customer, total_cents, items, status, version) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&order.id)
            .bind(&order.customer)
            .bind(order.total_cents)
            .bind(order.items)
            .bind(if order.paid { "paid" } else { "created" })
            .bind(events.len() as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        self.outbox.append(&mut tx, &events).await?;
        self.outbox.commit(tx).await?;
        Ok(events)
    }

    async fn cancel_order(&self, order_id: &str) -> Result<Option<Event>, StoreError> {
        let mut tx = self.outbox.begin().await?;
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE orders SET status = 'cancelled', version = version + 1
             WHERE id = ? AND status != 'cancelled' RETURNING version",
        )
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(version) = version else {
            return Ok(None);
        };
        let event = cancelled(order_id, version as u64)?;
        self.outbox
            .append(&mut tx, std::slice::from_ref(&event))
            .await?;
        self.outbox.commit(tx).await?;
        Ok(Some(event))
    }

    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        let mut tx = self.outbox.begin().await?;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if SqliteInbox.record(&mut tx, CONSUMER, event.id).await? == Seen::Duplicate {
                outcomes.push(Shipped::Duplicate);
                continue;
            }
            let applied: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(order_version), 0) FROM shipments WHERE order_id = ?",
            )
            .bind(&event.aggregate_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            let version = event.aggregate_version as i64;
            if version <= applied {
                outcomes.push(Shipped::OutOfOrder);
                continue;
            }
            sqlx::query(
                "INSERT INTO shipments (order_id, status, order_version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (order_id) DO UPDATE SET status = ?2, order_version = ?3",
            )
            .bind(&event.aggregate_id)
            .bind(shipment_status(&event.event_type))
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            outcomes.push(if version == applied + 1 {
                Shipped::Applied
            } else {
                Shipped::AppliedAfterGap
            });
        }
        tx.commit().await?;
        Ok(outcomes)
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
        .fetch_one(self.outbox.pool())
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
