"""The relay's statements: claim, mark, leases, purge, backlog and table hygiene, for psycopg.

Parameters are ``%(name)s``. The per-row arrays of the hot statements arrive as array
literals in one text parameter (``'{1,2,3}'``, built with ``str.join``) and are cast in
SQL: adapting hundreds of elements one by one in the driver cost more than the statement.

Every hot statement handles a whole batch in one round trip. Reviewed plans (EXPLAIN):
the claim walks ``<outbox>_pending_idx`` in position order and stops at the batch size
(then drops the rows past the batch's byte budget);
its per-key check probes ``<outbox>_retrying_idx``, which holds only rows that failed;
the mark finds its rows through the primary key.
"""

from __future__ import annotations

import functools

from postroom.schema.sql import quoted_table
from postroom.schema.tables import DEAD, PENDING, PUBLISHED, Tables


@functools.cache
def claim_sql(tables: Tables) -> str:
    """Read up to %(limit)s due rows of the partitions the relay owns, oldest first, and
    stop once their bytes pass %(max_bytes)s (always at least one row).

    The claim writes nothing: a partition has one owner at a time, so its rows need no
    lock or lease of their own. Rows of batches still in flight are left out
    (%(in_flight)s). A row waits while an earlier row of its key is backing off after a
    failure, so each key is published in order. Empty headers come back as NULL and the
    others as JSON text, which the relay decodes faster than the driver's jsonb loader.

    A row's bytes are its payload's (``octet_length`` reads the stored length, without
    fetching a TOASTed value) plus its headers' text. The running total is a window over
    the rows the index walk already returns in position order, under the LIMIT, so the
    plan stays one index walk; the outer filter drops the rows past the budget before any
    payload leaves the server.
    """
    outbox = quoted_table(tables.outbox)
    return f"""
SELECT c.position, c.id, c.topic, c.key, c.payload, c.content_type, c.headers,
       c.created_at, c.available_at, c.attempts, c.partition, c.next_attempt_at
FROM (
    SELECT o.position, o.id, o.topic, o.key, o.payload, o.content_type,
           nullif(o.headers, '{{}}'::jsonb)::text AS headers,
           o.created_at, o.available_at, o.attempts, o.partition, o.next_attempt_at,
           sum(octet_length(o.payload) + octet_length(o.headers::text)) OVER w
               AS running_bytes,
           row_number() OVER w AS n
    FROM {outbox} AS o
    WHERE o.status = '{PENDING}'
      AND o.partition = ANY(%(partitions)s)
      AND o.next_attempt_at <= now()
      AND o.position <> ALL(%(in_flight)s::bigint[])
      AND NOT EXISTS (
          SELECT 1 FROM {outbox} AS e
          WHERE e.status = '{PENDING}' AND e.attempts > 0
            AND e.key = o.key AND e.position < o.position
            AND e.next_attempt_at > now()
      )
    WINDOW w AS (ORDER BY o.position ROWS UNBOUNDED PRECEDING)
    ORDER BY o.position
    LIMIT %(limit)s
) AS c
WHERE c.running_bytes <= %(max_bytes)s OR c.n = 1
ORDER BY c.position
"""


