"""The relay and the consumer over TLS, through a TLS-terminating proxy with a throwaway CA:
to RabbitMQ (amqps://), where a broker certificate from another CA is refused in one
sentence, and to a private Kafka-compatible broker with its TLS settings from the
environment. A URL that turns the certificate check off is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy.engine import Engine

from postroom.brokers.kafka.settings import parse_kafka_url
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.urls import psycopg_conninfo
from tests.support.apps import app_env, write_consumer_app
from tests.support.cli import run_postroom
from tests.support.consuming import KAFKA_GROUP_SETTINGS
from tests.support.database import count
from tests.support.network import free_port
from tests.support.private_postgres import PrivatePostgres
from tests.support.processes import RelayFleet, TansuBroker, all_alive
from tests.support.readback import delete_consumer_queues
from tests.support.services import require_service
from tests.support.tls import CertificateAuthority, TlsProxy, postgres_with_ssl
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

MESSAGES = 5


def _upstream(amqp_url: str) -> tuple[str, int]:
    parts = urlsplit(amqp_url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def _amqps_url(amqp_url: str, port: int) -> str:
    parts = urlsplit(amqp_url)
    credentials = parts.netloc.rpartition("@")[0]
    return parts._replace(scheme="amqps", netloc=f"{credentials}@127.0.0.1:{port}").geturl()


@dataclass
class Flow:
    """A consumer app and a fleet on this test's tables, to send messages through a broker."""

    tables: Tables
    engine: Engine
    fleet: RelayFleet
    app: Path
    name: str = dataclasses.field(default_factory=lambda: f"tls-{uuid.uuid4().hex[:8]}")
    topic: str = dataclasses.field(default_factory=lambda: f"tls-{uuid.uuid4().hex[:8]}")

    @classmethod
    def create(cls, database_url: str, tables: Tables, engine: Engine, tmp_path: Path) -> Flow:
        """The app written to ``tmp_path``/app, the fleet logging to ``tmp_path``/logs."""
        write_consumer_app(tmp_path / "app", "tls_app")
        fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")
        return cls(tables, engine, fleet, tmp_path / "app")

    async def relay_and_consume(self, url: str, env: dict[str, str]) -> None:
        """Run a consumer and a relay at ``url`` with ``env``; every message is handled."""
        consumer = self.fleet.start_consumer(
            "tls_app:consumer",
            broker_url=url,
            env={**app_env(self.app, self.name, [self.topic]), **env},
            pythonpath=str(self.app),
        )
        await consumer.wait_ready_async(30)
        with self.engine.begin() as connection:
            Outbox(self.tables).enqueue_many(
                connection, [Message.create(self.topic, {"n": n}) for n in range(MESSAGES)]
            )
        relay = self.fleet.start(broker_url=url, poll_interval=0.2, env=env)
        inbox = f'SELECT count(*) FROM "{self.tables.schema}".inbox WHERE consumer = :c'
        await wait_until(
            lambda: count(self.engine, inbox, c=self.name) == MESSAGES,
            within=40,
            what=f"every message relayed and handled over TLS ({url.split(':')[0]})",
            watch=all_alive(relay, consumer),
        )
        assert relay.terminate(30) == 0, relay.tail()
        assert consumer.terminate(30) == 0, consumer.tail()


async def test_relay_and_consumer_run_over_tls_and_an_untrusted_certificate_is_refused(
    rabbitmq: str, database_url: str, tables: Tables, engine: Engine, tmp_path: Path
) -> None:
    authority = CertificateAuthority.create(tmp_path, "postroom test CA")
    stranger = CertificateAuthority.create(tmp_path, "some other CA")
    server = authority.issue(tmp_path, hosts=["127.0.0.1", "localhost"])
    flow = Flow.create(database_url, tables, engine, tmp_path)
    trusted = {"POSTROOM_AMQP_CA_FILE": str(authority.cert_path)}
    with TlsProxy(server, upstream=_upstream(rabbitmq)) as proxy:
        url = _amqps_url(rabbitmq, proxy.port)
        try:
            await flow.relay_and_consume(url, trusted)

            # The same proxy, but the client trusts another CA.
            untrusting = flow.fleet.start(
                broker_url=url, env={"POSTROOM_AMQP_CA_FILE": str(stranger.cert_path)}
            )
            assert untrusting.popen is not None
            assert untrusting.popen.wait(30) == 3, untrusting.tail()
            errors = [line for line in untrusting.lines() if line.startswith("error:")]
            assert len(errors) == 1, untrusting.tail()
            assert "presented a TLS certificate this client does not trust" in errors[0]
            assert "certificate verify failed" in errors[0]
            assert "POSTROOM_AMQP_CA_FILE" in errors[0]
            assert untrusting.events("relay.broker_refused"), untrusting.tail()
        finally:
            flow.fleet.stop_all()
            await delete_consumer_queues(rabbitmq, flow.name)


