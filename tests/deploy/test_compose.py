"""deploy/docker-compose.yml (parsed, no container engine here): Kafka reachable from the
host and the network, the consumer's queues declared before anything runs, every command
and variable the CLI's, and Prometheus scraping every service."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.support import DEPLOY, check_place, load_yaml_documents

COMPOSE = DEPLOY / "docker-compose.yml"


def services() -> dict[str, Any]:
    """The compose file's services, YAML anchors and merges resolved."""
    (document,) = load_yaml_documents(COMPOSE)
    found: dict[str, Any] = document["services"]
    return found


def postroom_services() -> dict[str, Any]:
    """The services running the postroom image."""
    return {name: s for name, s in services().items() if "build" in s}


def test_kafka_advertises_an_address_for_the_host_and_one_for_the_network() -> None:
    kafka = services()["kafka"]["environment"]
    listeners = dict(item.split("://") for item in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"INTERNAL": "kafka:19092", "EXTERNAL": "localhost:9092"}
    assert listeners["EXTERNAL"] == ":9092"
    assert "9092:9092" in services()["kafka"]["ports"]
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols)
    # The containers use the internal listener, which advertises a name they resolve.
    for name, service in postroom_services().items():
        url = service.get("environment", {}).get("POSTROOM_BROKER_URL", "")
        if url.startswith("kafka"):
            assert url == "kafka://kafka:19092", name


def test_broker_setup_and_migration_run_before_relays_and_consumer() -> None:
    ours = postroom_services()
    relays = [name for name, s in ours.items() if s["command"][0] == "relay"]
    consumers = [name for name, s in ours.items() if s["command"][0] == "consume"]
    assert len([r for r in relays if "profiles" not in ours[r]]) == 2, relays
    assert consumers == ["consumer"]
    setup = ours["broker-setup"]
    assert setup["command"] == ["broker", "setup", ours["consumer"]["command"][1]]
    assert (
        setup["environment"]["POSTROOM_BROKER_URL"]
        == (ours["consumer"]["environment"]["POSTROOM_BROKER_URL"])
    )
    for name in [*relays, *consumers]:
        if "profiles" in ours[name]:
            continue
        needs = ours[name]["depends_on"]
        assert needs["migrate"] == {"condition": "service_completed_successfully"}, name
        assert needs["broker-setup"] == {"condition": "service_completed_successfully"}, name
    assert ours["migrate"]["command"] == ["db", "upgrade"]
    relay_ids = [ours[r]["environment"].get("POSTROOM_RELAY_ID") for r in relays]
    assert len(set(relay_ids)) == len(relays), "each relay names itself"


def test_every_command_and_variable_is_the_clis() -> None:
    for name, service in postroom_services().items():
        check_place(f"compose service {name}", [service["command"]], service["environment"])


def test_prometheus_scrapes_each_relay_and_consumer_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    targets: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update((target, job["job_name"]) for target in static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update((f"{n}:{dns['port']}", job["job_name"]) for n in dns["names"])
    for name, service in postroom_services().items():
        kind = service["command"][0]
        if kind not in ("relay", "consume"):
            continue
        port = 9400 if kind == "relay" else 9401
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}"
        job = targets[f"{name}:{port}"]
        wanted = "postroom-relay" if kind == "relay" else "postroom-consumer"
        assert job.startswith(wanted), f"{name} is scraped as job {job}; the rules want {wanted}*"
        published = {p.split(":")[1] for p in service["ports"]}
        assert published == {str(port)}, f"{name} publishes {published}, listens on {port}"
    volumes = services()["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in volumes
