-- Schema version 5: publishing deletes a queue row and writes nothing else
-- per event; every hot statement does its work by key whatever the
-- planner's statistics say; rows written by hand follow the append's
-- rules; no stored value can stop a relay.
--
-- - `outbox` rows are never updated once written (but to mark a dead
--   letter skipped): an event's delivery state lives in `outbox_queue`
--   while it is pending and in `outbox_dead` once it is dead. An event in
--   neither is published; `outbox_events` shows each event with its status.
-- - `outbox_published` keeps one row per settlement that published events
--   (when, and their positions), which is what retention purges by.
-- - The hot functions run with sequential scans, hash and merge joins and
--   sorts turned off (`SET` on the function): an estimate taken when a
--   table was empty (a routine ANALYZE, autovacuum) can no longer turn a
--   lookup by key into a walk over a whole table. The claim and the
--   settlement also keep one generic plan per statement
--   (`plan_cache_mode`): the planner otherwise judged the read's generic
--   plan (both of its branches) dearer than a custom one, and planned it
--   anew on every claim, 0.8 ms of a 1.9 ms claim of one event. Each statement was
--   written so that its only plan without them is the one by key; the
--   test `plans.rs` checks the plans of every call.

-- Relays of version 4 stop with a clear error instead of claiming beside
-- the new ones. Their leases stay in `outbox_leases` and hold their
-- aggregates until they end; their events are then claimed again.
CREATE OR REPLACE FUNCTION {schema}.outbox_claim_v3(
    p_limit INTEGER, p_lease UUID, p_until TIMESTAMPTZ, p_cutoff TIMESTAMPTZ,
    p_written_before TIMESTAMPTZ, p_park BOOLEAN)
RETURNS SETOF {schema}.outbox
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'OB426', MESSAGE =
        'the outbox schema {schema_name} was upgraded to version 5; this relay is older: upgrade it (outbox-postgres 0.1 with schema version 5 or later)';
END $$;
CREATE OR REPLACE FUNCTION {schema}.outbox_settle_v3(
    p_lease UUID, p_positions BIGINT[], p_kinds SMALLINT[], p_ats TIMESTAMPTZ[],
    p_errors TEXT[], p_sync BOOLEAN)
RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'OB426', MESSAGE =
        'the outbox schema {schema_name} was upgraded to version 5; this relay is older: upgrade it (outbox-postgres 0.1 with schema version 5 or later)';
END $$;

-- A lease names the aggregates it holds and counts its events; its
-- settlements name the events. It ends when every event was settled
-- (or when its time is up).
ALTER TABLE {schema}.outbox_leases DROP COLUMN positions, ADD COLUMN remaining INTEGER;
-- Hashes do not compress: storing them as they are saves every claim a
-- vain attempt.
ALTER TABLE {schema}.outbox_leases ALTER COLUMN aggregate_keys SET STORAGE EXTERNAL;

