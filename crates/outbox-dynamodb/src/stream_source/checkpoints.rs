//! Durable checkpoints: per shard, the last record of the settled prefix.

use super::*;

impl StreamSource {
    pub(super) async fn load_checkpoints(
        &self,
    ) -> Result<HashMap<String, (Option<String>, bool)>, StoreError> {
        let c = &self.inner.config;
        let mut found = HashMap::new();
        let mut start = None;
        loop {
            let out = self
                .inner
                .dynamodb
                .query()
                .table_name(&c.checkpoint_table)
                .key_condition_expression("#c = :c")
                .expression_attribute_names("#c", CONSUMER)
                .expression_attribute_values(":c", s(&c.consumer))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("Query", e))?;
            for item in out.items() {
                let Some(shard) = item.get(SHARD).and_then(|v| v.as_s().ok()) else {
                    continue;
                };
                if shard == LEASE_KEY {
                    continue;
                }
                let seq = item
                    .get(SEQUENCE_NUMBER)
                    .and_then(|v| v.as_s().ok())
                    .cloned();
                let finished = item
                    .get(FINISHED)
                    .and_then(|v| v.as_bool().ok())
                    .copied()
                    .unwrap_or(false);
                found.insert(shard.clone(), (seq, finished));
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(found),
            }
        }
    }

    /// Marks exhausted shards whose records are all settled as finished.
    pub(super) fn update_finished(&self) {
        let mut state = lock(&self.inner.state);
        let State {
            shards,
            buffer,
            finished_unwritten,
            ..
        } = &mut *state;
        for (id, sh) in shards.iter_mut() {
            if sh.exhausted && !sh.finished && buffer.logs.get(id).is_none_or(|l| l.is_settled()) {
                sh.finished = true;
                finished_unwritten.push(id.clone());
            }
        }
    }

    /// Writes advanced checkpoints and finished shards, on the condition
    /// that this process still holds the lease.
    pub(super) async fn flush_checkpoints(&self) -> Result<(), StoreError> {
        let (mut updates, finished): (Vec<CheckpointUpdate>, Vec<String>) = {
            let mut state = lock(&self.inner.state);
            let advanced: Vec<_> = state.buffer.advanced.drain().collect();
            let finished = std::mem::take(&mut state.finished_unwritten);
            (
                advanced
                    .into_iter()
                    .map(|(id, seq)| (id, Some(seq), false))
                    .collect(),
                finished,
            )
        };
        for id in &finished {
            match updates.iter_mut().find(|u| &u.0 == id) {
                Some(u) => u.2 = true,
                None => updates.push((id.clone(), None, true)),
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        let c = &self.inner.config;
        for (n, chunk) in updates.chunks(CHECKPOINTS_PER_TRANSACTION).enumerate() {
            let check = self.fence()?;
            let mut request = self
                .inner
                .dynamodb
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().condition_check(check).build());
            for (shard, seq, finished) in chunk {
                let mut expression = "SET #u = :u".to_owned();
                let mut update = Update::builder()
                    .table_name(&c.checkpoint_table)
                    .key(CONSUMER, s(&c.consumer))
                    .key(SHARD, s(shard))
                    .expression_attribute_names("#u", UPDATED_AT)
                    .expression_attribute_values(":u", AttributeValue::N(now_ms().to_string()));
                if let Some(seq) = seq {
                    expression.push_str(", #s = :s");
                    update = update
                        .expression_attribute_names("#s", SEQUENCE_NUMBER)
                        .expression_attribute_values(":s", s(seq));
                }
                if *finished {
                    expression.push_str(", #f = :f");
                    update = update
                        .expression_attribute_names("#f", FINISHED)
                        .expression_attribute_values(":f", AttributeValue::Bool(true));
                }
                let update = update
                    .update_expression(expression)
                    .build()
                    .map_err(config_error)?;
                request =
                    request.transact_items(TransactWriteItem::builder().update(update).build());
            }
            if let Err(e) = request.send().await {
                let lost = e
                    .as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception());
                if lost {
                    let mut state = lock(&self.inner.state);
                    *state = State::default();
                    return Err(StoreError::Conflict(format!(
                        "the stream lease of consumer `{}` was taken by another process; \
                         checkpoints not written, buffer dropped",
                        c.consumer
                    )));
                }
                // Keep what was not written for the next flush.
                let mut state = lock(&self.inner.state);
                for (shard, seq, finished) in
                    updates.into_iter().skip(n * CHECKPOINTS_PER_TRANSACTION)
                {
                    if let Some(seq) = seq {
                        state.buffer.advanced.entry(shard.clone()).or_insert(seq);
                    }
                    if finished {
                        state.finished_unwritten.push(shard);
                    }
                }
                return Err(outbox_aws::store_error("TransactWriteItems", e));
            }
        }
        Ok(())
    }

    /// The check every durable write of this relay carries: it still holds
    /// the stream's lease.
    pub(super) fn fence(&self) -> Result<ConditionCheck, StoreError> {
        let c = &self.inner.config;
        ConditionCheck::builder()
            .table_name(&c.checkpoint_table)
            .key(CONSUMER, s(&c.consumer))
            .key(SHARD, s(LEASE_KEY))
            .condition_expression("#o = :me")
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_values(":me", s(&self.inner.owner))
            .build()
            .map_err(config_error)
    }

    /// Writes dead-letter items fenced by the lease. A relay that lost the
    /// stream writes nothing, drops its buffer and gets `Conflict`.
    pub(super) async fn put_dead_letters(
        &self,
        items: Vec<HashMap<String, AttributeValue>>,
    ) -> Result<(), StoreError> {
        let fence = self.fence()?;
        if self.inner.dead_letters.put_fenced(items, &fence).await? {
            return Ok(());
        }
        *lock(&self.inner.state) = State::default();
        let c = &self.inner.config;
        tracing::error!(consumer = %c.consumer, "stream source: lease lost; dead letters not written, buffer dropped");
        Err(StoreError::Conflict(format!(
            "the stream lease of consumer `{}` was taken by another process; dead letters not written",
            c.consumer
        )))
    }
}
