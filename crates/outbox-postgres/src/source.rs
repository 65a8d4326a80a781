//! The relay's side: claim the heads of aggregates' queues, settle them,
//! wait for commits.

use std::time::Duration;

use tokio::time::Instant;

use chrono::{DateTime, Utc};
use outbox_core::{
    time, ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetterPolicy, LeaseId, Malformed,
    Settlements, StoreError,
};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;

use crate::error::map;
use crate::rows;
use crate::PostgresOutbox;

/// How long a relay that found events keeps polling instead of sleeping.
const LINGER: Duration = Duration::from_millis(50);
/// The poll interval meanwhile.
const POLL: Duration = Duration::from_millis(1);
/// How long a relay keeps polling after setting `armed`: commits that read
/// it just before land within this (their disk flush), unnotified.
const ARMING_MARGIN: Duration = Duration::from_millis(20);

/// How the relays of one process wait for events. A relay that found
/// events in the last `LINGER` polls every `POLL` (appends do not notify
/// it: notifying commits wait for each other), one relay of the process at
/// a time. Then it sets the schema's `armed` flag, polls for
/// `ARMING_MARGIN` more, and sleeps until a notification or `idle_poll`. A
/// claim that finds events (any relay's) clears the flag. Every wait also
/// ends at a commit of this process (see [`crate::wake`]).
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    /// When a claim last found events.
    found_at: Option<Instant>,
    /// When this process set `armed`, if it believes it set.
    armed_at: Option<Instant>,
}

/// Settlement kinds other than published, as `outbox_settle_v5` reads them.
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
        // One statement, one round trip: see `outbox_claim_v5` in the migrations.
        let mut conn = self.relay_connections.take(&self.pool).await?;
        let sent_at = std::time::Instant::now();
        let found = sqlx::query(
            self.schema
                .sql("SELECT * FROM {schema}.outbox_claim_v5($1, $2::uuid, $3, $4, $5, $6, $7)"),
        )
        .bind(i32::try_from(request.limit).unwrap_or(i32::MAX))
        .bind(lease.to_string())
        .bind(time::add(now, request.lease))
        .bind(cutoff)
        .bind(request.written_before)
        .bind(self.dead_letter_policy == DeadLetterPolicy::Park)
        .bind(self.max_payload_column())
        .fetch_all(&mut conn)
        .await
        .map_err(map);
        if found.as_ref().is_ok_and(Vec::is_empty) {
            if !request.wants_next_due {
                self.relay_connections.give_back(conn);
                return Ok(Claimed::empty(lease));
            }
            let next_due = self.next_due(&mut conn, cutoff).await;
            let next_due = self.done(conn, next_due)?;
            return Ok(Claimed::empty(lease).with_next_due(next_due));
        }
        let found = self.done(conn, found)?;
        let received_at = std::time::Instant::now();
        self.found_events();
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
        // The relay needs each aggregate in version order, which is position
        // order; the claim returns the rows in no order.
        events.sort_unstable_by_key(|c| c.receipt);
        tracing::trace!(
            query_us = (received_at - sent_at).as_micros() as u64,
            decode_us = received_at.elapsed().as_micros() as u64,
            "outbox-postgres: claim"
        );
        Ok(Claimed::new(lease, events).with_malformed(malformed))
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<i64>) -> Result<u64, StoreError> {
        if s.is_empty() {
            return Ok(0);
        }
        let n = s.len();
        // Sorted, as a claim returns them: the index is then read in order.
        let mut published = s.published;
        published.sort_unstable();
        let others = n - published.len();
        let mut positions = Vec::with_capacity(others);
        let mut kinds = Vec::with_capacity(others);
        let mut ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(others);
        let mut errors: Vec<Option<String>> = Vec::with_capacity(others);
        let mut push = |p: i64, kind: i16, at: Option<DateTime<Utc>>, error: Option<String>| {
            positions.push(p);
            kinds.push(kind);
            ats.push(at);
            errors.push(error);
        };
        for p in s.released {
            push(p, RELEASED, None, None);
        }
        for (p, at, e) in s.retry {
            push(p, RETRY, Some(at), Some(e));
        }
        for (p, e) in s.dead {
            push(p, DEAD, None, Some(e));
        }
        for (p, at, e) in s.deferred {
            push(p, DEFERRED, Some(at), Some(e));
        }
        let mut conn = self.relay_connections.take(&self.pool).await?;
        let applied: Result<i64, _> = sqlx::query_scalar(
            self.schema
                .sql("SELECT {schema}.outbox_settle_v5($1::uuid, $2, $3, $4, $5, $6, $7)"),
        )
        .bind(lease.to_string())
        .bind(published)
        .bind(positions)
        .bind(kinds)
        .bind(ats)
        .bind(errors)
        .bind(self.synchronous_settlements)
        .fetch_one(&mut conn)
        .await
        .map_err(map);
        let applied = self.done(conn, applied)?;
        self.vacuum.settled(n as u64, &self.pool, &self.schema);
        Ok(u64::try_from(applied).unwrap_or(0))
    }

    /// Claims see every relay's leases, this relay's included.
    fn claims_ahead(&self) -> bool {
        true
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        if !self.listen {
            self.pause(max_wait).await;
            return;
        }
        let now = Instant::now();
        let (found_at, armed_at) = match self.waiting.lock() {
            Ok(w) => (w.found_at, w.armed_at),
            Err(_) => (None, None),
        };
        if found_at.is_some_and(|at| now.duration_since(at) < LINGER) {
            // One relay of the process polls; the others wait for its
            // commits, or take the next turn.
            match self.local_commits.poll_turn() {
                Some(_turn) => self.pause(POLL.min(max_wait)).await,
                None => self.pause(POLL.saturating_mul(4).min(max_wait)).await,
            }
            return;
        }
        match armed_at {
            None => {
                // Listen first, so no notification sent once armed is missed.
                if let Err(e) = self.listening().await {
                    tracing::debug!(error = %e, "outbox-postgres: LISTEN failed; polling");
                    self.pause(max_wait).await;
                    return;
                }
                if let Err(e) = self.set_armed(true).await {
                    tracing::debug!(error = %e, "outbox-postgres: cannot arm the wake-up; polling");
                    self.pause(max_wait).await;
                    return;
                }
                self.pause(POLL.min(max_wait)).await;
            }
            Some(at) if now.duration_since(at) < ARMING_MARGIN => {
                self.pause(POLL.min(max_wait)).await;
            }
            Some(_) => {
                let started = Instant::now();
                match tokio::time::timeout(max_wait, self.notified_or_local()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        // No notifications for now: poll for the rest of the wait.
                        tracing::debug!(error = %e, "outbox-postgres: LISTEN failed; polling");
                        self.pause(max_wait.saturating_sub(started.elapsed())).await;
                    }
                    Err(_) => {
                        // Nothing came: set the flag again, in case a relay
                        // of another process cleared it and then stopped.
                        let _ = self.set_armed(true).await;
                    }
                }
            }
        }
    }
}