-- Dead letters leave the queue: claims never walk past them.
CREATE TABLE {schema}.outbox_dead (
    position          BIGINT      PRIMARY KEY,
    aggregate_key     BIGINT      NOT NULL,
    aggregate_version BIGINT      NOT NULL,
    attempts          INTEGER     NOT NULL,
    last_error        TEXT,
    dead_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A parked aggregate is found by one probe per claimed candidate.
CREATE INDEX outbox_dead_by_aggregate ON {schema}.outbox_dead (aggregate_key, aggregate_version);

-- The queue row carries the delivery state. `written_at` is the server's
-- clock when the row joined the queue, whatever `created_at` claims.
ALTER TABLE {schema}.outbox_queue RENAME COLUMN created_at TO written_at;
ALTER TABLE {schema}.outbox_queue
    ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN last_error TEXT,
    -- The row's `created_at` was ahead of the server's clock when written.
    ADD COLUMN created_ahead BOOLEAN NOT NULL DEFAULT false;

INSERT INTO {schema}.outbox_dead
SELECT q.position, q.aggregate_key, q.aggregate_version, o.attempts, o.last_error, now()
FROM {schema}.outbox_queue AS q JOIN {schema}.outbox AS o USING (position)
WHERE q.dead;
DELETE FROM {schema}.outbox_queue WHERE dead;
UPDATE {schema}.outbox_queue AS q SET
    attempts = o.attempts,
    last_error = o.last_error,
    written_at = CASE WHEN q.written_at <= now() AND isfinite(q.written_at) THEN q.written_at ELSE now() END,
    created_ahead = NOT coalesce(o.created_at <= now(), false)
FROM {schema}.outbox AS o WHERE o.position = q.position;

DROP INDEX {schema}.outbox_queue_held;
ALTER TABLE {schema}.outbox_queue DROP COLUMN dead;
-- What can hold an aggregate back in the queue: events not due yet. Small.
CREATE INDEX outbox_queue_held ON {schema}.outbox_queue (aggregate_key, aggregate_version)
    WHERE next_attempt_at IS NOT NULL;

-- Publications, one row per settlement: what retention purges by. A
-- batch is usually an unbroken run of positions, kept as its first and
-- last alone; any other set of positions is kept whole.
CREATE TABLE {schema}.outbox_published (
    published_at   TIMESTAMPTZ NOT NULL,
    first_position BIGINT      NOT NULL,
    last_position  BIGINT      NOT NULL,
    -- NULL: every position from first to last.
    positions      BIGINT[]
);
CREATE INDEX outbox_published_at ON {schema}.outbox_published (published_at);
-- Published events of earlier versions, by the hour (the latest time of
-- each hour, so that nothing is purged earlier than asked).
INSERT INTO {schema}.outbox_published
SELECT max(CASE WHEN isfinite(published_at) THEN published_at ELSE now() END),
       min(position), max(position), array_agg(position ORDER BY position)
FROM {schema}.outbox
WHERE status = 'published'
GROUP BY date_trunc('hour', CASE WHEN isfinite(published_at) THEN published_at ELSE now() END),
         position / 10000;

ALTER TABLE {schema}.outbox
    DROP COLUMN status, DROP COLUMN attempts, DROP COLUMN last_error, DROP COLUMN published_at;

-- Each event with its delivery state, for people and reports.
CREATE VIEW {schema}.outbox_events AS
SELECT o.*,
       CASE WHEN q.position IS NOT NULL THEN 'pending'
            WHEN d.position IS NOT NULL OR o.skipped_at IS NOT NULL THEN 'dead'
            ELSE 'published' END AS status,
       coalesce(q.attempts, d.attempts) AS attempts,
       coalesce(q.last_error, d.last_error) AS last_error,
       q.next_attempt_at
FROM {schema}.outbox AS o
LEFT JOIN {schema}.outbox_queue AS q USING (position)
LEFT JOIN {schema}.outbox_dead AS d USING (position);

-- The same keys as before, from a body that PostgreSQL can inline: `int ||
-- text` is only STABLE, and an IMMUTABLE SQL function whose body is not is
-- run as a function call of its own, which cost every append and every
-- enqueued row about 40 us.
CREATE OR REPLACE FUNCTION {schema}.outbox_aggregate_key(p_type TEXT, p_id TEXT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtextextended(length(p_type)::text || ':' || p_type || p_id, 0) $$;

-- Rows written by hand (or by another language's writer) follow the
-- append's rules. First what no event can be, each refused with the rule
-- it breaks (SQLSTATE 23514): the append checks the same before it sends,
-- and rows already there are read value by value and dead-lettered alone
-- if they break these. (Here, not as CHECK constraints: PostgreSQL
-- prepares a table's CHECK expressions anew for every statement, which
-- cost each append about 70 us.) Then the aggregate's row is bumped under
-- the same version condition (a version at or below the stored one is
-- refused, and a concurrent writer of the aggregate waits for this
-- transaction), and the row takes its position only then, so positions
-- follow versions.
DROP TRIGGER outbox_enqueue ON {schema}.outbox;
DROP FUNCTION {schema}.outbox_enqueue();
CREATE FUNCTION {schema}.outbox_enqueue() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    stored BIGINT;
BEGIN
    IF NOT coalesce(NEW.aggregate_version >= 1, false) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'outbox rule outbox_version_positive: aggregate_version must be 1 or more (got %s)',
            NEW.aggregate_version);
    END IF;
    IF NOT coalesce(octet_length(NEW.aggregate_type) BETWEEN 1 AND 512
                    AND octet_length(NEW.aggregate_id) BETWEEN 1 AND 512
                    AND octet_length(NEW.event_type) BETWEEN 1 AND 512
                    AND octet_length(NEW.id) <= 64, false) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'outbox rule outbox_names_short: aggregate_type, aggregate_id and event_type must be 1 to 512 bytes and id at most 64 (got %s, %s, %s and %s bytes)',
            octet_length(NEW.aggregate_type), octet_length(NEW.aggregate_id),
            octet_length(NEW.event_type), octet_length(NEW.id));
    END IF;
    IF coalesce(octet_length(NEW.traceparent), 0) > 4096 OR coalesce(octet_length(NEW.correlation_id), 0) > 4096
       OR coalesce(octet_length(NEW.causation_id), 0) > 4096 THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE =
            'outbox rule outbox_metadata_short: traceparent, correlation_id and causation_id must be at most 4096 bytes each';
    END IF;
    -- Years 1 to 9999: what an RFC 3339 time (a CloudEvent's `time`) can say.
    IF NOT coalesce(NEW.occurred_at >= '0001-01-01 00:00:00+00' AND NEW.occurred_at < '10000-01-01 00:00:00+00', false) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'outbox rule outbox_occurred_at_in_range: occurred_at must lie in the years 1 to 9999 (got %s)',
            NEW.occurred_at);
    END IF;
    IF NOT coalesce(NEW.created_at >= '0001-01-01 00:00:00+00' AND NEW.created_at < '10000-01-01 00:00:00+00', false) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'outbox rule outbox_created_at_in_range: created_at must lie in the years 1 to 9999 (got %s)',
            NEW.created_at);
    END IF;

    INSERT INTO {schema}.outbox_aggregates AS a (aggregate_type, aggregate_id, first_version, version)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.aggregate_version, NEW.aggregate_version)
    ON CONFLICT (aggregate_type, aggregate_id)
    DO UPDATE SET version = excluded.version, first_version = excluded.first_version
    WHERE a.version < excluded.first_version;
    IF NOT FOUND THEN
        SELECT a.version INTO stored FROM {schema}.outbox_aggregates AS a
        WHERE a.aggregate_type = NEW.aggregate_type AND a.aggregate_id = NEW.aggregate_id;
        RAISE EXCEPTION USING ERRCODE = 'OB409', MESSAGE = format(
            'outbox version rule: %s/%s already has version %s; a new row must carry a higher aggregate_version (got %s)',
            NEW.aggregate_type, NEW.aggregate_id, stored, NEW.aggregate_version);
    END IF;
    NEW.position := nextval(pg_get_serial_sequence('{schema}.outbox', 'position'));
    INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version, written_at, created_ahead)
    VALUES (NEW.position, {schema}.outbox_aggregate_key(NEW.aggregate_type, NEW.aggregate_id),
            NEW.aggregate_version, clock_timestamp(), NOT coalesce(NEW.created_at <= clock_timestamp(), false));
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_enqueue BEFORE INSERT ON {schema}.outbox FOR EACH ROW
    WHEN (current_setting('outbox_appending.{schema_name}', true) IS DISTINCT FROM 'y')
    EXECUTE FUNCTION {schema}.outbox_enqueue();

