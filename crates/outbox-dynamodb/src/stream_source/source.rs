//! The stream source under the core relay: claims, settlements, stats.

use super::*;

impl ClaimSource for StreamSource {
    type Receipt = StreamReceipt;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<StreamReceipt>, StoreError> {
        if !self.ensure_lease().await? {
            return Ok(Claimed::empty(LeaseId::new()));
        }
        // Another clone reading already fills the same buffer.
        let read = match self.inner.reading.try_lock() {
            Ok(_reading) => self.read_shards().await.map(|_| ()),
            Err(_) => Ok(()),
        };
        let replays = self.poll_replays(request.limit).await;
        let mut state = lock(&self.inner.state);
        let window = Window {
            due_by: request.due_cutoff(Utc::now()),
            written_before: request.written_before.unwrap_or(DateTime::<Utc>::MAX_UTC),
        };
        let claimed = state.buffer.claim(request.limit, request.lease, window);
        if claimed.events.is_empty() {
            read?;
            replays?;
        } else if let Err(e) = read.and(replays) {
            tracing::warn!(error = %e, "stream source: reading failed; serving the buffer");
        }
        Ok(claimed)
    }

    async fn settle(
        &self,
        lease: LeaseId,
        settlements: Settlements<StreamReceipt>,
    ) -> Result<u64, StoreError> {
        let mut applied = Applied::default();
        let dead_rows = {
            let mut state = lock(&self.inner.state);
            let b = &mut state.buffer;
            b.published(lease, &settlements.published, &mut applied);
            b.retry(lease, &settlements.retry, &mut applied);
            b.defer(lease, &settlements.deferred, &mut applied);
            b.release(lease, &settlements.released, &mut applied);
            b.dead_rows(lease, &settlements.dead)
        };
        if !dead_rows.is_empty() {
            // Stored before they leave the buffer, so none is lost; if this
            // fails they stay claimed until the lease ends, then run again.
            let items = dead_rows
                .iter()
                .map(|(event, attempts, error)| {
                    crate::dead_letters::event_item(event, *attempts, error)
                })
                .collect::<Result<Vec<_>, _>>()?;
            match self.put_dead_letters(items).await {
                Ok(()) => {
                    let dead: Vec<_> = settlements.dead.iter().map(|(r, _)| *r).collect();
                    lock(&self.inner.state)
                        .buffer
                        .dead(lease, &dead, &mut applied);
                }
                Err(StoreError::Conflict(_)) => {
                    // Another relay owns these records now: nothing more to settle.
                    return Ok(applied.count);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream source: dead letters not stored; they run again");
                }
            }
        }
        self.finish_replays(std::mem::take(&mut applied.finished_replays))
            .await;
        self.update_finished();
        if let Err(e) = self.flush_checkpoints().await {
            // The outcome is recorded in memory; the checkpoint follows on
            // the next write, and a restart meanwhile only re-publishes.
            tracing::warn!(error = %e, "stream source: checkpoint not written yet");
        }
        Ok(applied.count)
    }

    /// Writes the checkpoints and hands the stream lease back.
    async fn close(&self) -> Result<(), StoreError> {
        self.release().await
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let until = outbox_core::time::instant_after(tokio::time::Instant::now(), max_wait);
        loop {
            if lock(&self.inner.state).buffer.has_due() {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(25))).await;
        }
    }
}

impl Stats for StreamSource {
    /// `pending` counts events read and not settled plus replays waiting;
    /// `published` counts this process's publications. The stream's backlog
    /// beyond the buffer shows in CloudWatch as `IteratorAge`.
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let dead = self.inner.dead_letters.count_dead().await?
            + self.inner.dead_letters.count_malformed().await?;
        let lost = self.inner.dead_letters.count_lost().await?;
        let replays = self.inner.dead_letters.count_replays().await?;
        let state = lock(&self.inner.state);
        let unfinished = state.replays_to_finish.len() as u64;
        let mut stats = OutboxStats::default();
        stats.pending = state.buffer.stream_pending() + replays.saturating_sub(unfinished);
        stats.published = state.buffer.published;
        stats.dead = dead;
        stats.lost = lost;
        stats.oldest_pending_at = state.buffer.oldest_pending_at();
        stats.last_error = state.buffer.last_error();
        Ok(stats)
    }
}

impl DeadLetters for StreamSource {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters.dead_letters(limit).await
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.inner.dead_letters.replay(which).await
    }

    /// Gives dead events up for good (the stream shape does not park
    /// aggregates, so this only clears them from the listing).
    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.inner.dead_letters.skip(which).await
    }
}

impl Purge for StreamSource {
    /// Nothing to purge: DynamoDB drops stream records after 24 hours, and
    /// each aggregate's outbox item holds its latest transaction, which the
    /// next write's version condition needs.
    async fn purge_published(&self, _before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(0)
    }
}