impl PostgresOutbox {
    /// When the next held event comes due (a backoff ends or a lease
    /// expires), for a claim that found nothing.
    async fn next_due(
        &self,
        conn: &mut PgConnection,
        cutoff: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        sqlx::query_scalar(self.schema.sql("SELECT {schema}.outbox_next_due($1)"))
            .bind(cutoff)
            .fetch_one(conn)
            .await
            .map_err(map)
    }

    /// Gives a relay connection back after its statement, or drops it
    /// after a failure.
    fn done<T>(&self, conn: PgConnection, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => self.relay_connections.give_back(conn),
            Err(e) => self.relay_connections.failed(e),
        }
        result
    }

    /// Sleeps up to `max`, less if this process commits events meanwhile.
    async fn pause(&self, max: Duration) {
        self.local_commits.wait(max).await;
    }

    /// A claim found events (and cleared `armed` in the same statement):
    /// the relays are busy, appends need not notify.
    fn found_events(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.found_at = Some(Instant::now());
            w.armed_at = None;
        }
    }

    /// Sets or clears the schema's `armed` flag (an unlogged row: no disk
    /// flush), and notes it.
    async fn set_armed(&self, armed: bool) -> Result<(), StoreError> {
        let mut conn = self.relay_connections.take(&self.pool).await?;
        let result = sqlx::query(
            self.schema
                .sql("UPDATE {schema}.outbox_wake SET armed = $1"),
        )
        .bind(armed)
        .execute(&mut conn)
        .await
        .map_err(map);
        self.done(conn, result)?;
        if let Ok(mut w) = self.waiting.lock() {
            w.armed_at = armed.then(Instant::now);
        }
        Ok(())
    }

    /// Makes the listening connection if there is none.
    async fn listening(&self) -> Result<(), StoreError> {
        let mut slot = self.listener.lock().await;
        if slot.is_none() {
            let mut listener = PgListener::connect_with(&self.pool).await.map_err(map)?;
            listener.listen(&self.schema.channel()).await.map_err(map)?;
            *slot = Some(listener);
        }
        Ok(())
    }

    /// Waits for a commit notification, or for a commit of this process.
    async fn notified_or_local(&self) -> Result<(), StoreError> {
        tokio::select! {
            notified = self.notified() => notified,
            () = self.local_commits.committed_here() => Ok(()),
        }
    }

    /// Waits for one commit notification on the outbox's channel. The
    /// listening connection is kept between waits, so a notification that
    /// arrives between two waits is not missed: it ends the next one.
    async fn notified(&self) -> Result<(), StoreError> {
        self.listening().await?;
        let mut slot = self.listener.lock().await;
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