@functools.cache
def mark_sql(tables: Tables, delete_published: bool) -> str:
    """Record a batch's outcomes in one statement, fenced by the partitions' lease tokens.

    Each result carries the token of its partition's lease as it was when the row was
    claimed; a row whose partition has since been taken over by another relay (a new
    token) is left alone. It also carries the attempts and due time the claim read, so
    applying the same mark twice (a retry after a lost reply) counts a failure once, and
    a row an operator retried or replayed meanwhile (due again now) is not touched. Outcomes:
    ``confirmed`` (published; or deleted when ``delete_published``), ``rejected`` (one
    more attempt; backoff of %(delays)s, dead-lettered at %(max_attempts)s), ``refused``
    (one more attempt and dead-lettered at once: it can never be published as it is),
    ``unavailable`` and ``held`` (left pending as they were, no attempt counted).
    Returns the rows it changed.

    Per row it takes %(positions)s, %(attempts)s, %(due)s, %(outcomes)s and
    %(token_numbers)s (1-based indexes into %(tokens)s, the distinct lease tokens); the
    error and backoff delay come only for rows that have one (%(failed)s, %(errors)s,
    %(delays)s).
    """
    outbox = quoted_table(tables.outbox)
    partitions = quoted_table(tables.partitions)
    results = """
SELECT r.position, r.attempts, r.due, r.outcome, f.error,
       coalesce(f.delay_seconds, 0) AS delay_seconds,
       (%(tokens)s::uuid[])[r.token_number] AS token
FROM unnest(
    %(positions)s::bigint[], %(attempts)s::int[], %(due)s::timestamptz[],
    %(outcomes)s::text[], %(token_numbers)s::int[]
) AS r(position, attempts, due, outcome, token_number)
LEFT JOIN unnest(%(failed)s::bigint[], %(errors)s::text[], %(delays)s::float8[])
    AS f(position, error, delay_seconds) ON f.position = r.position
"""
    fenced = (
        "t.position = r.position AND t.status = 'pending' AND t.attempts = r.attempts "
        "AND t.next_attempt_at = r.due "
        "AND EXISTS ("
        f"SELECT 1 FROM {partitions} AS p WHERE p.partition = t.partition AND p.token = r.token)"
    )
    dead = (
        "r.outcome = 'refused' OR (r.outcome = 'rejected' AND t.attempts + 1 >= %(max_attempts)s)"
    )
    update = f"""
UPDATE {outbox} AS t SET
    status = CASE WHEN r.outcome = 'confirmed' THEN '{PUBLISHED}'
                  WHEN {dead} THEN '{DEAD}' ELSE '{PENDING}' END,
    attempts = t.attempts + (r.outcome IN ('rejected', 'refused'))::int,
    last_error = coalesce(r.error, t.last_error),
    next_attempt_at = CASE WHEN r.outcome = 'rejected'
                           THEN now() + r.delay_seconds * interval '1 second'
                           ELSE t.next_attempt_at END,
    published_at = CASE WHEN r.outcome = 'confirmed' THEN now() END,
    dead_lettered_at = CASE WHEN {dead} THEN now() END
FROM results AS r
WHERE {fenced}{{only}}
RETURNING t.position, t.status, t.attempts"""
    if not delete_published:
        return f"WITH results AS ({results}){update.format(only='')}"
    only_unconfirmed = update.format(only=" AND r.outcome <> 'confirmed'")
    return f"""
WITH results AS ({results}),
deleted AS (
    DELETE FROM {outbox} AS t USING results AS r
    WHERE {fenced} AND r.outcome = 'confirmed'
    RETURNING t.position, '{PUBLISHED}'::text AS status, t.attempts
),
updated AS ({only_unconfirmed})
SELECT * FROM deleted UNION ALL SELECT * FROM updated
"""


@functools.cache
def register_relay_sql(tables: Tables) -> str:
    """Record that this relay is alive (insert or refresh its heartbeat) and the state of
    its broker connection (%(broker_state)s, %(broker_error)s); ``broker_state_at`` moves
    only when the state changes."""
    relays = quoted_table(tables.relays)
    return (
        f"INSERT INTO {relays} AS r (relay_id, host, pid, broker_state, broker_error) "
        "VALUES (%(relay)s, %(host)s, %(pid)s, %(broker_state)s, %(broker_error)s) "
        "ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), "
        "broker_state = excluded.broker_state, broker_error = excluded.broker_error, "
        "broker_state_at = CASE WHEN r.broker_state = excluded.broker_state "
        "THEN r.broker_state_at ELSE now() END"
    )


@functools.cache
def live_relays_sql(tables: Tables) -> str:
    """Forget relays whose heartbeat is older than %(lease)s seconds; list those left."""
    relays = quoted_table(tables.relays)
    return f"""
WITH gone AS (
    DELETE FROM {relays} WHERE heartbeat_at < now() - %(lease)s * interval '1 second'
    RETURNING relay_id
)
SELECT relay_id FROM {relays} WHERE relay_id NOT IN (SELECT relay_id FROM gone)
ORDER BY relay_id
"""


