"""The operator CLI's statements: look at, retry, replay and purge outbox and inbox rows.

Parameters are psycopg's ``%(name)s``. Every filter is one fixed text with optional
parameters (``%(topics)s IS NULL OR ...``): a filter left out is sent as NULL, so no user
input is ever formatted into SQL, and PostgreSQL folds the unused conditions away when it
plans the statement with its values.

Statements that change rows work in bounded batches: each takes up to ``%(limit)s`` rows
(locked, in position order) and changes only those; the CLI repeats it, one transaction
per batch, until it changes nothing. There is no unbounded UPDATE or DELETE here.
"""

from __future__ import annotations

import functools
from typing import Final

from postroom.schema.sql import quoted_table
from postroom.schema.tables import DEAD, PENDING, PUBLISHED, Tables

#: The pseudo-state of pending rows that failed and wait for their next attempt.
BACKING_OFF: Final = "backing-off"

#: Rows changed (UPDATE) and deleted (DELETE) per statement by the operator commands.
UPDATE_BATCH: Final = 1000
DELETE_BATCH: Final = 5000

_BACKING_OFF_ROW: Final = (
    f"(o.status = '{PENDING}' AND o.attempts > 0 AND o.next_attempt_at > now())"
)

#: Parameters of :data:`OUTBOX_FILTER`: ``ids`` (uuid[]), ``states``, ``topics``, ``keys``
#: (text[]), ``older_than``/``newer_than`` (seconds since created), ``error`` (substring).
OUTBOX_FILTER_PARAMETERS: Final = (
    "ids",
    "states",
    "topics",
    "keys",
    "older_than",
    "newer_than",
    "error",
)

OUTBOX_FILTER: Final = f"""
    (%(ids)s::uuid[] IS NULL OR o.id = ANY(%(ids)s::uuid[]))
AND (%(states)s::text[] IS NULL OR o.status = ANY(%(states)s::text[])
     OR ('{BACKING_OFF}' = ANY(%(states)s::text[]) AND {_BACKING_OFF_ROW}))
AND (%(topics)s::text[] IS NULL OR o.topic = ANY(%(topics)s::text[]))
AND (%(keys)s::text[] IS NULL OR o.key = ANY(%(keys)s::text[]))
AND (%(older_than)s::float8 IS NULL
     OR o.created_at < now() - %(older_than)s::float8 * interval '1 second')
AND (%(newer_than)s::float8 IS NULL
     OR o.created_at >= now() - %(newer_than)s::float8 * interval '1 second')
AND (%(error)s::text IS NULL OR strpos(lower(o.last_error), lower(%(error)s::text)) > 0)
"""
"""The outbox rows (alias ``o``) an operator's filter selects."""

#: Which rows each changing command may touch, on top of the operator's filter.
RETRYABLE: Final = f"(o.status = '{DEAD}' OR {_BACKING_OFF_ROW})"
REPLAYABLE: Final = f"o.status = '{PUBLISHED}'"
ANY_ROW: Final = "TRUE"

_ROW_COLUMNS: Final = (
    "o.position, o.id, o.topic, o.key, o.partition, o.status, o.attempts, o.last_error, "
    "o.created_at, o.available_at, o.next_attempt_at, o.published_at, o.dead_lettered_at, "
    "length(o.payload) AS payload_bytes, o.content_type"
)


def _outbox(tables: Tables, columns: str, where: str, then: str = "") -> str:
    """``SELECT columns FROM <outbox> AS o WHERE where then``."""
    return f"SELECT {columns} FROM {quoted_table(tables.outbox)} AS o WHERE {where} {then}"


@functools.cache
def outbox_rows_sql(tables: Tables, guard: str = ANY_ROW, newest_first: bool = False) -> str:
    """Up to %(limit)s rows matching the filter and ``guard``, in position order."""
    order = "DESC" if newest_first else "ASC"
    then = f"ORDER BY o.position {order} LIMIT %(limit)s"
    return _outbox(tables, _ROW_COLUMNS, f"{OUTBOX_FILTER} AND {guard}", then)


@functools.cache
def outbox_count_sql(tables: Tables, guard: str = ANY_ROW) -> str:
    """How many rows match the filter and ``guard``."""
    return _outbox(tables, "count(*)", f"{OUTBOX_FILTER} AND {guard}")


@functools.cache
def outbox_row_sql(tables: Tables) -> str:
    """Every column of the row with id %(id)s (none if there is no such row)."""
    return _outbox(tables, f"{_ROW_COLUMNS}, o.payload, o.headers", "o.id = %(id)s")


@functools.cache
def outbox_states_of_sql(tables: Tables) -> str:
    """The state of each of the ids %(ids)s that are in the outbox."""
    return _outbox(tables, "o.id, o.status", "o.id = ANY(%(ids)s)")


def _batch(tables: Tables, guard: str) -> str:
    # A cursor over positions (after the last batch, up to the newest row when the change
    # was confirmed): a row the relay has meanwhile published again, or failed again, is
    # never taken a second time by the same command.
    return _outbox(
        tables,
        "o.position",
        f"{OUTBOX_FILTER} AND {guard} AND o.position > %(after)s AND o.position <= %(upto)s",
        "ORDER BY o.position LIMIT %(limit)s FOR UPDATE",
    )


