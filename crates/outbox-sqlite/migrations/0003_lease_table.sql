-- A claim leases its events with one row of `outbox_leases` instead of
-- rewriting every claimed row (and its index entries) twice, once to lease
-- it and once to settle it.
--
-- Before: a claim set each event's `lease_id` and pushed its
-- `next_attempt_at` to the lease's end, so the index of every pending event
-- by aggregate (`outbox_pending_held`) was rewritten at each claim and at
-- each settlement. Now:
--
-- - A claim writes one row: its lease, when it ends, and the aggregates of
--   the events it took. A later claim skips those aggregates until the
--   lease is settled (the row is deleted) or has ended (the row is dropped
--   by the next claim). A relay whose lease ended finds no row when it
--   settles, and settles nothing.
-- - Appended events are due at once: `next_attempt_at = 0`. Only a backoff,
--   a deferral or a replay sets it later, so the index of events that hold
--   their aggregate back (`outbox_held`) holds those few, not every pending
--   event.

CREATE TABLE IF NOT EXISTS outbox_leases (
    lease_id   TEXT    PRIMARY KEY,
    -- Unix milliseconds.
    expires_at INTEGER NOT NULL,
    -- The claimed events' aggregates: a JSON array of keys, each
    -- `quote(aggregate_type) || quote(aggregate_id)` (unambiguous, and
    -- defined for any cell, a BLOB too).
    aggregates TEXT    NOT NULL
) WITHOUT ROWID;

-- Events leased row by row by a relay of the previous version keep their
-- `next_attempt_at` (the lease's end) and hold their aggregate until then.
UPDATE outbox SET next_attempt_at = 0
WHERE status = 'pending' AND next_attempt_at <= created_at;

DROP INDEX IF EXISTS outbox_pending_held;
CREATE INDEX IF NOT EXISTS outbox_held
    ON outbox (aggregate_type, aggregate_id, next_attempt_at)
    WHERE status = 'pending' AND next_attempt_at > 0;

-- A relay of the previous version, still running, would lease rows beside
-- the new leases: it stops with this error instead.
CREATE TRIGGER IF NOT EXISTS outbox_row_leases_retired
BEFORE UPDATE OF lease_id ON outbox WHEN NEW.lease_id IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'outbox: this relay leases rows one by one, as outbox-sqlite did before schema version 3; upgrade it');
END;
