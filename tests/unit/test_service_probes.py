"""A missing service fails the run unless skipping is asked for; a slow one is waited for.

The first two tests run pytest in a subprocess on a generated one-test file that needs
RabbitMQ at a closed port, and read its exit code and output. The others call the probe
in-process against a listener that starts late, or only after a first probe gave up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.network import free_port
from tests.support.services import rabbitmq_available

REPO_ROOT = Path(__file__).resolve().parents[2]
NEEDS_RABBITMQ = """
def test_needs_rabbitmq(rabbitmq):
    assert rabbitmq.startswith("amqp://")
"""


def run_pytest_needing_rabbitmq(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on a generated test that needs RabbitMQ at a closed port (secret password)."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.support.fixtures"]\n')
    (tmp_path / "test_generated.py").write_text(NEEDS_RABBITMQ)
    ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    (tmp_path / "pytest.ini").write_text(ini)
    environment = {
        k: v for k, v in os.environ.items() if k not in {"CI", "POSTROOM_TEST_SKIP_MISSING"}
    }
    environment.update(
        POSTROOM_TEST_AMQP_URL=f"amqp://guest:hunter2@127.0.0.1:{free_port()}/",
        POSTROOM_TEST_PROBE_SECONDS="1",
        PYTHONPATH=str(REPO_ROOT),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_service_fails_the_run_with_one_clear_message(tmp_path: Path) -> None:
    result = run_pytest_needing_rabbitmq(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 error" in output  # the fixture fails: an error, exit code 1
    assert "RabbitMQ is not available at amqp://guest:***@127.0.0.1:" in output
    assert "`make services`" in output
    assert "POSTROOM_TEST_SKIP_MISSING=rabbitmq" in output
    assert "hunter2" not in output


@pytest.mark.parametrize("asked", ["rabbitmq", "kafka, rabbitmq", "all"])
def test_a_missing_service_skips_only_when_the_run_asks(tmp_path: Path, asked: str) -> None:
    result = run_pytest_needing_rabbitmq(tmp_path, POSTROOM_TEST_SKIP_MISSING=asked)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 skipped" in output
    assert "RabbitMQ is not available" in output


def test_skipping_another_service_still_fails_this_one(tmp_path: Path) -> None:
    result = run_pytest_needing_rabbitmq(tmp_path, POSTROOM_TEST_SKIP_MISSING="kafka")
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout


def serve_amqp_greeting(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every connection's protocol header with a frame-type byte, like RabbitMQ."""
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            client, _ = sock.accept()
        except TimeoutError:
            continue
        with client:
            client.recv(8)
            client.sendall(b"\x01")


@pytest.fixture
def late_listener() -> Iterator[tuple[int, threading.Event]]:
    """A port, and an event that, once set, makes something answer AMQP on it."""
    port = free_port()
    go, stop = threading.Event(), threading.Event()

    def run() -> None:
        go.wait()
        if stop.is_set():
            return
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            serve_amqp_greeting(sock, stop)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield port, go
    stop.set()
    go.set()
    thread.join(5)


def test_a_slow_first_answer_is_waited_for(late_listener: tuple[int, threading.Event]) -> None:
    port, go = late_listener
    threading.Timer(1.5, go.set).start()
    started = time.monotonic()
    url = rabbitmq_available(f"amqp://guest:guest@127.0.0.1:{port}/", within=10)
    assert url.endswith(f":{port}/")
    assert 1.4 < time.monotonic() - started < 8


def test_a_negative_answer_is_probed_again(late_listener: tuple[int, threading.Event]) -> None:
    port, go = late_listener
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    with pytest.raises(pytest.fail.Exception, match="RabbitMQ is not available"):
        rabbitmq_available(url, within=0.5)
    go.set()
    assert rabbitmq_available(url) == url
