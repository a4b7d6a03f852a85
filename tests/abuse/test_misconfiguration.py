"""Misconfiguration is loud: a process that cannot do its work exits non-zero with one
sentence (or reports itself unready), never "live" while doing nothing, and never prints
the secret in its URL. Beside each broken process, the stage's healthy relay and consumer
keep the ordinary traffic flowing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid

import pytest

from postroom.message import HEADER_ID
from tests.abuse.harness import BROKERS, HEALTH_TIMEOUT, PROFILE, Stage
from tests.support.cli import run_postroom
from tests.support.consuming import RawMessage
from tests.support.network import free_port, http_get
from tests.support.processes import ServiceProcess
from tests.support.readback import create_topics
from tests.support.services import KAFKA_BOOTSTRAP
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


def wrong_amqp(stage: Stage, vhost: str = "") -> str:
    """The session user's URL with a wrong (planted) password, or an unknown vhost."""
    if vhost:
        return stage.planted.amqp_url(vhost=vhost)
    return stage.planted.amqp_url(password=stage.planted.wrong)


def sasl_kafka(stage: Stage, *, in_url: bool) -> tuple[str, dict[str, str]]:
    """SASL against a broker that speaks none, with the planted Kafka secret: in the URL's
    query, or in ``POSTROOM_KAFKA_*`` variables. The URL and the environment."""
    settings = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "abuse",
        "sasl.password": stage.planted.kafka,
    }
    if in_url:
        query = "&".join(f"{k}={v}" for k, v in settings.items())
        return f"kafka://{KAFKA_BOOTSTRAP}?{query}", {}
    env = {f"POSTROOM_KAFKA_{k.upper().replace('.', '_')}": v for k, v in settings.items()}
    return f"kafka://{KAFKA_BOOTSTRAP}", env


#: Two refusals per broker: (case name, words the one sentence says).
REFUSALS = {
    "rabbitmq": [("wrong password", "refused the login"), ("unknown vhost", "virtual host")],
    "kafka": [
        ("SASL in URL, no SASL broker", "refused"),
        ("SASL from env, no SASL broker", "refused"),
    ],
}


