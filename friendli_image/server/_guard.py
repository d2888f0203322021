"""Connection limits aiohttp's server lacks: a header timeout, an idle timeout, a connection cap.

The guard runs its own accept loop, one connection at a time, and accepts the next only
while below the cap, so a flood never reaches the descriptor limit (asyncio's server
accepts in batches and, on EMFILE, logs and stops accepting for a second). Every accepted
connection's protocol (aiohttp's request handler) is wrapped in a `_GuardedConnection`
that forwards every event unchanged and keeps one timer. The application tells it when a
request starts and ends, so the guard knows whether the connection is waiting for a request
head, idle between requests, or busy (then the application bounds its own waits, e.g. for
the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable

try:
    import resource

    _HAVE_RLIMIT = True
except ImportError:  # pragma: no cover - not on POSIX
    _HAVE_RLIMIT = False

from ._config import ServerConfig
from ._state import ServerState

_BACKLOG = 128
# File descriptors kept free for everything else the process opens (image fetches, log
# files, the event loop's own), beyond the one accepted connection over the cap.
_FD_RESERVE_MIN = 32
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def default_max_connections() -> int:
    """The connection cap when none is configured: the descriptor limit minus a reserve."""
    if not _HAVE_RLIMIT:  # pragma: no cover - not on POSIX
        return 1000
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 10_000
    return max(8, soft - max(_FD_RESERVE_MIN, soft // 8))


class _GuardedConnection(asyncio.Protocol):
    """Forwards to the wrapped protocol; closes the connection when a deadline passes."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._loop = guard.loop
        self.transport: asyncio.Transport | None = None
        self._admitted = False
        self.busy = 0
        # When the head of the next request began (connection open or its first byte);
        # None while a request is in progress or the connection is idle between requests.
        self._head_started: float | None = None
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 -- a TCP server
        self.transport = transport
        if not self._guard.admit(self):
            transport.abort()
            return
        self._admitted = True
        self._head_started = self._loop.time()
        self._arm(self._head_started + self._guard.config.header_timeout_s)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self.busy == 0 and self._head_started is None:
            self._head_started = self._loop.time()
            self._arm(self._head_started + self._guard.config.header_timeout_s)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard.forget(self)
        if self._admitted:
            self._admitted = False
            self._inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()

    # -- request bookkeeping -------------------------------------------------------------

    def request_started(self) -> None:
        self.busy += 1
        self._head_started = None

    def request_finished(self) -> None:
        self.busy = max(0, self.busy - 1)
        if self.busy == 0:
            self._idle_since = self._loop.time()
            self._arm(self._idle_since + self._guard.config.idle_timeout_s)

    def mark(self, reason: str) -> None:
        """Count this connection's coming close under ``reason`` (see `ServerStats`)."""
        self._guard.reason[self] = reason

    def close(self, reason: str) -> None:
        """Drop the connection now (`abort`: a peer that does not read cannot hold it)."""
        if self.transport is not None and not self.transport.is_closing():
            self._guard.reason[self] = reason
            self.transport.abort()

    # -- the timer -----------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return  # fires first; `_check` then re-arms for the later deadline
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.busy:
            return
        config = self._guard.config
        if self._head_started is not None:
            deadline = self._head_started + config.header_timeout_s
        else:
            deadline = self._idle_since + config.idle_timeout_s
        if self._loop.time() < deadline:
            self._arm(deadline)
        else:
            self.close("timed_out")


class ConnectionGuard:
    """The connections of one listening application, with their limits and counters."""

    def __init__(self, config: ServerConfig, state: ServerState) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self._state = state
        self.max_connections = config.max_connections or default_max_connections()
        # Insertion order is age order: eviction takes the oldest idle connection.
        self._connections: dict[_GuardedConnection, None] = {}
        self._by_transport: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self.reason: dict[_GuardedConnection, str] = {}
        self._below_cap = asyncio.Event()
        self._below_cap.set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int, inner: Callable[[], asyncio.Protocol]) -> int:
        """Bind ``host:port`` and serve connections with protocols from ``inner``; the port."""
        infos = await self.loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _type, _proto, _name, address = infos[0]
        sock = socket.create_server(address, family=family, backlog=_BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = self.loop.create_task(self._accept_loop(sock, inner))
        return int(sock.getsockname()[1])

    async def _accept_loop(
        self, sock: socket.socket, inner: Callable[[], asyncio.Protocol]
    ) -> None:
        factory = self.protocol_factory(inner)
        while True:
            await self._below_cap.wait()
            try:
                conn, _peer = await self.loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    await asyncio.sleep(0.05)
                continue
            try:
                await self.loop.connect_accepted_socket(factory, conn)
            except OSError:
                conn.close()

    async def stop_listening(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        task, self._accepting = self._accepting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def protocol_factory(
        self, inner: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """Wrap a protocol factory (aiohttp's ``runner.server``) so its connections are guarded."""

        def make() -> asyncio.Protocol:
            return _GuardedConnection(self, inner())

        return make

    def admit(self, conn: _GuardedConnection) -> bool:
        """Register a new connection, closing the oldest idle one when at the cap."""
        self._state.connection_opened()
        self._connections[conn] = None
        self._all_closed.clear()
        if len(self._connections) > self.max_connections:
            self._below_cap.clear()
        assert conn.transport is not None  # noqa: S101 -- set before admit
        self._by_transport[conn.transport] = conn
        if len(self._connections) <= self.max_connections:
            return True
        for old in self._connections:
            if old is not conn and not old.busy and old.transport is not None:
                old.close("evicted")
                return True
        self.reason[conn] = "refused"
        return False

    def forget(self, conn: _GuardedConnection) -> None:
        """Unregister a closed connection and count why it closed."""
        if conn not in self._connections:
            return
        del self._connections[conn]
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)
        self._state.connection_closed(self.reason.pop(conn, None))
        if len(self._connections) <= self.max_connections:
            self._below_cap.set()
        if not self._connections:
            self._all_closed.set()

    def connection(self, transport: asyncio.BaseTransport | None) -> _GuardedConnection | None:
        """The guarded connection of a request's transport (None outside a guarded listener)."""
        if transport is None:
            return None
        return self._by_transport.get(transport)

    async def abort_all(self) -> None:
        """Drop every connection still open (after aiohttp's own shutdown closed the rest)."""
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), 1.0)
