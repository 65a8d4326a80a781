//! The relay engine: claim due events, publish them in per-aggregate order,
//! settle each one's fate (published, retry later, dead-letter, release,
//! defer while the target is down).
//!
//! This is the only place that schedules publishing. Every source (SQL and
//! DynamoDB claims, the DynamoDB Streams API, the records of one Lambda
//! invocation) hands out prefixes of each aggregate's queue through
//! [`ClaimSource`], and the relay does the rest:
//!
//! - ordering: at most one event per aggregate per publish call, an
//!   aggregate's next event as soon as its previous one is confirmed (other
//!   aggregates' calls are not waited for);
//! - retries: a failure the broker reports for one entry counts toward that
//!   entry's attempts and sets `next_attempt_at` by the [`RetryPolicy`];
//!   permanent failures and exhausted attempts are dead-lettered;
//! - outages: a failure of the target as a whole (unreachable, timed out,
//!   credentials refused, throttled, no such bus) spends no attempt: the
//!   events are deferred, the target paused with backoff and probed with
//!   small claims until it answers again;
//! - deadlines: no call runs past the claim's lease or the caller's
//!   deadline; what was not sent by then is released for the next relay.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::error::{Disposition, PublishError, StoreError};
use crate::event::Event;
use crate::publish::{PublishRequest, PublishResult, Publisher};
use crate::retry::RetryPolicy;
use crate::source::{ClaimRequest, ClaimSource, Claimed, ClaimedEvent, Settlements};
use crate::time;

/// How a relay batches, waits and retries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most events claimed at once.
    pub batch_size: usize,
    /// How long claimed events stay reserved. The relay starts no publish
    /// call that could outlive it: what is left near its end is released.
    pub lease: Duration,
    /// Longest sleep when nothing is due (commit notifications wake earlier).
    pub idle_poll: Duration,
    /// Longest wait for one publish call; a call that takes longer is a
    /// failure of the target (no event's attempt is spent).
    pub publish_timeout: Duration,
    /// Publish calls in flight at once within one wave.
    pub publish_concurrency: usize,
    /// Time kept back before the lease ends (or the caller's deadline) to
    /// record the outcome.
    pub settle_margin: Duration,
    /// Longest pause between probes of a target that is down.
    pub max_outage_pause: Duration,
    pub retry: RetryPolicy,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            lease: Duration::from_secs(30),
            idle_poll: Duration::from_millis(250),
            publish_timeout: Duration::from_secs(10),
            publish_concurrency: 4,
            settle_margin: Duration::from_secs(1),
            max_outage_pause: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

impl RelayConfig {
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn idle_poll(mut self, every: Duration) -> Self {
        self.idle_poll = every;
        self
    }

    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    pub fn publish_concurrency(mut self, n: usize) -> Self {
        self.publish_concurrency = n;
        self
    }

    pub fn settle_margin(mut self, margin: Duration) -> Self {
        self.settle_margin = margin;
        self
    }

    pub fn max_outage_pause(mut self, pause: Duration) -> Self {
        self.max_outage_pause = pause;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn max_attempts(mut self, n: u32) -> Self {
        self.retry.max_attempts = n;
        self
    }

    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |m: &str| Err(StoreError::Config(format!("relay config: {m}")));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.publish_concurrency == 0 {
            return bad("publish_concurrency must be at least 1");
        }
        if self.idle_poll.is_zero() {
            return bad("idle_poll must be greater than zero");
        }
        if self.publish_timeout.is_zero() {
            return bad("publish_timeout must be greater than zero");
        }
        if self.max_outage_pause.is_zero() {
            return bad("max_outage_pause must be greater than zero");
        }
        for (setting, value, max) in [
            ("lease", self.lease, time::MAX_LEASE),
            ("idle_poll", self.idle_poll, time::MAX_WAIT),
            ("publish_timeout", self.publish_timeout, time::MAX_WAIT),
            ("max_outage_pause", self.max_outage_pause, time::MAX_WAIT),
            ("settle_margin", self.settle_margin, time::MAX_WAIT),
        ] {
            time::check_at_most(setting, value, max).or_else(|m| bad(&m))?;
        }
        if self.lease <= self.publish_timeout.saturating_add(self.settle_margin) {
            return bad("lease must be longer than publish_timeout plus settle_margin, or no publish call would fit in it");
        }
        self.retry.validate().or_else(|m| bad(&m))
    }
}

