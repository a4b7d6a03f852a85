"""The fault suite's checks bite: a run whose results were tampered with is caught.

Every scenario passes only if its check finds nothing; this proves the check finds what
it must — an effect applied twice, a lost effect, an effect nobody committed, a key out of
order, a message of a rolled-back transaction — on a real run, tampered with after it
settled. And the crash writer files a COMMIT the database crashed under by what the
restarted server holds, both ways, on a private PostgreSQL.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.faults.harness import Endpoints, RunFactory
from tests.support.database import count
from tests.support.private_postgres import PrivatePostgres
from tests.support.waiting import wait_until_sync
from tests.support.writing import CrashWriter

pytestmark = pytest.mark.timeout(120)


async def test_the_check_finds_loss_double_effects_phantoms_and_disorder(
    make_run: RunFactory, rabbitmq: str
) -> None:
    async with make_run("self-check", Endpoints("rabbitmq", rabbitmq, rabbitmq)) as run:
        await run.start(relays=1)
        while run.writer.transactions < 10:
            await run.pause(0.1, 0.2)
        await run.settle()
        clean = run.check()
        assert clean.passed, clean.problems
        assert clean.messages >= 50

        written = run.writer.written.messages
        twice, lost = str(written[0].id), str(written[1].id)
        with run.engine.begin() as connection:
            connection.execute(
                text(f"INSERT INTO {run.effects} (message_id, topic, pid) VALUES (:i, 't', 0)"),
                [{"i": twice}, {"i": "never-committed"}],
            )
            delete = text(f"DELETE FROM {run.effects} WHERE message_id = :i")
            connection.execute(delete, {"i": lost})
        # Two messages of one key swap their numbers: their deliveries are now out of order.
        # (Any key written twice, apart from the two messages tampered with above: how
        # many messages share a key depends on the profile and the seed.)
        by_key: dict[str | None, list[Any]] = {}
        for message in written[2:]:
            by_key.setdefault(message.key, []).append(message)
        first, second = next(group for group in by_key.values() if len(group) >= 2)[:2]
        sequence = run.writer.written.sequence
        sequence[first.id], sequence[second.id] = sequence[second.id], sequence[first.id]
        # A committed message filed as rolled back: its row, delivery and effect are "seen".
        run.writer.rolled_back.add([written[2]], [0])

        run.outcome.problems.clear()
        tampered = run.check()
    assert not tampered.passed
    assert (tampered.lost, tampered.applied_twice, tampered.order_violations) == (1, 1, 1)
    assert any("never committed" in problem for problem in tampered.problems)
    assert any("rolled-back rows" in problem for problem in tampered.problems)


@pytest.mark.parametrize("fate", ["committed", "rolled back"])
def test_a_commit_cut_off_by_a_crash_is_settled_after_the_restart(
    fate: str, private_postgres: PrivatePostgres, private_tables: Tables, private_engine: Engine
) -> None:
    """The crash writer files a COMMIT that died with the server by what the restarted
    server holds: one whose WAL was flushed (it then waited for a synchronous standby that
    does not exist) as committed, one still running a deferred trigger as rolled back."""
    outbox_table = quoted_table(private_tables.outbox)
    if fate == "committed":
        setup = ["ALTER SYSTEM SET synchronous_standby_names = 'absent'", "SELECT pg_reload_conf()"]
        waiting = "SyncRep"
    else:
        setup = [
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(600); RETURN NULL; END $$",
            f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {outbox_table} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        ]
        waiting = "PgSleep"
    _autocommit(private_postgres, setup)
    writer = CrashWriter(
        private_engine, Outbox(private_tables), "settle", threads=1, rows_per_transaction=3
    )
    batch, numbers = writer.next_batch(writer.keys, random.Random(0))
    thread = threading.Thread(target=writer.transaction, args=(batch, numbers), daemon=True)
    thread.start()
    in_flight = "SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND wait_event = :w"
    wait_until_sync(lambda: count(private_engine, in_flight, w=waiting), what="a COMMIT waiting")

    private_postgres.kill()
    private_postgres.start()
    thread.join(60)
    _autocommit(private_postgres, ["ALTER SYSTEM RESET ALL", "SELECT pg_reload_conf()"])

    assert writer.error is None
    ids = {str(m.id) for m in batch}
    stored_sql = f"SELECT count(*) FROM {outbox_table} WHERE id = ANY(:i)"
    stored = count(private_engine, stored_sql, i=[m.id for m in batch])
    if fate == "committed":
        assert (writer.unknown_committed, writer.unknown_rolled_back, stored) == (1, 0, 3)
        assert (writer.written.ids(), writer.rolled_back.ids()) == (ids, set())
    else:
        assert (writer.unknown_committed, writer.unknown_rolled_back, stored) == (0, 1, 0)
        assert (writer.written.ids(), writer.rolled_back.ids()) == (set(), ids)


def _autocommit(server: PrivatePostgres, statements: list[str]) -> None:
    with psycopg.connect(server.conninfo, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)
