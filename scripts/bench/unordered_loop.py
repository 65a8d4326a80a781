"""The simplest relay a user could write instead of this project: no order at all.

Fills a plain outbox table with EVENTS rows shaped like `outbox bench`'s
events, then drains it with the classic loop, one transaction a batch:

    SELECT id FROM outbox WHERE processed_at IS NULL ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED
    UPDATE outbox SET processed_at = now() WHERE id = ANY(ids)

and prints the drain rate as JSON. Run by scripts/bench/pg-drain, which
alternates it with `outbox bench` on the same database.

    python unordered_loop.py DSN [--events N] [--batch N] [--schema NAME]
"""

import argparse
import json
import time

import psycopg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--schema", default="unordered_loop")
    args = parser.parse_args()

    with psycopg.connect(args.dsn, autocommit=True) as conn:
        s = args.schema
        conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(
            f"""CREATE TABLE {s}.outbox (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id UUID NOT NULL,
                aggregate_type TEXT NOT NULL,
                aggregate_id TEXT NOT NULL,
                aggregate_version BIGINT NOT NULL,
                event_type TEXT NOT NULL,
                payload TEXT NOT NULL,
                occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                processed_at TIMESTAMPTZ)"""
        )
        # The index such a loop needs so each batch does not walk past the
        # rows already processed.
        conn.execute(f"CREATE INDEX ON {s}.outbox (id) WHERE processed_at IS NULL")
        conn.execute(
            f"""INSERT INTO {s}.outbox (event_id, aggregate_type, aggregate_id,
                    aggregate_version, event_type, payload)
                SELECT gen_random_uuid(), 'Order', 'bench-' || n, 1, 'OrderCreated',
                       json_build_object('orderId', n, 'totalCents', 4200,
                                         'items', json_build_array(1, 2, 3))::text
                FROM generate_series(1, %s) AS n""",
            (args.events,),
        )
        conn.execute(f"VACUUM ANALYZE {s}.outbox")

    with psycopg.connect(args.dsn) as conn:
        drained = 0
        started = time.perf_counter()
        while True:
            with conn.transaction():
                ids = [
                    r[0]
                    for r in conn.execute(
                        f"""SELECT id FROM {s}.outbox WHERE processed_at IS NULL
                            ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
                        (args.batch,),
                    )
                ]
                if not ids:
                    break
                conn.execute(
                    f"UPDATE {s}.outbox SET processed_at = now() WHERE id = ANY(%s)",
                    (ids,),
                )
            drained += len(ids)
        seconds = time.perf_counter() - started

    print(
        json.dumps(
            {
                "loop": "unordered SKIP LOCKED",
                "events": drained,
                "batch": args.batch,
                "drain_events_per_s": round(drained / seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
