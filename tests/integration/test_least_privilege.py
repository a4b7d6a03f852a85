"""Each postroom process runs with only the rights `postroom db grants` gives it.

Five roles per test (unique names, dropped afterwards): the migrator is given what
``db grants --migrator`` prints and runs ``db upgrade``; as the tables' owner it then
applies the grants of the writer, relay, consumer and operator. The writer enqueues,
``postroom relay`` and ``postroom consume`` run as real processes under their roles on
each broker, and the operator commands run under theirs. A role missing one right fails
at start-up, in one sentence naming that right.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from postroom.database import create_engine
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables, build_tables
from postroom.schema.grants import Role
from tests.support.apps import app_env, delete_kafka_topics, write_consumer_app
from tests.support.cli import run_postroom
from tests.support.consuming import KAFKA_GROUP_SETTINGS
from tests.support.database import count, drop_schema, unique_schema
from tests.support.processes import RelayFleet, all_alive
from tests.support.readback import create_topics, delete_consumer_queues
from tests.support.services import AMQP_URL, KAFKA_BOOTSTRAP, KAFKA_URL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

MESSAGES = 5


@dataclass
class Roles:
    """The five roles of one test, their URLs, and the tables the migrator created."""

    names: dict[Role, str]
    urls: dict[Role, str]
    tables: Tables

    def postroom(self, role: Role, *args: str) -> tuple[int, str, str]:
        """Run ``postroom ARGS`` on this test's schema as ``role``; status, stdout, stderr."""
        result = run_postroom(
            *args,
            "--schema",
            str(self.tables.schema),
            env={"POSTROOM_DATABASE_URL": self.urls[role], "COLUMNS": "300"},
            clean=True,
        )
        return result.returncode, result.stdout, result.stderr


@pytest.fixture
def roles(database_url: str, engine: Engine) -> Iterator[Roles]:
    """Create the roles, make the migrator own a fresh schema's tables, grant the others."""
    tag = uuid.uuid4().hex[:8]
    names = {role: f"pr_lp_{tag}_{role}" for role in Role}
    base = make_url(database_url)
    urls = {
        role: base.set(username=name, password=None).render_as_string(hide_password=False)
        for role, name in names.items()
    }
    schema = unique_schema()
    with engine.begin() as connection:
        for name in names.values():
            connection.execute(text(f'CREATE ROLE "{name}" LOGIN'))
    roles = Roles(names, urls, build_tables(schema))
    try:
        admin = {"POSTROOM_DATABASE_URL": database_url}
        migrator = ["--migrator", names[Role.MIGRATOR], "--schema", schema]
        granted = run_postroom("db", "grants", *migrator, "--apply", env=admin, clean=True)
        assert granted.returncode == 0, granted.stderr
        code, out, err = roles.postroom(Role.MIGRATOR, "db", "upgrade")
        assert code == 0, err
        assert "upgraded from nothing" in out
        flags = [f"--{role}={names[role]}" for role in Role if role is not Role.MIGRATOR]
        code, _, err = roles.postroom(Role.MIGRATOR, "db", "grants", *flags, "--apply")
        assert code == 0, err
        yield roles
    finally:
        drop_schema(engine, schema)
        with engine.begin() as connection:
            for name in names.values():
                connection.execute(text(f'DROP OWNED BY "{name}"'))
                connection.execute(text(f'DROP ROLE "{name}"'))


