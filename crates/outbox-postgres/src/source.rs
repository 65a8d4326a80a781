//! The relay's side: claim the heads of aggregates' queues, settle them,
//! wait for commits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    time, ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetterPolicy, LeaseId, Malformed,
    Settlements, StoreError,
};
use sqlx::postgres::PgListener;

use crate::error::map;
use crate::rows;
use crate::PostgresOutbox;

/// Settlement kinds, as `outbox_settle` reads them.
const PUBLISHED: i16 = 1;
const RELEASED: i16 = 2;
const RETRY: i16 = 3;
const DEAD: i16 = 4;
const DEFERRED: i16 = 5;

impl ClaimSource for PostgresOutbox {
    /// The event's `position` in the outbox table.
    type Receipt = i64;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<i64>, StoreError> {
        let lease = LeaseId::new();
        let now = Utc::now();
        let cutoff = request.due_cutoff(now);
        // One statement, one round trip: see `outbox_claim` in the migrations.
        let found = sqlx::query(
            self.schema
                .sql("SELECT * FROM {schema}.outbox_claim($1, $2::uuid, $3, $4, $5, $6)"),
        )
        .bind(i32::try_from(request.limit).unwrap_or(i32::MAX))
        .bind(lease.to_string())
        .bind(time::add(now, request.lease))
        .bind(cutoff)
        .bind(request.written_before)
        .bind(self.dead_letter_policy == DeadLetterPolicy::Park)
        .fetch_all(&self.pool)
        .await
        .map_err(map)?;
        if found.is_empty() {
            return Ok(Claimed::empty(lease).with_next_due(self.next_due(cutoff).await?));
        }
        let mut events = Vec::with_capacity(found.len());
        let mut malformed = Vec::new();
        for row in &found {
            match rows::decode(row)? {
                Ok(stored) => events.push(ClaimedEvent::new(
                    stored.event,
                    stored.attempts,
                    stored.position,
                )),
                // Leased like the rest; the relay dead-letters it alone.
                Err(bad) => malformed.push(Malformed::new(bad.position, bad.reason)),
            }
        }
        // RETURNING gives no order; the relay needs each aggregate in
        // version order, which is position order.
        events.sort_unstable_by_key(|c| c.receipt);
        Ok(Claimed::new(lease, events).with_malformed(malformed))
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<i64>) -> Result<u64, StoreError> {
        if s.is_empty() {
            return Ok(0);
        }
        let now = Utc::now();
        let n = s.len();
        let mut positions = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut ats: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut errors: Vec<String> = Vec::with_capacity(n);
        // Settlements that hold an aggregate back must not interleave with a
        // claim (see `outbox_claim`); publishing and releasing need no lock.
        let lock = !(s.retry.is_empty() && s.dead.is_empty() && s.deferred.is_empty());
        let mut push = |p: i64, kind: i16, at: DateTime<Utc>, error: String| {
            positions.push(p);
            kinds.push(kind);
            ats.push(at);
            errors.push(error);
        };
        for p in s.published {
            push(p, PUBLISHED, now, String::new());
        }
        for p in s.released {
            push(p, RELEASED, now, String::new());
        }
        for (p, at, e) in s.retry {
            push(p, RETRY, at, e);
        }
        for (p, e) in s.dead {
            push(p, DEAD, now, e);
        }
        for (p, at, e) in s.deferred {
            push(p, DEFERRED, at, e);
        }
        let applied: i64 = sqlx::query_scalar(
            self.schema
                .sql("SELECT {schema}.outbox_settle($1::uuid, $2, $3, $4, $5, $6)"),
        )
        .bind(lease.to_string())
        .bind(positions)
        .bind(kinds)
        .bind(ats)
        .bind(errors)
        .bind(lock)
        .fetch_one(&self.pool)
        .await
        .map_err(map)?;
        Ok(u64::try_from(applied).unwrap_or(0))
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        if !self.listen {
            tokio::time::sleep(max_wait).await;
            return;
        }
        let started = tokio::time::Instant::now();
        let woke = tokio::time::timeout(max_wait, self.notified()).await;
        if let Ok(Err(e)) = woke {
            // No notifications for now: poll for the rest of the wait.
            tracing::debug!(error = %e, "outbox-postgres: LISTEN failed; polling");
            tokio::time::sleep(max_wait.saturating_sub(started.elapsed())).await;
        }
    }
}

impl PostgresOutbox {
    /// When the next held pending event comes due, for a claim that found
    /// nothing.
    async fn next_due(&self, cutoff: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, StoreError> {
        sqlx::query_scalar(self.schema.sql(
            "SELECT min(next_attempt_at) FROM {schema}.outbox
             WHERE status = 'pending' AND next_attempt_at > $1",
        ))
        .bind(cutoff)
        .fetch_one(&self.pool)
        .await
        .map_err(map)
    }

    /// Waits for one commit notification on the outbox's channel. The
    /// listening connection is kept between waits, so a notification that
    /// arrives between two waits is not missed: it ends the next one.
    async fn notified(&self) -> Result<(), StoreError> {
        let mut slot = self.listener.lock().await;
        if slot.is_none() {
            let mut listener = PgListener::connect_with(&self.pool).await.map_err(map)?;
            listener.listen(&self.schema.channel()).await.map_err(map)?;
            *slot = Some(listener);
        }
        let Some(listener) = slot.as_mut() else {
            return Ok(());
        };
        // `try_recv` returns None when the connection was lost (and is
        // remade on the next call): events may have been missed, so wake.
        match listener.try_recv().await {
            Ok(_) => Ok(()),
            Err(e) => {
                *slot = None;
                Err(map(e))
            }
        }
    }
}
