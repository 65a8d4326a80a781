-- The append as one function: the aggregates' rows under the version
-- condition, the events, and their queue rows, written directly instead of
-- by the triggers that catch rows written by hand. With a commit that
-- carries its events (`PostgresTransaction::commit`), the call travels in
-- the same message as the COMMIT: the business transaction pays no round
-- trip for its events, and no trigger runs per row.

-- The triggers stay for rows written by hand; the function's own rows skip
-- them (the settings are read as each row is inserted).
DROP TRIGGER outbox_enqueue ON {schema}.outbox;
DROP FUNCTION {schema}.outbox_enqueue();
-- A row trigger with a condition: the function's rows cost one test of a
-- setting each, where a statement trigger collects every row it inserts.
CREATE FUNCTION {schema}.outbox_enqueue() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'published' THEN
        INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version, created_at, dead)
        VALUES (NEW.position, {schema}.outbox_aggregate_key(NEW.aggregate_type, NEW.aggregate_id),
                NEW.aggregate_version, NEW.created_at, NEW.status = 'dead');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_enqueue AFTER INSERT ON {schema}.outbox FOR EACH ROW
    WHEN (current_setting('outbox_appending.{schema_name}', true) IS DISTINCT FROM 'y')
    EXECUTE FUNCTION {schema}.outbox_enqueue();
DROP TRIGGER outbox_wake ON {schema}.outbox;
CREATE CONSTRAINT TRIGGER outbox_wake AFTER INSERT ON {schema}.outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('outbox_woken.{schema_name}', true) IS DISTINCT FROM 'y')
    EXECUTE FUNCTION {schema}.outbox_wake();

-- Appends events (the p_e_* arrays, in order) whose aggregates, with the
-- first and last version appended to each, are the p_a_* arrays. Each
-- aggregate's row is updated on the condition that it holds an older version
-- than the first one appended: a concurrent writer of the same aggregate
-- waits for this transaction to end, so an aggregate's transactions commit
-- in version order, and the events are inserted after every such lock is
-- held, so positions follow commit order per aggregate. A stale version
-- raises SQLSTATE OB409 and writes nothing (the transaction is aborted).
--
-- p_wake says who wakes sleeping relays: 'commit', the commit trigger
-- (the caller's transaction goes on); 'now', this call (the COMMIT follows
-- in the same message); 'never' (notifications are off).
CREATE FUNCTION {schema}.outbox_append(
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
        SELECT string_agg(format('%s/%s from version %s (stored: %s)', u.t, u.i, u.f, a.version), ', ')
        INTO stale
        FROM unnest(p_a_types, p_a_ids, p_a_firsts) AS u(t, i, f)
        JOIN {schema}.outbox_aggregates AS a ON a.aggregate_type = u.t AND a.aggregate_id = u.i
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
    INSERT INTO {schema}.outbox_queue (position, aggregate_key, aggregate_version, created_at)
    SELECT a.position, {schema}.outbox_aggregate_key(a.aggregate_type, a.aggregate_id),
           a.aggregate_version, a.created_at
    FROM added AS a;
    -- Rows written by hand later in this transaction join the queue again.
    PERFORM set_config('outbox_appending.{schema_name}', '', true);

    IF p_wake = 'now' AND (SELECT bool_or(armed) FROM {schema}.outbox_wake) THEN
        PERFORM pg_notify('{schema_name}_outbox', '');
    END IF;
END $$;
