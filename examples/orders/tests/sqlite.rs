//! The API and Shipping on SQLite, through `orders::api` and the store.

#![allow(clippy::unwrap_used)] // tests fail loudly

mod common;

use std::sync::Arc;

use orders::domain::{Meta, Order, PlaceOrder, ShipmentStatus};
use orders::store::sqlite::SqliteStore;
use orders::store::{ShipmentStore, Shipped};
use outbox_sqlite::SqliteOutbox;

async fn store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = SqliteOutbox::open(&dir.path().join("orders.db"))
        .await
        .unwrap();
    (SqliteStore::open(outbox).await.unwrap(), dir)
}

async fn count(store: &SqliteStore, sql: &str) -> u64 {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(store.outbox().pool())
        .await
        .unwrap();
    n as u64
}

#[tokio::test]
async fn lifecycle_and_refusals() {
    let (store, _dir) = store().await;
    common::lifecycle(&store).await;
    common::unknown_orders_and_routes(&store).await;
    common::stale_if_match_is_a_conflict(&store).await;
}

#[tokio::test]
async fn bad_input_is_a_400_and_writes_nothing() {
    let (store, _dir) = store().await;
    let st = &store;
    common::bad_input_writes_nothing(st, || async move {
        (
            count(st, "SELECT count(*) FROM orders").await,
            count(st, "SELECT count(*) FROM outbox").await,
        )
    })
    .await;
}

#[tokio::test]
async fn a_lost_race_is_a_conflict_never_a_lost_update() {
    let (store, _dir) = store().await;
    let pool = store.outbox().pool().clone();
    common::lost_race_in_the_store_is_a_conflict(&store, move |id| {
        let pool = pool.clone();
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_id = ?")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            n as u64
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pay_and_cancel_one_wins() {
    let (store, _dir) = store().await;
    common::concurrent_pay_and_cancel(Arc::new(store), 20).await;
}

/// Every arrival order of an order's three events ends in the same
/// shipment; older events and redeliveries are recorded, change nothing.
#[tokio::test]
async fn shipping_tolerates_any_arrival_order_and_duplicates() {
    let (store, _dir) = store().await;
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (n, arrival) in orders.iter().enumerate() {
        let meta = Meta::default();
        let request: PlaceOrder = serde_json::from_str(common::VALID).unwrap();
        let created = Order::create(&format!("o-{n}"), request, &meta).unwrap();
        let paid = created.order.pay(&meta).unwrap();
        let cancelled = paid.order.cancel(None, &meta).unwrap();
        let events = [created.events, paid.events, cancelled.events].concat();
        let mut newest = 0;
        for &i in arrival {
            // One delivery at a time, as a queue without order hands them over.
            let outcome = store.ship(&events[i..=i]).await.unwrap();
            let v = events[i].aggregate_version;
            let expected = if v > newest {
                let gap = v != newest + 1;
                newest = v;
                if gap {
                    Shipped::AppliedAfterGap
                } else {
                    Shipped::Applied
                }
            } else {
                Shipped::Stale
            };
            assert_eq!(outcome, [expected], "order {n}, arrival {arrival:?}");
        }
        // Redelivered all at once: the inbox absorbs every one.
        assert_eq!(store.ship(&events).await.unwrap(), [Shipped::Duplicate; 3]);
        let shipment = store.shipment(&format!("o-{n}")).await.unwrap().unwrap();
        assert_eq!(
            (shipment.status, shipment.order_version),
            (ShipmentStatus::Cancelled, 3)
        );
    }
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM inbox WHERE consumer = 'shipping'"
        )
        .await,
        18
    );
}
