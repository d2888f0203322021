"""SyncFriendli: the blocking facade, running AsyncFriendli's coroutines on a private loop.

Each ``SyncFriendli`` owns one event loop, run by anyio on a daemon thread with a
``BlockingPortal`` (which starts and stops it), and one ``AsyncFriendli`` that opens its
session on that loop and is never handed out (aiohttp sessions belong to the loop that
made them). A blocking call hands the coroutine to the loop with one ``call_soon_threadsafe``
and waits on a lock that its task's done callback releases (`_Hop`: cheaper than
``run_coroutine_threadsafe``, which was half the cost of the portal's
``start_task_soon``); if the wait is interrupted (Ctrl-C), the task is cancelled, which
closes its connection, and the call is not retried. There is no second implementation:
the sync methods are delegations.

Lifecycle: the loop thread starts on the first call (or ``with``), stops on ``close()``;
a client nobody closed is closed when it is garbage collected or at interpreter exit
(``weakref.finalize``). After ``os.fork()`` the child forgets the parent's loop (its
thread does not exist there) and builds its own on the next call. A fork waits for a
loop thread that is starting and finishes the imports the facade makes lazily, so no
child inherits an import lock held by a thread it does not have (see `_before_fork`).
Where Python refuses new threads but still runs code (its ``atexit`` hooks, on 3.12), a
client's calls run on its private loop in the calling thread instead (`_InlineRuntime`);
once the interpreter is finalizing (a ``__del__`` run at exit), a call fails typed, as
no thread could run it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import logging
import os
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from functools import cached_property, wraps
from typing import TYPE_CHECKING, Any, Concatenate, Final, Generic, ParamSpec, TypeVar

from ._batch import Batch
from ._batch_models import BatchItem, BatchResult, EndpointStats
from ._client import AsyncFriendli, describe
from ._exceptions import FriendliUsageError, FriendliUsageWarning
from ._resources import Image as AsyncImage
from ._serde import converter

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

__all__ = ["LOOP_THREAD_NAME", "SyncBatch", "SyncFriendli"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

logger = logging.getLogger("friendli_image")

#: The name of every facade loop thread (tests count them; debuggers show it).
LOOP_THREAD_NAME: Final = "friendli-image-sync"
#: On Windows a blocked lock wait does not see Ctrl-C, so the wait wakes up this often.
_WINDOWS_WAKE_S: Final = 0.2


class _Runtime:
    """One running loop thread, its portal, and the AsyncFriendli that lives on it."""

    __slots__ = ("client", "loop", "loop_thread_id", "pid", "portal", "thread")

    def __init__(self, client: AsyncFriendli) -> None:
        ready: concurrent.futures.Future[
            tuple[BlockingPortal, asyncio.AbstractEventLoop, AsyncFriendli, int]
        ]
        ready = concurrent.futures.Future()
        # Our own daemon thread rather than anyio's start_blocking_portal: that context
        # manager's cleanup blocks on the portal, which hangs when it is finalized in a
        # forked child (where the loop thread does not exist), and anyio < 4.5 runs it on
        # a non-daemon executor thread that interpreter exit waits for before atexit.
        self.thread = threading.Thread(
            target=_serve, args=(ready, client), name=LOOP_THREAD_NAME, daemon=True
        )
        global _started  # noqa: PLW0603  (set once, read by the fork hook)
        _started = True
        # A fork waits while a loop thread starts: it imports anyio as it goes, and a
        # child forked meanwhile would inherit that module's import lock, held by a
        # thread it does not have, and hang at its own first call.
        with _starting:
            self.thread.start()
            try:
                self.portal, self.loop, self.client, self.loop_thread_id = ready.result()
            except BaseException:
                self.thread.join()
                raise
        self.pid = os.getpid()

    def shutdown(self) -> None:
        """Stop the loop thread, which closes the inner client (from close, GC or at exit)."""
        if self.pid != os.getpid():
            return  # a forked child: the loop thread is the parent's
        if sys.is_finalizing():
            # Past the atexit hooks (a client first used in one of them is collected
            # here): daemon threads are frozen now, so waiting for the loop would hang
            # the exit forever; the process is going, and its sockets with it.
            return
        if threading.get_ident() == self.loop_thread_id:
            # Dropped by a callback on the loop itself, which cannot wait for itself.
            threading.Thread(target=self.shutdown, name=LOOP_THREAD_NAME + "-stop").start()
            return
        # Calls still in flight are cancelled; then the loop closes the session (_serve).
        with contextlib.suppress(RuntimeError):  # already stopped
            self.portal.call(self.portal.stop, True)
        self.thread.join()
        logger.debug("SyncFriendli closed: session closed, loop thread stopped")


class _InlineRuntime:
    """The loop of a client that could not start its thread because Python is exiting
    (``atexit`` hooks refuse new threads on 3.12): each call runs to its end on this
    private loop, in the calling thread, one at a time."""

    __slots__ = ("_lock", "client", "loop", "loop_thread_id", "pid")

    def __init__(self, client: AsyncFriendli) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()
        self.loop_thread_id = -1  # no thread is the loop's own
        self.pid = os.getpid()
        self._lock = threading.Lock()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run one call on the loop, blocking the calling thread."""
        with self._lock:
            return self.loop.run_until_complete(coroutine)

    def shutdown(self) -> None:
        """Close the client and the loop (not in a forked child, nor once finalizing)."""
        if self.pid != os.getpid() or sys.is_finalizing():
            return
        with self._lock:
            self.loop.run_until_complete(self.client.close())
            self.loop.close()


