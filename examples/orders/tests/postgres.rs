//! The API and Shipping on PostgreSQL (127.0.0.1:5432, database `test`,
//! or `OUTBOX_TEST_POSTGRES`), each test in a schema of its own.

#![allow(clippy::unwrap_used)] // tests fail loudly

mod common;

use std::sync::Arc;

use orders::domain::{Meta, Order, PlaceOrder, ShipmentStatus};
use orders::store::postgres::PostgresStore;
use orders::store::{ShipmentStore, Shipped};
use outbox_postgres::PostgresOutbox;

fn url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A store in a fresh schema, dropped when the guard goes.
struct Schema {
    store: PostgresStore,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = url();
        let schema = self.store.outbox().schema_name().to_owned();
        // Dropped from a thread of its own: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&pool)
                    .await;
                }
            });
        })
        .join();
    }
}

async fn schema() -> Schema {
    let id = outbox_core::EventId::new().as_uuid().simple().to_string();
    let name = format!("orders_{}", &id[id.len() - 12..]);
    let outbox = PostgresOutbox::connect(&url())
        .await
        .unwrap()
        .schema(&name)
        .unwrap();
    Schema {
        store: PostgresStore::open(outbox).await.unwrap(),
    }
}

async fn count(store: &PostgresStore, sql: &str) -> u64 {
    let n: i64 = sqlx::query_scalar(store.sql(sql))
        .fetch_one(store.outbox().pool())
        .await
        .unwrap();
    n as u64
}

#[tokio::test]
async fn lifecycle_and_refusals() {
    let s = schema().await;
    common::lifecycle(&s.store).await;
    common::unknown_orders_and_routes(&s.store).await;
    common::stale_if_match_is_a_conflict(&s.store).await;
}

#[tokio::test]
async fn bad_input_is_a_400_and_writes_nothing() {
    let s = schema().await;
    let st = &s.store;
    common::bad_input_writes_nothing(st, || async move {
        (
            count(st, "SELECT count(*) FROM {s}.orders").await,
            count(st, "SELECT count(*) FROM {s}.outbox").await,
        )
    })
    .await;
}

#[tokio::test]
async fn a_lost_race_is_a_conflict_never_a_lost_update() {
    let s = schema().await;
    let store = s.store.clone();
    common::lost_race_in_the_store_is_a_conflict(&s.store, move |id| {
        let store = store.clone();
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(
                store.sql("SELECT count(*) FROM {s}.outbox WHERE aggregate_id = $1"),
            )
            .bind(id)
            .fetch_one(store.outbox().pool())
            .await
            .unwrap();
            n as u64
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pay_and_cancel_one_wins() {
    let s = schema().await;
    common::concurrent_pay_and_cancel(Arc::new(s.store.clone()), 20).await;
}

#[tokio::test]
async fn shipping_applies_paid_before_created_and_absorbs_duplicates() {
    let s = schema().await;
    let meta = Meta::default();
    let request: PlaceOrder = serde_json::from_str(common::VALID).unwrap();
    let created = Order::create("o-1", request, &meta).unwrap();
    let paid = created.order.pay(&meta).unwrap();
    let (created, paid) = (&created.events[0], &paid.events[0]);
    assert_eq!(
        s.store.ship(std::slice::from_ref(paid)).await.unwrap(),
        [Shipped::AppliedAfterGap]
    );
    // The older event and a redelivery of the newer, in one batch.
    assert_eq!(
        s.store
            .ship(&[created.clone(), paid.clone()])
            .await
            .unwrap(),
        [Shipped::Stale, Shipped::Duplicate]
    );
    let shipment = s.store.shipment("o-1").await.unwrap().unwrap();
    assert_eq!(
        (shipment.status, shipment.order_version),
        (ShipmentStatus::ReadyToShip, 2)
    );
    assert_eq!(
        count(
            &s.store,
            "SELECT count(*) FROM {s}.inbox WHERE consumer = 'shipping'"
        )
        .await,
        2
    );
}
