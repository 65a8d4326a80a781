-- Publishing an event changes one row of the small queue and nothing
-- indexed in the outbox; a claim writes one row, to an unlogged table.
--
-- Before: each event row was written twice (the lease at claim, then the
-- outcome), the second time not in place, with every index of the outbox
-- updated. Now:
--
-- - `outbox_queue` holds the events still to publish (and the dead letters),
--   with what claims need: the position, a hash of the aggregate, the
--   version, when it was written and when it is due again. Publishing deletes
--   its row.
-- - `outbox` keeps every event and its status, but is indexed on `position`
--   and `id` only, so marking an event published is an in-place (HOT) update
--   (`fillfactor = 50` leaves room on each page for it).
-- - `outbox_leases` holds one row per claim: its positions and their
--   aggregates, and when it ends. It is UNLOGGED: a lease is not worth a WAL
--   write, and a crash (which ends every relay's connection too) simply
--   forgets the leases, so the events are claimed again: at-least-once, as
--   after a relay crash.

CREATE TABLE {schema}.outbox_queue (
    position          BIGINT      PRIMARY KEY,
    -- A hash of (aggregate_type, aggregate_id). Two aggregates sharing one
    -- only wait for each other; they are never reordered.
    aggregate_key     BIGINT      NOT NULL,
    aggregate_version BIGINT      NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    -- NULL: due since it was written. Otherwise due at this time (a retry's
    -- backoff, a deferral while the target is down, a replay).
    next_attempt_at   TIMESTAMPTZ,
    dead              BOOLEAN     NOT NULL DEFAULT false
);
-- What can hold an aggregate back: events not due yet, and dead letters. Small.
CREATE INDEX outbox_queue_held ON {schema}.outbox_queue (aggregate_key, aggregate_version)
    WHERE next_attempt_at IS NOT NULL OR dead;

CREATE FUNCTION {schema}.outbox_aggregate_key(p_type TEXT, p_id TEXT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtextextended(length(p_type) || ':' || p_type || p_id, 0) $$;

CREATE UNLOGGED TABLE {schema}.outbox_leases (
    lease_id       UUID        PRIMARY KEY,
    expires_at     TIMESTAMPTZ NOT NULL,
    -- The claimed positions not yet settled, and their aggregate keys.
    positions      BIGINT[]    NOT NULL,
    aggregate_keys BIGINT[]    NOT NULL
);

-- Every row written to the outbox (by `append` or by hand) joins the queue.
CREATE FUNCTION {schema}.outbox_enqueue() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version, created_at, dead)
    SELECT a.position, {schema}.outbox_aggregate_key(a.aggregate_type, a.aggregate_id),
           a.aggregate_version, a.created_at, a.status = 'dead'
    FROM added AS a WHERE a.status <> 'published';
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_enqueue AFTER INSERT ON {schema}.outbox
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION {schema}.outbox_enqueue();

-- The events of existing outboxes; a lease taken by a relay of the previous
-- version holds its aggregate until it ends.
INSERT INTO {schema}.outbox_queue
SELECT position, {schema}.outbox_aggregate_key(aggregate_type, aggregate_id), aggregate_version,
       created_at, CASE WHEN next_attempt_at > created_at THEN next_attempt_at END, status = 'dead'
FROM {schema}.outbox
WHERE status = 'pending' OR (status = 'dead' AND skipped_at IS NULL);

DROP INDEX {schema}.outbox_pending;
DROP INDEX {schema}.outbox_pending_by_aggregate;
DROP INDEX {schema}.outbox_dead;
DROP INDEX {schema}.outbox_published;
ALTER TABLE {schema}.outbox DROP COLUMN next_attempt_at, DROP COLUMN lease_id;
ALTER TABLE {schema}.outbox SET (fillfactor = 50);
-- The time of the insert, not of the transaction's start: an aggregate's
-- later versions are then never written "before" its earlier ones, which a
-- drain's `written_before` relies on.
ALTER TABLE {schema}.outbox ALTER COLUMN created_at SET DEFAULT clock_timestamp();

-- Relays of the previous version stop with an error instead of claiming
-- beside the new ones.
DROP FUNCTION {schema}.outbox_claim(INTEGER, UUID, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ, BOOLEAN);
DROP FUNCTION {schema}.outbox_settle(UUID, BIGINT[], SMALLINT[], TIMESTAMPTZ[], TEXT[], BOOLEAN);

-- Waking relays. A NOTIFY makes its transaction's commit take a lock that
-- every other notifying commit waits for, disk flush included: with a
-- notification per append, writers of one database commit one at a time
-- (a few hundred per second on one disk). So appends notify only while a
-- relay sleeps: relays that found work recently poll instead (see
-- `wait_for_events`) and set `armed` when they go to sleep; a claim that
-- finds events clears it.
CREATE UNLOGGED TABLE {schema}.outbox_wake (armed BOOLEAN NOT NULL);
INSERT INTO {schema}.outbox_wake VALUES (true);

-- Leases up to p_limit due events that nothing holds back: no earlier event
-- of their aggregate is leased to a relay, not due yet or (with p_park)
-- dead. Claims take the advisory lock of 0002, so each one sees the leases
-- of every earlier claim: two relays never hold parts of one aggregate.
-- A lease that ended is dropped first; its relay's settlements then apply
-- to nothing.
CREATE FUNCTION {schema}.outbox_claim_v3(
    p_limit INTEGER, p_lease UUID, p_until TIMESTAMPTZ, p_cutoff TIMESTAMPTZ,
    p_written_before TIMESTAMPTZ, p_park BOOLEAN)
RETURNS SETOF {schema}.outbox
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    picked_positions BIGINT[];
    picked_keys BIGINT[];
BEGIN
    PERFORM pg_advisory_xact_lock({schema}.outbox_lock_key());
    -- Each statement of a VOLATILE function takes a new snapshot: this one
    -- sees every claim and settlement committed while we waited for the lock.
    DELETE FROM {schema}.outbox_leases WHERE expires_at <= p_cutoff;
    WITH leased AS (
        SELECT DISTINCT u.k FROM {schema}.outbox_leases AS l, unnest(l.aggregate_keys) AS u(k)
    ), held AS (
        SELECT h.aggregate_key AS k, min(h.aggregate_version) AS v
        FROM {schema}.outbox_queue AS h
        WHERE (h.next_attempt_at IS NOT NULL OR h.dead)
          AND (h.next_attempt_at > p_cutoff OR (p_park AND h.dead))
        GROUP BY 1
    ), picked AS (
        SELECT q.position, q.aggregate_key FROM {schema}.outbox_queue AS q
        WHERE NOT q.dead AND coalesce(q.next_attempt_at, q.created_at) <= p_cutoff
          AND (p_written_before IS NULL OR q.created_at <= p_written_before)
          -- NOT IN over a subquery is a hash lookup in the scan's filter, so
          -- the scan stays in position order and stops at the limit.
          AND q.aggregate_key NOT IN (SELECT leased.k FROM leased)
          AND (q.aggregate_key NOT IN (SELECT held.k FROM held)
               OR q.aggregate_version <= (SELECT held.v FROM held WHERE held.k = q.aggregate_key))
        -- Writers of an aggregate are serialized, so its positions grow with
        -- its versions: a limit in position order keeps each prefix whole.
        ORDER BY q.position
        LIMIT p_limit
    )
    SELECT array_agg(position), array_agg(aggregate_key) INTO picked_positions, picked_keys
    FROM picked;
    IF picked_positions IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO {schema}.outbox_leases VALUES (p_lease, p_until, picked_positions, picked_keys);
    -- A relay is busy: appends need not notify (see `outbox_wake` below).
    UPDATE {schema}.outbox_wake SET armed = false WHERE armed;
    RETURN QUERY SELECT o.* FROM {schema}.outbox AS o WHERE o.position = ANY(picked_positions);
END $$;

-- Applies a relay's settlements to the events its lease still holds, and
-- takes them out of the lease. Kinds: 1 published, 2 released, 3 retry,
-- 4 dead, 5 deferred. The lease's row lock orders this against a claim
-- dropping the lease: either the settlement lands first, or it finds no
-- lease and applies nothing.
--
-- With p_sync off the transaction commits without waiting for its WAL
-- flush. A crash may then lose the last settlements: those events are
-- published again (at-least-once, as when a relay dies before settling),
-- a retry or dead letter is attempted again.
CREATE FUNCTION {schema}.outbox_settle_v3(
    p_lease UUID, p_positions BIGINT[], p_kinds SMALLINT[], p_ats TIMESTAMPTZ[],
    p_errors TEXT[], p_sync BOOLEAN)
RETURNS BIGINT
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    held BIGINT[];
    rest_positions BIGINT[];
    rest_keys BIGINT[];
    applied BIGINT;
BEGIN
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT l.positions INTO held FROM {schema}.outbox_leases AS l
    WHERE l.lease_id = p_lease FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH s AS (
        SELECT * FROM unnest(p_positions, p_kinds, p_ats, p_errors) AS s(pos, kind, at, err)
        WHERE s.pos IN (SELECT unnest(held))
    ), sent AS (
        DELETE FROM {schema}.outbox_queue AS q USING s
        WHERE q.position = s.pos AND s.kind = 1 AND NOT q.dead
        RETURNING q.position
    ), kept AS (
        UPDATE {schema}.outbox_queue AS q SET
            next_attempt_at = CASE WHEN s.kind IN (3, 5) THEN s.at END,
            dead = (s.kind = 4)
        FROM s WHERE q.position = s.pos AND s.kind <> 1 AND NOT q.dead
        RETURNING q.position
    )
    UPDATE {schema}.outbox AS o SET
        status = CASE s.kind WHEN 1 THEN 'published' WHEN 4 THEN 'dead' ELSE 'pending' END,
        published_at = CASE WHEN s.kind = 1 THEN s.at ELSE o.published_at END,
        attempts = o.attempts + CASE WHEN s.kind IN (3, 4) THEN 1 ELSE 0 END,
        last_error = CASE WHEN s.kind IN (3, 4, 5) THEN s.err ELSE o.last_error END
    FROM s, (SELECT position FROM sent UNION ALL SELECT position FROM kept) AS c
    WHERE o.position = s.pos AND c.position = s.pos;
    GET DIAGNOSTICS applied = ROW_COUNT;
    SELECT array_agg(u.p), array_agg(u.k) INTO rest_positions, rest_keys
    FROM {schema}.outbox_leases AS l, unnest(l.positions, l.aggregate_keys) AS u(p, k)
    WHERE l.lease_id = p_lease AND u.p NOT IN (SELECT unnest(p_positions));
    IF rest_positions IS NULL THEN
        DELETE FROM {schema}.outbox_leases WHERE lease_id = p_lease;
    ELSE
        UPDATE {schema}.outbox_leases
        SET positions = rest_positions, aggregate_keys = rest_keys
        WHERE lease_id = p_lease;
    END IF;
    RETURN applied;
END $$;


-- At commit (deferred), once per transaction: read `armed` as late as
-- possible, so a relay going to sleep only has to look again once the
-- commits under way have landed.
CREATE FUNCTION {schema}.outbox_wake() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('outbox_woken.{schema_name}', true) IS DISTINCT FROM 'y' THEN
        PERFORM set_config('outbox_woken.{schema_name}', 'y', true);
        IF (SELECT bool_or(armed) FROM {schema}.outbox_wake) THEN
            PERFORM pg_notify('{schema_name}_outbox', '');
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER outbox_wake AFTER INSERT ON {schema}.outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.outbox_wake();
