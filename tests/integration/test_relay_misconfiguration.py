"""Misconfiguration is loud: a relay the broker refuses exits at once, naming the cause,
gives its partitions back and prints no secret; an unreachable broker stays an outage."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import RabbitMQReadback

pytestmark = pytest.mark.timeout(150)

RABBIT_SECRET = "wrong-s3cret-pw"
KAFKA_SECRET = "kafka-s3cret-pw"
#: How long a refused relay may take to give up and exit.
EXIT_WITHIN = 20.0


@pytest.fixture
def fleet(database_url: str, tables: Tables, tmp_path: Path) -> Iterator[RelayFleet]:
    """Relay processes on this test's schema; all killed at teardown."""
    assert tables.schema is not None
    with RelayFleet(database_url, schema=tables.schema, log_dir=tmp_path / "relays") as relays:
        yield relays


def with_credentials(url: str, user: str, password: str, vhost: str = "") -> str:
    """``url`` (amqp://...) with other credentials and vhost."""
    rest = url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    return f"amqp://{user}:{password}@{rest}/{vhost}"


async def exited(process: ServiceProcess, within: float) -> tuple[int, float]:
    """Wait for ``process`` to exit; its status and how long it ran."""
    started = time.monotonic()
    while process.alive:
        assert time.monotonic() - started < within, f"still running\n{process.tail()}"
        await asyncio.sleep(0.1)
    code = process.returncode
    assert code is not None
    return code, time.monotonic() - started


def plain_lines(process: ServiceProcess) -> list[str]:
    """The lines that are not JSON log events (what the CLI printed as an error)."""
    return [line for line in process.lines() if line.strip() and not line.startswith("{")]


def scalar_rows(engine: Engine, sql: str) -> list[object]:
    with engine.connect() as connection:
        return list(connection.execute(text(sql)).scalars())


async def test_refused_relays_exit_loudly_and_a_healthy_relay_publishes_everything(
    rabbitmq: str,
    fleet: RelayFleet,
    engine: Engine,
    outbox: Outbox,
    tables: Tables,
    database_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """The issue's case: beside a healthy relay, relays with a wrong password or vhost held
    their share of the partitions and left most new messages pending, shown as live."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    relays = quoted_table(tables.relays)
    partitions = quoted_table(tables.partitions)
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        healthy = fleet.start(broker_url=rabbitmq, lease=3)
        await healthy.wait_ready_async()
        wrong_password = fleet.start(
            broker_url=with_credentials(rabbitmq, "guest", RABBIT_SECRET), lease=3
        )
        unknown_vhost = fleet.start(
            broker_url=with_credentials(rabbitmq, "guest", "guest", f"no-such-vhost-{prefix}"),
            lease=3,
        )
        timings = {}
        for name, process in (("wrong_password", wrong_password), ("unknown_vhost", unknown_vhost)):
            code, seconds = await exited(process, EXIT_WITHIN)
            timings[name] = round(seconds, 1)
            assert code == 3, process.tail()
            printed = plain_lines(process)
            assert len(printed) == 1, printed
            assert printed[0].startswith("error: RabbitMQ at"), printed
            assert "Traceback" not in "\n".join(process.lines())
            assert RABBIT_SECRET not in "\n".join(process.lines())
            assert len(process.events("relay.broker_refused")) == 1, process.tail()
            assert not process.events("relay.broker_unavailable"), "a refusal is not an outage"
        assert "refused the login of user 'guest'" in plain_lines(wrong_password)[0]
        assert "would not open virtual host 'no-such-vhost-" in plain_lines(unknown_vhost)[0]
        record_property("seconds_to_exit", json.dumps(timings))

        gone = {wrong_password.relay_id, unknown_vhost.relay_id}
        assert gone.isdisjoint(scalar_rows(engine, f"SELECT relay_id FROM {relays}"))
        owners = scalar_rows(engine, f"SELECT owner FROM {partitions} WHERE owner IS NOT NULL")
        assert gone.isdisjoint(owners), "a refused relay must give its partitions back"

        with Session(engine) as session:
            written = [
                outbox.enqueue(session, f"{prefix}.t", {"n": i}, key=f"k{i}") for i in range(20)
            ]
            session.commit()
        await readback.wait_for_ids([str(m.id) for m in written], within=30)
        deadline = time.monotonic() + 10
        while True:
            states = scalar_rows(engine, f"SELECT broker_state FROM {relays}")
            if states == ["connected"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert states == ["connected"]
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "postroom", "outbox", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                **os.environ,
                "POSTROOM_DATABASE_URL": database_url,
                "POSTROOM_SCHEMA": tables.schema or "",
            },
        )
        shown = json.loads(status.stdout)["relays"]
        assert [(r["relay_id"], r["broker_state"]) for r in shown] == [
            (healthy.relay_id, "connected")
        ]
        assert healthy.terminate() == 0


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl`` (the test is skipped where it is not available to this user)."""
    subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=True)


