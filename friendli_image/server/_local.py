"""Ways to run the server: `LocalServer` (async or on its own thread) and blocking `run_server`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Awaitable, Generator, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar

import attrs
from aiohttp import web

from ._app import GUARD_KEY, create_app
from ._config import Action, ServerConfig
from ._guard import ConnectionGuard
from ._state import RequestRecord, ServerState, ServerStats

_T = TypeVar("_T")


class _Done:
    """An awaitable that is already complete (what a blocking `restart` returns)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


class _Listener:
    """One run of the server on a port: the aiohttp runner, the guard and the socket."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, port: int) -> None:
        self._runner = runner
        self._guard = guard
        self.port = port

    @classmethod
    async def open(
        cls, state: ServerState, host: str, port: int, *, shutdown_timeout: float
    ) -> _Listener:
        app = create_app(state=state)
        guard = ConnectionGuard(state.config, state)
        app[GUARD_KEY] = guard
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            # The guard closes idle connections (and counts them); aiohttp's timer is a backstop.
            keepalive_timeout=state.config.idle_timeout_s + 1.0,
            shutdown_timeout=shutdown_timeout,
        )
        await runner.setup()
        try:
            assert runner.server is not None  # noqa: S101 -- set by setup()
            bound = await guard.listen(host, port, runner.server)
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, guard, bound)

    async def close(self) -> None:
        await self._guard.stop_listening()
        try:
            await self._runner.cleanup()
        finally:
            await self._guard.abort_all()


class LocalServer:
    """The bundled image server on a free loopback port, for tests and development.

    ``async with LocalServer() as srv:`` runs it on the current event loop;
    ``with LocalServer() as srv:`` runs it on an event loop in a daemon thread.
    Either way ``srv.url`` is where to send requests, and the stats, records and
    fault scripts are available from any thread.
    """

    def __init__(
        self, config: ServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._state = ServerState(self.config)
        self._listener: _Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._mode: Literal["async", "thread"] | None = None

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<LocalServer {where}>"

    @property
    def port(self) -> int:
        """The TCP port the server listens on (kept across `restart`)."""
        if self._port is None:
            raise RuntimeError("LocalServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the request counters."""
        return self._state.stats()

    @property
    def records(self) -> list[RequestRecord]:
        """The accepted requests, oldest first (bounded by ``ServerConfig.max_records`` and
        ``max_record_bytes``); requests refused at the token check leave no record."""
        return self._state.records()

    def reset_stats(self) -> None:
        """Zero the counters and forget the recorded requests."""
        self._state.reset_stats()

    @property
    def healthy(self) -> bool:
        """What ``GET /health`` answers: 200 ``{"status": "ok"}`` if True, else 503.

        Set it to False to make health probes fail while image requests are still served.
        """
        return self._state.healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._state.healthy = bool(value)

    @property
    def listening(self) -> bool:
        """Whether the port accepts connections (False after `kill`, until `revive`)."""
        return self._listener is not None

    def script(self, test_id: str | None, actions: Iterable[Action]) -> None:
        """Queue ``actions`` for requests whose ``x-test-id`` header equals ``test_id``.

        Each matching image request consumes one action, first in first out; once the queue
        is empty such requests are served normally. ``test_id=None`` scripts requests that
        carry no ``x-test-id``. Replaces any actions still queued for ``test_id``.
        """
        self._state.script(test_id, actions)

    def clear_scripts(self) -> None:
        """Forget every scripted action not yet consumed."""
        self._state.clear_scripts()

    def pending_actions(self, test_id: str | None) -> int:
        """How many scripted actions for ``test_id`` have not been consumed yet."""
        return self._state.pending_actions(test_id)

    # -- lifecycle on the caller's loop --------------------------------------------------

    async def _bind(self, port: int) -> None:
        if self._listener is not None:
            return
        # Not 0: aiohttp reads 0 as "wait for handlers forever". The restart must be abrupt.
        self._listener = await _Listener.open(self._state, self.host, port, shutdown_timeout=0.01)
        self._port = self._listener.port

    async def _unbind(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    async def _arestart(self, down_for_s: float) -> None:
        await self._unbind()
        await asyncio.sleep(down_for_s)
        await self._bind(self.port)

    async def astart(self) -> LocalServer:
        """Start listening on the running event loop."""
        if self._mode is not None:
            raise RuntimeError("LocalServer is already started")
        self._mode = "async"
        self._loop = asyncio.get_running_loop()
        try:
            await self._bind(self._requested_port)
        except BaseException:
            self._mode = None
            raise
        return self

    async def aclose(self) -> None:
        """Stop the server and close every connection (no-op when already closed)."""
        if self._mode == "thread":
            await asyncio.get_running_loop().run_in_executor(None, self.close)
            return
        await self._unbind()
        self._mode = None

    async def __aenter__(self) -> LocalServer:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- lifecycle on a private loop thread ---------------------------------------------

    def _call(self, coro: Awaitable[_T]) -> _T:
        assert self._loop is not None  # noqa: S101 -- only called in thread mode

        async def wrapper() -> _T:
            return await coro

        future: Future[_T] = asyncio.run_coroutine_threadsafe(wrapper(), self._loop)
        return future.result()

    def start(self) -> LocalServer:
        """Start the server on an event loop in a daemon thread; returns once it listens."""
        if self._mode is not None:
            raise RuntimeError("LocalServer is already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Finish on this thread: the thread that closes the server may be running
            # an event loop of its own (a `with LocalServer()` inside async code).
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        thread = threading.Thread(target=run, name="friendli-image-local-server", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._mode = loop, thread, "thread"
        try:
            self._call(self._bind(self._requested_port))
        except BaseException:
            self._stop_thread()
            raise
        return self

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._mode = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def close(self) -> None:
        """Stop the server, close every connection and join its thread (no-op when closed)."""
        if self._mode is None:
            return
        if self._mode == "async":
            raise RuntimeError("this LocalServer runs on an event loop: use 'await srv.aclose()'")
        try:
            self._call(self._unbind())
        finally:
            self._stop_thread()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- both modes ---------------------------------------------------------------------

    def _run(self, coro: Awaitable[None]) -> Awaitable[None]:
        if self._mode == "thread":
            self._call(coro)
            return _Done()
        if self._mode == "async":
            return coro
        if asyncio.iscoroutine(coro):
            coro.close()
        raise RuntimeError("LocalServer is not started")

    def kill(self) -> Awaitable[None]:
        """Stop listening and drop every connection at once, like a server that died.

        The port refuses connections until `revive`; requests in flight get no answer. In
        async mode, await the result; in thread mode the call is complete when it returns.
        """
        return self._run(self._unbind())

    def revive(self) -> Awaitable[None]:
        """Listen again on the same port after `kill` (no-op while listening).

        Counters, records and scripts are kept. Await the result in async mode.
        """
        if self._mode is not None and self._port is None:
            raise RuntimeError("LocalServer never listened")
        return self._run(self._bind(self._port or 0))

    def restart(self, down_for_s: float = 0.0) -> Awaitable[None]:
        """Close the listener and every connection, stay down ``down_for_s``, rebind the port.

        Connections are refused while the server is down. In async mode, await the result;
        in thread mode the restart is complete when the call returns (awaiting is harmless).
        """
        return self._run(self._arestart(down_for_s))


class _BackgroundStderr(logging.Handler):
    """Writes log records to stderr from a daemon thread; drops them when stderr is stuck.

    A write to a pipe nobody reads blocks once the pipe is full; on the event loop's thread
    that would stop the server for good. The thread writes with `os.write`, holding no lock
    that interpreter shutdown needs.
    """

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__(level=logging.WARNING)
        self.dropped = 0
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(
            target=self._drain, name="friendli-image-server-log", daemon=True
        )
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 -- a broken record must not reach the loop
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def handleError(self, record: logging.LogRecord) -> None:
        self.dropped += 1  # the default prints a traceback to stderr, which may be stuck

    def _drain(self) -> None:
        while (text := self._queue.get()) is not None:
            data = text.encode("utf-8", "backslashreplace")
            try:
                fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
                while data:
                    data = data[os.write(fd, data) :]
            except (OSError, ValueError):
                self.dropped += 1

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=1.0)
        super().close()


@contextlib.contextmanager
def _stderr_off_the_loop() -> Iterator[None]:
    """Route warnings to `_BackgroundStderr` unless the application configured logging."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = _BackgroundStderr()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


async def _serve_until_signalled(config: ServerConfig, host: str, port: int) -> None:
    listener = await _Listener.open(ServerState(config), host, port, shutdown_timeout=5.0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
        shown = f"[{host}]" if ":" in host else host
        print(f"Serving Friendli Container image API on http://{shown}:{listener.port}", flush=True)
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await listener.close()


def run_server(
    config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Serve the image API until interrupted (Ctrl-C or SIGTERM stop it cleanly).

    Call it from the main thread. Unless logging is configured, warnings go to stderr from
    a background thread and are dropped when stderr does not keep up, so a full pipe cannot
    stop the server. With ``ServerConfig(token_file=...)`` or ``token_env=...`` the token is
    read before the port is bound and never appears in the process list. No
    `RequestRecord` is kept (nothing could read it): use `LocalServer` for that.
    """
    # Nothing can read the records of a server run this way: keeping them would only
    # grow the process (``friendli-image serve`` runs this).
    config = attrs.evolve(config or ServerConfig(), record_requests=False)
    config.resolve_token()
    with _stderr_off_the_loop(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(config, host, port))