pub use crate::metrics::RelayMetrics;

/// What one or more claim-publish-settle cycles did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    pub claimed: usize,
    pub published: usize,
    pub retried: usize,
    /// Dead-lettered, malformed entries included.
    pub dead_lettered: usize,
    /// Entries that could not be read (also counted in `dead_lettered`).
    pub malformed: usize,
    pub released: usize,
    /// Put back because the target as a whole was down.
    pub deferred: usize,
    /// From the last claim that found nothing due: when the source's next
    /// event comes due, if it knows.
    pub next_due: Option<DateTime<Utc>>,
}

impl BatchReport {
    fn add(&mut self, other: BatchReport) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.malformed += other.malformed;
        self.released += other.released;
        self.deferred += other.deferred;
        self.next_due = other.next_due;
    }
}

/// A target that is down, as the relay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outage {
    /// When the first failed call of this outage was seen.
    pub since: DateTime<Utc>,
    /// Failed probes so far.
    pub failures: u32,
    pub last_error: String,
    /// How long the relay waits before its next probe.
    pub pause: Duration,
}

/// Moves events from a [`ClaimSource`] to a [`Publisher`].
#[derive(Debug)]
pub struct Relay<S, P> {
    source: S,
    publisher: P,
    config: RelayConfig,
    metrics: Arc<RelayMetrics>,
    outage: Mutex<Option<Outage>>,
}

/// Until when one batch may publish.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    /// The caller's deadline (not the lease) is the nearer one.
    callers: bool,
}

impl<S: ClaimSource, P: Publisher> Relay<S, P> {
    pub fn new(source: S, publisher: P, config: RelayConfig) -> Result<Self, StoreError> {
        config.validate()?;
        Ok(Self {
            source,
            publisher,
            config,
            metrics: Arc::default(),
            outage: Mutex::new(None),
        })
    }

    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The target's outage, while one lasts.
    pub fn outage(&self) -> Option<Outage> {
        self.outage.lock().map(|o| o.clone()).unwrap_or(None)
    }

