"""SyncFriendli: the blocking facade, running AsyncFriendli's coroutines on a private loop.

Each ``SyncFriendli`` owns one event loop, run by anyio on a daemon thread with a
``BlockingPortal``, and one ``AsyncFriendli`` created on that loop and never handed out
(aiohttp sessions belong to the loop that made them). A blocking call submits the async
call to the portal with ``start_task_soon`` and waits on the returned
``concurrent.futures.Future``; if the wait is interrupted (Ctrl-C), the future is
cancelled, which cancels the task, which closes its connection, and the call is not
retried. There is no second implementation: the sync methods are one-line delegations.

Lifecycle: the loop thread starts on the first call (or ``with``), stops on ``close()``;
a client nobody closed is closed when it is garbage collected or at interpreter exit
(``weakref.finalize``). After ``os.fork()`` the child forgets the parent's loop (its
thread does not exist there) and builds its own on the next call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import ssl
import sys
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._batch import SyncBatch as Batch  # the blocking Batch, named like Image below
from ._client import AsyncFriendli
from ._config import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_RESPONSE_BYTES, RetryConfig, Timeout
from ._exceptions import FriendliUsageError, FriendliUsageWarning

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Iterable

    from ._batch import BatchProgress, RequestSpec
    from ._images import ImageSource
    from ._models import ImageResult, ResponseFormat

__all__ = ["SyncFriendli"]

_T = TypeVar("_T")

logger = logging.getLogger("friendli_image")

#: The name of every facade loop thread (tests count them; debuggers show it).
LOOP_THREAD_NAME: Final = "friendli-image-sync"
#: On Windows a blocked lock wait does not see Ctrl-C, so the wait wakes up this often.
_WINDOWS_WAKE_S: Final = 0.2


class _Runtime:
    """One running loop thread, its portal, and the AsyncFriendli that lives on it."""

    __slots__ = ("client", "loop_thread_id", "pid", "portal", "thread")

    def __init__(self, make_client: Callable[[], AsyncFriendli]) -> None:
        ready: concurrent.futures.Future[tuple[BlockingPortal, AsyncFriendli, int]]
        ready = concurrent.futures.Future()
        # Our own daemon thread rather than anyio's start_blocking_portal: that context
        # manager's cleanup blocks on the portal, which hangs when it is finalized in a
        # forked child (where the loop thread does not exist), and anyio < 4.5 runs it on
        # a non-daemon executor thread that interpreter exit waits for before atexit.
        self.thread = threading.Thread(
            target=_serve, args=(ready, make_client), name=LOOP_THREAD_NAME, daemon=True
        )
        self.thread.start()
        try:
            self.portal, self.client, self.loop_thread_id = ready.result()
        except BaseException:
            self.thread.join()
            raise
        self.pid = os.getpid()

    def shutdown(self) -> None:
        """Stop the loop thread, which closes the inner client (from close, GC or at exit)."""
        if self.pid != os.getpid():
            return  # a forked child: the loop thread is the parent's
        if threading.get_ident() == self.loop_thread_id:
            # Dropped by a callback on the loop itself, which cannot wait for itself.
            threading.Thread(target=self.shutdown, name=LOOP_THREAD_NAME + "-stop").start()
            return
        # Calls still in flight are cancelled; then the loop closes the session (_serve).
        with contextlib.suppress(RuntimeError):  # already stopped
            self.portal.call(self.portal.stop, True)
        self.thread.join()
        logger.debug("SyncFriendli closed: session closed, loop thread stopped")


def _serve(
    ready: concurrent.futures.Future[tuple[BlockingPortal, AsyncFriendli, int]],
    make_client: Callable[[], AsyncFriendli],
) -> None:
    async def run_portal() -> None:
        client = make_client()
        try:
            async with BlockingPortal() as portal:
                ready.set_result((portal, client, threading.get_ident()))
                await portal.sleep_until_stopped()
        finally:
            # After the portal's tasks are cancelled and done, so none uses the session.
            await client.close()

    try:
        anyio.run(run_portal, backend="asyncio")
    except BaseException as exc:  # noqa: BLE001  (handed to the thread that waits for us)
        if not ready.done():
            ready.set_exception(exc)


#: Every live facade, so a forked child can make each forget its parent's loop thread.
_live: weakref.WeakSet[SyncFriendli] = weakref.WeakSet()
#: Runtimes inherited through fork. Kept alive on purpose: their objects belong to the
#: parent (sockets, a loop whose thread is gone), and letting the child collect them
#: would warn about unclosed resources the child must not close.
_inherited: list[_Runtime] = []


def _after_fork_in_child() -> None:
    for client in list(_live):
        client._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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

    In async code (``async def``, Jupyter), use `AsyncFriendli` instead: a blocking call
    there works but stalls the running loop, and warns once with `FriendliUsageWarning`.

    Args:
        token: the API token; default ``FRIENDLI_TOKEN``. None or ``""`` sends no
            ``Authorization`` header.
        server_url: the server's base URL; default ``FRIENDLI_SERVER_URL``, else
            ``http://localhost:8000``. A per-call ``server_url`` overrides it.
        timeout_ms: the per-attempt timeout in milliseconds (shorthand for
            ``timeout=Timeout(attempt=...)``).
        retries: a ``RetryConfig``, a number of retries (0 disables retrying), or None
            for the default policy.
        http_headers: extra headers sent with every request.
        max_connections: the most requests in flight at once (the connection pool size).
        timeout: connect / read / attempt / total timeouts (see ``Timeout``).
        max_response_bytes: responses larger than this raise ``FriendliResponseTooLarge``
            before they are buffered.
        verify: TLS certificate verification: True (the system's CAs), a path to a CA
            bundle file (or directory), an ``ssl.SSLContext``, or False to turn it off.
        trust_env: honour ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` and ``.netrc``.
            Off by default, so an environment cannot silently route the token through
            a proxy.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        retries: RetryConfig | int | None = None,
        http_headers: Mapping[str, str] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: Timeout | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        trust_env: bool = False,
    ) -> None:
        # Built here only to validate the arguments (errors at construction, not at the
        # first call) and to resolve the environment once; the client that sends
        # requests is built from the resolved settings on the loop thread.
        settings = AsyncFriendli(
            token=token,
            server_url=server_url,
            timeout_ms=timeout_ms,
            retries=retries,
            http_headers=http_headers,
            max_connections=max_connections,
            timeout=timeout,
            max_response_bytes=max_response_bytes,
            verify=verify,
            trust_env=trust_env,
        )
        secret, resolved_url = settings._token, settings.server_url
        self._has_token = secret is not None
        self._server_url = resolved_url
        self._max_connections = max_connections

        def make_client() -> AsyncFriendli:
            return AsyncFriendli(
                token=secret.reveal() if secret is not None else "",
                server_url=resolved_url,
                timeout_ms=timeout_ms,
                retries=retries,
                http_headers=http_headers,
                max_connections=max_connections,
                timeout=timeout,
                max_response_bytes=max_response_bytes,
                verify=verify,
                trust_env=trust_env,
            )

        self._make_client = make_client
        self._lock = threading.Lock()
        self._runtime: _Runtime | None = None
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
        return self._server_url

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
        token = "'***'" if self._has_token else "None"
        return (
            f"SyncFriendli(server_url={self._server_url!r}, token={token}, "
            f"max_connections={self._max_connections}, closed={self._closed})"
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            "SyncFriendli holds a connection pool, a thread and a token and cannot be "
            "pickled; create a client in each process"
        )

    # -- the thread boundary -------------------------------------------------------

    def _run(self, call: Callable[[AsyncFriendli], Awaitable[_T]]) -> _T:
        """Run ``call(inner_client)`` on the loop thread and block until it returns.

        The one way across the thread boundary. ``call`` receives the `AsyncFriendli`
        living on the loop and returns the awaitable to run there, e.g.
        ``self._run(lambda c: c.container.image.generate(prompt=prompt))``; batch
        methods cross once per batch, fanning out inside the loop. Interrupting the
        wait (Ctrl-C) cancels the task and re-raises; the result or error of ``call``
        is returned or raised as is.
        """
        runtime = self._runtime or self._start()
        if threading.get_ident() == runtime.loop_thread_id:
            raise FriendliUsageError(
                "a SyncFriendli call was made on the client's own event loop thread (from "
                "a callback or hook), where it would wait for itself forever; use the "
                "AsyncFriendli API there, or call from another thread"
            )
        if not self._warned_in_loop and asyncio._get_running_loop() is not None:
            self._warned_in_loop = True
            warnings.warn(
                "a SyncFriendli call was made inside a running event loop: it works, but "
                "blocks that loop until the call returns; in async code use AsyncFriendli "
                "and `await client.container.image.generate(...)`",
                FriendliUsageWarning,
                stacklevel=3,
            )
        try:
            future = runtime.portal.start_task_soon(call, runtime.client)
        except RuntimeError:
            raise self._closed_error() from None
        try:
            if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
                while not future.done():
                    concurrent.futures.wait((future,), timeout=_WINDOWS_WAKE_S)
            return future.result()
        except concurrent.futures.CancelledError:
            # Only close() (or interpreter exit) cancels a task we did not cancel.
            raise self._closed_error("while this call was in flight") from None
        except BaseException:
            # Ctrl-C (or any exception raised in this thread while waiting): cancel the
            # task, which aborts its connection; a no-op when the call already ended.
            future.cancel()
            raise

    def _start(self) -> _Runtime:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            runtime = self._runtime
            if runtime is None:
                runtime = _Runtime(self._make_client)
                self._finalizer = weakref.finalize(self, runtime.shutdown)
                self._runtime = runtime
            return runtime

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


async def _open(client: AsyncFriendli) -> None:
    await client.__aenter__()


class Image:
    """Image generation and editing, blocking: ``friendli.container.image``."""

    def __init__(self, client: SyncFriendli) -> None:
        self._client = client

    def generate(
        self,
        *,
        prompt: str,
        model: str | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 0.0,
        seed: int | None = None,
        response_format: ResponseFormat | None = None,
        control_images: Sequence[ImageSource] | None = None,
        controlnet_weights: Sequence[float] | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """Generate an image from a text prompt (``POST /v1/images/generations``); blocks.

        Args:
            prompt: what the image should show.
            model: routes the request to a specific adapter.
            num_inference_steps: denoising steps, in [1, 50].
            guidance_scale: how closely to follow the prompt (0 lets the model choose).
            seed: an int in [0, 2**32 - 1] for reproducible images.
            response_format: ``"jpeg"`` or ``"raw"`` (PNG); None for the server default.
            control_images: ControlNet conditioning images (URL, data: URI, base64,
                bytes, path, binary file, PIL image or ``{"image": ...}``).
            controlnet_weights: one weight in [0, 1] per control image.
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries).
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
            FriendliUsageError: the client is closed, or this is its own loop thread.
        """
        return self._client._run(
            lambda c: c.container.image.generate(
                prompt=prompt,
                model=model,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                response_format=response_format,
                control_images=control_images,
                controlnet_weights=controlnet_weights,
                retries=retries,
                server_url=server_url,
                timeout_ms=timeout_ms,
                http_headers=http_headers,
            )
        )

    def edit(
        self,
        *,
        image: ImageSource | Sequence[ImageSource],
        prompt: str,
        model: str | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 0.0,
        seed: int | None = None,
        response_format: ResponseFormat | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """Edit an image as a text prompt describes (``POST /v1/images/edits``); blocks.

        Args:
            image: the image to edit, or a list of images. Each may be a URL (passed
                to the server, never fetched here), data: URI, base64 text, bytes, a
                path, a binary file object, a PIL image or ``{"image": ...}``.
            prompt: the change to make.
            model: routes the request to a specific adapter.
            num_inference_steps: denoising steps, in [1, 50].
            guidance_scale: how closely to follow the prompt.
            seed: an int in [0, 2**32 - 1] for reproducible images.
            response_format: ``"jpeg"`` or ``"raw"`` (PNG); None for the server default.
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries).
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
            FriendliUsageError: the client is closed, or this is its own loop thread.
        """
        return self._client._run(
            lambda c: c.container.image.edit(
                image=image,
                prompt=prompt,
                model=model,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                response_format=response_format,
                retries=retries,
                server_url=server_url,
                timeout_ms=timeout_ms,
                http_headers=http_headers,
            )
        )

    def generate_batch(
        self,
        requests: Iterable[RequestSpec] | AsyncIterable[RequestSpec],
        *,
        concurrency: int = 16,
        rps: float | None = None,
        ordered: bool = False,
        reorder_window: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        on_progress: Callable[[BatchProgress], object] | None = None,
        stop_on_fatal: bool = True,
        total: int | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> Batch:
        """Generate many images, fanned out on the client's event loop; see `SyncBatch`.

        ``for item in friendli.container.image.generate_batch(prompts): ...`` or
        ``result = friendli.container.image.generate_batch(prompts).collect()``. Takes
        the arguments of ``AsyncFriendli``'s ``generate_batch`` (see there); the whole
        batch runs on the loop thread, which reads ``requests`` and calls
        ``on_progress``.
        """
        return Batch(
            self._client,
            lambda c: c.container.image.generate_batch(
                requests,
                concurrency=concurrency,
                rps=rps,
                ordered=ordered,
                reorder_window=reorder_window,
                out_dir=out_dir,
                resume=resume,
                on_progress=on_progress,
                stop_on_fatal=stop_on_fatal,
                total=total,
                retries=retries,
                server_url=server_url,
                timeout_ms=timeout_ms,
                http_headers=http_headers,
            ),
        )

    def edit_batch(
        self,
        requests: Iterable[RequestSpec] | AsyncIterable[RequestSpec],
        *,
        concurrency: int = 16,
        rps: float | None = None,
        ordered: bool = False,
        reorder_window: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        on_progress: Callable[[BatchProgress], object] | None = None,
        stop_on_fatal: bool = True,
        total: int | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> Batch:
        """Edit many images, fanned out on the client's event loop; see `SyncBatch`.

        Takes the arguments of ``AsyncFriendli``'s ``edit_batch``; each request is a
        mapping of ``edit`` arguments (``image``, ``prompt``, ...) or an ``EditRequest``.
        """
        return Batch(
            self._client,
            lambda c: c.container.image.edit_batch(
                requests,
                concurrency=concurrency,
                rps=rps,
                ordered=ordered,
                reorder_window=reorder_window,
                out_dir=out_dir,
                resume=resume,
                on_progress=on_progress,
                stop_on_fatal=stop_on_fatal,
                total=total,
                retries=retries,
                server_url=server_url,
                timeout_ms=timeout_ms,
                http_headers=http_headers,
            ),
        )


class Container:
    """The Friendli Container API, blocking: ``friendli.container``."""

    def __init__(self, client: SyncFriendli) -> None:
        self._client = client

    @cached_property
    def image(self) -> Image:
        """Image generation and editing."""
        return Image(self._client)
