"""A real Prometheus (Debian's binary, private port, temporary config) scrapes a live
``postroom relay`` and ``postroom consume`` of deploy/example/billing.py, records the rules'
series from them, and fires PostroomRelayBrokerUnavailable when the relay's broker is cut.

The rules are deploy/prometheus/rules.yml as shipped, with every ``for:`` shortened to 2 s
so the test takes seconds; scrapes and evaluations run every second.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.outbox import Outbox
from postroom.schema import Tables
from tests.deploy.support import (
    DEPLOY,
    RULES,
    WITH_APT,
    exported_metric_names,
    recorded_names,
    tool,
)
from tests.support.cli import run_postroom
from tests.support.network import address, free_port, http_get, listens
from tests.support.processes import RelayFleet, die_with_parent
from tests.support.proxy import FaultProxy
from tests.support.quickstart import fresh_vhost
from tests.support.waiting import wait_until_sync

#: Recorded series that need an event this test does not cause (a handler that raises).
NEEDS_FAILURES = {"job:postroom_consumer_failures:rate5m"}
FOR = "2s"


class Prometheus:
    """A Prometheus server of the test's own, and its HTTP API."""

    def __init__(self, directory: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.directory = directory
        shortened = yaml.safe_load(RULES.read_text())
        for group in shortened["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = FOR
        (directory / "rules.yml").write_text(yaml.safe_dump(shortened))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until its API answers."""
        binary = tool("prometheus", install=WITH_APT)
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        wait_until_sync(
            lambda: http_get(self.port, "/-/ready")[0] == 200,
            within=30,
            what="Prometheus ready",
            detail=self.tail,
        )

    def stop(self) -> None:
        """Kill it (never raises)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def tail(self) -> str:
        """The end of its log, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer; fails with Prometheus' error otherwise."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                answer = json.load(reply)
        except urllib.error.HTTPError as error:
            answer = json.load(error)
        assert answer["status"] == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def series(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] == "vector" else []

    def firing(self) -> set[str]:
        """The names of the alerts firing now."""
        return {
            a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"
        }


@pytest.fixture
def vhost(rabbitmq: str) -> Iterator[str]:
    """A RabbitMQ virtual host of this test's own (the example's topics are fixed names)."""
    with fresh_vhost(rabbitmq) as url:
        yield url


def live_names(port: int) -> set[str]:
    """The sample names a /metrics endpoint serves now."""
    status, body = http_get(port, "/metrics")
    assert status == 200
    return {
        line.split("{")[0].split(" ")[0] for line in body.splitlines() if not line.startswith("#")
    }


def place_order(engine: Engine, tables: Tables, order_id: int) -> None:
    """Commit one ``orders.created`` message, as an application would."""
    with Session(engine) as session:
        Outbox(tables).enqueue(session, "orders.created", {"order_id": order_id}, key="c-1")
        session.commit()


def test_prometheus_records_the_rules_from_live_services_and_alerts_on_a_cut_broker(
    database_url: str, engine: Engine, tables: Tables, vhost: str, tmp_path: Path
) -> None:
    relay_port, consumer_port = free_port(), free_port()
    prometheus = Prometheus(
        tmp_path, {"postroom-relay": relay_port, "postroom-consumer": consumer_port}
    )
    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")
    name = f"billing-{uuid.uuid4().hex[:8]}"
    # As the deploy files do: the consumer's queue and bindings first, with its own image's
    # module, then the services.
    setup = run_postroom(
        "broker",
        "setup",
        "billing:consumer",
        env={
            "POSTROOM_BROKER_URL": vhost,
            "BILLING_CONSUMER_NAME": name,
            "PYTHONPATH": str(DEPLOY / "example"),
        },
        clean=True,
    )
    assert setup.returncode == 0, setup.stderr
    assert f"queue {name}" in setup.stdout, setup.stdout
    with FaultProxy(*address(vhost, 5672)) as proxy:
        try:
            consumer = fleet.start_consumer(
                "billing:consumer",
                broker_url=vhost,
                metrics_port=consumer_port,
                env={"BILLING_CONSUMER_NAME": name},
                pythonpath=str(DEPLOY / "example"),
            )
            relay = fleet.start(
                broker_url=proxy.url_for(vhost), metrics_port=relay_port, poll_interval=0.2
            )
            consumer.wait_ready()
            relay.wait_ready()
            prometheus.start()
            place_order(engine, tables, 1)
            # The order and the follow-up the example's handler enqueues, both handled.
            expected = {"orders.created", "charges.made"}

            def all_recorded() -> bool:
                handled = {
                    s["metric"]["topic"]
                    for s in prometheus.series("job:postroom_consumer_handled:rate5m")
                }
                present = {name for name in recorded_names() if prometheus.series(name)}
                return handled >= expected and present >= recorded_names() - NEEDS_FAILURES

            wait_until_sync(
                all_recorded,
                within=30,
                what="every recorded series, and both topics handled, in Prometheus",
                detail=lambda: fleet.tails() + prometheus.tail(),
            )
            (owned,) = prometheus.series(
                'job:postroom_relay_owned_partitions:sum{job="postroom-relay"}'
            )
            assert float(owned["value"][1]) > 0
            # The consumer's lag: its RabbitMQ queue (Prometheus drops the empty partition).
            (lag,) = prometheus.series('postroom_consumer_lag_messages{job="postroom-consumer"}')
            assert lag["metric"]["topic"] == name
            assert "partition" not in lag["metric"]
            assert prometheus.series("job:postroom_outbox_dead_tuples:max")
            assert prometheus.firing() == set(), "nothing alerts while all is well"

            # The relay's exported names are its live /metrics (the registry the deploy
            # checks compare rules and dashboard with is the one the services serve).
            relay_names = {
                n
                for n in exported_metric_names()
                if n.startswith(("postroom_relay", "postroom_outbox"))
            }
            assert relay_names <= live_names(relay_port)
            assert "postroom_consumer_handled_total" in live_names(consumer_port)

            # Every dashboard query is valid PromQL on this server.
            dashboard = json.loads((DEPLOY / "grafana" / "postroom.json").read_text())
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$relay_job", "postroom-relay.*")
                    prometheus.series(expr.replace("$consumer_job", "postroom-consumer.*"))

            proxy.cut()
            place_order(engine, tables, 2)  # the relay finds the broker gone when it publishes
            wait_until_sync(
                lambda: "PostroomRelayBrokerUnavailable" in prometheus.firing(),
                within=20,
                what="PostroomRelayBrokerUnavailable firing",
                detail=lambda: relay.tail() + prometheus.tail(),
            )
            (alert,) = [
                a
                for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "PostroomRelayBrokerUnavailable"
            ]
            assert alert["labels"]["instance"] == f"127.0.0.1:{relay_port}"
            assert alert["annotations"]["runbook_url"].endswith("#postroomrelaybrokerunavailable")
            assert relay.alive
            assert consumer.alive
            assert listens(consumer_port)
        finally:
            prometheus.stop()
            fleet.stop_all()
