"""deploy/kubernetes/: valid against the Kubernetes API schemas (offline), locked down,
sized from the relay's byte budget, and running real commands with real settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.deploy.support import (
    DEPLOY,
    MIB,
    WITH_VENV,
    check_place,
    consumer_memory_needed,
    load_yaml_documents,
    relay_memory_needed,
    run,
    tool,
)

MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every resource of every manifest, with its file."""
    for path in MANIFESTS:
        for document in load_yaml_documents(path):
            yield path, document


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    """The resources of one kind, by name."""
    return {r["metadata"]["name"]: r for _, r in resources() if r["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers of a Deployment or Job."""
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def mebibytes(quantity: str) -> int:
    """Bytes of a memory quantity in Mi or Gi."""
    number, unit = quantity[:-2], quantity[-2:]
    return int(number) * {"Mi": MIB, "Gi": 1024 * MIB}[unit]


def env_of(container: dict[str, Any], *, from_secrets: bool = True) -> dict[str, str]:
    """The variables a container gets: from the example Secret (envFrom) and env."""
    secret = of_kind("Secret")
    found: dict[str, str] = {}
    if from_secrets:
        for source in container.get("envFrom", []):
            found.update(secret[source["secretRef"]["name"]]["stringData"])
    for item in container.get("env", []):
        found[item["name"]] = item.get("value", "")
    return found


def test_built_in_kinds_pass_the_api_schemas_strictly() -> None:
    built_in = [p for p in MANIFESTS if p.name != "servicemonitor.yaml"]
    validate = tool("kubernetes-validate", install=WITH_VENV)
    result = run(validate, "--strict", *map(str, built_in))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    assert passed == sum(1 for p, _ in resources() if p in built_in), result.stdout


def test_the_service_monitor_scrapes_every_postroom_service_on_its_metrics_port() -> None:
    (monitor,) = of_kind("ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    services = of_kind("Service")
    assert {"postroom-relay", "postroom-consumer-billing"} <= set(services)
    for name, service in services.items():
        assert selector.items() <= service["metadata"]["labels"].items(), name
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, name


def test_workloads_run_locked_down_with_probes_limits_and_disruption_budgets() -> None:
    workloads = {**of_kind("Deployment"), **of_kind("Job")}
    assert {"postroom-relay", "postroom-consumer-billing"} <= set(of_kind("Deployment"))
    assert any(
        c["args"][:2] == ["db", "upgrade"]
        for job in of_kind("Job").values()
        for c in containers(job)
    )
    budgets = of_kind("PodDisruptionBudget")
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "memory" in container["resources"]["limits"], where
            assert not container["image"].endswith(":latest"), where
            assert container["imagePullPolicy"] == "IfNotPresent", where
        if workload["kind"] == "Deployment":
            (service,) = list(pod["containers"])
            assert service["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert service["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            budget = budgets[name]["spec"]
            assert budget["selector"] == workload["spec"]["selector"], name
            assert budget["minAvailable"] < workload["spec"]["replicas"], name


def test_memory_limits_hold_what_the_settings_let_a_service_keep_in_memory() -> None:
    deployments = of_kind("Deployment")
    (relay,) = deployments["postroom-relay"]["spec"]["template"]["spec"]["containers"]
    limit = mebibytes(relay["resources"]["limits"]["memory"])
    assert limit >= relay_memory_needed(env_of(relay))
    (consumer,) = deployments["postroom-consumer-billing"]["spec"]["template"]["spec"]["containers"]
    limit = mebibytes(consumer["resources"]["limits"]["memory"])
    assert limit >= consumer_memory_needed(env_of(consumer))
    # The consumer's settings matter: with the defaults, the same limit would be too small.
    assert limit < consumer_memory_needed({})


def test_every_command_and_variable_is_the_clis() -> None:
    for name, workload in {**of_kind("Deployment"), **of_kind("Job")}.items():
        for container in containers(workload):
            where = f"kubernetes {name}/{container['name']}"
            own = env_of(container, from_secrets=False)
            check_place(where, [container["args"]], own, shared=env_of(container).keys() - own)
