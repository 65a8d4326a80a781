//! The Order service's use cases: load, decide (domain), save under the
//! version condition. One implementation for every store and transport.

use std::time::Duration;

use outbox_core::StoreError;

use crate::domain::{Change, Meta, Order, OrderError, PlaceOrder};
use crate::store::OrderStore;

/// Why a use case failed; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("no order {0}")]
    NotFound(String),
    /// The domain refused the command.
    #[error(transparent)]
    Refused(#[from] OrderError),
    /// The caller's `If-Match` version is not the order's.
    #[error("order {order_id} is at version {actual}, not {expected}")]
    StaleVersion {
        order_id: String,
        expected: u64,
        actual: u64,
    },
    /// Another change of the order committed between our read and our write.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => ServiceError::Conflict(message),
            e => ServiceError::Store(e),
        }
    }
}

/// Tries of a call the store reports busy or unreachable (SQLite's single
/// writer, a dropped connection) before giving up.
const TRIES: u32 = 20;

async fn retrying<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    mut op: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let mut tries = 1;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && tries < TRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// Writes a change: the order and its events, or nothing.
pub async fn commit<S: OrderStore>(store: &S, change: Change) -> Result<Change, ServiceError> {
    retrying(|| store.save(&change)).await?;
    Ok(change)
}

/// `CreateOrder` with a new id (UUIDv7: ordered by time, unguessable enough).
pub async fn place<S: OrderStore>(
    store: &S,
    request: PlaceOrder,
    meta: &Meta,
) -> Result<Change, ServiceError> {
    let id = uuid::Uuid::now_v7().to_string();
    commit(store, Order::create(&id, request, meta)?).await
}

pub async fn get<S: OrderStore>(store: &S, id: &str) -> Result<Order, ServiceError> {
    retrying(|| store.load(id))
        .await?
        .ok_or_else(|| ServiceError::NotFound(id.to_owned()))
}

/// Loads the order, checks the caller's version, runs `command`, saves.
async fn change<S: OrderStore>(
    store: &S,
    id: &str,
    if_match: Option<u64>,
    command: impl FnOnce(&Order) -> Result<Change, OrderError>,
) -> Result<Change, ServiceError> {
    let order = get(store, id).await?;
    if let Some(expected) = if_match {
        if expected != order.version {
            return Err(ServiceError::StaleVersion {
                order_id: id.to_owned(),
                expected,
                actual: order.version,
            });
        }
    }
    // A lost race is the caller's to resolve (409), not ours to retry: the
    // command was decided on a state that no longer holds.
    commit(store, command(&order)?).await
}

pub async fn pay<S: OrderStore>(
    store: &S,
    id: &str,
    if_match: Option<u64>,
    meta: &Meta,
) -> Result<Change, ServiceError> {
    change(store, id, if_match, |o| o.pay(meta)).await
}

pub async fn cancel<S: OrderStore>(
    store: &S,
    id: &str,
    reason: Option<&str>,
    if_match: Option<u64>,
    meta: &Meta,
) -> Result<Change, ServiceError> {
    change(store, id, if_match, |o| o.cancel(reason, meta)).await
}