    /// Hands back what the source holds for this relay (see
    /// [`ClaimSource::close`]). [`Relay::run`] does it when it stops.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.source.close().await
    }

    /// Runs until `shutdown` completes, then closes the source. The batch in
    /// flight finishes its current publish call; what it has not yet sent is
    /// released for the next relay, so a restart neither waits for a lease
    /// nor loses anything. A target that is down is probed with growing
    /// pauses for as long as it stays down; no event is dead-lettered for it.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<BatchReport, StoreError> {
        let result = self.serve(shutdown).await;
        if let Err(e) = self.close().await {
            tracing::warn!(error = %e, "relay: could not hand back the source; the next relay waits for its lease");
        }
        result
    }

    async fn serve(&self, shutdown: impl Future<Output = ()>) -> Result<BatchReport, StoreError> {
        let mut shutdown = Shutdown {
            signal: pin!(shutdown),
            fired: false,
        };
        let mut total = BatchReport::default();
        let mut store_failures = 0u32;
        let mut ahead = Ahead::default();
        loop {
            if shutdown.fired() {
                self.release_ahead(ahead).await;
                return Ok(total);
            }
            let outcome = self.next_batch(&mut ahead, None, Some(&mut shutdown)).await;
            let report = match outcome {
                Ok(report) => {
                    store_failures = 0;
                    report
                }
                Err(e) if e.is_retryable() || matches!(e, StoreError::Backend(_)) => {
                    // The store is down or busy: keep going, with growing pauses.
                    self.release_ahead(std::mem::take(&mut ahead)).await;
                    store_failures = store_failures.saturating_add(1);
                    let pause = self
                        .config
                        .idle_poll
                        .saturating_mul(2u32.saturating_pow(store_failures.min(5)))
                        .min(Duration::from_secs(10));
                    tracing::warn!(error = %e, retry_in = ?pause, "relay: store call failed");
                    tokio::select! {
                        biased;
                        () = shutdown.wait() => return Ok(total),
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
                Err(e) => {
                    self.release_ahead(ahead).await;
                    return Err(e);
                }
            };
            total.add(report);
            if let Some(outage) = self.outage().filter(|_| report.deferred > 0) {
                // The target is down: hand back what was claimed ahead, wait,
                // then probe it with a small claim.
                self.release_ahead(std::mem::take(&mut ahead)).await;
                tokio::select! {
                    biased;
                    () = shutdown.wait() => return Ok(total),
                    () = tokio::time::sleep(outage.pause) => continue,
                }
            }
            // A full batch means more is probably due: go again at once.
            if !ahead.may_hold_more() && report.claimed < self.config.batch_size {
                tokio::select! {
                    biased;
                    () = shutdown.wait() => return Ok(total),
                    () = self.source.wait_for_events(self.config.idle_poll) => {}
                }
            }
        }
    }

    /// Claims made ahead, at most this many at once, while a batch
    /// publishes: each claim's round trip and decoding then overlap the
    /// store's work on the next one and the publishing of the last.
    const CLAIMS_AHEAD: usize = 2;

    /// One claim-publish-settle cycle, taking the batch claimed ahead if
    /// there is one. While a full batch publishes, and when the source
    /// allows it, the next claims are made (see [`ClaimSource::claims_ahead`]).
    async fn next_batch<'a, F: Future<Output = ()> + ?Sized>(
        &'a self,
        ahead: &mut Ahead<'a, S::Receipt>,
        written_before: Option<DateTime<Utc>>,
        shutdown: Option<&mut Shutdown<'_, F>>,
    ) -> Result<BatchReport, StoreError> {
        let batch = match ahead.next().await {
            Some(batch) => batch?,
            None => self.claim_batch(None, written_before).await?,
        };
        if batch.claimed.is_empty() {
            return Ok(BatchReport {
                next_due: batch.claimed.next_due,
                ..BatchReport::default()
            });
        }
        let full = batch.claimed.len() >= self.config.batch_size;
        if full && self.source.claims_ahead() && self.outage().is_none() {
            while ahead.len() < Self::CLAIMS_AHEAD {
                ahead.push(Box::pin(self.claim_batch(None, written_before)));
            }
        }
        ahead
            .while_running(self.publish_batch(batch, None, shutdown))
            .await
    }

    /// Hands back the batches claimed ahead and not published: their events
    /// are due again at once, for this relay or another.
    async fn release_ahead(&self, mut ahead: Ahead<'_, S::Receipt>) {
        while let Some(batch) = ahead.next().await {
            let Ok(batch) = batch else { continue };
            let mut settlements = Settlements {
                released: batch
                    .claimed
                    .events
                    .into_iter()
                    .map(|c| c.receipt)
                    .collect(),
                ..Settlements::default()
            };
            settlements
                .released
                .extend(batch.claimed.malformed.into_iter().map(|m| m.receipt));
            if settlements.released.is_empty() {
                continue;
            }
            // Never counted as claimed, so not counted as released either.
            let released = settlements.released.len();
            if let Err(e) = self.source.settle(batch.claimed.lease, settlements).await {
                tracing::warn!(error = %e, released, "relay: could not release a batch claimed ahead; its events wait for its lease to end");
            }
        }
    }

    /// Publishes what was written when it started and is due, then returns;
    /// for scheduled relays (`outbox relay --once`, a Lambda on a timer).
    /// Writers that keep writing do not keep it going, and events that fail
    /// wait for their next attempt unless it comes while the drain runs. A target that is down ends it at once, with
    /// the events deferred (see [`Relay::outage`]).
    pub async fn drain(&self) -> Result<BatchReport, StoreError> {
        let started = Utc::now();
        let mut total = BatchReport::default();
        let mut ahead = Ahead::default();
        loop {
            let report = match self
                .next_batch(&mut ahead, Some(started), NO_SHUTDOWN)
                .await
            {
                Ok(report) => report,
                Err(e) => {
                    self.release_ahead(ahead).await;
                    return Err(e);
                }
            };
            total.add(report);
            if report.deferred > 0 {
                self.release_ahead(ahead).await;
                return Ok(total);
            }
            // An empty claim made ahead proves nothing: claim once more.
            if report.claimed == 0 && !ahead.may_hold_more() {
                return Ok(total);
            }
        }
    }

    /// Publishes everything that is or comes due before `deadline`, retries
    /// included, and returns in time: no publish call runs past `deadline`
    /// less the settle margin, and what was not sent by then is released.
    /// For a source whose events all fit one run, such as the records of one
    /// Lambda invocation.
    pub async fn drain_until(&self, deadline: Instant) -> Result<BatchReport, StoreError> {
        let mut total = BatchReport::default();
        let end = deadline
            .checked_sub(self.config.settle_margin)
            .unwrap_or(deadline);
        loop {
            if Instant::now() >= end {
                return Ok(total);
            }
            let report = self.run_batch(Some(deadline), None, NO_SHUTDOWN).await?;
            total.add(report);
            if report.deferred > 0 {
                return Ok(total);
            }
            if report.claimed == 0 {
                let Some(next) = report.next_due else {
                    return Ok(total);
                };
                let wake = time::instant_after(Instant::now(), time::until(Utc::now(), next));
                if wake >= end {
                    return Ok(total);
                }
                tokio::time::sleep_until(wake).await;
            }
        }
    }

    /// One claim-publish-settle cycle.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        self.run_batch(None, None, NO_SHUTDOWN).await
    }

    async fn run_batch<F: Future<Output = ()> + ?Sized>(
        &self,
        deadline: Option<Instant>,
        written_before: Option<DateTime<Utc>>,
        shutdown: Option<&mut Shutdown<'_, F>>,
    ) -> Result<BatchReport, StoreError> {
        let batch = self.claim_batch(deadline, written_before).await?;
        if batch.claimed.is_empty() {
            return Ok(BatchReport {
                next_due: batch.claimed.next_due,
                ..BatchReport::default()
            });
        }
        self.publish_batch(batch, deadline, shutdown).await
    }

    /// One claim, timed from before it was sent (the lease runs from then).
    async fn claim_batch(
        &self,
        deadline: Option<Instant>,
        written_before: Option<DateTime<Utc>>,
    ) -> Result<ClaimedBatch<S::Receipt>, StoreError> {
        let started = Instant::now();
        // While the target is down, a claim is only a probe: one call's worth.
        let limit = if self.outage().is_some() {
            self.publisher
                .max_batch_size()
                .clamp(1, self.config.batch_size)
        } else {
            self.config.batch_size
        };
        // Only a drain with a deadline waits for the next due event.
        let mut request =
            ClaimRequest::new(limit, self.config.lease).wants_next_due(deadline.is_some());
        if let Some(at) = written_before {
            request = request.written_before(at);
        }
        let claimed = self.source.claim(request).await.inspect_err(|_| {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        });
        self.metrics.claim_seconds.observe(started.elapsed());
        tracing::trace!(
            claim_us = started.elapsed().as_micros() as u64,
            "relay: claim"
        );
        Ok(ClaimedBatch {
            started,
            claimed: claimed?,
        })
    }

    /// Publishes a claimed batch and settles it.
    async fn publish_batch<F: Future<Output = ()> + ?Sized>(
        &self,
        batch: ClaimedBatch<S::Receipt>,
        deadline: Option<Instant>,
        mut shutdown: Option<&mut Shutdown<'_, F>>,
    ) -> Result<BatchReport, StoreError> {
        let ClaimedBatch { started, claimed } = batch;
        let count = claimed.len();
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .claimed
            .fetch_add(count as u64, Ordering::Relaxed);

        // The lease was taken at the store after `started`: measuring from
        // here keeps the relay on the safe side of it.
        let lease_end = time::instant_after(started, self.config.lease);
        let batch_deadline = match deadline {
            Some(at) if at < lease_end => Deadline { at, callers: true },
            _ => Deadline {
                at: lease_end,
                callers: false,
            },
        };
        let publish_by = batch_deadline
            .at
            .checked_sub(self.config.settle_margin)
            .unwrap_or(batch_deadline.at);

        let claimed_at = Instant::now();
        let mut settlements = Settlements::default();
        let malformed = claimed.malformed.len();
        for entry in claimed.malformed {
            tracing::warn!(receipt = ?entry.receipt, reason = %entry.reason, "relay: dead-lettering an entry that cannot be read");
            settlements
                .dead
                .push((entry.receipt, format!("malformed: {}", entry.reason)));
        }
        let mut lanes = Lanes::new(claimed.events);
        let max_batch = self.publisher.max_batch_size().max(1);
        let mut calls = FuturesUnordered::new();
        let mut stop_starting = false;
        let mut target_down: Option<PublishError> = None;
        // Whether the target answered any call of this batch.
        let mut answered = false;
        let mut deadline_hit = false;
        loop {
            while !stop_starting && calls.len() < self.config.publish_concurrency {
                if shutdown.as_mut().is_some_and(|s| s.fired()) || target_down.is_some() {
                    stop_starting = true;
                } else if Instant::now() >= publish_by {
                    deadline_hit = true;
                    stop_starting = true;
                }
                let ready = lanes.ready(max_batch);
                // With calls in flight, a part-filled call waits for them
                // (each answer frees more aggregates, and every call has a
                // fixed cost), unless the deepest aggregate is ready: it
                // sets how long the batch takes, so it never waits.
                let fill = calls.is_empty() || ready >= max_batch || lanes.deepest_is_ready();
                if stop_starting || ready == 0 || !fill {
                    break;
                }
                let (events, tickets) = lanes.take_heads(max_batch);
                calls.push(self.call(events, tickets, publish_by));
            }
            let Some((events, tickets, outcomes)) = calls.next().await else {
                break;
            };
            // One clock read per answered call, not per event.
            let answered_at = Utc::now();
            for ((event, (lane, attempts, receipt)), outcome) in
                events.iter().zip(tickets).zip(outcomes)
            {
                answered |= match &outcome {
                    Outcome::Sent(Ok(())) => true,
                    Outcome::Sent(Err(e)) => !e.is_target_failure(),
                    Outcome::Cut => false,
                };
                let failed = !matches!(outcome, Outcome::Sent(Ok(())));
                lanes.answered(lane, failed);
                if matches!(outcome, Outcome::Sent(Err(_))) {
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                }
                match outcome {
                    Outcome::Sent(Ok(())) => {
                        let waited = (answered_at - event.occurred_at)
                            .to_std()
                            .unwrap_or_default();
                        self.metrics.commit_to_publish_seconds.observe(waited);
                        settlements.published.push(receipt);
                    }
                    Outcome::Cut => {
                        // The deadline came first: not a failure of anything.
                        deadline_hit = true;
                        settlements.released.push(receipt);
                    }
                    Outcome::Sent(Err(error)) if error.is_target_failure() => {
                        settlements
                            .deferred
                            .push((receipt, answered_at, error.to_string()));
                        target_down.get_or_insert(error);
                    }
                    Outcome::Sent(Err(error)) => {
                        self.settle_failure(event, attempts, receipt, error, &mut settlements);
                    }
                }
            }
        }
        // Behind a failure, a shutdown, the deadline or an outage.
        settlements.released.extend(lanes.into_unsent());
        if deadline_hit && !batch_deadline.callers {
            tracing::warn!(
                released = settlements.released.len(),
                "relay: batch reached the end of its lease; releasing what was not sent (a longer lease or a smaller batch avoids this)"
            );
        }
        self.track_outage(target_down.as_ref(), answered, &mut settlements);

        let report = BatchReport {
            claimed: count,
            published: settlements.published.len(),
            retried: settlements.retry.len(),
            dead_lettered: settlements.dead.len(),
            malformed,
            released: settlements.released.len(),
            deferred: settlements.deferred.len(),
            next_due: None,
        };
        let m = &self.metrics;
        let published_at = Instant::now();
        let applied = self
            .source
            .settle(claimed.lease, settlements)
            .await
            .inspect_err(|_| {
                m.store_errors.fetch_add(1, Ordering::Relaxed);
            });
        m.settle_seconds.observe(published_at.elapsed());
        let applied = applied?;
        if applied < count as u64 {
            // Another relay took over after our lease ran out; it will publish
            // these again, which consumers absorb as duplicates.
            tracing::warn!(
                stale = count as u64 - applied,
                "relay: lease expired before settling"
            );
        }
        tracing::trace!(
            events = count,
            claim_us = (claimed_at - started).as_micros() as u64,
            publish_us = (published_at - claimed_at).as_micros() as u64,
            settle_us = published_at.elapsed().as_micros() as u64,
            "relay: batch"
        );
        // Counted once recorded, so the totals match the store.
        m.published
            .fetch_add(report.published as u64, Ordering::Relaxed);
        m.retried
            .fetch_add(report.retried as u64, Ordering::Relaxed);
        m.dead_lettered
            .fetch_add(report.dead_lettered as u64, Ordering::Relaxed);
        m.malformed.fetch_add(malformed as u64, Ordering::Relaxed);
        m.released
            .fetch_add(report.released as u64, Ordering::Relaxed);
        m.deferred
            .fetch_add(report.deferred as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Starts, extends or ends the target's outage after a batch, and dates
    /// the deferred events to the next probe.
    fn track_outage(
        &self,
        failure: Option<&PublishError>,
        answered: bool,
        settlements: &mut Settlements<S::Receipt>,
    ) {
        let Ok(mut outage) = self.outage.lock() else {
            return;
        };
        match failure {
            Some(error) => {
                let failures = outage.as_ref().map_or(0, |o| o.failures).saturating_add(1);
                let pause = self
                    .config
                    .retry
                    .backoff(failures)
                    .min(self.config.max_outage_pause);
                let since = outage.as_ref().map_or_else(Utc::now, |o| o.since);
                if outage.is_none() {
                    self.metrics.outages.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(%error, failures, probe_in = ?pause, "relay: target unavailable; its events wait, no attempt counted");
                let retry_at = time::add(Utc::now(), pause);
                for (_, at, _) in &mut settlements.deferred {
                    *at = retry_at;
                }
                *outage = Some(Outage {
                    since,
                    failures,
                    last_error: error.to_string(),
                    pause,
                });
            }
            None if answered => {
                if let Some(ended) = outage.take() {
                    let lasted = time::until(ended.since, Utc::now());
                    tracing::info!(lasted = ?lasted, "relay: target available again");
                }
            }
            None => {}
        }
    }

    fn settle_failure(
        &self,
        event: &Event,
        attempts: u32,
        receipt: S::Receipt,
        error: PublishError,
        settlements: &mut Settlements<S::Receipt>,
    ) {
        let attempts = attempts.saturating_add(1);
        let id = event.id;
        match error.disposition() {
            Disposition::Permanent => {
                tracing::warn!(%id, %error, "relay: permanent failure, dead-lettering");
                settlements
                    .dead
                    .push((receipt, format!("permanent: {error}")));
            }
            _ if self.config.retry.exhausted(attempts) => {
                tracing::warn!(%id, %error, attempts, "relay: out of attempts, dead-lettering");
                settlements.dead.push((
                    receipt,
                    format!("gave up after {attempts} attempts: {error}"),
                ));
            }
            disposition => {
                let delay = match disposition {
                    // The target knows best when it can take more; only an
                    // absurd answer is bounded.
                    Disposition::RetryAfter(after) => after.min(time::MAX_RETRY_DELAY),
                    _ => self.config.retry.backoff(attempts),
                };
                let at = time::add(Utc::now(), delay);
                tracing::debug!(%id, %error, attempts, ?delay, "relay: transient failure");
                settlements.retry.push((receipt, at, error.to_string()));
            }
        }
    }

    /// One call, owning its events, answered with them and their tickets.
    async fn call<T>(
        &self,
        events: Vec<Event>,
        tickets: Vec<T>,
        publish_by: Instant,
    ) -> (Vec<Event>, Vec<T>, Vec<Outcome>) {
        let outcomes = self.publish_call(&events, publish_by).await;
        (events, tickets, outcomes)
    }

    /// One publish call, bounded by the publish timeout and the deadline,
    /// always answering one outcome per event.
    async fn publish_call(&self, events: &[Event], publish_by: Instant) -> Vec<Outcome> {
        let now = Instant::now();
        let left = publish_by.saturating_duration_since(now);
        if left.is_zero() {
            return events.iter().map(|_| Outcome::Cut).collect();
        }
        let timeout = self.config.publish_timeout;
        let call = self.publisher.publish(PublishRequest::new(events));
        let answer = tokio::time::timeout(timeout.min(left), call).await;
        self.metrics.publish_seconds.observe(now.elapsed());
        let mut results = match answer {
            Ok(results) => results,
            Err(_) if left < timeout => return events.iter().map(|_| Outcome::Cut).collect(),
            Err(_) => vec![
                Err(PublishError::unavailable(format!(
                    "publish call timed out after {timeout:?}"
                )));
                events.len()
            ],
        };
        if results.len() != events.len() {
            let msg = format!(
                "publisher returned {} results for {} events",
                results.len(),
                events.len()
            );
            results.resize_with(events.len(), || Err(PublishError::transient(msg.clone())));
        }
        results.into_iter().map(Outcome::Sent).collect()
    }
}

/// A claim and when it was sent.
struct ClaimedBatch<R> {
    started: Instant,
    claimed: Claimed<R>,
}

type ClaimFuture<'a, R> =
    Pin<Box<dyn Future<Output = Result<ClaimedBatch<R>, StoreError>> + Send + 'a>>;

/// Claims made ahead of the batch publishing: those under way, and those
/// that came back, in the order they were made.
struct Ahead<'a, R> {
    claiming: FuturesOrdered<ClaimFuture<'a, R>>,
    claimed: VecDeque<Result<ClaimedBatch<R>, StoreError>>,
    /// The last batch handed out was claimed ahead: made while earlier
    /// batches held their aggregates, so what it lacks may be due by now.
    last_was_ahead: bool,
}

impl<R> Default for Ahead<'_, R> {
    fn default() -> Self {
        Self {
            claiming: FuturesOrdered::new(),
            claimed: VecDeque::new(),
            last_was_ahead: false,
        }
    }
}

