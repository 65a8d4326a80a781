-- The outbox: events written in the business transaction, read by the relay.
CREATE TABLE IF NOT EXISTS outbox (
    position          INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    aggregate_type    TEXT    NOT NULL,
    aggregate_id      TEXT    NOT NULL,
    aggregate_version INTEGER NOT NULL,
    event_type        TEXT    NOT NULL,
    payload           TEXT    NOT NULL,
    occurred_at       TEXT    NOT NULL,
    traceparent       TEXT,
    correlation_id    TEXT,
    causation_id      TEXT,
    status            TEXT    NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'published', 'dead')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    -- Unix milliseconds before which no relay may take the event: the retry
    -- backoff after a failure, or the end of a relay's lease while claimed.
    next_attempt_at   INTEGER NOT NULL,
    lease_id          TEXT,
    last_error        TEXT,
    created_at        INTEGER NOT NULL,
    published_at      INTEGER,
    -- Two writers appending the same version of an aggregate: one must fail.
    UNIQUE (aggregate_type, aggregate_id, aggregate_version)
);

-- The relay scans pending events in write order...
CREATE INDEX IF NOT EXISTS outbox_pending
    ON outbox (position) WHERE status = 'pending';
-- ...and skips aggregates whose earlier event is held (backing off or claimed).
CREATE INDEX IF NOT EXISTS outbox_pending_held
    ON outbox (aggregate_type, aggregate_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_published
    ON outbox (published_at) WHERE status = 'published';
CREATE INDEX IF NOT EXISTS outbox_dead
    ON outbox (position) WHERE status = 'dead';

-- The inbox: event ids a consumer has processed, recorded in its transaction.
CREATE TABLE IF NOT EXISTS inbox (
    consumer     TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