@pytest.fixture
def user_without_permissions(rabbitmq: str) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user that may connect to vhost '/' but not configure or write anything."""
    if os.geteuid() != 0 or not shutil.which("rabbitmqctl"):
        pytest.skip("needs rabbitmqctl as root to create a RabbitMQ user")
    user, password = f"postroom-noperm-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


async def test_a_user_without_permissions_is_refused_loudly(
    rabbitmq: str, fleet: RelayFleet, user_without_permissions: tuple[str, str]
) -> None:
    user, password = user_without_permissions
    relay = fleet.start(broker_url=with_credentials(rabbitmq, user, password))
    code, _ = await exited(relay, EXIT_WITHIN)
    assert code == 3, relay.tail()
    printed = plain_lines(relay)
    assert len(printed) == 1, printed
    assert "refused access to exchange 'postroom'" in printed[0]
    assert "set_permissions" in printed[0]
    assert password not in "\n".join(relay.lines())


async def test_unreachable_broker_is_an_outage_the_relay_waits_out(
    fleet: RelayFleet, engine: Engine, tables: Tables
) -> None:
    """Nothing listening is not a refusal: the relay keeps its leases and retries."""
    relay = fleet.start(broker_url=f"amqp://guest:{RABBIT_SECRET}@127.0.0.1:1/", lease=3)
    await relay.wait_for_async("relay.broker_unavailable", within=30)
    await relay.wait_ready_async()
    relays = quoted_table(tables.relays)
    deadline = time.monotonic() + 10
    while True:
        rows = scalar_rows(engine, f"SELECT broker_state || ': ' || broker_error FROM {relays}")
        if (rows and str(rows[0]).startswith("unavailable")) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(rows) == 1
    assert str(rows[0]).startswith("unavailable: cannot connect to RabbitMQ at 127.0.0.1:1")
    assert RABBIT_SECRET not in str(rows[0])
    assert relay.alive
    assert relay.terminate() == 0
    assert RABBIT_SECRET not in "\n".join(relay.lines())


@pytest.mark.parametrize("where", ["url", "environment", "file"])
async def test_kafka_sasl_failure_exits_without_printing_the_secret(
    kafka: str, fleet: RelayFleet, tmp_path: Path, where: str
) -> None:
    """A failed SASL handshake ends the relay; the password, however given, is never printed."""
    settings = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "postroom",
        "sasl.password": KAFKA_SECRET,
    }
    env: dict[str, str] = {}
    url = f"kafka://{kafka}"
    if where == "url":
        url += "?" + "&".join(f"{k}={v}" for k, v in settings.items())
    elif where == "environment":
        env = {f"POSTROOM_KAFKA_{k.upper().replace('.', '_')}": v for k, v in settings.items()}
    else:
        config = tmp_path / "kafka.properties"
        config.write_text(
            "# client settings\n" + "".join(f"{k}={v}\n" for k, v in settings.items())
        )
        env = {"POSTROOM_KAFKA_CONFIG_FILE": str(config)}
    relay = fleet.start(broker_url=url, env=env)
    code, seconds = await exited(relay, EXIT_WITHIN)
    output = "\n".join(relay.lines())
    assert code == 3, relay.tail()
    assert KAFKA_SECRET not in output
    printed = plain_lines(relay)
    assert len(printed) == 1, printed
    assert printed[0].startswith("error: Kafka at"), printed
    assert "refused this client" in printed[0]
    configured = relay.events("relay.configured")
    assert len(configured) == 1
    if where == "url":
        assert "sasl.password=***" in configured[0]["broker_url"]
    assert seconds < EXIT_WITHIN