impl<'a, R> Ahead<'a, R> {
    fn len(&self) -> usize {
        self.claiming.len() + self.claimed.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, claim: ClaimFuture<'a, R>) {
        self.claiming.push_back(claim);
    }

    /// The oldest claim made ahead, once it came back.
    async fn next(&mut self) -> Option<Result<ClaimedBatch<R>, StoreError>> {
        let batch = match self.claimed.pop_front() {
            Some(batch) => Some(batch),
            None => self.claiming.next().await,
        };
        self.last_was_ahead = batch.is_some();
        batch
    }

    /// Whether a claim made now could find more than the last batch said:
    /// claims are still under way, or the last batch was claimed ahead.
    fn may_hold_more(&self) -> bool {
        !self.is_empty() || self.last_was_ahead
    }

    /// Runs `work` to its end while the claims under way go on.
    async fn while_running<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                Some(batch) = self.claiming.next(), if !self.claiming.is_empty() => {
                    self.claimed.push_back(batch);
                }
            }
        }
    }
}

/// What became of one event handed to a publish call.
#[derive(Debug)]
enum Outcome {
    Sent(PublishResult),
    /// The call was not made, or abandoned, because the deadline came.
    Cut,
}

/// A claim as one queue per aggregate, in order of first appearance. A call
/// takes at most the head of each aggregate whose previous event is
/// confirmed: no call carries two events of one aggregate, and an
/// aggregate's next event goes out as soon as its previous one is confirmed,
/// without waiting for other aggregates' calls.
struct Lanes<R> {
    lanes: Vec<Lane<R>>,
}

