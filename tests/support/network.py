"""Local ports and broker addresses."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def address(url: str, default_port: int) -> tuple[str, int]:
    """The host and port of ``url``."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def replace_address(url: str, host: str, port: int) -> str:
    """``url`` pointed at ``host:port``, keeping its scheme, user, password, path and query."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def listens(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections at ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET path`` on 127.0.0.1:``port`` (nothing listening: 0)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError:
        return 0, ""
