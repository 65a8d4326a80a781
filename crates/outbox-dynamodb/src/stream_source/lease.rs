//! The relay lease: one process reads a stream per consumer.

use super::*;

impl StreamSource {
    /// Takes or renews the lease; false when another process holds it and
    /// the source is told to wait.
    pub(super) async fn ensure_lease(&self) -> Result<bool, StoreError> {
        let c = &self.inner.config;
        let ttl_ms = i64::try_from(c.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let held_until = lock(&self.inner.state).lease_until_ms;
        if held_until.is_some_and(|until| until.saturating_sub(now) > ttl_ms / 3 * 2) {
            return Ok(true);
        }
        let out = self
            .inner
            .dynamodb
            .put_item()
            .table_name(&c.checkpoint_table)
            .item(CONSUMER, s(&c.consumer))
            .item(SHARD, s(LEASE_KEY))
            .item(OWNER, s(&self.inner.owner))
            .item(
                EXPIRES_AT,
                AttributeValue::N(now.saturating_add(ttl_ms).to_string()),
            )
            .item(UPDATED_AT, AttributeValue::N(now.to_string()))
            .condition_expression("attribute_not_exists(#c) OR #o = :me OR #e < :now")
            .expression_attribute_names("#c", CONSUMER)
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#e", EXPIRES_AT)
            .expression_attribute_values(":me", s(&self.inner.owner))
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match out {
            Ok(out) => {
                // Who held the lease before this put: if it was this process
                // all along, nobody read or settled in between, even when a
                // long batch let the lease lapse or the source was closed and
                // opened again (a release keeps the owner), and the buffer
                // stays valid.
                let held_by_other = out
                    .attributes()
                    .and_then(|old| old.get(OWNER))
                    .is_some_and(|owner| *owner != s(&self.inner.owner));
                let mut state = lock(&self.inner.state);
                if held_by_other {
                    // Another process held the stream meanwhile and may have
                    // settled records: start again from the checkpoints.
                    tracing::warn!("stream source: lease was taken over meanwhile; re-reading from checkpoints");
                    *state = State::default();
                }
                state.lease_until_ms = Some(now.saturating_add(ttl_ms));
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                let lost = {
                    let mut state = lock(&self.inner.state);
                    let lost = state.lease_until_ms.is_some();
                    *state = State::default();
                    lost
                };
                if lost {
                    tracing::error!(table = %c.outbox_table, consumer = %c.consumer,
                        "stream source: lease lost to another process; buffer dropped");
                }
                if c.wait_for_lease {
                    return Ok(false);
                }
                Err(StoreError::Conflict(format!(
                    "another relay holds the stream of table {} for consumer `{}` (lease item in {}); \
                     run one relay per consumer, or wait until its lease ({:?}) runs out",
                    c.outbox_table, c.consumer, c.checkpoint_table, c.lease_ttl
                )))
            }
            Err(e) => Err(outbox_aws::store_error("PutItem", e)),
        }
    }
}
