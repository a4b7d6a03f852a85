"""The handler gate: ordinary runs side by side, a suspect's run alone."""

from __future__ import annotations

import asyncio

from postroom.consumer.isolation import HandlerGate


async def test_a_suspect_runs_alone_and_before_later_ordinary_runs() -> None:
    gate = HandlerGate()
    running: set[str] = set()
    overlaps: list[tuple[str, frozenset[str]]] = []
    order: list[str] = []

    async def run(name: str, alone: bool, seconds: float) -> None:
        async with gate.alone() if alone else gate.shared():
            overlaps.append((name, frozenset(running)))
            running.add(name)
            order.append(name)
            await asyncio.sleep(seconds)
            running.discard(name)

    first = [asyncio.create_task(run(f"a{n}", False, 0.05)) for n in range(3)]
    await asyncio.sleep(0.01)
    suspect = asyncio.create_task(run("suspect", True, 0.05))
    await asyncio.sleep(0.01)
    later = asyncio.create_task(run("later", False, 0.01))
    await asyncio.gather(*first, suspect, later)

    seen = dict(overlaps)
    assert seen["suspect"] == frozenset(), "the suspect ran beside others"
    assert "suspect" not in seen["later"]
    # The three first runs shared the gate; the later one waited for the suspect.
    assert order == ["a0", "a1", "a2", "suspect", "later"]
    assert len(seen["a2"]) == 2