def refused(stage: Stage, variant: int) -> tuple[str, str, dict[str, str]]:
    """The ``variant``-th refusal of the stage's broker: its name, the URL and environment."""
    name, _ = REFUSALS[stage.broker][variant]
    if stage.broker == "kafka":
        return name, *sasl_kafka(stage, in_url=variant == 0)
    if variant == 0:
        return name, wrong_amqp(stage), {}
    return name, wrong_amqp(stage, vhost=f"no-such-vhost-{stage.consumer_name}"), {}


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_refused_relay_beside_a_healthy_one(stage: Stage, variant: int) -> None:
    refusal, url, env = refused(stage, variant)
    others = stage.ordinary(PROFILE.others)
    stage.commit(others[: len(others) // 2])
    broken = stage.start_relay(broker_url=url, env=env)
    status = exits(broken)
    stage.commit(others[len(others) // 2 :])
    assert status == 3, broken.tail()
    said = one_sentence(broken, "error:", REFUSALS[stage.broker][variant][1])
    assert broken.events("relay.broker_refused"), broken.tail()
    other = stage.flowing(others)
    shown = outbox_status(stage)
    relays = {r["relay_id"]: r["broker_state"] for r in json.loads(shown.stdout)["relays"]}
    assert broken.relay_id not in relays, relays
    assert set(relays.values()) == {"connected"}, relays
    stage.finish(
        f"misconfig: relay, {refusal}",
        f"exit 3: {said.removeprefix('error: ')[:50]}...",
        f"{other}, by the healthy relay",
        extra_lines=[shown.stdout, shown.stderr],
    )


def outbox_status(stage: Stage) -> subprocess.CompletedProcess[str]:
    """``postroom outbox status --json`` on the stage's schema, with the planted secret."""
    shown = run_postroom(
        "outbox",
        "status",
        "--json",
        env={"POSTROOM_DATABASE_URL": stage.database_url, "POSTROOM_SCHEMA": stage.schema},
        clean=True,
    )
    assert shown.returncode == 0, shown.stderr
    return shown


@pytest.mark.parametrize("stage", ["kafka"], indirect=True)
def test_relay_at_a_bad_kafka_address_is_shown_unavailable(stage: Stage) -> None:
    """Nothing listening is an outage the relay waits out (it keeps running), but never in
    silence: ``outbox status`` shows its broker unavailable."""
    bad = f"kafka://127.0.0.1:{free_port()}?sasl.password={stage.planted.kafka}"
    lost = stage.start_relay(broker_url=bad)
    shown: list[str] = []

    def unavailable() -> bool:
        lost.check_alive()
        status = outbox_status(stage)
        shown.extend([status.stdout, status.stderr])
        states = {r["relay_id"]: r["broker_state"] for r in json.loads(status.stdout)["relays"]}
        return states.get(lost.relay_id) == "unavailable"

    wait_until_sync(
        unavailable,
        within=60,
        what="outbox status showing the relay's broker unavailable",
        interval=0.5,
        detail=lost.tail,
    )
    assert lost.terminate() == 0
    others = stage.ordinary(PROFILE.others)
    stage.commit(others)
    other = stage.flowing(others)
    stage.finish(
        "misconfig: relay, bad Kafka address",
        "kept running; outbox status: broker unavailable",
        other,
        extra_lines=shown,
    )


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_refused_consumer_exits(stage: Stage, variant: int) -> None:
    refusal, url, env = refused(stage, variant)
    others = stage.ordinary(PROFILE.others)
    stage.commit(others[: len(others) // 2])
    broken = stage.start_consumer(broker_url=url, env=env)
    status = exits(broken)
    stage.commit(others[len(others) // 2 :])
    assert status == 3, broken.tail()
    said = one_sentence(broken, "error:", REFUSALS[stage.broker][variant][1])
    assert not broken.events("consumer.ready"), "never ready while refused"
    other = stage.flowing(others)
    stage.finish(
        f"misconfig: consumer, {refusal}",
        f"exit 3: {said.removeprefix('error: ')[:50]}...",
        other,
    )


@pytest.mark.parametrize("stage", ["kafka"], indirect=True)
def test_missing_kafka_topic_is_unready_until_it_exists(stage: Stage) -> None:
    tag = uuid.uuid4().hex[:8]
    missing = f"abuse.{tag}.later"
    own_topics = {"ABUSE_OTHER": f"abuse.{tag}.other", "ABUSE_DECOY": f"abuse.{tag}.decoy"}
    create_topics(KAFKA_BOOTSTRAP, list(own_topics.values()))
    port = free_port()
    waiting = stage.start_consumer(
        broker_url=stage.broker_url,
        metrics_port=port,
        env={"ABUSE_CONSUMER": f"abuse-later-{tag}", "ABUSE_TOPIC": missing, **own_topics},
    )
    seen: list[int] = []

    def readiness() -> int:
        waiting.check_alive()
        status = http_get(port, "/readyz")[0]
        seen.append(status)
        return status

    wait_until_sync(lambda: readiness() == 503, within=60, what="/readyz 503", detail=waiting.tail)
    time.sleep(HEALTH_TIMEOUT)
    assert readiness() == 503, "ready while a topic it handles does not exist"
    assert http_get(port, "/healthz")[0] == 200
    create_topics(KAFKA_BOOTSTRAP, [missing])
    wait_until_sync(
        lambda: readiness() == 200,
        within=60,
        what="/readyz 200 once the topic exists",
        interval=0.5,
        detail=waiting.tail,
    )
    message_id = str(uuid.uuid4())
    stage.raw([RawMessage(b"{}", {HEADER_ID: message_id}, "application/json")], topic=missing)
    stage.wait_handled_once([message_id])
    others = stage.ordinary(PROFILE.others)
    stage.commit(others)
    other = stage.flowing(others)
    assert waiting.terminate() == 0
    stage.finish(
        "misconfig: consumer, missing Kafka topic",
        f"/readyz 503 ({seen.count(503)} looks), 200 once created, then consumed",
        other,
    )
