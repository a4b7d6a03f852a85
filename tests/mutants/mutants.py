"""The mutants: deliberately broken builds of postroom, one small patch each.

Each mutant replaces one function or one SQL statement of postroom with a version that
breaks one of its promises. ``boot/sitecustomize.py`` applies the mutant named by
:data:`VARIABLE` at the start of every Python process of a mutant run: the pytest process
and the relays and consumers its tests start (they inherit the variable and
``PYTHONPATH``). This module imports nothing of the tests, so that file can load it by path.

A patch checks that the code it breaks is still there and raises :class:`MutantNotApplied`
otherwise: a renamed function or a reworded statement must not pass for a caught mutant.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The environment variable naming the mutant to apply (not ``POSTROOM_*``: the test
#: helpers that start relays and consumers leave those out of their environment).
VARIABLE = "TEST_MUTANT"
#: A file to which every process that applied the mutant appends a line (optional).
LOG_VARIABLE = "TEST_MUTANT_LOG"


class MutantNotApplied(RuntimeError):
    """The code a mutant breaks has changed: update the mutant's patch."""


@dataclass(frozen=True)
class Mutant:
    """One broken build, the promise it breaks, and the tests that must catch it."""

    name: str
    breaks: str
    """What the broken build does wrong, in one line."""
    patch: Callable[[], None]
    detecting: tuple[str, ...]
    """pytest node ids, each of which must fail under the mutant (``make mutants``)."""
    quick: str
    """The quickest of ``detecting``: the one the short form in ``make test`` runs."""


def _sample_tables() -> Any:
    from postroom.schema.tables import build_tables

    return build_tables("pr_mutant", "outbox", "inbox")


def _patched_sql(
    original: Callable[..., str], pattern: re.Pattern[str], replacement: str, what: str
) -> Callable[..., str]:
    """``original`` with every match of ``pattern`` replaced; raises if nothing matches."""

    def patched(*args: Any) -> str:
        sql, count = pattern.subn(replacement, original(*args))
        if count == 0:
            raise MutantNotApplied(f"{what}: pattern {pattern.pattern!r} not found")
        return sql

    return patched


def mark_without_confirm() -> None:
    """The relay records every message it sent as published, whatever the broker said."""
    from postroom.relay import service
    from postroom.relay.store import CONFIRMED

    original = service.Relay._outcome

    def outcome(self: Any, row: Any, result: Any) -> tuple[str, str | None, float]:
        if result is None:  # held back, never sent: left as it was
            return original(self, row, result)
        return CONFIRMED, None, 0.0

    setattr(service.Relay, "_outcome", outcome)


def consumer_skips_inbox() -> None:
    """The consumer runs the handler without inserting the inbox row."""
    from postroom.consumer import batching, processing
    from postroom.schema.inbox_sql import insert_inbox_sql as original

    if "INSERT INTO" not in original(_sample_tables()):
        raise MutantNotApplied("insert_inbox_sql no longer inserts")

    def insert_inbox_sql(tables: Any) -> str:
        # One row back, as for a new message, and nothing written.
        return (
            "SELECT 1 WHERE CAST(:consumer AS text) IS NOT NULL "
            "AND CAST(:message_id AS text) IS NOT NULL"
        )

    def insert_inbox_batch_sql(tables: Any) -> str:
        # Every id back, as for new messages, and nothing written (the batched path).
        return (
            "SELECT unnest(CAST(:message_ids AS text[])) WHERE CAST(:consumer AS text) IS NOT NULL"
        )

    setattr(processing, "insert_inbox_sql", insert_inbox_sql)
    setattr(batching, "insert_inbox_batch_sql", insert_inbox_batch_sql)


def mark_ignores_fencing_token() -> None:
    """The mark statement records outcomes whoever holds the partition's lease now."""
    from postroom.schema import relay_sql

    fence = re.compile(
        r" AND EXISTS \(SELECT 1 FROM \S+ AS p "
        r"WHERE p\.partition = t\.partition AND p\.token = r\.token\)"
    )
    patched = _patched_sql(relay_sql.mark_sql, fence, "", "mark_sql")
    for delete_published in (False, True):
        patched(_sample_tables(), delete_published)
    setattr(relay_sql, "mark_sql", patched)


def claim_reorders_keys() -> None:
    """The claim reads the newest due rows first, so a key's later message goes out first."""
    from postroom.schema import relay_sql

    order = re.compile(r"ORDER BY ([oc])\.position\b(?! DESC)")
    patched = _patched_sql(relay_sql.claim_sql, order, r"ORDER BY \1.position DESC", "claim_sql")
    if patched(_sample_tables()).count("position DESC") != 3:
        raise MutantNotApplied("claim_sql: expected the window, inner and outer ORDER BY")
    setattr(relay_sql, "claim_sql", patched)


