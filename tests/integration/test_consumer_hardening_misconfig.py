"""``postroom consume`` with a wrong RabbitMQ password, an unknown virtual host or a Kafka
SASL login the broker refuses: it exits with status 3 and one sentence, no traceback and no
secret."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from postroom.schema import Tables
from tests.support.cli import arun_postroom
from tests.support.services import AMQP_URL, KAFKA_URL, kafka_available, rabbitmq_available

pytestmark = pytest.mark.timeout(120)

CONSUMER = textwrap.dedent(
    """
    import postroom

    consumer = postroom.Consumer("misconfigured")


    @consumer.handler("orders")
    def handle(message, session):
        pass
    """
)

SECRET = "not-the-password-s3cr3t"


def with_credentials(url: str, password: str, vhost: str) -> str:
    rest = url.split("@", 1)[1].split("/", 1)[0]
    return f"amqp://guest:{password}@{rest}/{vhost}"


async def consume(
    database_url: str, tables: Tables, tmp_path: Path, broker_url: str
) -> subprocess.CompletedProcess[str]:
    """Run ``postroom consume`` on a one-handler consumer until it exits."""
    (tmp_path / "misconfigured.py").write_text(CONSUMER)
    return await arun_postroom(
        "consume",
        "misconfigured:consumer",
        "--database-url",
        database_url,
        "--schema",
        str(tables.schema),
        "--broker-url",
        broker_url,
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        env={"PYTHONPATH": str(tmp_path)},
        clean=True,
    )


@pytest.mark.parametrize(
    ("password", "vhost", "sentence"),
    [
        (SECRET, "", "refused the login of user 'guest'"),
        ("guest", "no-such-vhost", "would not open virtual host 'no-such-vhost'"),
    ],
    ids=["wrong-password", "unknown-vhost"],
)
async def test_a_refused_consumer_exits_3_with_one_sentence(
    database_url: str, tables: Tables, tmp_path: Path, password: str, vhost: str, sentence: str
) -> None:
    rabbitmq_available()
    url = with_credentials(AMQP_URL, password, vhost)
    result = await consume(database_url, tables, tmp_path, url)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert sentence in result.stderr
    assert "Traceback" not in output
    assert SECRET not in output


async def test_a_consumer_kafka_refuses_exits_3_with_one_sentence(
    database_url: str, tables: Tables, tmp_path: Path
) -> None:
    kafka_available()
    sasl = (
        "security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512&sasl.username=u"
        f"&sasl.password={SECRET}"
    )
    result = await consume(database_url, tables, tmp_path, f"{KAFKA_URL}?{sasl}")
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "refused the consumer" in result.stderr
    assert "Traceback" not in output
    assert SECRET not in output