async def test_relay_and_consumer_reach_kafka_over_tls_with_settings_from_the_environment(
    tansu: str, database_url: str, tables: Tables, engine: Engine, tmp_path: Path
) -> None:
    authority = CertificateAuthority.create(tmp_path, "postroom test CA")
    stranger = CertificateAuthority.create(tmp_path, "some other CA")
    server = authority.issue(tmp_path, hosts=["127.0.0.1", "localhost"])
    flow = Flow.create(database_url, tables, engine, tmp_path)
    # Kafka clients connect where the broker says it is: a private broker that advertises
    # the proxy keeps every connection on TLS.
    proxy_port = free_port()
    broker = TansuBroker(tansu, advertised_port=proxy_port, log_path=tmp_path / "tansu.log")
    tls = {
        "POSTROOM_KAFKA_SECURITY_PROTOCOL": "SSL",
        "POSTROOM_KAFKA_SSL_CA_LOCATION": str(authority.cert_path),
    }
    with (
        broker,
        TlsProxy(server, upstream=("127.0.0.1", broker.port), port=proxy_port),
    ):
        url = f"kafka://127.0.0.1:{proxy_port}?{KAFKA_GROUP_SETTINGS}"
        await asyncio.to_thread(_create_topic, url, flow.topic, tls)
        try:
            await flow.relay_and_consume(url, tls)

            # The same broker, but the relay trusts another CA: refused, not retried.
            untrusting = flow.fleet.start(
                broker_url=url,
                env={**tls, "POSTROOM_KAFKA_SSL_CA_LOCATION": str(stranger.cert_path)},
            )
            assert untrusting.popen is not None
            assert untrusting.popen.wait(45) == 3, untrusting.tail()
            errors = [line for line in untrusting.lines() if line.startswith("error:")]
            assert len(errors) == 1, untrusting.tail()
            assert "presented a TLS certificate this client does not trust" in errors[0]
            assert "POSTROOM_KAFKA_SSL_CA_LOCATION" in errors[0]
        finally:
            flow.fleet.stop_all()


def _create_topic(url: str, topic: str, environ: dict[str, str]) -> None:
    """Create ``topic`` through the TLS proxy, with the same settings as the services."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    servers, settings = parse_kafka_url(url, environ)
    group_only = {"session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms"}
    config = {k: v for k, v in settings.items() if k not in group_only}
    admin = AdminClient({"bootstrap.servers": servers, **config})
    for future in admin.create_topics([NewTopic(topic, 1)], request_timeout=15).values():
        future.result(20)


def test_a_url_that_turns_the_certificate_check_off_is_refused(
    database_url: str, tables: Tables, tmp_path: Path
) -> None:
    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")
    url = "amqps://guest:guest@127.0.0.1:5671/?no_verify_ssl=1"
    relay = fleet.start(broker_url=url)
    assert relay.popen is not None
    assert relay.popen.wait(30) == 2, relay.tail()
    errors = [line for line in relay.lines() if line.startswith("error:")]
    assert len(errors) == 1, relay.tail()
    assert "no_verify_ssl" in errors[0]
    assert "POSTROOM_ALLOW_INSECURE_TLS=true (--allow-insecure-tls)" in errors[0]


def test_postgresql_over_tls_with_verify_full_and_a_wrong_ca_refused(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path, "postroom test CA")
    stranger = CertificateAuthority.create(tmp_path, "some other CA")
    binaries = postgres_with_ssl()
    if binaries is None:
        require_service("PostgreSQL server binaries", "pg_config --bindir names no server")
    server = PrivatePostgres(log_path=tmp_path / "postgres.log", binaries=binaries)
    server.initdb()
    certificate = authority.issue(server.data, hosts=["127.0.0.1", "localhost"])
    for path in (certificate.cert_path, certificate.key_path):
        path.chmod(0o600)
        if server.account.uid is not None:
            os.chown(path, server.account.uid, server.account.gid or -1)
    with (server.data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"ssl = on\nssl_cert_file = '{certificate.cert_path}'\n"
            f"ssl_key_file = '{certificate.key_path}'\n"
        )

    def url(ca: Path) -> str:
        return f"{server.url}?sslmode=verify-full&sslrootcert={ca}"

    with server:
        upgraded = run_postroom(
            "db", "upgrade", env={"POSTROOM_DATABASE_URL": url(authority.cert_path)}, clean=True
        )
        assert upgraded.returncode == 0, upgraded.stderr
        with psycopg.connect(psycopg_conninfo(url(authority.cert_path))) as connection:
            row = connection.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        assert row == (True,)

        refused = run_postroom(
            "db", "check", env={"POSTROOM_DATABASE_URL": url(stranger.cert_path)}, clean=True
        )
        assert refused.returncode == 3, refused.stderr
        assert refused.stderr.startswith("error: cannot reach PostgreSQL at"), refused.stderr
        assert "certificate verify failed" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