def claim_skips_key_wait() -> None:
    """The claim takes a key's later rows while an earlier row of the key backs off."""
    from postroom.schema import relay_sql

    wait = re.compile(r"\s+AND NOT EXISTS \(.*?e\.next_attempt_at > now\(\)\s*\)", re.DOTALL)
    patched = _patched_sql(relay_sql.claim_sql, wait, "", "claim_sql")
    patched(_sample_tables())
    setattr(relay_sql, "claim_sql", patched)


_RELAY = "tests/integration/test_relay.py::"
_POISON = "tests/integration/test_relay_poison.py::"
_PROCESSES = "tests/integration/test_relay_processes.py::"
_FENCING = "tests/integration/test_relay_fencing.py::"
_CONSUMER = "tests/integration/test_consumer.py::"
_CONSUMER_PROCESS = "tests/integration/test_consumer_process.py::"
_HARDENING = "tests/integration/test_hardening_consumer.py::"
_FAULTS = "tests/faults/test_faults.py::"

#: Every mutant, in the order the harness runs them.
MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="mark-without-confirm",
        breaks="marks a row published although the broker refused it (no confirm)",
        patch=mark_without_confirm,
        detecting=(
            _RELAY + "test_poison_row_retries_with_backoff_then_is_dead_lettered_while_others_flow",
            _POISON + "test_unroutable_rabbitmq_row_is_retried_on_the_backoff_then_dead_and_"
            "its_key_flows",
            _POISON + "test_kafka_record_over_message_max_bytes_is_dead_at_once_and_its_key_flows",
            _RELAY + "test_broker_outage_burns_no_attempts_and_resumes_by_itself",
            _FAULTS + "test_broker_unreachable_then_back[rabbitmq]",
        ),
        quick=_RELAY
        + "test_poison_row_retries_with_backoff_then_is_dead_lettered_while_others_flow",
    ),
    Mutant(
        name="consumer-skips-inbox",
        breaks="runs the handler without the inbox row, so a redelivery applies twice",
        patch=consumer_skips_inbox,
        detecting=(
            _HARDENING + "test_one_uuid_in_every_spelling_runs_the_handler_once",
            _CONSUMER + "test_five_deliveries_change_the_business_table_once[memory]",
            _CONSUMER + "test_five_deliveries_change_the_business_table_once[rabbitmq]",
            _CONSUMER + "test_five_deliveries_change_the_business_table_once[kafka]",
            _CONSUMER_PROCESS
            + "test_consumer_killed_before_commit_processes_the_message_once_after_restart",
            _FAULTS + "test_duplicate_storms[rabbitmq]",
            _FAULTS + "test_duplicate_storms[kafka]",
        ),
        quick=_HARDENING + "test_one_uuid_in_every_spelling_runs_the_handler_once",
    ),
    Mutant(
        name="mark-ignores-fencing-token",
        breaks="a relay whose lease was taken over still marks its batch",
        patch=mark_ignores_fencing_token,
        detecting=(
            _RELAY + "test_a_stalled_relay_cannot_mark_rows_another_relay_took_over",
            _FENCING + "test_a_stale_failure_cannot_undo_the_new_owners_confirm[rejected]",
            _FENCING + "test_a_stale_failure_cannot_undo_the_new_owners_confirm[refused]",
        ),
        quick=_RELAY + "test_a_stalled_relay_cannot_mark_rows_another_relay_took_over",
    ),
    Mutant(
        name="claim-reorders-keys",
        breaks="the claim reads the newest rows first, reordering each key",
        patch=claim_reorders_keys,
        detecting=(
            _RELAY + "test_hot_keys_stay_in_order_across_many_batches",
            _RELAY + "test_rows_of_a_long_transaction_committing_late_are_published_in_order",
            _PROCESSES + "test_ten_thousand_keyed_messages_arrive_exactly_with_three_relays_"
            "and_one_killed[rabbitmq]",
            _FAULTS + "test_long_transactions_commit_after_later_rows_were_published[rabbitmq]",
            _FAULTS + "test_long_transactions_commit_after_later_rows_were_published[kafka]",
        ),
        quick=_RELAY + "test_hot_keys_stay_in_order_across_many_batches",
    ),
    Mutant(
        name="claim-skips-key-wait",
        breaks="a key's later row goes out while an earlier row of the key backs off",
        patch=claim_skips_key_wait,
        detecting=(
            _RELAY + "test_poison_row_retries_with_backoff_then_is_dead_lettered_while_others_flow",
            _POISON + "test_unroutable_rabbitmq_row_is_retried_on_the_backoff_then_dead_and_"
            "its_key_flows",
        ),
        quick=_RELAY
        + "test_poison_row_retries_with_backoff_then_is_dead_lettered_while_others_flow",
    ),
)


def named(name: str) -> Mutant:
    """The mutant called ``name``."""
    for mutant in MUTANTS:
        if mutant.name == name:
            return mutant
    known = ", ".join(m.name for m in MUTANTS)
    raise MutantNotApplied(f"no mutant named {name!r} (known: {known})")
