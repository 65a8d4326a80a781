//! The relay engine: claim due events, publish them in per-aggregate order,
//! settle each one's fate (published, retry later, dead-letter, release).

use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::stream::{self, StreamExt};

use crate::error::{Disposition, PublishError, StoreError};
use crate::event::Event;
use crate::publish::{PublishRequest, PublishResult, Publisher};
use crate::retry::RetryPolicy;
use crate::source::{ClaimRequest, ClaimSource, ClaimedEvent, Settlements};

/// How a relay batches, waits and retries.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most events claimed at once.
    pub batch_size: usize,
    /// How long claimed events stay reserved; must outlast a batch's publishing.
    pub lease: Duration,
    /// Longest sleep when nothing is due (commit notifications wake earlier).
    pub idle_poll: Duration,
    /// Longest wait for one publish call; a call that takes longer counts as
    /// a transient failure of all its entries.
    pub publish_timeout: Duration,
    /// Publish calls in flight at once within one wave.
    pub publish_concurrency: usize,
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
        if self.lease <= self.publish_timeout {
            return bad("lease must be longer than publish_timeout, or a slow publish would let another relay take the same events");
        }
        self.retry.validate().or_else(|m| bad(&m))
    }
}

/// Running totals of one relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    pub batches: AtomicU64,
    pub claimed: AtomicU64,
    pub published: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub released: AtomicU64,
    pub store_errors: AtomicU64,
}

/// What one claim-publish-settle cycle did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub claimed: usize,
    pub published: usize,
    pub retried: usize,
    pub dead_lettered: usize,
    pub released: usize,
}

impl BatchReport {
    fn add(&mut self, other: BatchReport) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.released += other.released;
    }
}

/// Moves events from a [`ClaimSource`] to a [`Publisher`].
#[derive(Debug)]
pub struct Relay<S, P> {
    source: S,
    publisher: P,
    config: RelayConfig,
    metrics: Arc<RelayMetrics>,
}

impl<S: ClaimSource, P: Publisher> Relay<S, P> {
    pub fn new(source: S, publisher: P, config: RelayConfig) -> Result<Self, StoreError> {
        config.validate()?;
        Ok(Self {
            source,
            publisher,
            config,
            metrics: Arc::default(),
        })
    }

    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Runs until `shutdown` completes. The batch in flight then finishes its
    /// current publish call; what it has not yet sent is released for the next
    /// relay, so a restart neither waits for a lease nor loses anything.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<BatchReport, StoreError> {
        let mut shutdown = Shutdown {
            signal: pin!(shutdown),
            fired: false,
        };
        let mut total = BatchReport::default();
        let mut store_failures = 0u32;
        loop {
            if shutdown.fired() {
                return Ok(total);
            }
            let report = match self.run_batch(Some(&mut shutdown)).await {
                Ok(report) => {
                    store_failures = 0;
                    report
                }
                Err(e) if e.is_retryable() || matches!(e, StoreError::Backend(_)) => {
                    // The store is down or busy: keep going, with growing pauses.
                    store_failures = store_failures.saturating_add(1);
                    let pause = self.config.idle_poll * 2u32.saturating_pow(store_failures.min(5));
                    tracing::warn!(error = %e, retry_in = ?pause, "relay: store call failed");
                    tokio::select! {
                        biased;
                        () = shutdown.wait() => return Ok(total),
                        () = tokio::time::sleep(pause.min(Duration::from_secs(10))) => continue,
                    }
                }
                Err(e) => return Err(e),
            };
            total.add(report);
            // A full batch means more is probably due: go again at once.
            if report.claimed < self.config.batch_size {
                tokio::select! {
                    biased;
                    () = shutdown.wait() => return Ok(total),
                    () = self.source.wait_for_events(self.config.idle_poll) => {}
                }
            }
        }
    }

    /// Claims and processes batches until nothing is due; for scheduled relays.
    pub async fn drain(&self) -> Result<BatchReport, StoreError> {
        let mut total = BatchReport::default();
        loop {
            let report = self.run_batch(NO_SHUTDOWN).await?;
            total.add(report);
            if report.claimed == 0 {
                return Ok(total);
            }
        }
    }

    /// One claim-publish-settle cycle.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        self.run_batch(NO_SHUTDOWN).await
    }

    async fn run_batch<F: Future<Output = ()> + ?Sized>(
        &self,
        mut shutdown: Option<&mut Shutdown<'_, F>>,
    ) -> Result<BatchReport, StoreError> {
        let started = tokio::time::Instant::now();
        let claimed = self
            .source
            .claim(ClaimRequest::new(self.config.batch_size, self.config.lease))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        let count = claimed.events.len();
        if count == 0 {
            return Ok(BatchReport::default());
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .claimed
            .fetch_add(count as u64, Ordering::Relaxed);

        let claimed_at = tokio::time::Instant::now();
        let mut settlements = Settlements::default();
        let (aggregates, waves) = into_waves(claimed.events);
        // Aggregates with a failure in this batch: their later events wait.
        let mut blocked = vec![false; aggregates];
        let mut stopping = false;
        for wave in waves {
            stopping = stopping || shutdown.as_mut().is_some_and(|s| s.fired());
            let (send, held): (Vec<_>, Vec<_>) = wave
                .into_iter()
                .partition(|(aggregate, _)| !stopping && !blocked[*aggregate]);
            settlements
                .released
                .extend(held.into_iter().map(|(_, c)| c.receipt));
            if send.is_empty() {
                continue;
            }
            // The events go to the publisher by reference; what settling
            // needs stays beside them.
            let (events, tickets): (Vec<Event>, Vec<_>) = send
                .into_iter()
                .map(|(aggregate, c)| (c.event, (aggregate, c.attempts, c.receipt)))
                .unzip();
            let results = self.publish_wave(&events).await;
            for ((event, (aggregate, attempts, receipt)), result) in
                events.iter().zip(tickets).zip(results)
            {
                match result {
                    Ok(()) => settlements.published.push(receipt),
                    Err(error) => {
                        blocked[aggregate] = true;
                        self.settle_failure(event, attempts, receipt, error, &mut settlements);
                    }
                }
            }
        }

        let report = BatchReport {
            claimed: count,
            published: settlements.published.len(),
            retried: settlements.retry.len(),
            dead_lettered: settlements.dead.len(),
            released: settlements.released.len(),
        };
        let m = &self.metrics;
        let published_at = tokio::time::Instant::now();
        let applied = self
            .source
            .settle(claimed.lease, settlements)
            .await
            .inspect_err(|_| {
                m.store_errors.fetch_add(1, Ordering::Relaxed);
            })?;
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
        m.released
            .fetch_add(report.released as u64, Ordering::Relaxed);
        Ok(report)
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
                    // The target knows best when it can take more.
                    Disposition::RetryAfter(after) => after,
                    _ => self.config.retry.backoff(attempts),
                };
                let at =
                    Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                tracing::debug!(%id, %error, attempts, ?delay, "relay: transient failure");
                settlements.retry.push((receipt, at, error.to_string()));
            }
        }
    }

    /// Publishes one wave (at most one event per aggregate) in calls of the
    /// publisher's batch size, several calls at once.
    async fn publish_wave(&self, events: &[Event]) -> Vec<PublishResult> {
        let chunk = self.publisher.max_batch_size().max(1);
        // Futures collected first: a closure in the stream would make the
        // relay's future lose `Send` (rust-lang/rust#102211).
        let calls: Vec<_> = events
            .chunks(chunk)
            .map(|events| self.publish_call(events))
            .collect();
        stream::iter(calls)
            .buffered(self.config.publish_concurrency)
            .flat_map(stream::iter)
            .collect()
            .await
    }

    /// One publish call, bounded by the publish timeout, always answering
    /// one result per event.
    async fn publish_call(&self, events: &[Event]) -> Vec<PublishResult> {
        let call = self.publisher.publish(PublishRequest::new(events));
        let mut results = match tokio::time::timeout(self.config.publish_timeout, call).await {
            Ok(results) => results,
            Err(_) => vec![Err(PublishError::transient("publish timed out")); events.len()],
        };
        if results.len() != events.len() {
            let msg = format!(
                "publisher returned {} results for {} events",
                results.len(),
                events.len()
            );
            results.resize_with(events.len(), || Err(PublishError::transient(msg.clone())));
        }
        results
    }
}