-- The append, as in version 4 (same arguments: writers of version 4 keep
-- working during an upgrade), writing the queue's new columns.
CREATE OR REPLACE FUNCTION {schema}.outbox_append(
    p_a_types TEXT[], p_a_ids TEXT[], p_a_firsts BIGINT[], p_a_lasts BIGINT[],
    p_e_ids TEXT[], p_e_types TEXT[], p_e_aggregate_ids TEXT[], p_e_versions BIGINT[],
    p_e_event_types TEXT[], p_e_payloads TEXT[], p_e_occurred TIMESTAMPTZ[],
    p_e_traceparents TEXT[], p_e_correlations TEXT[], p_e_causations TEXT[],
    p_wake TEXT)
RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    bumped_types TEXT[];
    bumped_ids TEXT[];
    stale TEXT;
BEGIN
    WITH b AS (
        INSERT INTO {schema}.outbox_aggregates AS a (aggregate_type, aggregate_id, first_version, version)
        SELECT * FROM unnest(p_a_types, p_a_ids, p_a_firsts, p_a_lasts)
        ON CONFLICT (aggregate_type, aggregate_id)
        DO UPDATE SET version = excluded.version, first_version = excluded.first_version
        WHERE a.version < excluded.first_version
        RETURNING a.aggregate_type, a.aggregate_id
    )
    SELECT array_agg(b.aggregate_type), array_agg(b.aggregate_id) INTO bumped_types, bumped_ids FROM b;
    IF coalesce(cardinality(bumped_types), 0) < cardinality(p_a_types) THEN
        -- Every aggregate's row is locked by now: what the others hold is
        -- what this append lost to.
        -- (Each aggregate's row read by its key, whatever the statistics.)
        SELECT string_agg(format('%s/%s from version %s (stored: %s)', u.t, u.i, u.f,
                   (SELECT a.version FROM {schema}.outbox_aggregates AS a
                    WHERE a.aggregate_type = u.t AND a.aggregate_id = u.i)), ', ')
        INTO stale
        FROM unnest(p_a_types, p_a_ids, p_a_firsts) AS u(t, i, f)
        WHERE (u.t, u.i) NOT IN (SELECT * FROM unnest(bumped_types, bumped_ids));
        RAISE EXCEPTION USING ERRCODE = 'OB409', MESSAGE = format(
            'an aggregate of this append already has its first version or a later one (%s)', stale);
    END IF;

    PERFORM set_config('outbox_appending.{schema_name}', 'y', true);
    IF p_wake <> 'commit' THEN
        PERFORM set_config('outbox_woken.{schema_name}', 'y', true);
    END IF;
    WITH added AS (
        INSERT INTO {schema}.outbox (id, aggregate_type, aggregate_id, aggregate_version,
            event_type, payload, occurred_at, traceparent, correlation_id, causation_id)
        SELECT e.id, e.t, e.i, e.v, e.et, e.p, e.at, e.tp, e.corr, e.caus
        FROM unnest(p_e_ids, p_e_types, p_e_aggregate_ids, p_e_versions, p_e_event_types,
                    p_e_payloads, p_e_occurred, p_e_traceparents, p_e_correlations, p_e_causations)
             WITH ORDINALITY AS e(id, t, i, v, et, p, at, tp, corr, caus, n)
        ORDER BY e.n
        RETURNING position, aggregate_type, aggregate_id, aggregate_version, created_at
    )
    INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version, written_at)
    SELECT a.position, {schema}.outbox_aggregate_key(a.aggregate_type, a.aggregate_id),
           a.aggregate_version, a.created_at
    FROM added AS a;
    -- Rows written by hand later in this transaction join the queue again.
    PERFORM set_config('outbox_appending.{schema_name}', '', true);

    IF p_wake = 'now' AND (SELECT bool_or(armed) FROM {schema}.outbox_wake) THEN
        PERFORM pg_notify('{schema_name}_outbox', '');
    END IF;
