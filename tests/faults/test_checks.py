"""The fault suite's checks bite: a run whose results were tampered with is caught.

Every scenario passes only if its check finds nothing; this proves the check finds what
it must — an effect applied twice, a lost effect, an effect nobody committed, a key out of
order — on a real run, tampered with after it settled.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from tests.faults.harness import Endpoints, RunFactory

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

        run.outcome.problems.clear()
        tampered = run.check()
    assert not tampered.passed
    assert (tampered.lost, tampered.applied_twice, tampered.order_violations) == (1, 1, 1)
    assert any("never committed" in problem for problem in tampered.problems)
