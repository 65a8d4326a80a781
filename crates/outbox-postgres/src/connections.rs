//! The relays' own connections, for their claims and settlements.
//!
//! A pool checks a connection with a round trip when it hands it out and
//! again when it takes it back: at 1,000 events/s, two extra round trips
//! for every claim and every settlement. These connections are taken for
//! one statement and given back without checks. One that fails is dropped,
//! with the idle ones (a failure usually means the server or the network
//! went away), and the next statement connects anew.

use std::sync::Mutex;
use std::time::Duration;

use outbox_core::StoreError;
use sqlx::{ConnectOptions, PgConnection, PgPool};

use crate::error::map;

/// Idle connections kept: one per relay sharing this outbox, and more are
/// made when needed.
const MAX_IDLE: usize = 4;
/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub(crate) struct RelayConnections {
    idle: Mutex<Vec<PgConnection>>,
}

impl RelayConnections {
    /// An idle connection, or a new one made with `pool`'s options. Give it
    /// back with [`RelayConnections::give_back`] once its statement
    /// succeeded; a dropped one is closed.
    pub(crate) async fn take(&self, pool: &PgPool) -> Result<PgConnection, StoreError> {
        if let Some(conn) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(conn);
        }
        let options = pool.connect_options();
        match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
            Ok(connected) => connected.map_err(map),
            Err(_) => Err(StoreError::Unavailable(
                format!("no connection to PostgreSQL within {CONNECT_TIMEOUT:?}").into(),
            )),
        }
    }

    pub(crate) fn give_back(&self, conn: PgConnection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
    }

    /// A statement failed: its connection is dropped, and the idle ones
    /// with it, unless the failure was the statement's own (an SQL error on
    /// a working connection).
    pub(crate) fn failed(&self, error: &StoreError) {
        if error.is_retryable() {
            if let Ok(mut idle) = self.idle.lock() {
                idle.clear();
            }
        }
    }
}
