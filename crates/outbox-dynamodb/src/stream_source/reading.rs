//! Reading records from the shards into the buffer.

use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::shards::{read_error, ReadError};
use super::*;

impl StreamSource {
    /// One round of reads over the shards that may be read now.
    pub(super) async fn read_shards(&self) -> Result<usize, StoreError> {
        let arn = self.stream_arn().await?;
        let refresh = {
            let state = lock(&self.inner.state);
            state
                .listed_at
                .is_none_or(|at| at.elapsed() >= self.inner.config.shard_refresh)
        };
        if refresh {
            self.list_shards(&arn).await?;
        }
        let readable: Vec<String> = {
            let state = lock(&self.inner.state);
            let now = Instant::now();
            state
                .shards
                .iter()
                .filter(|(_, sh)| !sh.exhausted && sh.next_read_at <= now)
                .filter(|(_, sh)| {
                    sh.parent
                        .as_ref()
                        .and_then(|p| state.shards.get(p))
                        .is_none_or(|p| p.finished)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut added = 0;
        let mut first_error = None;
        for shard in readable {
            if lock(&self.inner.state).buffer.len() >= self.inner.config.buffer_limit {
                break;
            }
            match self.read_shard(&arn, &shard).await {
                Ok(n) => added += n,
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "stream source: reading a shard failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.update_finished();
        self.flush_checkpoints().await?;
        match first_error {
            Some(e) if added == 0 => Err(e),
            _ => Ok(added),
        }
    }

    pub(super) async fn read_shard(&self, arn: &str, shard: &str) -> Result<usize, StoreError> {
        let iterator = lock(&self.inner.state)
            .shards
            .get(shard)
            .and_then(|s| s.iterator.clone());
        let iterator = match iterator {
            Some(it) => it,
            None => match self.shard_iterator(arn, shard).await? {
                Some(it) => it,
                None => return Ok(0),
            },
        };
        let room = {
            let state = lock(&self.inner.state);
            self.inner
                .config
                .buffer_limit
                .saturating_sub(state.buffer.len())
        };
        let limit = i32::try_from(room)
            .unwrap_or(GET_RECORDS_MAX)
            .clamp(1, GET_RECORDS_MAX);
        let out = self
            .inner
            .streams
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let kind = read_error(e.code(), e.message());
                if let Some(sh) = lock(&self.inner.state).shards.get_mut(shard) {
                    sh.iterator = None;
                }
                match kind {
                    ReadError::Trimmed => {
                        tracing::error!(%shard, error = %e, "stream source: records were trimmed \
                            before they were read; they are LOST to this relay. Recording the loss \
                            and continuing at TRIM_HORIZON");
                        self.note_gap(shard);
                        return Ok(0);
                    }
                    // A fresh iterator is taken on the next read.
                    ReadError::Expired => return Ok(0),
                    ReadError::Other => return Err(outbox_aws::store_error("GetRecords", e)),
                }
            }
        };
        let records = out.records.unwrap_or_default();
        let got_records = !records.is_empty();
        let first = records
            .first()
            .and_then(|r| r.dynamodb())
            .and_then(|d| d.sequence_number());
        self.record_gap(shard, first).await?;
        let mut added = 0;
        for record in &records {
            let decoded = decode_streams_record(record);
            let seq = match &decoded {
                Ok(r) => Some(r.sequence_number.clone()),
                Err(e) => e.sequence_number.clone(),
            };
            let already = {
                let state = lock(&self.inner.state);
                let last = state.shards.get(shard).and_then(|s| s.last_read.clone());
                matches!((&seq, last), (Some(seq), Some(last)) if !seq_after(seq, &last))
            };
            if already {
                continue;
            }
            let events = match decoded {
                Ok(r) => match r.change {
                    Change::Events(item) => item.events,
                    Change::Ignored { reason } => {
                        tracing::debug!(%shard, seq = %r.sequence_number, %reason, "stream source: record ignored");
                        Vec::new()
                    }
                },
                Err(e) => {
                    tracing::error!(%shard, error = %e, "stream source: malformed record dead-lettered");
                    let key = seq
                        .clone()
                        .or_else(|| record.event_id().map(str::to_owned))
                        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                    let item = crate::dead_letters::malformed_item(
                        shard,
                        &key,
                        &raw::record_json(record).to_string(),
                        &e.reason,
                    );
                    let stored = self.put_dead_letters(vec![item]).await;
                    if let Err(err) = stored {
                        // Resume after the last record taken, to try it again.
                        let mut state = lock(&self.inner.state);
                        if let Some(sh) = state.shards.get_mut(shard) {
                            sh.iterator = None;
                        }
                        return Err(err);
                    }
                    Vec::new()
                }
            };
            // When the stream dates the change. DynamoDB Local rounds it to
            // the minute: a minute's slack keeps a drain from passing over
            // what was written just before it began.
            let written = record
                .dynamodb()
                .and_then(|d| d.approximate_creation_date_time())
                .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), 0))
                .map(|t| outbox_core::time::sub(t, std::time::Duration::from_secs(60)));
            let mut state = lock(&self.inner.state);
            let Some(sh) = state.shards.get_mut(shard) else {
                return Ok(added);
            };
            let Some(seq) = seq else {
                continue;
            };
            sh.last_read = Some(seq.clone());
            added += events.len();
            self.inner
                .events_read
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            state.buffer.push_record(shard, &seq, events, written);
        }
        let mut state = lock(&self.inner.state);
        if let Some(sh) = state.shards.get_mut(shard) {
            match out.next_shard_iterator {
                Some(next) => sh.iterator = Some(next),
                None => {
                    sh.iterator = None;
                    sh.exhausted = true;
                    // Its children can be listed now.
                    state.listed_at = None;
                }
            }
        }
        if let Some(sh) = state.shards.get_mut(shard) {
            sh.next_read_at = if got_records {
                Instant::now()
            } else {
                later(self.inner.config.poll_interval)
            };
        }
        Ok(added)
    }

    /// Writes the loss record of a trimmed range, if one is pending, before
    /// anything after it is read (so the checkpoint cannot pass it first).
    async fn record_gap(&self, shard: &str, before: Option<&str>) -> Result<(), StoreError> {
        let Some(after) = lock(&self.inner.state)
            .shards
            .get(shard)
            .and_then(|sh| sh.gap_after.clone())
        else {
            return Ok(());
        };
        let item = crate::dead_letters::lost_item(
            shard,
            &after,
            before,
            "records trimmed by the stream's retention before this relay read them",
        );
        if let Err(e) = self.put_dead_letters(vec![item]).await {
            if let Some(sh) = lock(&self.inner.state).shards.get_mut(shard) {
                sh.iterator = None;
            }
            return Err(e);
        }
        tracing::error!(%shard, %after, before = ?before, "stream source: loss recorded in the dead-letter table");
        if let Some(sh) = lock(&self.inner.state).shards.get_mut(shard) {
            sh.gap_after = None;
        }
        Ok(())
    }
}