@functools.cache
def max_position_sql(tables: Tables) -> str:
    """The newest position in the outbox (0 when empty): where a change's cursor stops."""
    return f"SELECT coalesce(max(position), 0) FROM {quoted_table(tables.outbox)}"


def _back_to_pending_sql(tables: Tables, guard: str, resets: str) -> str:
    """Move up to %(limit)s rows matching the filter and ``guard`` to pending, due now,
    applying ``resets`` too; one notification wakes the relays."""
    outbox = quoted_table(tables.outbox)
    return f"""
WITH batch AS ({_batch(tables, guard)}),
changed AS (
    UPDATE {outbox} AS t SET status = '{PENDING}', next_attempt_at = now(), {resets}
    FROM batch WHERE t.position = batch.position
    RETURNING t.position
)
SELECT count(*), coalesce(max(position), 0), pg_notify(%(channel)s, '') FROM changed
"""


@functools.cache
def retry_batch_sql(tables: Tables) -> str:
    """Move up to %(limit)s dead or backing-off rows matching the filter to pending, due now.

    A dead row also gets its attempts reset to 0 (a full set of attempts again) and loses
    its ``dead_lettered_at``; a backing-off row keeps its attempts. ``last_error`` is kept
    as a record of what went wrong.
    """
    return _back_to_pending_sql(
        tables,
        RETRYABLE,
        f"attempts = CASE WHEN t.status = '{DEAD}' THEN 0 ELSE t.attempts END, "
        "dead_lettered_at = NULL",
    )


@functools.cache
def replay_batch_sql(tables: Tables) -> str:
    """Move up to %(limit)s published rows matching the filter back to pending, due now.

    The rows keep their ids, so a consumer with an inbox recognises the messages it
    already handled. Attempts start again from 0; ``published_at`` is cleared.
    """
    return _back_to_pending_sql(tables, REPLAYABLE, "attempts = 0, published_at = NULL")


@functools.cache
def oldest_published_sql(tables: Tables) -> str:
    """When the oldest published row still kept was written (NULL if none is kept)."""
    return _outbox(tables, "min(o.created_at)", f"o.status = '{PUBLISHED}'")


#: Rows ``purge`` may delete: published or dead (%(states)s), finished more than
#: %(finished_before)s seconds ago, of %(topics)s if given.
_PURGEABLE: Final = f"""
    o.status = ANY(%(states)s::text[]) AND o.status IN ('{PUBLISHED}', '{DEAD}')
AND coalesce(o.published_at, o.dead_lettered_at)
    < now() - %(finished_before)s::float8 * interval '1 second'
AND (%(topics)s::text[] IS NULL OR o.topic = ANY(%(topics)s::text[]))
"""


@functools.cache
def purge_count_sql(tables: Tables) -> str:
    """How many rows :func:`purge_batch_sql` would delete."""
    return _outbox(tables, "count(*)", _PURGEABLE)


@functools.cache
def purge_rows_sql(tables: Tables) -> str:
    """Up to %(limit)s of the rows :func:`purge_batch_sql` would delete, oldest first."""
    return _outbox(tables, _ROW_COLUMNS, _PURGEABLE, "ORDER BY o.position LIMIT %(limit)s")


@functools.cache
def purge_batch_sql(tables: Tables) -> str:
    """Delete up to %(limit)s published or dead rows finished long enough ago."""
    batch = _outbox(
        tables, "o.position", _PURGEABLE, "ORDER BY o.position LIMIT %(limit)s FOR UPDATE"
    )
    return f"DELETE FROM {quoted_table(tables.outbox)} WHERE position IN ({batch})"


@functools.cache
def state_counts_sql(tables: Tables) -> str:
    """Rows per (state, topic), with backing-off rows counted as their own state."""
    return f"""
SELECT CASE WHEN {_BACKING_OFF_ROW} THEN '{BACKING_OFF}' ELSE o.status END AS state,
       o.topic, count(*)
FROM {quoted_table(tables.outbox)} AS o
GROUP BY 1, 2 ORDER BY 2, 1
"""


@functools.cache
def pending_summary_sql(tables: Tables) -> str:
    """Pending rows: how many, how many are delayed, and the oldest due row's times.

    The oldest pending age counts from when a row became due (``available_at``: its
    creation, or the end of its delay), so delayed messages do not look stuck.
    """
    return f"""
SELECT count(*),
       count(*) FILTER (WHERE o.available_at > now()),
       min(o.available_at) FILTER (WHERE o.available_at <= now()),
       extract(epoch FROM now() - min(o.available_at) FILTER (WHERE o.available_at <= now())),
       now()
FROM {quoted_table(tables.outbox)} AS o WHERE o.status = '{PENDING}'
"""


