-- Claims and settlements of several relays must never interleave in a way
-- that reorders an aggregate. Every claim, and every settlement that holds
-- events back (retry, dead, deferred), takes this one transaction-level
-- lock: a claim then computes each aggregate's head from a snapshot taken
-- after every earlier claim and such settlement committed. Claims are one
-- short statement, so relays barely wait for each other; publishing runs
-- outside the lock.
CREATE FUNCTION {schema}.outbox_lock_key() RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtextextended('outbox relay lock {schema_name}', 0) $$;

-- Leases up to p_limit due pending events that no earlier pending event of
-- their aggregate holds back (leased by another relay, backing off, or,
-- with p_park, dead): a prefix of each aggregate's queue.
CREATE FUNCTION {schema}.outbox_claim(
    p_limit INTEGER, p_lease UUID, p_until TIMESTAMPTZ, p_cutoff TIMESTAMPTZ,
    p_written_before TIMESTAMPTZ, p_park BOOLEAN)
RETURNS SETOF {schema}.outbox
-- JIT compiling this short statement would cost far more than running it.
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({schema}.outbox_lock_key());
    -- A VOLATILE function takes a new snapshot for this statement: it sees
    -- every claim and settlement that committed while we waited for the lock.
    RETURN QUERY
    UPDATE {schema}.outbox AS o SET lease_id = p_lease, next_attempt_at = p_until
    FROM (
        SELECT c.position FROM {schema}.outbox AS c
        WHERE c.status = 'pending' AND c.next_attempt_at <= p_cutoff
          AND (p_written_before IS NULL OR c.created_at <= p_written_before)
          -- Scalar subqueries, not NOT EXISTS: the planner would turn that
          -- into an anti-join over every held row; this is one index probe
          -- per candidate, usually of an empty range.
          AND (SELECT 1 FROM {schema}.outbox AS h
               WHERE h.status = 'pending'
                 AND h.aggregate_type = c.aggregate_type AND h.aggregate_id = c.aggregate_id
                 AND h.aggregate_version < c.aggregate_version
                 AND h.next_attempt_at > p_cutoff
               LIMIT 1) IS NULL
          AND (NOT p_park OR (SELECT 1 FROM {schema}.outbox AS d
               WHERE d.status = 'dead' AND d.skipped_at IS NULL
                 AND d.aggregate_type = c.aggregate_type AND d.aggregate_id = c.aggregate_id
                 AND d.aggregate_version < c.aggregate_version
               LIMIT 1) IS NULL)
        -- Writers of an aggregate are serialized, so its positions grow with
        -- its versions: a limit in position order keeps each prefix whole.
        ORDER BY c.position
        LIMIT p_limit
    ) AS picked
    -- Rechecked on the newest row version if a stale relay settles it meanwhile.
    WHERE o.position = picked.position AND o.status = 'pending' AND o.next_attempt_at <= p_cutoff
    RETURNING o.*;
END $$;

-- Applies a relay's settlements, fenced by its lease. Kinds: 1 published,
-- 2 released, 3 retry, 4 dead, 5 deferred.
CREATE FUNCTION {schema}.outbox_settle(
    p_lease UUID, p_positions BIGINT[], p_kinds SMALLINT[], p_ats TIMESTAMPTZ[],
    p_errors TEXT[], p_lock BOOLEAN)
RETURNS BIGINT
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    applied BIGINT;
BEGIN
    IF p_lock THEN
        PERFORM pg_advisory_xact_lock({schema}.outbox_lock_key());
    END IF;
    UPDATE {schema}.outbox AS o SET
        status = CASE s.kind WHEN 1 THEN 'published' WHEN 4 THEN 'dead' ELSE 'pending' END,
        published_at = CASE WHEN s.kind = 1 THEN s.at ELSE o.published_at END,
        attempts = o.attempts + CASE WHEN s.kind IN (3, 4) THEN 1 ELSE 0 END,
        next_attempt_at = CASE WHEN s.kind IN (2, 3, 5) THEN s.at ELSE o.next_attempt_at END,
        last_error = CASE WHEN s.kind IN (3, 4, 5) THEN s.err ELSE o.last_error END,
        lease_id = NULL
    FROM unnest(p_positions, p_kinds, p_ats, p_errors) AS s(pos, kind, at, err)
    WHERE o.position = s.pos AND o.lease_id = p_lease AND o.status = 'pending';
    GET DIAGNOSTICS applied = ROW_COUNT;
    RETURN applied;
END $$;
