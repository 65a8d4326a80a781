//! Finding the stream and its shards, and iterators into them.

use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::*;

impl StreamSource {
    pub(super) async fn stream_arn(&self) -> Result<String, StoreError> {
        if let Some(arn) = lock(&self.inner.state).stream_arn.clone() {
            return Ok(arn);
        }
        let table = &self.inner.config.outbox_table;
        let out = self
            .inner
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("DescribeTable", e))?;
        let arn = out
            .table()
            .and_then(|t| t.latest_stream_arn())
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "table {table} has no stream: enable one with view type NEW_IMAGE"
                ))
            })?
            .to_owned();
        lock(&self.inner.state).stream_arn = Some(arn.clone());
        Ok(arn)
    }

    /// Lists the stream's shards and loads the checkpoints of new ones.
    pub(super) async fn list_shards(&self, arn: &str) -> Result<(), StoreError> {
        let mut listed = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .inner
                .streams
                .describe_stream()
                .stream_arn(arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("DescribeStream", e))?;
            let Some(desc) = out.stream_description else {
                break;
            };
            for shard in desc.shards() {
                if let Some(id) = shard.shard_id() {
                    let closed = shard
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some();
                    listed.push((
                        id.to_owned(),
                        shard.parent_shard_id().map(str::to_owned),
                        closed,
                    ));
                }
            }
            match desc.last_evaluated_shard_id {
                Some(id) if Some(&id) != start.as_ref() => start = Some(id),
                _ => break,
            }
        }
        let checkpoints = self.load_checkpoints().await?;
        let mut state = lock(&self.inner.state);
        let first_listing = state.listed_at.is_none();
        for (id, parent, closed) in listed {
            if state.shards.contains_key(&id) {
                continue;
            }
            let (checkpoint, finished) = checkpoints.get(&id).cloned().unwrap_or((None, false));
            let latest = first_listing && self.inner.config.start_at == StartAt::Latest;
            let skip = latest && checkpoint.is_none() && closed;
            let start = if latest {
                ShardIteratorType::Latest
            } else {
                ShardIteratorType::TrimHorizon
            };
            state.shards.insert(
                id,
                Shard {
                    parent,
                    iterator: None,
                    last_read: checkpoint,
                    start,
                    exhausted: finished || skip,
                    finished: finished || skip,
                    next_read_at: Instant::now(),
                    gap_after: None,
                },
            );
        }
        state.listed_at = Some(Instant::now());
        Ok(())
    }

    pub(super) async fn shard_iterator(
        &self,
        arn: &str,
        shard: &str,
    ) -> Result<Option<String>, StoreError> {
        let (after, start) = {
            let state = lock(&self.inner.state);
            let Some(sh) = state.shards.get(shard) else {
                return Ok(None);
            };
            (sh.last_read.clone(), sh.start.clone())
        };
        let request = |kind: ShardIteratorType, after: Option<String>| {
            self.inner
                .streams
                .get_shard_iterator()
                .stream_arn(arn)
                .shard_id(shard)
                .shard_iterator_type(kind)
                .set_sequence_number(after)
                .send()
        };
        let out = match after {
            Some(seq) => request(ShardIteratorType::AfterSequenceNumber, Some(seq)).await,
            None => request(start, None).await,
        };
        let out = match out {
            Err(e) if read_error(e.code(), e.message()) == ReadError::Trimmed => {
                tracing::error!(%shard, error = %e, "stream source: the checkpoint is older than \
                    the stream's 24-hour retention; records in between are LOST to this relay. \
                    Recording the loss and continuing at TRIM_HORIZON");
                self.note_gap(shard);
                request(ShardIteratorType::TrimHorizon, None).await
            }
            other => other,
        };
        match out {
            Ok(o) => Ok(o.shard_iterator),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                tracing::warn!(%shard, "stream source: shard is gone from the stream");
                let mut state = lock(&self.inner.state);
                if let Some(sh) = state.shards.get_mut(shard) {
                    sh.exhausted = true;
                }
                Ok(None)
            }
            Err(e) => Err(outbox_aws::store_error("GetShardIterator", e)),
        }
    }

    /// Notes that the records after the last one read (or the checkpoint)
    /// are gone; the next read records the loss.
    pub(super) fn note_gap(&self, shard: &str) {
        let mut state = lock(&self.inner.state);
        if let Some(sh) = state.shards.get_mut(shard) {
            if let Some(after) = sh.last_read.take() {
                sh.gap_after.get_or_insert(after);
            }
            sh.start = ShardIteratorType::TrimHorizon;
            sh.iterator = None;
        }
    }
}

/// What a failed stream read means for the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadError {
    /// The records asked for are past the stream's retention: lost.
    Trimmed,
    /// The iterator is too old; take a fresh one, nothing is lost.
    Expired,
    Other,
}

/// Sorts a Streams API error by its code and message.
///
/// AWS answers a checkpoint older than the retention with
/// `TrimmedDataAccessException`. DynamoDB Local answers a sequence number
/// the shard no longer (or never) holds with `ValidationException: Invalid
/// SequenceNumber for the shard`; either way the checkpoint cannot be
/// resumed, and failing every read would stop the shard for good, so it is
/// treated as a loss: recorded, counted, and reading goes on from
/// TRIM_HORIZON.
pub(super) fn read_error(code: Option<&str>, message: Option<&str>) -> ReadError {
    match code {
        Some("TrimmedDataAccessException") => ReadError::Trimmed,
        Some("ValidationException")
            if message.is_some_and(|m| m.contains("Invalid SequenceNumber")) =>
        {
            ReadError::Trimmed
        }
        Some("ExpiredIteratorException") => ReadError::Expired,
        _ => ReadError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_reads_are_losses_and_expired_ones_are_not() {
        let trimmed = read_error(Some("TrimmedDataAccessException"), None);
        assert_eq!(trimmed, ReadError::Trimmed);
        // What DynamoDB Local answers for a sequence number older than the shard.
        let local = read_error(
            Some("ValidationException"),
            Some("Invalid SequenceNumber for the shard"),
        );
        assert_eq!(local, ReadError::Trimmed);
        let malformed_request = read_error(
            Some("ValidationException"),
            Some("Member must have length greater than or equal to 21"),
        );
        assert_eq!(malformed_request, ReadError::Other);
        let expired = read_error(Some("ExpiredIteratorException"), None);
        assert_eq!(expired, ReadError::Expired);
        assert_eq!(
            read_error(Some("ThrottlingException"), None),
            ReadError::Other
        );
        assert_eq!(read_error(None, None), ReadError::Other);
    }
}
