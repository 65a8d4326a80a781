-- Dead letters an operator gave up on (`outbox dead-letters skip`): kept for
-- the record, no longer listed, counted or holding back their aggregate.
ALTER TABLE outbox ADD COLUMN skipped_at INTEGER;

-- With the park policy, a claim looks for an earlier dead letter of the
-- same aggregate.
CREATE INDEX IF NOT EXISTS outbox_dead_by_aggregate
    ON outbox (aggregate_type, aggregate_id, position)
    WHERE status = 'dead' AND skipped_at IS NULL;
