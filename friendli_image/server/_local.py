"""Ways to run the server: `LocalServer` (async or on its own thread) and blocking `run_server`."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Generator, Iterable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar

from aiohttp import web

from ._app import create_app
from ._config import Action, ServerConfig
from ._state import RequestRecord, ServerState, ServerStats

_T = TypeVar("_T")


class _Done:
    """An awaitable that is already complete (what a blocking `restart` returns)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


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
        self._runner: web.AppRunner | None = None
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
        """The recorded requests, oldest first (bounded by ``ServerConfig.max_records``)."""
        return self._state.records()

    def reset_stats(self) -> None:
        """Zero the counters and forget the recorded requests."""
        self._state.reset_stats()

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
        runner = web.AppRunner(
            create_app(state=self._state),
            handler_cancellation=True,
            access_log=None,
            # Not 0: aiohttp reads 0 as "wait for handlers forever". The restart must be abrupt.
            shutdown_timeout=0.01,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner

    async def _unbind(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

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

    def restart(self, down_for_s: float = 0.0) -> Awaitable[None]:
        """Close the listener and every connection, stay down ``down_for_s``, rebind the port.

        Connections are refused while the server is down. In async mode, await the result;
        in thread mode the restart is complete when the call returns (awaiting is harmless).
        """
        if self._mode == "thread":
            self._call(self._arestart(down_for_s))
            return _Done()
        if self._mode == "async":
            return self._arestart(down_for_s)
        raise RuntimeError("LocalServer is not started")


_ANNOUNCED_URL = re.compile(r"Running on (\S+)")


def run_server(
    config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Serve the image API until interrupted (Ctrl-C or SIGTERM stop it cleanly)."""
    app = create_app(config if config is not None else ServerConfig())

    def announce(message: str) -> None:
        found = _ANNOUNCED_URL.search(message)
        url = found.group(1) if found else f"http://{host}:{port}"
        print(f"Serving Friendli Container image API on {url}", flush=True)

    web.run_app(
        app,
        host=host,
        port=port,
        print=announce,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        reuse_address=True,
    )
