"""A fault-injecting TCP proxy for tests: put it between a client and a broker, then break it.

    with FaultProxy("127.0.0.1", 5672) as proxy:
        url = proxy.url_for("amqp://guest:guest@127.0.0.1:5672/")   # give this to the client
        proxy.cut()          # every connection reset, new ones refused
        proxy.restore()      # listening and forwarding again, on the same port
        proxy.black_hole()   # connections accepted and kept, but no byte forwarded
        proxy.slow(0.5)      # every chunk delivered 0.5 s after it arrived (both ways)

The proxy runs its own event loop in a daemon thread, so the same object works from sync
and async tests alike: every control method is a plain call that returns once the change is
in effect (a few milliseconds; it never waits on the caller's event loop). It listens on
127.0.0.1 only, holds at most ``max_connections`` links and ``max_buffered_chunks`` chunks
per direction (then TCP back-pressure applies), and shuts itself down after ``lifetime``
seconds even if a test forgets to close it.

Modes:

- ``cut``: the listening socket is closed (new connections are refused) and every open
  link is reset on both sides (SO_LINGER 0, so peers see ECONNRESET, not a clean close).
- ``black_hole``: like a network partition: connections are accepted (the client sees its
  connect succeed) but nothing is forwarded either way; bytes are held, not dropped, and
  flow again after :meth:`restore`, like TCP after a partition heals. Follow it with
  :meth:`cut` to model a partition that ends with the connections gone.
- ``slow``: adds ``latency`` seconds to every chunk in both directions, pipelined (latency,
  not a bandwidth limit). Combines with the other modes; :meth:`restore` clears it.

Kafka note: clients reconnect to the address the broker *advertises*, so a proxy in front
of Kafka only sees the bootstrap connection unless the broker advertises the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.support.network import free_port, replace_address

T = TypeVar("T")

_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_host:upstream_port`` that can fail."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        port: int | None = None,
        max_connections: int = 64,
        max_buffered_chunks: int = 256,
        lifetime: float = 600.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.max_connections = max_connections
        self.max_buffered_chunks = max_buffered_chunks
        self.lifetime = lifetime
        self.connect_timeout = connect_timeout
        # Counters, read from any thread (plain ints: a torn read is harmless in tests).
        self.accepted = 0
        self.refused = 0
        self.upstream_failures = 0
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        # Bytes read from one side and not yet written to the other (held by latency or a
        # black hole): a client with bytes in transit is waiting for an answer.
        self.in_transit_to_upstream = 0
        self.in_transit_to_client = 0
        self.mode = "stopped"
        self.latency = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._holder: socket.socket | None = None
        """While cut: a socket bound to the port but not listening (connections are refused),
        so that no other process on the machine takes the port before :meth:`restore`."""
        self._links: set[_Link] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        self._flowing: asyncio.Event | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def address(self) -> str:
        """``127.0.0.1:port``: where clients should connect."""
        return f"{self.host}:{self.port}"

    @property
    def active(self) -> int:
        """Links open right now."""
        return len(self._links)

    def url_for(self, url: str) -> str:
        """``url`` (for example an amqp:// URL of the upstream) pointed at this proxy."""
        return replace_address(url, self.host, self.port)

    def start(self) -> FaultProxy:
        """Start the proxy's thread and listen; returns self."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        running = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(running,), name=f"fault-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        if not running.wait(_CONTROL_TIMEOUT):
            raise RuntimeError("the proxy's event loop did not start")
        self._call(self._start())
        return self

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        self._call(self._cut())

    def black_hole(self) -> None:
        """Keep accepting connections, forward nothing (held until :meth:`restore`)."""
        self._call(self._black_hole())

    def slow(self, latency: float) -> None:
        """Deliver every chunk ``latency`` seconds after it arrived, both ways."""
        if latency < 0:
            raise ValueError("latency must not be negative")
        self._call(self._set_latency(latency))

    def restore(self) -> None:
        """Listen (on the same port) and forward again, without latency."""
        self._call(self._restore())

    def close(self) -> None:
        """Reset everything and stop the proxy's thread (idempotent)."""
        if self._closed or self._loop is None or self._thread is None:
            self._closed = True
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CONTROL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
        self._closed = True

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> FaultProxy:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.address} -> {self.upstream[0]}:{self.upstream[1]}, "
            f"mode={self.mode}, latency={self.latency:g}, active={self.active})"
        )

    # ------------------------------------------------------------------ internals

    def _run_loop(self, running: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(running.set)
        self._loop.run_forever()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._closed or not self._loop.is_running():
            coroutine.close()
            raise RuntimeError(f"{self!r} is not running")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=_CONTROL_TIMEOUT)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()
        self.mode = "normal"
        assert self._loop is not None
        self._expiry = self._loop.call_later(self.lifetime, self._expire)

    async def _listen(self) -> None:
        self._release_port()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self._hold_port()
        for link in list(self._links):
            link.reset()
        self._links.clear()
        self.mode = "cut"

    async def _black_hole(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()
        await self._listen()
        self.mode = "black_hole"

    async def _set_latency(self, latency: float) -> None:
        self.latency = latency

    async def _restore(self) -> None:
        assert self._flowing is not None
        self.latency = 0.0
        await self._listen()
        self._flowing.set()
        self.mode = "normal"

    async def _shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await self._cut()
        self._release_port()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        self.mode = "stopped"

    def _hold_port(self) -> None:
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind((self.host, self.port))
        except OSError:  # taken in the instant between close and bind: restore will say so
            holder.close()
            return
        self._holder = holder

    def _release_port(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def _expire(self) -> None:
        # A forgotten proxy must not outlive its test by much: stop it.
        self._closed = True
        assert self._loop is not None
        task = self._loop.create_task(self._shutdown())
        task.add_done_callback(lambda _: self._loop.stop() if self._loop else None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        if len(self._links) >= self.max_connections:
            self.refused += 1
            link.reset()
            return
        self.accepted += 1
        self._links.add(link)
        try:
            assert self._flowing is not None
            # A black hole accepts, then never even reaches the upstream until restored.
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), self.connect_timeout
                )
            except (OSError, TimeoutError):
                self.upstream_failures += 1
                return
            link.upstream = up_writer
            if link not in self._links:  # cut while connecting
                link.reset()
                return
            pipes = [
                asyncio.ensure_future(self._pipe(reader, up_writer, upstream=True)),
                asyncio.ensure_future(self._pipe(up_reader, writer, upstream=False)),
            ]
            link.tasks.update(pipes)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            link.reset()
            self._links.discard(link)

    async def _pipe(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        """Copy ``source`` to ``target``, each chunk delayed by the latency at its arrival."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_buffered_chunks)

        async def pump() -> None:
            while True:
                try:
                    data = await source.read(_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                await queue.put((loop.time() + self.latency, data))
                self._in_transit(upstream, len(data))
                if not data:
                    return

        async def deliver() -> None:
            assert self._flowing is not None
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                if not data:
                    return
                target.write(data)
                self._in_transit(upstream, -len(data))
                if upstream:
                    self.bytes_to_upstream += len(data)
                else:
                    self.bytes_to_client += len(data)
                await target.drain()

        pumping = asyncio.ensure_future(pump())
        try:
            await deliver()
        except (ConnectionError, OSError):
            pass
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await pumping
            # Whatever is still queued is dropped with the link.
            while not queue.empty():
                self._in_transit(upstream, -len(queue.get_nowait()[1]))

    def _in_transit(self, upstream: bool, change: int) -> None:
        if upstream:
            self.in_transit_to_upstream += change
        else:
            self.in_transit_to_client += change
