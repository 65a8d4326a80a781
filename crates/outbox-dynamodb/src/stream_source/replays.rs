//! Replayed dead letters, read back from the dead-letter table.

use super::*;

impl StreamSource {
    pub(super) async fn poll_replays(&self, limit: usize) -> Result<(), StoreError> {
        let due = {
            let state = lock(&self.inner.state);
            state
                .replays_polled_at
                .is_none_or(|at| at.elapsed() >= self.inner.config.poll_interval)
        };
        if !due {
            return Ok(());
        }
        lock(&self.inner.state).replays_polled_at = Some(Instant::now());
        let replays = self.inner.dead_letters.take_replays(limit.max(1)).await?;
        let mut state = lock(&self.inner.state);
        for event in replays {
            if !state.replays_to_finish.contains(&event.id)
                && !state.buffer.is_replay_buffered(&event.id)
            {
                state.buffer.push_replay(event);
            }
        }
        Ok(())
    }

    pub(super) async fn finish_replays(&self, mut ids: Vec<EventId>) {
        ids.append(&mut lock(&self.inner.state).replays_to_finish);
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.inner.dead_letters.finish_replays(&ids).await {
            tracing::warn!(error = %e, "stream source: replay items not removed yet; retrying later");
            lock(&self.inner.state).replays_to_finish.extend(ids);
        }
    }
}
