-- `{schema}` is replaced by the configured schema name, quoted.

-- One row per aggregate: every append updates it under a version condition,
-- so writers of one aggregate are serialized inside their transactions and
-- commit in version order, even under READ COMMITTED.
CREATE TABLE {schema}.outbox_aggregates (
    aggregate_type TEXT   NOT NULL,
    aggregate_id   TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    -- The first version of the latest append (the condition's operand).
    first_version  BIGINT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The outbox. Text columns are kept as text (not uuid, not jsonb) so that a
-- row edited by hand into something unreadable is reported and
-- dead-lettered alone instead of failing a whole claim; the payload is kept
-- exactly as written.
CREATE TABLE {schema}.outbox (
    position          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT        NOT NULL,
    aggregate_type    TEXT        NOT NULL,
    aggregate_id      TEXT        NOT NULL,
    aggregate_version BIGINT      NOT NULL,
    event_type        TEXT        NOT NULL,
    payload           TEXT        NOT NULL,
    occurred_at       TIMESTAMPTZ NOT NULL,
    traceparent       TEXT,
    correlation_id    TEXT,
    causation_id      TEXT,
    status            TEXT        NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'published', 'dead')),
    attempts          INTEGER     NOT NULL DEFAULT 0,
    -- Before this no relay may take the event: the retry backoff after a
    -- failure, or the end of a relay's lease while claimed.
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_id          UUID,
    last_error        TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at      TIMESTAMPTZ,
    -- A dead letter an operator gave up on: kept, no longer listed or parking.
    skipped_at        TIMESTAMPTZ
) WITH (fillfactor = 85); -- room for the claim's in-place (HOT) update

-- No index covers next_attempt_at or lease_id, so leasing a row is a HOT update.
CREATE UNIQUE INDEX outbox_id ON {schema}.outbox (id);
-- Claims scan pending events in write order...
CREATE INDEX outbox_pending ON {schema}.outbox (position) WHERE status = 'pending';
-- ...and look at the earlier pending events of the same aggregate.
CREATE INDEX outbox_pending_by_aggregate
    ON {schema}.outbox (aggregate_type, aggregate_id, aggregate_version) WHERE status = 'pending';
CREATE INDEX outbox_dead
    ON {schema}.outbox (aggregate_type, aggregate_id, aggregate_version)
    WHERE status = 'dead' AND skipped_at IS NULL;
CREATE INDEX outbox_published ON {schema}.outbox (published_at) WHERE status = 'published';

-- The inbox: event ids a consumer has processed, recorded in its transaction.
CREATE TABLE {schema}.inbox (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