END $$;

-- Events by position, every value checked before it leaves the server: a
-- value the relay could not read (a time outside years 1 to 9999, text
-- longer than any event's, a payload over the limit) is not sent; the
-- last column says why, and the relay dead-letters that event alone.
-- Overlong text is cut to its first 256 bytes, for the dead letter. A
-- plain SQL function: it is inlined into the statement that calls it.
-- p_positions must be in ascending order; the rows come in no order.
CREATE FUNCTION {schema}.outbox_read(
    p_positions BIGINT[], p_attempts INTEGER[], p_errors TEXT[], p_max_payload INTEGER)
RETURNS TABLE (
    r_position BIGINT, r_id TEXT, r_aggregate_type TEXT, r_aggregate_id TEXT,
    r_aggregate_version BIGINT, r_event_type TEXT, r_payload TEXT, r_occurred_at TIMESTAMPTZ,
    r_traceparent TEXT, r_correlation_id TEXT, r_causation_id TEXT, r_attempts INTEGER,
    r_last_error TEXT, r_unreadable TEXT)
LANGUAGE sql STABLE
AS $$
    -- (Each check written where it is used: evaluated once per row.)
    SELECT o.position,
           CASE WHEN octet_length(o.id) <= 64 THEN o.id ELSE left(o.id, 64) END,
           CASE WHEN octet_length(o.aggregate_type) <= 512 THEN o.aggregate_type ELSE left(o.aggregate_type, 256) END,
           CASE WHEN octet_length(o.aggregate_id) <= 512 THEN o.aggregate_id ELSE left(o.aggregate_id, 256) END,
           o.aggregate_version,
           CASE WHEN octet_length(o.event_type) <= 512 THEN o.event_type ELSE left(o.event_type, 256) END,
           CASE WHEN octet_length(o.payload) <= p_max_payload THEN o.payload ELSE left(o.payload, 256) END,
           CASE WHEN o.occurred_at >= '0001-01-01 00:00:00+00' AND o.occurred_at < '10000-01-01 00:00:00+00'
                THEN o.occurred_at END,
           CASE WHEN octet_length(o.traceparent) <= 4096 THEN o.traceparent ELSE left(o.traceparent, 256) END,
           CASE WHEN octet_length(o.correlation_id) <= 4096 THEN o.correlation_id ELSE left(o.correlation_id, 256) END,
           CASE WHEN octet_length(o.causation_id) <= 4096 THEN o.causation_id ELSE left(o.causation_id, 256) END,
           o.attempts, o.error,
           nullif(concat_ws('; ',
               CASE WHEN octet_length(o.id) > 64 THEN format('id is %s bytes', octet_length(o.id)) END,
               CASE WHEN octet_length(o.aggregate_type) > 512 THEN format('aggregate_type is %s bytes, at most 512 allowed', octet_length(o.aggregate_type)) END,
               CASE WHEN octet_length(o.aggregate_id) > 512 THEN format('aggregate_id is %s bytes, at most 512 allowed', octet_length(o.aggregate_id)) END,
               CASE WHEN octet_length(o.event_type) > 512 THEN format('event_type is %s bytes, at most 512 allowed', octet_length(o.event_type)) END,
               CASE WHEN octet_length(o.payload) > p_max_payload THEN format('payload is %s bytes, over the limit of %s', octet_length(o.payload), p_max_payload) END,
               CASE WHEN NOT (o.occurred_at >= '0001-01-01 00:00:00+00' AND o.occurred_at < '10000-01-01 00:00:00+00')
                    THEN format('occurred_at %s is outside the years 1 to 9999', o.occurred_at) END,
               CASE WHEN octet_length(o.traceparent) > 4096 OR octet_length(o.correlation_id) > 4096
                         OR octet_length(o.causation_id) > 4096 THEN 'metadata longer than 4096 bytes' END), '')
    FROM (
        -- Positions in one unbroken run (the usual claim): one range scan.
        SELECT r.*, p_attempts[r.position - p_positions[1] + 1] AS attempts,
               p_errors[r.position - p_positions[1] + 1] AS error
        FROM {schema}.outbox AS r
        WHERE p_positions[cardinality(p_positions)] - p_positions[1] + 1 = cardinality(p_positions)
          AND r.position BETWEEN p_positions[1] AND p_positions[cardinality(p_positions)]
        UNION ALL
        -- Otherwise one lookup by key per position.
        SELECT r.*, p.attempts, p.error
        FROM unnest(p_positions, p_attempts, p_errors) AS p(position, attempts, error)
        JOIN {schema}.outbox AS r ON r.position = p.position
        WHERE p_positions[cardinality(p_positions)] - p_positions[1] + 1 <> cardinality(p_positions)
    ) AS o
$$;

-- Leases up to p_limit due events that nothing holds back: no earlier event
-- of their aggregate is leased to a relay, not due yet or (with p_park)
-- dead. Claims take the advisory lock of version 2, so each one sees the
-- leases of every earlier claim: two relays never hold parts of one
-- aggregate. A lease that ended is dropped first; its relay's settlements
-- then apply to nothing.
CREATE FUNCTION {schema}.outbox_claim_v5(
    p_limit INTEGER, p_lease UUID, p_until TIMESTAMPTZ, p_cutoff TIMESTAMPTZ,
    p_written_before TIMESTAMPTZ, p_park BOOLEAN, p_max_payload INTEGER)
RETURNS TABLE (
    r_position BIGINT, r_id TEXT, r_aggregate_type TEXT, r_aggregate_id TEXT,
    r_aggregate_version BIGINT, r_event_type TEXT, r_payload TEXT, r_occurred_at TIMESTAMPTZ,
    r_traceparent TEXT, r_correlation_id TEXT, r_causation_id TEXT, r_attempts INTEGER,
    r_last_error TEXT, r_unreadable TEXT)
LANGUAGE plpgsql
SET jit = off SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
    SET enable_sort = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    picked_positions BIGINT[];
    picked_keys BIGINT[];
    picked_attempts INTEGER[];
BEGIN
    PERFORM pg_advisory_xact_lock({schema}.outbox_lock_key());
    -- Each statement of a VOLATILE function takes a new snapshot: this one
    -- sees every claim and settlement committed while we waited for the lock.
    -- (The leases table holds a row per relay: its scan is bounded by them.)
    DELETE FROM {schema}.outbox_leases AS l WHERE l.expires_at <= p_cutoff;
    WITH leased AS (
        SELECT u.k FROM {schema}.outbox_leases AS l, unnest(l.aggregate_keys) AS u(k)
    ), picked AS (
        -- The queue in position order from its head, stopping at the limit.
        SELECT q.position, q.aggregate_key, q.attempts FROM {schema}.outbox_queue AS q
        WHERE (q.next_attempt_at IS NULL OR q.next_attempt_at <= p_cutoff)
          AND (p_written_before IS NULL OR q.written_at <= p_written_before)
          -- A hashed lookup among the leased keys (a few batches' worth).
          AND q.aggregate_key NOT IN (SELECT leased.k FROM leased)
          -- One probe each of small indexes, by the candidate's key:
          -- an earlier event of its aggregate backing off...
          AND (SELECT 1 FROM {schema}.outbox_queue AS h
               WHERE h.next_attempt_at IS NOT NULL AND h.aggregate_key = q.aggregate_key
                 AND h.aggregate_version < q.aggregate_version AND h.next_attempt_at > p_cutoff
               LIMIT 1) IS NULL
          -- ...or, when dead letters park their aggregate, dead.
          AND (NOT p_park OR (SELECT 1 FROM {schema}.outbox_dead AS d
               WHERE d.aggregate_key = q.aggregate_key AND d.aggregate_version < q.aggregate_version
               LIMIT 1) IS NULL)
        -- Writers of an aggregate are serialized, so its positions grow with
        -- its versions: a limit in position order keeps each prefix whole.
        ORDER BY q.position
        LIMIT p_limit
    )
    SELECT array_agg(p.position ORDER BY p.position), array_agg(p.aggregate_key ORDER BY p.position),
           array_agg(p.attempts ORDER BY p.position)
    INTO picked_positions, picked_keys, picked_attempts
    FROM picked AS p;
    IF picked_positions IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO {schema}.outbox_leases (lease_id, expires_at, aggregate_keys, remaining)
    VALUES (p_lease, p_until, picked_keys, cardinality(picked_positions));
    -- A relay is busy: appends need not notify (see `outbox_wake`).
    UPDATE {schema}.outbox_wake SET armed = false WHERE armed;
    RETURN QUERY SELECT * FROM {schema}.outbox_read(
        picked_positions, picked_attempts, NULL::text[], p_max_payload);
END $$;

-- Applies a relay's settlements: p_published, the published positions;
-- the other arrays, the rest (kinds 2 released, 3 retry, 4 dead,
-- 5 deferred). The lease's row is settled first: if a claim dropped it
-- (it ended, and its events may be another relay's now) the settlement
-- applies to nothing. A relay may settle its lease in several calls; the
-- lease holds its aggregates until the last one.
--
-- Publishing deletes the queue rows and adds one `outbox_published` row.
-- With p_sync off the transaction commits without waiting for its WAL
-- flush: a crash may then lose the last settlements, whose events are
-- published again (at-least-once, as when a relay dies before settling).
CREATE FUNCTION {schema}.outbox_settle_v5(
    p_lease UUID, p_published BIGINT[], p_positions BIGINT[], p_kinds SMALLINT[],
    p_ats TIMESTAMPTZ[], p_errors TEXT[], p_sync BOOLEAN)
RETURNS BIGINT
LANGUAGE plpgsql
SET jit = off SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    applied BIGINT := 0;
    sent BIGINT[];
    settling INTEGER := cardinality(p_published) + coalesce(cardinality(p_positions), 0);
    n BIGINT;
    i INTEGER;
BEGIN
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    DELETE FROM {schema}.outbox_leases AS l
    WHERE l.lease_id = p_lease AND l.remaining <= settling;
    IF NOT FOUND THEN
        UPDATE {schema}.outbox_leases AS l SET remaining = l.remaining - settling
        WHERE l.lease_id = p_lease;
        IF NOT FOUND THEN
            RETURN 0;
        END IF;
    END IF;
    IF cardinality(p_published) > 0 THEN
        -- p_published is in ascending order: an unbroken run of positions
        -- (the usual batch) is deleted by one range scan, any other set by
        -- one lookup per position. Both touch the lease's events alone.
        IF p_published[cardinality(p_published)] - p_published[1] + 1 = cardinality(p_published) THEN
            WITH gone AS (
                DELETE FROM {schema}.outbox_queue AS q
                WHERE q.position BETWEEN p_published[1] AND p_published[cardinality(p_published)]
                RETURNING q.position
            )
            SELECT array_agg(g.position) INTO sent FROM gone AS g;
        ELSE
            WITH gone AS (
                DELETE FROM {schema}.outbox_queue AS q WHERE q.position = ANY(p_published)
                RETURNING q.position
            )
            SELECT array_agg(g.position) INTO sent FROM gone AS g;
        END IF;
        IF sent IS NOT NULL THEN
            applied := cardinality(sent);
            INSERT INTO {schema}.outbox_published
            VALUES (now(), p_published[1], p_published[cardinality(p_published)],
                    CASE WHEN applied = p_published[cardinality(p_published)] - p_published[1] + 1
                         THEN NULL ELSE sent END);
        END IF;
    END IF;
    -- The rest one by one (few, but for a failing target): each a lookup
    -- by key. A released event needs no write: it is due as it was.
    FOR i IN 1 .. coalesce(cardinality(p_positions), 0) LOOP
        IF p_kinds[i] = 2 THEN
            applied := applied + 1;
            CONTINUE;
        ELSIF p_kinds[i] = 4 THEN
            WITH died AS (
                DELETE FROM {schema}.outbox_queue AS q WHERE q.position = p_positions[i]
                RETURNING q.position, q.aggregate_key, q.aggregate_version, q.attempts
            )
            INSERT INTO {schema}.outbox_dead
            SELECT d.position, d.aggregate_key, d.aggregate_version, d.attempts + 1, p_errors[i], now()
            FROM died AS d;
        ELSE
            UPDATE {schema}.outbox_queue AS q SET
                next_attempt_at = p_ats[i],
                attempts = q.attempts + CASE WHEN p_kinds[i] = 3 THEN 1 ELSE 0 END,
                last_error = p_errors[i]
            WHERE q.position = p_positions[i];
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        applied := applied + n;
    END LOOP;
    RETURN applied;
END $$;

-- When the next held event comes due (a backoff ends, a lease ends), for a
-- claim that found nothing: bounded by the held events and the leases.
CREATE FUNCTION {schema}.outbox_next_due(p_cutoff TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE
SET jit = off SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    SELECT least(
        (SELECT min(q.next_attempt_at) FROM {schema}.outbox_queue AS q
         WHERE q.next_attempt_at IS NOT NULL AND q.next_attempt_at > p_cutoff),
        (SELECT min(l.expires_at) FROM {schema}.outbox_leases AS l))
$$;

-- Retention: deletes the events of up to p_logs publications made before
-- p_before (oldest first), and those publications' rows. Called until it
-- finds no publication to purge.
CREATE FUNCTION {schema}.outbox_purge(p_before TIMESTAMPTZ, p_logs INTEGER,
    OUT publications INTEGER, OUT events BIGINT)
LANGUAGE plpgsql
SET jit = off SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    log RECORD;
    n BIGINT;
BEGIN
    publications := 0;
    events := 0;
    FOR log IN
        DELETE FROM {schema}.outbox_published AS p
        WHERE p.ctid = ANY(ARRAY(
            SELECT l.ctid FROM {schema}.outbox_published AS l
            WHERE l.published_at < p_before ORDER BY l.published_at LIMIT p_logs))
        RETURNING p.first_position, p.last_position, p.positions
    LOOP
        IF log.positions IS NULL THEN
            DELETE FROM {schema}.outbox AS o
            WHERE o.position BETWEEN log.first_position AND log.last_position;
        ELSE
            DELETE FROM {schema}.outbox AS o WHERE o.position = ANY(log.positions);
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        events := events + n;
        publications := publications + 1;
    END LOOP;
END $$;