@functools.cache
def partition_owners_sql(tables: Tables) -> str:
    """Per owner (NULL: nobody): its partitions, expired leases, and pending rows in them."""
    partitions = quoted_table(tables.partitions)
    outbox = quoted_table(tables.outbox)
    return f"""
SELECT p.owner,
       array_agg(p.partition ORDER BY p.partition),
       count(*) FILTER (WHERE p.lease_expires_at < now()),
       min(p.lease_expires_at),
       coalesce(sum(w.pending), 0)::bigint
FROM {partitions} AS p
LEFT JOIN (
    SELECT o.partition, count(*) AS pending FROM {outbox} AS o
    WHERE o.status = '{PENDING}' GROUP BY o.partition
) AS w ON w.partition = p.partition
GROUP BY p.owner ORDER BY p.owner NULLS LAST
"""


@functools.cache
def relays_sql(tables: Tables) -> str:
    """The relays that registered, with seconds since their last heartbeat, and the state
    of their broker connection (state, error, seconds in that state)."""
    return (
        "SELECT relay_id, host, pid, started_at, heartbeat_at, "
        "extract(epoch FROM now() - heartbeat_at), "
        "broker_state, broker_error, extract(epoch FROM now() - broker_state_at) "
        f"FROM {quoted_table(tables.relays)} ORDER BY relay_id"
    )


#: Parameters of :data:`INBOX_FILTER`: ``consumers``, ``message_ids`` (text[]),
#: ``older_than``/``newer_than`` (seconds since processed).
INBOX_FILTER: Final = """
    (%(consumers)s::text[] IS NULL OR i.consumer = ANY(%(consumers)s::text[]))
AND (%(message_ids)s::text[] IS NULL OR i.message_id = ANY(%(message_ids)s::text[]))
AND (%(older_than)s::float8 IS NULL
     OR i.processed_at < now() - %(older_than)s::float8 * interval '1 second')
AND (%(newer_than)s::float8 IS NULL
     OR i.processed_at >= now() - %(newer_than)s::float8 * interval '1 second')
"""


def _inbox(tables: Tables, columns: str, then: str = "") -> str:
    """``SELECT columns FROM <inbox> AS i WHERE <the filter> then``."""
    return f"SELECT {columns} FROM {quoted_table(tables.inbox)} AS i WHERE {INBOX_FILTER} {then}"


@functools.cache
def inbox_summary_sql(tables: Tables) -> str:
    """Per consumer: entries, and when the oldest and newest were processed."""
    columns = "i.consumer, count(*), min(i.processed_at), max(i.processed_at)"
    return _inbox(tables, columns, "GROUP BY i.consumer ORDER BY i.consumer")


@functools.cache
def inbox_rows_sql(tables: Tables, newest_first: bool = True) -> str:
    """Up to %(limit)s inbox entries matching the filter, by processing time."""
    order = "DESC" if newest_first else "ASC"
    then = f"ORDER BY i.processed_at {order}, i.message_id LIMIT %(limit)s"
    return _inbox(tables, "i.consumer, i.message_id, i.processed_at", then)


@functools.cache
def inbox_count_sql(tables: Tables) -> str:
    """How many inbox entries match the filter."""
    return _inbox(tables, "count(*)")


@functools.cache
def inbox_delete_batch_sql(tables: Tables) -> str:
    """Delete up to %(limit)s inbox entries matching the filter (oldest first)."""
    batch = _inbox(
        tables, "i.consumer, i.message_id", "ORDER BY i.processed_at LIMIT %(limit)s FOR UPDATE"
    )
    return (
        f"DELETE FROM {quoted_table(tables.inbox)} AS t USING ({batch}) AS b "
        "WHERE t.consumer = b.consumer AND t.message_id = b.message_id"
    )


@functools.cache
def inbox_has_consumer_sql(tables: Tables) -> str:
    """True if consumer %(consumer)s has at least one inbox entry (one index probe)."""
    return (
        f"SELECT EXISTS (SELECT 1 FROM {quoted_table(tables.inbox)} WHERE consumer = %(consumer)s)"
    )


@functools.cache
def inbox_consumers_sql(tables: Tables) -> str:
    """The first %(limit)s consumer names in the inbox, in order.

    A skip scan of the primary key (one index probe per name), so it stays fast however
    many entries each consumer has.
    """
    inbox = quoted_table(tables.inbox)
    return (
        "WITH RECURSIVE names(consumer, n) AS ("
        f" (SELECT consumer, 1 FROM {inbox} ORDER BY consumer LIMIT 1)"
        " UNION ALL"
        f" SELECT (SELECT i.consumer FROM {inbox} AS i WHERE i.consumer > names.consumer"
        "          ORDER BY i.consumer LIMIT 1), n + 1"
        " FROM names WHERE names.consumer IS NOT NULL AND n < %(limit)s"
        ") SELECT consumer FROM names WHERE consumer IS NOT NULL"
    )


@functools.cache
def inbox_ids_present_sql(tables: Tables) -> str:
    """Which of %(message_ids)s consumer %(consumer)s has an inbox entry for."""
    return (
        f"SELECT message_id FROM {quoted_table(tables.inbox)} "
        "WHERE consumer = %(consumer)s AND message_id = ANY(%(message_ids)s::text[])"
    )