class _Hop(Generic[_T]):
    """One blocking call across the thread boundary: its task, and a lock its caller waits on.

    What ``run_coroutine_threadsafe`` does with a ``concurrent.futures.Future`` (a new
    ``Condition`` per wait, callbacks chained both ways), for less: 32-35 against 42-55 µs
    of CPU and 64-71 against 80-101 µs of wall time per hop of a trivial coroutine
    (benchmarks/ANALYSIS.md). The lock is released once the task is done; the caller
    then reads the finished task's outcome, which nothing else touches any more.
    """

    __slots__ = ("_cancelled", "_coroutine", "_done", "_loop", "_task")

    def __init__(self, coroutine: Coroutine[Any, Any, _T], loop: asyncio.AbstractEventLoop) -> None:
        self._coroutine: Coroutine[Any, Any, _T] | None = coroutine
        self._loop = loop
        self._task: asyncio.Task[_T] | None = None
        self._cancelled = False
        self._done = threading.Lock()
        self._done.acquire()

    def start(self) -> None:
        """On the loop: run the coroutine as a task (unless the caller gave up first)."""
        coroutine, self._coroutine = self._coroutine, None
        if coroutine is None:
            return
        if self._cancelled:
            coroutine.close()
            self._done.release()
            return
        self._task = self._loop.create_task(coroutine)
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[_T]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone (Ctrl-C), asyncio must not log it
        self._done.release()

    def cancel(self) -> None:
        """On the loop: the caller stopped waiting; cancel the task (or never start it)."""
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """The loop is gone before the call started: drop the coroutine unrun."""
        coroutine, self._coroutine = self._coroutine, None
        if coroutine is not None:
            coroutine.close()

    def wait(self, timeout: float = -1) -> bool:
        """Block until the task is done (Ctrl-C interrupts); False if ``timeout`` passed."""
        return self._done.acquire(timeout=timeout)

    def result(self) -> _T:
        """The finished task's result, or its exception raised."""
        if self._task is None:
            raise asyncio.CancelledError
        return self._task.result()


def _serve(
    ready: concurrent.futures.Future[
        tuple[BlockingPortal, asyncio.AbstractEventLoop, AsyncFriendli, int]
    ],
    client: AsyncFriendli,
) -> None:
    async def run_portal() -> None:
        from anyio.from_thread import BlockingPortal  # noqa: PLC0415

        try:
            async with BlockingPortal() as portal:
                loop = asyncio.get_running_loop()
                ready.set_result((portal, loop, client, threading.get_ident()))
                await portal.sleep_until_stopped()
        finally:
            # The calls still running are cancelled and awaited first, so that none uses
            # the session while it closes.
            calls = asyncio.all_tasks() - {asyncio.current_task()}
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await client.close()

    try:
        # Imported by the first loop thread, not with the package: anyio.from_thread
        # costs ~10 ms of import time that async-only programs would pay for nothing.
        import anyio  # noqa: PLC0415

        anyio.run(run_portal, backend="asyncio")
    except BaseException as exc:  # noqa: BLE001  (handed to the thread that waits for us)
        if not ready.done():
            ready.set_exception(exc)