struct Lane<R> {
    queue: VecDeque<ClaimedEvent<R>>,
    /// Its head is being published.
    busy: bool,
    /// Something failed: the rest waits for a later claim.
    blocked: bool,
}

impl<R> Lane<R> {
    fn ready(&self) -> bool {
        !self.busy && !self.blocked && !self.queue.is_empty()
    }
}

/// What settling an event needs: its lane, attempts so far and receipt.
type Ticket<R> = (usize, u32, R);

impl<R> Lanes<R> {
    fn new(events: Vec<ClaimedEvent<R>>) -> Self {
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut lanes: Vec<Lane<R>> = Vec::new();
        for claimed in events {
            let key = (
                claimed.event.aggregate_type.clone(),
                claimed.event.aggregate_id.clone(),
            );
            let next = lanes.len();
            let lane = *index.entry(key).or_insert(next);
            if lane == next {
                lanes.push(Lane {
                    queue: VecDeque::new(),
                    busy: false,
                    blocked: false,
                });
            }
            lanes[lane].queue.push_back(claimed);
        }
        Self { lanes }
    }

    /// How many aggregates could go into a call now, up to `max`.
    fn ready(&self, max: usize) -> usize {
        self.lanes.iter().filter(|l| l.ready()).take(max).count()
    }

