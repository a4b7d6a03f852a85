"""Start-up failures of ``postroom relay`` and ``postroom consume`` print no secret.

Each case starts the real command with secrets in the database URL's user-info and query
and in the broker URL's user-info and query, lets it fail (or run into a broker that
refuses it) for a few seconds, and searches everything it printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from postroom.schema import Tables
from tests.support.cli import postroom_command

pytestmark = pytest.mark.timeout(120)

SECRETS = ("hunter2pw", "saslpw55", "keypass77", "tokval99", "dbkey11")
GOOD_DB = "postgresql://postgres:hunter2pw@127.0.0.1:5432/test?sslpassword=dbkey11"
KAFKA_QUERY = "sasl.password=saslpw55&ssl.key.password=keypass77&token=tokval99"

CASES = {
    "database unreachable": (
        "postgresql://postgres:hunter2pw@127.0.0.1:1/test?sslpassword=dbkey11",
        "amqp://guest:guest@127.0.0.1:5672/",
    ),
    "database URL with a bad port": (
        "postgresql://postgres:hunter2pw@127.0.0.1:notaport/test",
        "amqp://guest:guest@127.0.0.1:5672/",
    ),
    "database URL without a scheme": ("postgres:hunter2pw@127.0.0.1/test", "amqp://guest@h/"),
    "database URL in libpq form": ("host=127.0.0.1 password=hunter2pw", "amqp://guest@h/"),
    "database URL with an unknown parameter": (
        "postgresql://postgres:hunter2pw@127.0.0.1:5432/test?token=tokval99",
        "amqp://guest:guest@127.0.0.1:5672/",
    ),
    "wrong RabbitMQ password": (GOOD_DB, "amqp://guest:hunter2pw@127.0.0.1:5672/?token=tokval99"),
    "Kafka secrets in the query": (GOOD_DB, f"kafka://127.0.0.1:9092?{KAFKA_QUERY}"),
    "Kafka SASL against a broker without it": (
        GOOD_DB,
        "kafka://127.0.0.1:9092?security.protocol=sasl_plaintext&sasl.mechanism=PLAIN"
        "&sasl.username=probe&sasl.password=saslpw55",
    ),
    "Kafka URL with user-info": (GOOD_DB, f"kafka://u:hunter2pw@127.0.0.1:9092?{KAFKA_QUERY}"),
    "Kafka URL with a bad address": (GOOD_DB, f"kafka://127.0.0.1:x?{KAFKA_QUERY}"),
    "unknown broker scheme": (GOOD_DB, "nats://u:hunter2pw@127.0.0.1/?token=tokval99"),
}

CONSUMER_MODULE = textwrap.dedent(
    """
    import postroom

    consumer = postroom.Consumer("secrets-probe")


    @consumer.handler("secrets.probe")
    async def handle(message, session):
        pass
    """
)


def run_briefly(args: list[str], cwd: Path, seconds: float = 6.0) -> tuple[int | None, str]:
    """Run the command; stop it with SIGTERM after ``seconds``; return its code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    process = subprocess.Popen(
        [*postroom_command(), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("command", ["relay", "consume"])
@pytest.mark.parametrize(("db_url", "broker_url"), CASES.values(), ids=CASES.keys())
def test_start_up_failures_print_no_secret(
    command: str, db_url: str, broker_url: str, tables: Tables, tmp_path: Path
) -> None:
    assert tables.schema is not None
    (tmp_path / "probe.py").write_text(CONSUMER_MODULE)
    target = ["probe:consumer"] if command == "consume" else []
    args = [
        command,
        *target,
        "--database-url",
        db_url,
        "--broker-url",
        broker_url,
        "--schema",
        tables.schema,
        "--metrics-port",
        "0",
        "--log-format",
        "json",
    ]
    _, output = run_briefly(args, tmp_path)
    assert output.strip(), "the command printed nothing"
    for secret in SECRETS:
        assert secret not in output, f"{secret!r} printed:\n{output}"
