//! Vacuuming the queue tables as the relays go.
//!
//! Every published event deletes its row of `outbox_queue`, and every claim
//! writes a row of `outbox_leases` that its settlement deletes. A claim
//! reads the queue from its head in position order, which is exactly where
//! the deleted rows are, so each claim pays for every dead row left there
//! until a vacuum removes it. Autovacuum visits a table once a fifth of it
//! has changed and at most once a minute (and it can be turned off): for a
//! queue of a few hundred live rows and tens of thousands of deletions a
//! second, that is far too late. Measured: 630,000 dead rows behind 90 live
//! ones made a steady 1,000 events/s wait 9 ms at p99 instead of 4 ms.
//!
//! So the relays of a process vacuum the two tables themselves, in the
//! background, after every `every` settled events, one vacuum at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::PgPool;

use crate::Schema;

/// Settled events between two vacuums, by default.
pub(crate) const DEFAULT_EVERY: u64 = 2_000;

#[derive(Debug)]
pub(crate) struct QueueVacuum {
    /// 0: never (left to autovacuum).
    every: AtomicU64,
    /// Events settled since the last vacuum started.
    settled: AtomicU64,
    running: AtomicBool,
    /// Whether this user was found to own the tables (asked once).
    owner: AtomicBool,
}

impl QueueVacuum {
    pub(crate) fn new(every: u64) -> Arc<Self> {
        Arc::new(Self {
            every: AtomicU64::new(every),
            settled: AtomicU64::new(0),
            running: AtomicBool::new(false),
            owner: AtomicBool::new(false),
        })
    }

    pub(crate) fn every(&self) -> u64 {
        self.every.load(Ordering::Relaxed)
    }

    /// Counts `n` settled events; starts a vacuum in the background when
    /// `every` have been settled since the last one and none is running.
    pub(crate) fn settled(self: &Arc<Self>, n: u64, pool: &PgPool, schema: &Arc<Schema>) {
        let every = self.every.load(Ordering::Relaxed);
        if every == 0 {
            return;
        }
        let settled = self
            .settled
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        if settled < every || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.settled.store(0, Ordering::Relaxed);
        let this = self.clone();
        let pool = pool.clone();
        let schema = schema.clone();
        tokio::spawn(async move {
            this.vacuum(&pool, &schema).await;
            this.running.store(false, Ordering::Release);
        });
    }

    async fn vacuum(&self, pool: &PgPool, schema: &Schema) {
        // Only the tables' owner (or a superuser) may vacuum them; anyone
        // else would get a warning each time. Asked at the first vacuum.
        if !self.owner.load(Ordering::Relaxed) {
            let owner: Result<bool, _> = sqlx::query_scalar(schema.sql(
                "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class
                 WHERE oid = '{schema}.outbox_queue'::regclass",
            ))
            .fetch_one(pool)
            .await;
            match owner {
                Ok(true) => self.owner.store(true, Ordering::Relaxed),
                Ok(false) => {
                    tracing::info!(
                        schema = schema.name(),
                        "outbox-postgres: not the owner of the queue tables; their vacuum is left to autovacuum"
                    );
                    self.every.store(0, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "outbox-postgres: cannot vacuum the queue tables");
                    return;
                }
            }
        }
        // Not in a transaction (VACUUM refuses one): the simple protocol.
        // SKIP_LOCKED: another process's vacuum already does the work.
        // TRUNCATE false: no exclusive lock, however brief, in the claims' way.
        // INDEX_CLEANUP ON: the dead entries at the head of the position
        // index are what claims walk through.
        let vacuum = sqlx::raw_sql(schema.sql(
            "VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP ON)
                {schema}.outbox_queue, {schema}.outbox_leases",
        ))
        .execute(pool)
        .await;
        if let Err(e) = vacuum {
            tracing::debug!(error = %e, "outbox-postgres: vacuum of the queue tables failed");
        }
    }
}