    /// Whether an aggregate with the most events left (sent or not) can
    /// go now.
    fn deepest_is_ready(&self) -> bool {
        let left = |l: &Lane<R>| l.queue.len() + usize::from(l.busy);
        let deepest = self
            .lanes
            .iter()
            .filter(|l| !l.blocked)
            .map(left)
            .max()
            .unwrap_or(0);
        self.lanes
            .iter()
            .any(|l| l.ready() && l.queue.len() == deepest)
    }

    /// The heads of up to `max` ready aggregates: those with the most events
    /// left first (they set how long the batch takes), then the earliest.
    fn take_heads(&mut self, max: usize) -> (Vec<Event>, Vec<Ticket<R>>) {
        let mut order: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| self.lanes[i].ready())
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.lanes[i].queue.len()));
        let mut events = Vec::new();
        let mut tickets = Vec::new();
        for i in order.into_iter().take(max) {
            let lane = &mut self.lanes[i];
            if let Some(head) = lane.queue.pop_front() {
                lane.busy = true;
                tickets.push((i, head.attempts, head.receipt));
                events.push(head.event);
            }
        }
        (events, tickets)
    }

    fn answered(&mut self, lane: usize, failed: bool) {
        if let Some(lane) = self.lanes.get_mut(lane) {
            lane.busy = false;
            lane.blocked |= failed;
        }
    }

    /// Receipts of everything not sent.
    fn into_unsent(self) -> impl Iterator<Item = R> {
        self.lanes
            .into_iter()
            .flat_map(|l| l.queue.into_iter().map(|c| c.receipt))
    }
}