#: Every live facade, so a forked child can make each forget its parent's loop thread.
_live: weakref.WeakSet[SyncFriendli] = weakref.WeakSet()
#: Runtimes inherited through fork. Kept alive on purpose: their objects belong to the
#: parent (sockets, a loop whose thread is gone), and letting the child collect them
#: would warn about unclosed resources the child must not close.
_inherited: list[_Runtime | _InlineRuntime] = []


#: Held while a loop thread starts; a fork waits for it (see `_before_fork`).
_starting = threading.RLock()
#: Whether this process ever started a loop thread (else forks need no care).
_started = False
#: Whether the forking thread holds `_starting` (released after the fork in the parent).
_fork_holds = False
#: How long a fork waits for a loop thread to finish starting before going ahead.
_FORK_WAIT_S: Final = 10.0
#: Modules the SDK imports lazily, on a facade's loop thread among others: at its start,
#: a request's serialization, the first retry, an error's excerpt, a host name's lookup,
#: telemetry's first call (when OpenTelemetry is installed), a URL location's staging
#: folder. A fork imports them all first: after that no thread can be halfway through one
#: (checking which are loaded would leave a window between the check and the fork in which
#: a thread starts one). tests/test_layers.py holds this list to the imports in the code.
_LAZY_MODULES: Final = (
    "anyio",
    "anyio.from_thread",
    "queue",
    "tenacity",
    "html",
    "encodings.idna",
    "urllib.parse",
    "tarfile",
    "shutil",
    "tempfile",
    "opentelemetry.trace",
    "opentelemetry.metrics",
    "opentelemetry.propagate",
)
#: Heavy optional modules that only a batch's output formats or a picture's conversion
#: import: completed at a fork when already being loaded, else not paid for.
_HEAVY_LAZY_MODULES: Final = ("pyarrow", "pyarrow.parquet", "fsspec", "PIL.Image")


def _import_lazy_modules() -> None:
    """Finish importing what the SDK's threads import lazily, waiting for any thread that
    is importing one of them now."""
    for name in _LAZY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in _HEAVY_LAZY_MODULES:
        if name.partition(".")[0] in sys.modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    converter()


def _before_fork() -> None:
    """Let no fork catch a facade thread halfway through an import.

    A module being imported is locked by the importing thread; a child forked then
    inherits the lock but not the thread, and its first import of that module waits
    forever. So the forking thread waits for a starting loop thread, then imports the
    lazily loaded modules itself (waiting for any thread importing one now): the child
    finds them complete.
    """
    global _fork_holds  # noqa: PLW0603
    if not _started:
        return
    _fork_holds = _starting.acquire(timeout=_FORK_WAIT_S)
    _import_lazy_modules()


def _after_fork_in_parent() -> None:
    global _fork_holds  # noqa: PLW0603
    if _fork_holds:
        _fork_holds = False
        _starting.release()