/// Splits a claim into waves: wave k holds the k-th claimed event of every
/// aggregate, so no publish call carries two events of one aggregate and an
/// aggregate's next event is only sent once its previous one is confirmed.
/// Each event comes with its aggregate's number, below the returned count.
type Waves<R> = Vec<Vec<(usize, ClaimedEvent<R>)>>;

fn into_waves<R>(events: Vec<ClaimedEvent<R>>) -> (usize, Waves<R>) {
    // Per aggregate: its number and the wave its next event goes to.
    let mut seen: HashMap<(String, String), (usize, usize)> = HashMap::new();
    let mut waves: Waves<R> = Vec::new();
    for claimed in events {
        let next = seen.len();
        let key = (
            claimed.event.aggregate_type.clone(),
            claimed.event.aggregate_id.clone(),
        );
        let (aggregate, slot) = seen.entry(key).or_insert((next, 0));
        if waves.len() <= *slot {
            waves.push(Vec::new());
        }
        waves[*slot].push((*aggregate, claimed));
        *slot += 1;
    }
    (seen.len(), waves)
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
        ClaimedEvent {
            event: Event::builder("Order", agg, version, "E").build().unwrap(),
            attempts: 0,
            receipt: version,
        }
    }

    #[test]
    fn waves_hold_one_event_per_aggregate_in_order() {
        let (aggregates, waves) = into_waves(vec![
            claimed("a", 1),
            claimed("b", 1),
            claimed("a", 2),
            claimed("a", 3),
            claimed("b", 2),
            claimed("c", 7),
        ]);
        let shape: Vec<Vec<(String, u64)>> = waves
            .iter()
            .map(|w| {
                w.iter()
                    .map(|(_, c)| (c.event.aggregate_id.clone(), c.event.aggregate_version))
                    .collect()
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 7)],
                vec![("a".into(), 2), ("b".into(), 2)],
                vec![("a".into(), 3)],
            ]
        );
        assert_eq!(aggregates, 3);
    }

    #[test]
    fn config_is_validated() {
        assert!(RelayConfig::default().validate().is_ok());
        assert!(RelayConfig::default().batch_size(0).validate().is_err());
        let slow = RelayConfig::default()
            .lease(Duration::from_secs(1))
            .publish_timeout(Duration::from_secs(2));
        assert!(slow.validate().is_err());
    }
}
