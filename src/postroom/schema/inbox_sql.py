"""The consumer's statements on the inbox: record a message, and purge old rows in batches.

Parameters use SQLAlchemy's ``:name`` style (they run through ``text()`` on the handler's
session). The insert finds a conflict through the primary key ``(consumer, message_id)``;
the purge walks ``<inbox>_processed_at_idx``.
"""

from __future__ import annotations

import functools

from postroom.schema.sql import quoted_table
from postroom.schema.tables import Tables


@functools.cache
def insert_inbox_sql(tables: Tables) -> str:
    """Record ``:message_id`` as handled by ``:consumer``; returns a row only if it is new.

    A concurrent transaction that inserted the same pair and has not finished makes this
    statement wait for it: if that one commits, this returns nothing (a duplicate); if it
    rolls back, this inserts. So one message is handled once even when delivered twice at
    the same moment.
    """
    inbox = quoted_table(tables.inbox)
    return (
        f"INSERT INTO {inbox} (consumer, message_id) VALUES (:consumer, :message_id) "
        "ON CONFLICT (consumer, message_id) DO NOTHING RETURNING 1"
    )


@functools.cache
def insert_inbox_batch_sql(tables: Tables) -> str:
    """Record every id of the array ``:message_ids`` as handled by ``:consumer`` in one
    statement; returns the ids that were new (waits on concurrent inserts as the single one).
    """
    inbox = quoted_table(tables.inbox)
    return (
        f"INSERT INTO {inbox} (consumer, message_id) "
        "SELECT :consumer, unnest(CAST(:message_ids AS text[])) "
        "ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id"
    )


@functools.cache
def delete_inbox_sql(tables: Tables) -> str:
    """Delete the inbox rows of the ids in the array ``:message_ids`` for ``:consumer`` (a
    batch's handlers that failed or did not run)."""
    inbox = quoted_table(tables.inbox)
    return (
        f"DELETE FROM {inbox} WHERE consumer = :consumer "
        "AND message_id = ANY(CAST(:message_ids AS text[]))"
    )


@functools.cache
def purge_inbox_sql(tables: Tables) -> str:
    """Delete up to ``:limit`` rows of ``:consumer`` older than ``:retention`` seconds.

    Rows another replica of the consumer is deleting are skipped, not waited for.
    """
    inbox = quoted_table(tables.inbox)
    return (
        f"DELETE FROM {inbox} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {inbox} "
        "WHERE processed_at < now() - CAST(:retention AS float8) * interval '1 second' "
        "AND consumer = :consumer LIMIT :limit FOR UPDATE SKIP LOCKED))"
    )


@functools.cache
def count_redelivery_sql(tables: Tables) -> str:
    """Count one more redelivery of ``:message_id`` to ``:consumer``; returns the count.

    Run in its own short committed transaction before the handler, only for deliveries
    the broker marks as redelivered (never on the hot path of first deliveries).
    """
    attempts = quoted_table(tables.attempts)
    return (
        f"INSERT INTO {attempts} AS a (consumer, message_id, attempts, last_attempt_at) "
        "VALUES (:consumer, :message_id, 1, now()) "
        "ON CONFLICT (consumer, message_id) DO UPDATE "
        "SET attempts = a.attempts + 1, last_attempt_at = now() RETURNING a.attempts"
    )


@functools.cache
def forget_redeliveries_sql(tables: Tables) -> str:
    """Delete the redelivery count of ``:message_id`` for ``:consumer`` (once it is handled)."""
    attempts = quoted_table(tables.attempts)
    return f"DELETE FROM {attempts} WHERE consumer = :consumer AND message_id = :message_id"


@functools.cache
def purge_redeliveries_sql(tables: Tables) -> str:
    """Delete up to ``:limit`` redelivery counts of ``:consumer`` not touched for
    ``:retention`` seconds (left by messages settled without their handler committing)."""
    attempts = quoted_table(tables.attempts)
    return (
        f"DELETE FROM {attempts} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {attempts} "
        "WHERE last_attempt_at < now() - CAST(:retention AS float8) * interval '1 second' "
        "AND consumer = :consumer LIMIT :limit FOR UPDATE SKIP LOCKED))"
    )
