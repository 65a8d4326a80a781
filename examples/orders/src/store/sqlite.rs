//! Both services on the embedded SQLite default: `orders` and `shipments`
//! beside the outbox and inbox tables, in the outbox's database.

use outbox_core::{Event, Inbox, Seen, StoreError};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};

use super::{
    items_json, order_from_row, shipment_from_row, sql_version, stale_write, OrderStore,
    ShipmentStore, Shipped,
};
use crate::domain::{self, Applied, Change, Order, Shipment};
use crate::SHIPPING_CONSUMER;

const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, items TEXT NOT NULL,
        total_cents INTEGER NOT NULL, status TEXT NOT NULL, version INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY, status TEXT NOT NULL, order_version INTEGER NOT NULL);";

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// The Order and Shipping services' tables in one SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    outbox: SqliteOutbox,
}

impl SqliteStore {
    /// Creates the services' tables when missing (the outbox's own are
    /// created by [`SqliteOutbox`]).
    pub async fn open(outbox: SqliteOutbox) -> Result<Self, StoreError> {
        sqlx::raw_sql(TABLES)
            .execute(outbox.pool())
            .await
            .map_err(db)?;
        Ok(Self { outbox })
    }

    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }
}

impl OrderStore for SqliteStore {
    async fn load(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let row: Option<(String, String, String, i64, String, i64)> = sqlx::query_as(
            "SELECT id, customer_id, items, total_cents, status, version FROM orders WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(self.outbox.pool())
        .await
        .map_err(db)?;
        row.map(|(id, customer, items, total, status, version)| {
            order_from_row(id, customer, &items, total, &status, version)
        })
        .transpose()
    }

    async fn save(&self, change: &Change) -> Result<(), StoreError> {
        let order = &change.order;
        let items = items_json(order)?;
        let mut tx = self.outbox.begin().await?;
        let insert = change.expected_version == 0;
        let sql = if insert {
            "INSERT INTO orders (id, customer_id, items, total_cents, status, version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING"
        } else {
            "UPDATE orders SET customer_id = ?2, items = ?3, total_cents = ?4, status = ?5,
                version = ?6
             WHERE id = ?1 AND version = ?7"
        };
        let mut query = sqlx::query(sql)
            .bind(&order.id)
            .bind(&order.customer_id)
            .bind(&items)
            .bind(order.total_cents)
            .bind(order.status.as_str())
            .bind(sql_version(order.version)?);
        if !insert {
            query = query.bind(sql_version(change.expected_version)?);
        }
        let written = query.execute(&mut *tx).await.map_err(db)?.rows_affected();
        if written == 0 {
            // Dropping the transaction rolls it back.
            return Err(stale_write(change));
        }
        self.outbox.append(&mut tx, &change.events).await?;
        self.outbox.commit(tx).await
    }
}

impl ShipmentStore for SqliteStore {
    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        let mut tx = self.outbox.begin().await?;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if SqliteInbox
                .record(&mut tx, SHIPPING_CONSUMER, event.id)
                .await?
                == Seen::Duplicate
            {
                outcomes.push(Shipped::Duplicate);
                continue;
            }
            let row: Option<(String, i64)> =
                sqlx::query_as("SELECT status, order_version FROM shipments WHERE order_id = ?")
                    .bind(&event.aggregate_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            let current = row
                .map(|(status, v)| shipment_from_row(event.aggregate_id.clone(), &status, v))
                .transpose()?;
            let outcome = match domain::apply(current.as_ref(), event) {
                Applied::Stale => Shipped::Stale,
                Applied::Ignored => Shipped::Ignored,
                Applied::Advanced { shipment, gap } => {
                    // Only ever forwards, whatever another writer did meanwhile.
                    sqlx::query(
                        "INSERT INTO shipments (order_id, status, order_version) VALUES (?1, ?2, ?3)
                         ON CONFLICT (order_id) DO UPDATE SET status = ?2, order_version = ?3
                         WHERE shipments.order_version < ?3",
                    )
                    .bind(&shipment.order_id)
                    .bind(shipment.status.as_str())
                    .bind(sql_version(shipment.order_version)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    if gap {
                        Shipped::AppliedAfterGap
                    } else {
                        Shipped::Applied
                    }
                }
            };
            outcomes.push(outcome);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn shipment(&self, order_id: &str) -> Result<Option<Shipment>, StoreError> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT status, order_version FROM shipments WHERE order_id = ?")
                .bind(order_id)
                .fetch_optional(self.outbox.pool())
                .await
                .map_err(db)?;
        row.map(|(status, v)| shipment_from_row(order_id.to_owned(), &status, v))
            .transpose()
    }
}