@functools.cache
def renew_partitions_sql(tables: Tables) -> str:
    """Extend the leases of the partitions this relay still owns; return them."""
    return (
        f"UPDATE {quoted_table(tables.partitions)} "
        "SET lease_expires_at = now() + %(lease)s * interval '1 second' "
        "WHERE owner = %(relay)s RETURNING partition, token, lease_expires_at, now()"
    )


@functools.cache
def acquire_partitions_sql(tables: Tables) -> str:
    """Take up to %(want)s partitions that nobody holds or whose lease ran out.

    Each gets a new token: marks made under the previous owner's token no longer apply.
    """
    partitions = quoted_table(tables.partitions)
    return f"""
UPDATE {partitions} AS p
SET owner = %(relay)s, token = gen_random_uuid(),
    lease_expires_at = now() + %(lease)s * interval '1 second'
FROM (
    SELECT partition FROM {partitions}
    WHERE owner IS NULL OR lease_expires_at < now()
    ORDER BY partition
    LIMIT %(want)s
    FOR UPDATE SKIP LOCKED
) AS free
WHERE p.partition = free.partition
RETURNING p.partition, p.token, p.lease_expires_at, now()
"""


@functools.cache
def release_partitions_sql(tables: Tables) -> str:
    """Give partitions up so other relays can take them at once."""
    return (
        f"UPDATE {quoted_table(tables.partitions)} "
        "SET owner = NULL, token = NULL, lease_expires_at = NULL "
        "WHERE owner = %(relay)s AND partition = ANY(%(partitions)s)"
    )


@functools.cache
def unregister_relay_sql(tables: Tables) -> str:
    """Remove this relay from the live set (on a clean shutdown)."""
    return f"DELETE FROM {quoted_table(tables.relays)} WHERE relay_id = %(relay)s"


@functools.cache
def purge_published_sql(tables: Tables) -> str:
    """Delete up to %(limit)s rows published more than %(older_than)s seconds ago."""
    outbox = quoted_table(tables.outbox)
    return f"""
DELETE FROM {outbox} WHERE position IN (
    SELECT position FROM {outbox}
    WHERE status = '{PUBLISHED}'
      AND published_at < now() - %(older_than)s * interval '1 second'
    ORDER BY published_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING position
"""


@functools.cache
def backlog_sql(tables: Tables) -> str:
    """Pending rows, seconds the oldest due row has waited, and dead-lettered rows.

    The wait counts from when a row became due (``available_at``), as in
    ``postroom outbox status``, so a message delayed on purpose does not look stuck.
    """
    outbox = quoted_table(tables.outbox)
    return f"""
SELECT count(*),
       coalesce(extract(epoch FROM now() - min(available_at)
                FILTER (WHERE available_at <= now())), 0)::float8,
       (SELECT count(*) FROM {outbox} WHERE status = '{DEAD}')
FROM {outbox} WHERE status = '{PENDING}'
"""


def hygiene_sql() -> str:
    """Dead tuples of the outbox table (and of its partitions, if a DBA partitioned it), and
    seconds the oldest transaction holding back vacuum in this database has been open.

    Both read the statistics views only (no table is scanned). A transaction holds back
    vacuum while it has a snapshot (``backend_xmin``) or a transaction id
    (``backend_xid``), and so does a prepared transaction until it is committed or rolled
    back; autovacuum's own transactions do not (PostgreSQL's vacuum ignores them), and only
    client sessions are counted. This sampling statement's own session is left out. A role
    without ``pg_read_all_stats`` sees ``xact_start`` only of sessions of its own role, so the age
    counts those (0 when none is open). Parameter: %(outbox)s, the outbox's quoted name.
    """
    return """
SELECT coalesce((SELECT sum(s.n_dead_tup) FROM pg_stat_user_tables AS s
                 WHERE s.relid = %(outbox)s::regclass
                    OR s.relid IN (SELECT t.relid
                                   FROM pg_partition_tree(%(outbox)s::regclass) AS t)), 0)::bigint,
       greatest(
           coalesce((SELECT extract(epoch FROM now() - min(a.xact_start))
                     FROM pg_stat_activity AS a
                     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                       AND a.backend_type = 'client backend'
                       AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)), 0),
           coalesce((SELECT extract(epoch FROM now() - min(p.prepared))
                     FROM pg_prepared_xacts AS p
                     WHERE p.database = current_database()), 0))::float8
"""