def _after_fork_in_child() -> None:
    global _starting, _fork_holds  # noqa: PLW0603
    _starting = threading.RLock()  # the parent's may be held by a thread we lack
    _fork_holds = False
    for client in list(_live):
        client._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _in_ipython_kernel() -> bool:
    """Is this a Jupyter (ipykernel) cell? Its running loop is the kernel's own, and a
    blocking call there is what a notebook is for, so it gets no warning."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return getattr(shell, "kernel", None) is not None


def _arguments_of(
    source: Callable[_P, object],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, _P], None]]:
    """Give a constructor the parameters of ``source`` (for mypy, help and signature)."""

    def decorate(init: Callable[..., None]) -> Callable[Concatenate[Any, _P], None]:
        init.__wrapped__ = source.__init__  # type: ignore[attr-defined]
        return init

    return decorate


class SyncFriendli:
    """The blocking client for the Friendli Container image API.

    Takes the same arguments as `AsyncFriendli` and offers the same calls, blocking:
    ``friendli.container.image.generate(...)`` and ``.edit(...)``. Each client runs an
    event loop on a private daemon thread, started on first use, and an `AsyncFriendli`
    on it; nothing else is shared.

    Create one client and reuse it: it is safe to share between threads, which then
    share its connection pool (``max_connections`` requests in flight at once). Close it
    with ``close()`` or a ``with`` block; one that is never closed is cleaned up when it
    is garbage collected or when the interpreter exits. Ctrl-C during a call raises
    ``KeyboardInterrupt`` at once and cancels the request.

    In async code (``async def``), use `AsyncFriendli` instead: a blocking call there
    works but stalls the running loop, and warns once with `FriendliUsageWarning`. A
    Jupyter cell gets no warning: there a blocking call is what the cell is for (in
    Jupyter, ``await`` on an `AsyncFriendli` call works in a cell too).

    Takes exactly the arguments of `AsyncFriendli` (see there), checked once, here.
    """

    @_arguments_of(AsyncFriendli)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Validated (and the environment read) once, on the caller's thread; this client
        # then opens its session on the loop thread at the first call. A loop thread
        # built later (after fork) gets a copy, with the same settings.
        self._template = AsyncFriendli(*args, **kwargs)
        self._next_client: AsyncFriendli | None = self._template
        self._lock = threading.Lock()
        self._runtime: _Runtime | _InlineRuntime | None = None
        self._finalizer: weakref.finalize[[], SyncFriendli] | None = None
        self._closed = False
        self._warned_in_loop = False
        _live.add(self)

    # -- public surface ------------------------------------------------------------

    @cached_property
    def container(self) -> Container:
        """The Friendli Container API: ``friendli.container.image.generate(...)``."""
        return Container(self)

    @property
    def server_url(self) -> str:
        """The base URL calls go to unless a call names another."""
        return self._template.server_url

    @property
    def max_connections(self) -> int:
        """The most requests this client has in flight at once."""
        return self._template.max_connections

    @property
    def endpoints(self) -> tuple[EndpointStats, ...]:
        """A snapshot of each endpoint of a fleet (see `AsyncFriendli.endpoints`)."""
        runtime = self._runtime
        if runtime is None:
            return self._template.endpoints
        return self._run(_endpoints_of)

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    def __enter__(self) -> SyncFriendli:
        self._run(_open)
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and stop the loop thread. Idempotent.

        Calls still in flight in other threads end with `FriendliUsageError`; the client
        cannot be used afterwards.
        """
        runtime = self._runtime
        if runtime is not None and threading.get_ident() == runtime.loop_thread_id:
            raise FriendliUsageError(
                "SyncFriendli.close() was called on the client's own event loop thread "
                "(from a callback), where it would wait for itself; close it elsewhere"
            )
        with self._lock:
            self._closed = True
            finalizer, self._finalizer = self._finalizer, None
            self._runtime = None
        if finalizer is not None:
            finalizer()

    def __repr__(self) -> str:
        settings = describe(self._template).rsplit(", closed=", 1)[0]
        return f"SyncFriendli({settings}, closed={self._closed})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "SyncFriendli holds a connection pool, a thread and a token and cannot be "
            "pickled; create a client in each process"
        )

    # -- the thread boundary -------------------------------------------------------

    def _run(self, call: Callable[[AsyncFriendli], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``call(inner_client)`` on the loop thread and block until it returns.

        The one way across the thread boundary. ``call`` receives the `AsyncFriendli`
        living on the loop and returns the awaitable to run there, e.g.
        ``self._run(lambda c: c.container.image.generate(prompt=prompt))``; batch
        methods cross once per batch, fanning out inside the loop. Interrupting the
        wait (Ctrl-C) cancels the task and re-raises; the result or error of ``call``
        is returned or raised as is.
        """
        if sys.is_finalizing():
            # Past the atexit hooks, threads no longer run: a loop thread would never
            # answer (or, on 3.10 and 3.11, never start), and the call would hang the exit.
            raise FriendliUsageError(
                "a SyncFriendli call was made while Python is finalizing (from a __del__ or "
                "a finalizer run at exit), when no thread can run it; make the call before "
                "the program ends, or from an atexit hook (atexit.register)"
            )
        runtime = self._runtime or self._start()
        if isinstance(runtime, _InlineRuntime):
            return runtime.run(call(runtime.client))
        if threading.get_ident() == runtime.loop_thread_id:
            raise FriendliUsageError(
                "a SyncFriendli call was made on the client's own event loop thread (from "
                "a callback or hook), where it would wait for itself forever; use the "
                "AsyncFriendli API there, or call from another thread"
            )
        if (
            not self._warned_in_loop
            and asyncio._get_running_loop() is not None
            and not _in_ipython_kernel()
        ):
            self._warned_in_loop = True
            warnings.warn(
                "a SyncFriendli call was made inside a running event loop: it works, but "
                "blocks that loop until the call returns; in async code use AsyncFriendli "
                "and `await client.container.image.generate(...)`",
                FriendliUsageWarning,
                stacklevel=3,
            )
        hop = _Hop(call(runtime.client), runtime.loop)
        try:
            runtime.loop.call_soon_threadsafe(hop.start)
        except RuntimeError:  # the loop is closed
            hop.close()
            raise self._closed_error() from None
        try:
            if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
                while not hop.wait(_WINDOWS_WAKE_S):
                    pass
            else:
                hop.wait()
            return hop.result()
        except asyncio.CancelledError:
            # Only close() (or interpreter exit) cancels a task we did not cancel.
            raise self._closed_error("while this call was in flight") from None
        except BaseException:
            # Ctrl-C (or any exception raised in this thread while waiting): cancel the
            # task, which aborts its connection; a no-op when the call already ended.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs
                runtime.loop.call_soon_threadsafe(hop.cancel)
            raise

    def _inner_client(self) -> AsyncFriendli:
        """The AsyncFriendli living on the loop (its thread started if need be)."""
        return (self._runtime or self._start()).client

    def _start(self) -> _Runtime | _InlineRuntime:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            runtime = self._runtime
            if runtime is None:
                client, self._next_client = self._next_client or self._template.copy(), None
                try:
                    runtime = _Runtime(client)
                except RuntimeError:
                    # Python is exiting (the atexit hooks run once the main thread is
                    # done) and its loop thread could not start: 3.12 refuses new
                    # threads, and 3.10 refuses the atexit registration of an import the
                    # thread makes (concurrent.futures.thread, for older anyio).
                    if threading.main_thread().is_alive():
                        raise
                    runtime = _InlineRuntime(client)
                self._finalizer = weakref.finalize(self, runtime.shutdown)
                self._runtime = runtime
            return runtime

    def _runs_inline(self) -> bool:
        """True when this client's calls run in the calling thread (`_InlineRuntime`)."""
        return isinstance(self._runtime, _InlineRuntime)

    def _closed_error(self, when: str = "") -> FriendliUsageError:
        return FriendliUsageError(
            f"this SyncFriendli was closed{' ' + when if when else ''}; create a new "
            "SyncFriendli (or use it in a `with` block and make calls inside it)"
        )

    def _forget_parent(self) -> None:
        """After fork, in the child: drop the parent's loop thread; the next call builds one."""
        self._lock = threading.Lock()  # the parent may have held it while forking
        runtime, self._runtime = self._runtime, None
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if runtime is not None:
            _inherited.append(runtime)


async def _endpoints_of(client: AsyncFriendli) -> tuple[EndpointStats, ...]:
    # Taken on the loop thread, where the endpoints' state changes.
    return client.endpoints


async def _open(client: AsyncFriendli) -> None:
    await client.__aenter__()


def _blocking(
    method: Callable[Concatenate[AsyncImage, _P], Awaitable[_T]],
) -> Callable[Concatenate[Image, _P], _T]:
    """The blocking twin of an async resource method: same parameters, same docs."""
    name = method.__name__

    @wraps(method)
    def call(self: Image, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        async def run(client: AsyncFriendli) -> _T:
            bound: Callable[_P, Awaitable[_T]] = getattr(client.container.image, name)
            return await bound(*args, **kwargs)

        return self._client._run(run)

    return call


def _blocking_batch(
    method: Callable[Concatenate[AsyncImage, _P], Batch],
) -> Callable[Concatenate[Image, _P], SyncBatch]:
    """The blocking twin of an async batch method: it returns a `SyncBatch`."""
    name = method.__name__

    @wraps(method)
    def call(self: Image, /, *args: _P.args, **kwargs: _P.kwargs) -> SyncBatch:
        def make(client: AsyncFriendli) -> Batch:
            bound: Callable[_P, Batch] = getattr(client.container.image, name)
            return bound(*args, **kwargs)

        return SyncBatch(self._client, make)

    call.__signature__ = inspect.signature(method).replace(  # type: ignore[attr-defined]
        return_annotation="SyncBatch"
    )
    call.__doc__ = (
        "Blocking: returns a `SyncBatch`; ``for item in batch`` or ``batch.collect()``.\n\n"
        + (method.__doc__ or "")
    )
    return call


class Image:
    """Image generation and editing, blocking: ``friendli.container.image``.

    Each method takes exactly the arguments of its `AsyncFriendli` twin and blocks
    until it is done; a batch runs on the client's loop thread (see `SyncBatch`).
    """

    def __init__(self, client: SyncFriendli) -> None:
        self._client = client

    generate = _blocking(AsyncImage.generate)
    edit = _blocking(AsyncImage.edit)
    generate_batch = _blocking_batch(AsyncImage.generate_batch)
    edit_batch = _blocking_batch(AsyncImage.edit_batch)


class Container:
    """The Friendli Container API, blocking: ``friendli.container``."""

    def __init__(self, client: SyncFriendli) -> None:
        self._client = client

    @cached_property
    def image(self) -> Image:
        """Image generation and editing."""
        return Image(self._client)


# -- the blocking batch bridge ----------------------------------------------------------------


class _Pump:
    """Runs a `Batch` on the loop and hands finished items to another thread in chunks.

    The consumer thread takes everything finished so far at once, and the loop thread
    wakes it only when the buffer goes from empty to non-empty, so a fast batch crosses
    the thread boundary once per chunk, not once per item. When the consumer falls
    ``high_water`` items behind, the pump stops pulling (and the batch stops dispatching).
    """

    def __init__(self, batch: Batch, high_water: int) -> None:
        self._batch = batch
        self._high_water = high_water
        self._items: deque[BatchItem] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._finished = False
        self._cancelled_by_us = False
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            async with self._batch:
                async for item in self._batch:
                    with self._cond:
                        self._items.append(item)
                        if len(self._items) == 1:
                            self._cond.notify()
                        full = len(self._items) >= self._high_water
                        if full:
                            self._room.clear()
                    if full:
                        await self._room.wait()
        except asyncio.CancelledError:
            if not self._cancelled_by_us:
                self._error = FriendliUsageError(
                    "the batch was cancelled because its SyncFriendli was closed while it ran"
                )
            raise
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer thread)
            self._error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify()

    def take(self) -> list[BatchItem] | None:
        """Block until items are finished; return them all (None once the batch is over)."""
        with self._cond:
            while not self._items and not self._finished:
                self._cond.wait()
            if not self._items:
                if self._error is not None:
                    raise self._error
                return None
            chunk = list(self._items)
            self._items.clear()
            if not self._room.is_set():
                self._loop.call_soon_threadsafe(self._room.set)
        return chunk

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._finished

    async def cancel(self) -> None:
        """Cancel the batch (requests in flight included) and wait until it stopped."""
        self._cancelled_by_us = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class SyncBatch:
    """The blocking twin of `Batch`, from ``SyncFriendli.container.image.generate_batch``.

    ``for item in batch`` yields each `BatchItem` as it finishes (in input order with
    ``ordered=True``); ``batch.collect()`` runs the batch to the end and returns a
    `BatchResult` in input order. Either way the whole batch runs on the client's event
    loop thread: ``collect()`` crosses the thread boundary once, iteration once per
    chunk of finished items. The requests are read, and ``on_progress`` is called, on
    that thread. Arguments are checked at once, when the batch is created. Leaving a
    ``for`` loop early, or Ctrl-C, cancels the requests in flight.
    """

    def __init__(self, client: SyncFriendli, make: Callable[[AsyncFriendli], Batch]) -> None:
        self._client = client
        # Built now, on the caller's thread (creating a batch touches no event loop), so
        # that a bad option raises here, at the caller's line, as with AsyncFriendli.
        self._batch = make(client._inner_client())
        self._used = False

    def _claim(self) -> Batch:
        if self._used:
            raise FriendliUsageError(
                "a batch runs once; call generate_batch()/edit_batch() again to rerun it"
            )
        self._used = True
        return self._batch

    def collect(self) -> BatchResult:
        """Run the batch to the end; return every item in input order (see `Batch.collect`)."""
        batch = self._claim()

        async def run(_client: AsyncFriendli) -> BatchResult:
            return await batch.collect()

        return self._client._run(run)

    def __iter__(self) -> Iterator[BatchItem]:
        if self._client._runs_inline():
            # No loop runs between calls to fill a pump: the batch runs to its end, and
            # its items come in input order (an order it could have finished in).
            yield from self.collect().items
            return
        batch = self._claim()

        async def start(_client: AsyncFriendli) -> _Pump:
            return _Pump(batch, high_water=max(2 * batch.options.concurrency, 64))

        pump = self._client._run(start)
        try:
            while (chunk := pump.take()) is not None:
                yield from chunk
        finally:
            if not pump.finished:
                self._client._run(lambda _client: pump.cancel())
