//! Both services on PostgreSQL: `orders` and `shipments` beside the outbox
//! and inbox tables, in the outbox's schema.

use outbox_core::{Event, Inbox, Seen, StoreError};
use outbox_postgres::PostgresOutbox;
use sqlx::AssertSqlSafe;

use super::{
    items_json, order_from_row, shipment_from_row, sql_version, stale_write, OrderStore,
    ShipmentStore, Shipped,
};
use crate::domain::{self, Applied, Change, Order, Shipment};
use crate::SHIPPING_CONSUMER;

const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS {s}.orders (
        id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, items TEXT NOT NULL,
        total_cents BIGINT NOT NULL, status TEXT NOT NULL, version BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS {s}.shipments (
        order_id TEXT PRIMARY KEY, status TEXT NOT NULL, order_version BIGINT NOT NULL);";

fn db(e: sqlx::Error) -> StoreError {
    match e {
        // A dropped connection or an exhausted pool may pass on a retry.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(Box::new(e))
        }
        e => StoreError::Backend(Box::new(e)),
    }
}

/// The Order and Shipping services' tables in the outbox's schema.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    outbox: PostgresOutbox,
}

impl PostgresStore {
    /// Applies the outbox's migrations and creates the services' tables
    /// when missing.
    pub async fn open(outbox: PostgresOutbox) -> Result<Self, StoreError> {
        outbox.migrate().await?;
        let store = Self { outbox };
        sqlx::raw_sql(store.sql(TABLES))
            .execute(store.outbox.pool())
            .await
            .map_err(db)?;
        Ok(store)
    }

    pub fn outbox(&self) -> &PostgresOutbox {
        &self.outbox
    }

    /// `sql` with `{s}` the quoted schema. The outbox validates schema
    /// names (lower-case letters, digits, `_`), so quoting is all they need.
    pub fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(sql.replace("{s}", &format!("\"{}\"", self.outbox.schema_name())))
    }
}

impl OrderStore for PostgresStore {
    async fn load(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let row: Option<(String, String, String, i64, String, i64)> = sqlx::query_as(self.sql(
            "SELECT id, customer_id, items, total_cents, status, version FROM {s}.orders
             WHERE id = $1",
        ))
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
        let mut tx = self.outbox.pool().begin().await.map_err(db)?;
        let insert = change.expected_version == 0;
        // Under READ COMMITTED a concurrent UPDATE of the row waits for the
        // first to commit, then finds the version changed: 0 rows, a conflict.
        let sql = if insert {
            "INSERT INTO {s}.orders (id, customer_id, items, total_cents, status, version)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
        } else {
            "UPDATE {s}.orders SET customer_id = $2, items = $3, total_cents = $4, status = $5,
                version = $6
             WHERE id = $1 AND version = $7"
        };
        let mut query = sqlx::query(self.sql(sql))
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
            return Err(stale_write(change));
        }
        self.outbox.append(&mut tx, &change.events).await?;
        tx.commit().await.map_err(db)
    }
}

impl ShipmentStore for PostgresStore {
    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        let inbox = self.outbox.inbox();
        let mut tx = self.outbox.pool().begin().await.map_err(db)?;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if inbox.record(&mut tx, SHIPPING_CONSUMER, event.id).await? == Seen::Duplicate {
                outcomes.push(Shipped::Duplicate);
                continue;
            }
            let row: Option<(String, i64)> = sqlx::query_as(
                self.sql("SELECT status, order_version FROM {s}.shipments WHERE order_id = $1"),
            )
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
                    // Only ever forwards, even past a concurrent consumer.
                    sqlx::query(self.sql(
                        "INSERT INTO {s}.shipments (order_id, status, order_version)
                         VALUES ($1, $2, $3)
                         ON CONFLICT (order_id) DO UPDATE SET status = $2, order_version = $3
                         WHERE {s}.shipments.order_version < $3",
                    ))
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
        tx.commit().await.map_err(db)?;
        Ok(outcomes)
    }

    async fn shipment(&self, order_id: &str) -> Result<Option<Shipment>, StoreError> {
        let row: Option<(String, i64)> = sqlx::query_as(
            self.sql("SELECT status, order_version FROM {s}.shipments WHERE order_id = $1"),
        )
        .bind(order_id)
        .fetch_optional(self.outbox.pool())
        .await
        .map_err(db)?;
        row.map(|(status, v)| shipment_from_row(order_id.to_owned(), &status, v))
            .transpose()
    }
}
