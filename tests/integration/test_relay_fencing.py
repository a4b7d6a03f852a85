"""Fencing where only the lease token can tell: a stale relay's failure lands between the
new owner's claim and its mark.

While the new owner has not recorded its batch, the rows are still pending with the
attempts and due time both relays read, so the mark's other checks (status, attempts,
due time) let the stale relay's outcome through; only the partition's lease token stops
it. Without it the stale failure would count an attempt (or dead-letter the row) for a
message the new owner delivered, and the new owner's confirm would then be refused, so
the row would be published again or left dead though delivered.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.outbox import Outbox
from postroom.relay.leases import PartitionLeases
from postroom.relay.store import (
    CONFIRMED,
    REFUSED,
    REJECTED,
    BatchOutcomes,
    Claim,
    Connection,
    OutboxStore,
    RowOutcome,
)
from postroom.schema import Tables
from tests.support.relaying import outbox_rows


def outcomes(claim: Claim, outcome: str) -> BatchOutcomes:
    """``outcome`` for every row of ``claim``, under the tokens the claim was read with."""
    error = None if outcome == CONFIRMED else f"{outcome} by the broker"
    delay = 5.0 if outcome == REJECTED else 0.0
    return BatchOutcomes.of(
        [
            RowOutcome(
                r.position,
                claim.tokens[r.partition],
                r.attempts,
                r.due_at,
                outcome,
                error=error,
                delay_seconds=delay,
            )
            for r in claim.rows
        ]
    )


@pytest.mark.parametrize("stale_outcome", [REJECTED, REFUSED])
async def test_a_stale_failure_cannot_undo_the_new_owners_confirm(
    stale_outcome: str,
    database_url: str,
    conninfo: str,
    engine: Engine,
    outbox: Outbox,
    tables: Tables,
) -> None:
    with Session(engine) as session:
        written = outbox.enqueue_many(
            session, [outbox.message("t", i, key=f"k{i % 2}") for i in range(6)]
        )
        session.commit()
    leases_a = PartitionLeases(Connection(conninfo, database_url), tables, "relay-a", 30)
    store_a = OutboxStore(Connection(conninfo, database_url), tables)
    await leases_a.heartbeat()
    stale = await store_a.claim(leases_a.tokens, limit=10)
    # relay-a stalls past its lease; relay-b takes every partition and reads the same rows.
    with engine.begin() as connection:
        connection.execute(
            update(tables.partitions).values(lease_expires_at=text("now() - interval '1 second'"))
        )
        connection.execute(tables.relays.delete())
    leases_b = PartitionLeases(Connection(conninfo, database_url), tables, "relay-b", 30)
    store_b = OutboxStore(Connection(conninfo, database_url), tables)
    await leases_b.heartbeat()
    current = await store_b.claim(leases_b.tokens, limit=10)
    assert [r.position for r in current.rows] == [r.position for r in stale.rows]
    assert len(current.rows) == len(written)

    # relay-b is publishing; relay-a wakes and records its publish as failed.
    stale_marks = await store_a.mark(
        outcomes(stale, stale_outcome), max_attempts=3, delete_published=False
    )
    # relay-b's broker confirms them all.
    marks = await store_b.mark(outcomes(current, CONFIRMED), max_attempts=3, delete_published=False)

    rows = {r.id: r for r in outbox_rows(engine, tables)}
    assert {(r.status, r.attempts, r.last_error) for r in rows.values()} == {
        ("published", 0, None)
    }, f"the stale relay's {stale_outcome} mark changed rows relay-b delivered"
    assert all(r.dead_lettered_at is None for r in rows.values())
    assert stale_marks == []
    assert sorted(m.position for m in marks) == sorted(r.position for r in current.rows)
    assert set(rows) == {m.id for m in written}