/// The caller's shutdown future, asked "has it fired?" without waiting, as
/// often as needed: a completed future must never be polled again.
struct Shutdown<'a, F: ?Sized> {
    signal: Pin<&'a mut F>,
    fired: bool,
}

impl<F: Future<Output = ()> + ?Sized> Shutdown<'_, F> {
    fn fired(&mut self) -> bool {
        if !self.fired {
            self.fired = is_ready(self.signal.as_mut());
        }
        self.fired
    }

    async fn wait(&mut self) {
        if !self.fired {
            self.signal.as_mut().await;
            self.fired = true;
        }
    }
}

const NO_SHUTDOWN: Option<&mut Shutdown<'static, std::future::Pending<()>>> = None;

/// Whether a future has completed, without waiting for it.
fn is_ready<F: Future<Output = ()> + ?Sized>(fut: Pin<&mut F>) -> bool {
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    fut.poll(&mut cx).is_ready()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(agg: &str, version: u64) -> ClaimedEvent<u64> {
        ClaimedEvent::new(
            Event::builder("Order", agg, version, "E").build().unwrap(),
            0,
            version,
        )
    }

    #[test]
    fn a_call_takes_one_head_per_aggregate_and_the_next_after_an_answer() {
        let mut lanes = Lanes::new(vec![
            claimed("a", 1),
            claimed("b", 1),
            claimed("a", 2),
            claimed("a", 3),
            claimed("b", 2),
            claimed("c", 7),
        ]);
        let versions = |events: &[Event]| -> Vec<(String, u64)> {
            events
                .iter()
                .map(|e| (e.aggregate_id.clone(), e.aggregate_version))
                .collect()
        };
        let (first, tickets) = lanes.take_heads(10);
        assert_eq!(
            versions(&first),
            vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 7)]
        );
        // Nothing more until an answer comes.
        assert_eq!(lanes.ready(10), 0);
        // `a` confirmed, `b` failed: only `a` goes on, `b` waits.
        lanes.answered(tickets[0].0, false);
        lanes.answered(tickets[1].0, true);
        let (second, _) = lanes.take_heads(10);
        assert_eq!(versions(&second), vec![("a".into(), 2)]);
        let unsent: Vec<u64> = lanes.into_unsent().collect();
        assert_eq!(unsent, vec![3, 2]);
    }

    #[test]
    fn config_is_validated() {
        assert!(RelayConfig::default().validate().is_ok());
        assert!(RelayConfig::default().batch_size(0).validate().is_err());
        let slow = RelayConfig::default()
            .lease(Duration::from_secs(1))
            .publish_timeout(Duration::from_secs(2));
        assert!(slow.validate().is_err());
        for absurd in [
            RelayConfig::default().lease(Duration::MAX),
            RelayConfig::default().idle_poll(Duration::MAX),
            RelayConfig::default().publish_timeout(Duration::MAX),
            RelayConfig::default().max_outage_pause(Duration::MAX),
            RelayConfig::default().retry(RetryPolicy {
                max_delay: Duration::MAX,
                ..RetryPolicy::default()
            }),
        ] {
            let error = absurd.validate().unwrap_err().to_string();
            assert!(
                error.contains("too long") || error.contains("lease"),
                "{error}"
            );
        }
    }
}
