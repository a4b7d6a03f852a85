"""Misconfiguration is loud: a process that cannot do its work exits non-zero with one
sentence (or reports itself unready), never "live" while doing nothing, and never prints
the secret in its URL. Beside each broken process, the stage's healthy relay and consumer
keep the ordinary traffic flowing.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.abuse.harness import BROKERS, HEALTH_TIMEOUT, PROFILE, Stage
from tests.support.network import http_get
from tests.support.processes import ServiceProcess
from tests.support.waiting import wait_until_sync


def exits(process: ServiceProcess, within: float = 60.0) -> int:
    """Wait until ``process`` exits by itself; its status."""
    wait_until_sync(
        lambda: not process.alive,
        within=within,
        what=f"{process} exiting",
        interval=0.1,
        detail=process.tail,
    )
    status = process.returncode
    assert status is not None
    return status


def one_sentence(process: ServiceProcess, *words: str) -> str:
    """The error the process ended with: named once, no traceback; it contains ``words``."""
    lines = process.lines()
    assert not any("Traceback" in line for line in lines), process.tail()
    saying = [line for line in lines if all(w in line for w in words)]
    assert saying, f"no line says {words}\n{process.tail()}"
    return saying[-1]


@pytest.mark.parametrize("kind", ["relay", "consumer"])
@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_taken_metrics_port(stage: Stage, kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        start = stage.start_relay if kind == "relay" else stage.start_consumer
        others = stage.ordinary(PROFILE.others)
        stage.commit(others)
        broken = start(metrics_port=port, broker_url=stage.broker_url)
        status = exits(broken)
    assert status != 0, broken.tail()
    one_sentence(broken, "cannot serve metrics", str(port))
    other = stage.flowing(others)
    stage.finish(f"misconfig: taken metrics port ({kind})", f"exit {status}, one sentence", other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_idle_services_stay_healthy(stage: Stage) -> None:
    relay, consumer = stage.services
    stage.wait_handled_once([])  # nothing in flight from an earlier case
    watched = HEALTH_TIMEOUT * PROFILE.idle_windows
    end = time.monotonic() + watched
    answers: set[tuple[str, int]] = set()
    while time.monotonic() < end:
        for name, port in (("relay", stage.relay_port), ("consumer", stage.consumer_port)):
            answers.add((name, http_get(port, "/healthz")[0]))
        time.sleep(0.2)
    assert answers == {("relay", 200), ("consumer", 200)}, answers
    others = stage.ordinary(PROFILE.others)
    stage.commit(others)
    other = stage.flowing(others)
    stage.finish(
        f"idle {watched:g} s ({PROFILE.idle_windows:g} health windows)",
        "/healthz 200 throughout (relay, consumer)",
        other,
    )
    assert relay.alive
    assert consumer.alive