def test_db_grants_prints_each_role_its_rights_on_custom_names(database_url: str) -> None:
    result = run_postroom(
        "db",
        "grants",
        '--writer=app"s',
        "--consumer=billing",
        "--schema=my_schema",
        "--outbox-table=events",
        "--inbox-table=seen",
        env={"POSTROOM_DATABASE_URL": database_url},
        clean=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'GRANT USAGE ON SCHEMA "my_schema" TO "app""s";' in lines
    assert 'GRANT INSERT ON TABLE "my_schema"."events" TO "app""s";' in lines
    assert 'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "my_schema"."seen" TO "billing";' in lines
    assert (
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "my_schema"."seen_attempts" TO "billing";'
        in lines
    )
    assert 'REVOKE ALL ON TABLE "my_schema"."events_relays" FROM "app""s";' in lines
    assert not any('TO "app"' in line and "seen" in line for line in lines)


def test_db_grants_without_a_role_is_bad_usage(database_url: str) -> None:
    result = run_postroom("db", "grants", env={"POSTROOM_DATABASE_URL": database_url}, clean=True)
    assert result.returncode == 2
    assert "name at least one role" in result.stderr


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
async def test_each_process_runs_with_only_its_grants(
    roles: Roles, engine: Engine, broker: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(broker)
    tables = roles.tables
    consumer_name = f"lp-{uuid.uuid4().hex[:8]}"
    topic = f"lp-{uuid.uuid4().hex[:8]}"
    url = AMQP_URL if broker == "rabbitmq" else f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"
    if broker == "kafka":
        create_topics(KAFKA_BOOTSTRAP, [topic], partitions=1)
    checked = (Role.WRITER, Role.RELAY, Role.CONSUMER, Role.OPERATOR)
    checks = await asyncio.gather(
        *(
            asyncio.to_thread(roles.postroom, role, "db", "check", "--role", role)
            for role in checked
        )
    )
    for role, (code, out, err) in zip(checked, checks, strict=True):
        assert code == 0, err
        assert f"has every right the {role} needs" in out

    app = tmp_path / "app"
    write_consumer_app(app, "lp_app")
    logs = tmp_path / "logs"
    schema = str(tables.schema)
    consumers = RelayFleet(roles.urls[Role.CONSUMER], schema=schema, log_dir=logs)
    relays = RelayFleet(roles.urls[Role.RELAY], schema=schema, log_dir=logs)
    try:
        consumer = consumers.start_consumer(
            "lp_app:consumer",
            broker_url=url,
            env=app_env(app, consumer_name, [topic]),
            pythonpath=str(app),
        )
        await consumer.wait_ready_async(30)

        writer = create_engine(roles.urls[Role.WRITER], pool_size=1)
        try:
            with writer.begin() as connection:
                Outbox(tables).enqueue_many(
                    connection,
                    [Message.create(topic, {"n": n}, key=f"k{n}") for n in range(MESSAGES)],
                )
        finally:
            writer.dispose()

        relay = relays.start(broker_url=url, poll_interval=0.2)
        inbox = f'SELECT count(*) FROM "{schema}"."{tables.inbox.name}" WHERE consumer = :c'
        published = (
            f'SELECT count(*) FROM "{schema}"."{tables.outbox.name}" WHERE status = \'published\''
        )
        # The consumer may handle a message before the relay's mark of it commits.
        await wait_until(
            lambda: (
                count(engine, inbox, c=consumer_name) == MESSAGES
                and count(engine, published) == MESSAGES
            ),
            within=40,
            what="every message published and handled by the restricted processes",
            watch=all_alive(relay, consumer),
        )
        assert relay.terminate(30) == 0, relay.tail()
        assert consumer.terminate(30) == 0, consumer.tail()
    finally:
        consumers.stop_all()
        relays.stop_all()
        if broker == "rabbitmq":
            await delete_consumer_queues(AMQP_URL, consumer_name)
        else:
            await asyncio.to_thread(delete_kafka_topics, KAFKA_BOOTSTRAP, [topic])

    if broker == "kafka":
        return  # the operator's commands do not depend on the broker
    # The operator's commands, under the operator's role: first the reads, then the purges.

    async def operator(*args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(roles.postroom, Role.OPERATOR, *args)

    status, listed = await asyncio.gather(
        operator("outbox", "status", "--json"),
        operator("inbox", "ls", "--consumer", consumer_name, "--json"),
    )
    assert status[0] == 0, status[2]
    assert listed[0] == 0, listed[2]
    assert consumer_name in listed[1]
    purges = await asyncio.gather(
        operator("outbox", "purge", "--older-than", "0s", "-s", "published", "--yes"),
        operator("inbox", "purge", "--older-than", "0s", "--consumer", consumer_name, "--yes"),
    )
    for code, _, err in purges:
        assert code == 0, err
    assert count(engine, inbox, c=consumer_name) == 0
    assert count(engine, published) == 0


def test_a_missing_right_stops_relay_and_consumer_at_start_up(
    roles: Roles, engine: Engine, tmp_path: Path
) -> None:
    tables = roles.tables
    inbox = f'"{tables.schema}"."{tables.inbox.name}"'
    outbox = f'"{tables.schema}"."{tables.outbox.name}"'
    with engine.begin() as connection:
        connection.execute(text(f'REVOKE UPDATE ON {inbox} FROM "{roles.names[Role.CONSUMER]}"'))
        connection.execute(text(f'REVOKE DELETE ON {outbox} FROM "{roles.names[Role.RELAY]}"'))

    code, _, err = roles.postroom(Role.CONSUMER, "db", "check", "--role", "consumer")
    assert code == 1
    assert f"lacks UPDATE on table {inbox}, which the consumer needs" in err
    assert f'GRANT UPDATE ON TABLE {inbox} TO "{roles.names[Role.CONSUMER]}";' in err

    app = tmp_path / "app"
    write_consumer_app(app, "lp_app")
    schema = str(tables.schema)
    logs = tmp_path / "logs"
    # memory:// so no broker is involved: the check comes before any connection to one.
    consumer = RelayFleet(roles.urls[Role.CONSUMER], schema=schema, log_dir=logs).start_consumer(
        "lp_app:consumer",
        broker_url="memory://lp",
        env=app_env(app, "lp-missing", ["t"]),
        pythonpath=str(app),
    )
    relay = RelayFleet(roles.urls[Role.RELAY], schema=schema, log_dir=logs).start(
        broker_url="memory://lp"
    )
    for process, right in (
        (consumer, f"UPDATE on table {inbox}"),
        (relay, f"DELETE on table {outbox}"),
    ):
        assert process.popen is not None
        assert process.popen.wait(30) == 3, process.tail()
        said = process.tail()
        assert f"lacks {right}, which the {process.kind} needs" in said, said
        errors = [line for line in process.lines() if line.startswith("error:")]
        assert len(errors) == 1, said
