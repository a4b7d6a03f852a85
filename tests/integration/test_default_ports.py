"""A relay and a consumer started on one host with their default metrics ports both run."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

from postroom.config import DEFAULT_METRICS_PORTS, Settings
from postroom.schema import Tables
from tests.support.network import http_get, listens
from tests.support.processes import RelayFleet
from tests.support.readback import delete_consumer_queues

CONSUMER = textwrap.dedent(
    """
    import os

    import postroom

    consumer = postroom.Consumer(os.environ["TEST_CONSUMER"])


    @consumer.handler(os.environ["TEST_TOPIC"])
    def handle(message, session):
        return None
    """
)


def test_settings_give_each_service_its_own_port_unless_one_is_set() -> None:
    assert Settings().metrics_port_for("relay") == 9400
    assert Settings().metrics_port_for("consumer") == 9401
    assert Settings(metrics_port=9500).metrics_port_for("consumer") == 9500
    assert Settings.from_env({"POSTROOM_METRICS_PORT": "0"}).metrics_port_for("relay") == 0


async def test_relay_and_consumer_on_default_ports_serve_metrics_side_by_side(
    database_url: str, tables: Tables, rabbitmq: str, tmp_path: Path
) -> None:
    relay_port, consumer_port = DEFAULT_METRICS_PORTS["relay"], DEFAULT_METRICS_PORTS["consumer"]
    taken = [port for port in (relay_port, consumer_port) if listens(port)]
    assert not taken, f"ports {taken} are taken on this host; stop what listens there"
    name = f"ports-{uuid.uuid4().hex[:8]}"
    (tmp_path / "ports_app.py").write_text(CONSUMER)
    env = {"TEST_CONSUMER": name, "TEST_TOPIC": f"t-{uuid.uuid4().hex[:8]}"}
    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")
    try:
        relay = fleet.start(broker_url=rabbitmq, metrics_port=None)
        consumer = fleet.start_consumer(
            "ports_app:consumer",
            broker_url=rabbitmq,
            metrics_port=None,
            env=env,
            pythonpath=str(tmp_path),
        )
        relay.wait_ready()
        consumer.wait_ready()
        relay_status, relay_metrics = http_get(relay_port, "/metrics")
        consumer_status, consumer_metrics = http_get(consumer_port, "/metrics")
        assert (relay_status, consumer_status) == (200, 200), fleet.tails()
        assert "postroom_relay_published_total" in relay_metrics
        assert "postroom_consumer_handled_total" in consumer_metrics
        assert relay.alive
        assert consumer.alive
        assert relay.terminate() == 0
        assert consumer.terminate() == 0
    finally:
        fleet.stop_all()
        await delete_consumer_queues(rabbitmq, name)
