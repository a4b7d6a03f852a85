"""The metrics endpoint listens only where it is told and answers bad requests calmly."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import structlog
from prometheus_client import CollectorRegistry

from postroom.config import Settings
from postroom.errors import ConfigurationError
from postroom.metrics import serve_http

pytestmark = pytest.mark.timeout(60)


def outward_address() -> str | None:
    """A non-loopback address of this machine, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def serve(host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    server = await serve_http(
        0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True, host=host
    )
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_the_endpoint_listens_on_loopback_by_default() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    server, port = await serve()
    try:
        assert {s.getsockname()[0] for s in server.sockets} == {"127.0.0.1"}
        reply = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK")
        outward = outward_address()
        if outward is not None:
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection(outward, port), 5)
    finally:
        server.close()


async def test_the_endpoint_listens_on_every_interface_when_told() -> None:
    server, port = await serve("0.0.0.0")
    try:
        assert {s.getsockname()[0] for s in server.sockets} == {"0.0.0.0"}
        outward = outward_address() or "127.0.0.1"
        reply = await exchange(port, b"GET /readyz HTTP/1.1\r\n\r\n", host=outward)
        assert reply.startswith(b"HTTP/1.1 200 OK")
    finally:
        server.close()


@pytest.mark.parametrize("host", ["bad host", "", "999.1.1.1.1", "a" * 300, "127.0.0.1:9400"])
def test_a_bad_host_is_refused_naming_the_variable(host: str) -> None:
    with pytest.raises(ConfigurationError, match="POSTROOM_METRICS_HOST"):
        Settings(metrics_host=host)


BAD_REQUESTS = {
    "garbage bytes": (b"\x00\xff\xfe garbage \x16\x03\x01\r\n\r\n", b"400"),
    "TLS hello": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\n",
        b"400",
    ),
    "huge request line": (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n", b"400"),
    "huge header": (b"GET /metrics HTTP/1.1\r\nX: " + b"b" * 200_000 + b"\r\n\r\n", b"400"),
    "endless headers": (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n", b"400"),
    "unknown path": (b"GET /admin HTTP/1.1\r\n\r\n", b"404"),
    "path with junk": (b"GET /\xff\x00 HTTP/1.1\r\n\r\n", b"404"),
    "POST": (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
    "no version": (b"GET /metrics\r\n\r\n", b"400"),
}


@pytest.mark.parametrize(
    ("request_bytes", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
async def test_bad_requests_get_an_answer_and_no_traceback(
    request_bytes: bytes, status: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server, port = await serve()
    try:
        with structlog.testing.capture_logs() as events:
            reply = await exchange(port, request_bytes)
            good = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    finally:
        server.close()
    assert reply.split(b" ", 2)[1] == status
    assert good.startswith(b"HTTP/1.1 200 OK")
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not [e for e in events if e["log_level"] in {"warning", "error", "critical"}]
    assert not [e for e in events if "exc_info" in e or "exception" in e]


async def test_a_client_that_sends_nothing_is_dropped_without_a_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("postroom.metrics.REQUEST_TIMEOUT", 0.3)
    server, port = await serve()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        server.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
