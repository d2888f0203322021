"""AsyncFriendli: the client, its settings, and the one request path every call takes.

The path is: validated request model → JSON bytes → POST on the shared aiohttp session
(behind a slot semaphore, so timers start only once a connection is ours) → status check
→ body read under a size cap → JSON parse → base64 decode → ImageResult. Retries wrap
the attempt (see ``_retry``); aiohttp exceptions are translated here, and only here,
into the ``FriendliError`` tree.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ipaddress
import logging
import netrc
import os
import random
import re
import ssl
import time
import urllib.request
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Mapping
from functools import cached_property
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import attrs
import orjson
import pybase64
from yarl import URL

from ._config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RESPONSE_BYTES,
    ENV_LOG,
    RetryConfig,
    Timeout,
    env_server_url,
    env_token,
)
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliResponseTooLarge,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    FriendliUsageError,
    FriendliValidationError,
    excerpt,
    status_error_class,
)
from ._formats import image_dimensions, sniff_format
from ._models import EditRequest, GenerateRequest, ImageResult
from ._retry import CallRetry, RetryBudget, parse_retry_after
from ._serde import dumps_request
from ._version import __version__

if TYPE_CHECKING:
    from ._resources import Container

    _DropFinalizer = weakref.finalize[
        [asyncio.AbstractEventLoop, AsyncIterator[None]], "AsyncFriendli"
    ]

__all__ = ["AsyncFriendli", "CallOptions"]

logger = logging.getLogger("friendli_image")

_USER_AGENT: Final = f"friendli-image/{__version__} (python; aiohttp/{aiohttp.__version__})"
#: Error bodies are read up to this size, for the excerpt and the 422 details.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: Bodies above this are joined, parsed and decoded on a worker thread (the loop stays free).
_OFFLOOP_DECODE_BYTES: Final = 4 * 1024 * 1024
#: Request bodies above this are streamed (aiohttp's own threshold for a bytes body).
_INLINE_BODY_BYTES: Final = 1024 * 1024
_PREFIX: Final = re.compile(rb'\s*\{\s*"image"\s*:\s*"')
_SUFFIX: Final = re.compile(rb'"\s*\}\s*$')


def _configure_logging_from_env() -> None:
    level = os.environ.get(ENV_LOG, "").strip().upper()
    if not level:
        return
    known = logging.getLevelName(level)
    logger.setLevel(known if isinstance(known, int) else logging.DEBUG)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


_configure_logging_from_env()


class _Secret:
    """Holds the token so that no repr, str or pickle of ours can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __reduce__(self) -> Any:
        raise TypeError("the token is not picklable")


def _check_server_url(value: object, field: str = "server_url") -> str:
    if not isinstance(value, str) or not value.strip():
        raise FriendliValidationError(field, f"must be an http(s) URL string, got {value!r}")
    url = value.strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise FriendliValidationError(field, f"must start with http:// or https://, got {url!r}")
    return url


def _timeout_from_ms(timeout_ms: object, base: Timeout) -> Timeout:
    if timeout_ms is None:
        return base
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float):
        raise FriendliValidationError("timeout_ms", f"must be milliseconds, got {timeout_ms!r}")
    if not timeout_ms > 0:
        raise FriendliValidationError("timeout_ms", f"must be positive, got {timeout_ms!r}")
    return Timeout(
        connect=base.connect, read=base.read, attempt=timeout_ms / 1000, total=base.total
    )


def _retry_config(value: object, base: RetryConfig) -> RetryConfig:
    if value is None:
        return base
    if isinstance(value, RetryConfig):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return attrs.evolve(base, max_attempts=value + 1)
    raise FriendliValidationError(
        "retries", f"must be a RetryConfig, a number of retries (int >= 0) or None, got {value!r}"
    )


#: What HTTP forbids in header names and values (RFC 9110 5.5): aiohttp raises a bare
#: ValueError for them at send time, so they are refused up front.
_FORBIDDEN_HEADER_CHARS: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FriendliValidationError("http_headers", "must be a mapping of str to str")
    for name, text in value.items():
        if _FORBIDDEN_HEADER_CHARS.search(name) or _FORBIDDEN_HEADER_CHARS.search(text):
            # Name only: the value may be a secret.
            raise FriendliValidationError(
                "http_headers",
                f"header {name.strip()!r} contains a line break or control character; remove it",
            )
    return dict(value)


class CallOptions:
    """Per-call settings resolved against the client's: URL, timeouts, retries, headers."""

    __slots__ = ("headers", "retry", "server_url", "timeout")

    def __init__(
        self, server_url: str, timeout: Timeout, retry: RetryConfig, headers: dict[str, str]
    ) -> None:
        self.server_url = server_url
        self.timeout = timeout
        self.retry = retry
        self.headers = headers


class _Call:
    """The fixed parts of one call, shared by all of its attempts."""

    __slots__ = (
        "body",
        "deadline",
        "expect_jpeg",
        "headers",
        "request_id",
        "started",
        "timeout",
        "url",
    )

    def __init__(
        self,
        *,
        url: URL,
        body: bytes,
        headers: dict[str, str],
        request_id: str,
        timeout: Timeout,
        deadline: float | None,
        expect_jpeg: bool,
        started: float,
    ) -> None:
        self.url = url
        self.body = body
        self.headers = headers
        self.request_id = request_id
        self.timeout = timeout
        self.deadline = deadline
        self.expect_jpeg = expect_jpeg
        self.started = started


class _AttemptTrace:
    """What aiohttp's tracing tells about one attempt's connection."""

    __slots__ = ("connected", "reused")

    def __init__(self) -> None:
        self.connected = False
        self.reused = False


async def _on_connection_created(
    _session: aiohttp.ClientSession, context: Any, _params: object
) -> None:
    context.trace_request_ctx.connected = True


async def _on_connection_reused(
    _session: aiohttp.ClientSession, context: Any, _params: object
) -> None:
    trace = context.trace_request_ctx
    trace.connected = True
    trace.reused = True


def _make_trace_config() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(_on_connection_created)
    trace.on_connection_reuseconn.append(_on_connection_reused)
    trace.freeze()
    return trace


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    # Registered with the loop as an async generator: asyncio.run() (and every loop
    # runner calling shutdown_asyncgens) closes it at shutdown, and the loop's finalizer
    # closes it when the client is dropped, so a forgotten client leaves no unclosed
    # session or transport behind.
    try:
        yield
    finally:
        await session.close()


_closing: set[asyncio.Task[None]] = set()


def _close_dropped(loop: asyncio.AbstractEventLoop, guard: AsyncIterator[None]) -> None:
    def start() -> None:
        task = loop.create_task(guard.aclose())  # type: ignore[attr-defined]
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    if not loop.is_closed():
        # Any thread may run the collector; RuntimeError: the loop closed meanwhile
        # (its shutdown_asyncgens has closed the guard already).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(start)


class AsyncFriendli:
    """The asyncio client for the Friendli Container image API.

    Create one per event loop and reuse it: it owns a pool of keep-alive connections.
    The aiohttp session is created on first use (or in ``async with``) on the running
    loop, never in ``__init__``, so constructing a client is free and safe anywhere.

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
            bundle file (or directory), an ``ssl.SSLContext``, or False to turn it off
            (warns: anyone on the path can then read the token and the images).
        trust_env: honour ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` and ``.netrc``
            (read once per host). Off by default, so an environment cannot silently
            route the token through a proxy; a ``.netrc`` login is used only when no
            token is set.

    Redirects are never followed: a 3xx raises ``FriendliAPIStatusError`` with
    ``location`` set, so a POST is never replayed elsewhere and the token never leaves
    ``server_url``. A token sent over plain ``http://`` to a host other than loopback
    warns once per host.
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
        if token is not None and not isinstance(token, str):
            raise FriendliValidationError("token", f"must be a str or None, got {type(token)}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise FriendliValidationError("max_connections", "must be an int >= 1")
        if max_connections < 1:
            raise FriendliValidationError("max_connections", "must be an int >= 1")
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int):
            raise FriendliValidationError("max_response_bytes", "must be an int > 0")
        if max_response_bytes <= 0:
            raise FriendliValidationError("max_response_bytes", "must be an int > 0")
        if timeout is not None and not isinstance(timeout, Timeout):
            raise FriendliValidationError("timeout", "must be a friendli_image.Timeout")
        if not isinstance(trust_env, bool):
            raise FriendliValidationError("trust_env", f"must be a bool, got {trust_env!r}")
        self._ssl = _ssl_setting(verify)
        self._trust_env = trust_env
        self._env_routes: dict[tuple[str, str], _EnvRoute] = {}
        self._plain_http_warned: set[str] = set()
        resolved_token = env_token() if token is None else (token or None)
        if resolved_token and _FORBIDDEN_HEADER_CHARS.search(resolved_token):
            # Typically a trailing newline from a file; the token itself is not shown.
            raise FriendliValidationError(
                "token",
                "contains a line break or control character (often a trailing newline read "
                "from a file); pass token.strip()",
            )
        self._token = _Secret(resolved_token) if resolved_token else None
        self._server_url = _check_server_url(
            server_url if server_url is not None else env_server_url()
        )
        self._timeout = _timeout_from_ms(timeout_ms, timeout or Timeout())
        self._retry = _retry_config(retries, RetryConfig())
        self._max_connections = max_connections
        self._max_response_bytes = max_response_bytes
        headers = {
            "User-Agent": _USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "application/json",
            **_check_headers(http_headers),
        }
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.reveal()}"
        self._headers: Final = headers
        self._defaults = CallOptions(self._server_url, self._timeout, self._retry, {})
        self._urls: dict[tuple[str, str], URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_guard: AsyncIterator[None] | None = None
        self._dropped: _DropFinalizer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._budget = RetryBudget(self._retry.budget_floor)
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._closed = False

    # -- public surface ------------------------------------------------------------

    @cached_property
    def container(self) -> Container:
        """The Friendli Container API: ``client.container.image.generate(...)``."""
        from ._resources import Container  # noqa: PLC0415  (resources import this module)

        return Container(self)

    @property
    def server_url(self) -> str:
        """The base URL calls go to unless a call names another."""
        return self._server_url

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    async def __aenter__(self) -> AsyncFriendli:
        await self._open_session()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool. Idempotent; the client cannot be used afterwards."""
        self._closed = True
        if self._dropped is not None:
            self._dropped.detach()
        guard, self._session_guard = self._session_guard, None
        self._session = None
        if guard is not None:
            await guard.aclose()  # type: ignore[attr-defined]

    aclose = close

    def __repr__(self) -> str:
        token = "'***'" if self._token is not None else "None"
        return (
            f"AsyncFriendli(server_url={self._server_url!r}, token={token}, "
            f"max_connections={self._max_connections}, closed={self._closed})"
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            "AsyncFriendli holds a connection pool and a token and cannot be pickled; "
            "create a client in each process"
        )

    # -- the session -----------------------------------------------------------------

    def _ready_session(self) -> aiohttp.ClientSession | None:
        """The session for the running loop, or None when one must be opened first."""
        if self._closed:
            raise FriendliUsageError(
                "this client is closed; create a new AsyncFriendli (or use `async with`)"
            )
        session = self._session
        if session is None or session.closed:
            return None
        if self._loop is not asyncio.get_running_loop():
            if self._loop is not None and not self._loop.is_closed():
                raise FriendliUsageError(
                    "this AsyncFriendli is in use on another event loop; aiohttp sessions "
                    "belong to one loop, so create one client per loop (or per thread)"
                )
            return None
        return session

    async def _open_session(self) -> aiohttp.ClientSession:
        session = self._ready_session()
        if session is not None:
            return session
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300, ssl=self._ssl
            ),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=True,
            trace_configs=[_make_trace_config()],
            read_bufsize=256 * 1024,
        )
        guard = _close_on_loop_shutdown(session)
        # The first step registers the generator with the loop's shutdown hooks.
        await guard.__anext__()
        loop = asyncio.get_running_loop()
        if self._dropped is not None:
            self._dropped.detach()
        # A client dropped without close() is often collected by the cycle collector,
        # which would finalize the session and connector along with it (and aiohttp
        # warns "Unclosed ..."). The finalizer holds the guard, so the session stays
        # reachable until the guard closes it on its loop.
        self._dropped = weakref.finalize(self, _close_dropped, loop, guard)
        # At interpreter exit the loop's own shutdown (or the sync facade's atexit hook)
        # closes the session; a task scheduled from here then could outlive its loop.
        self._dropped.atexit = False
        self._session, self._session_guard = session, guard
        self._loop = loop
        self._slots = asyncio.Semaphore(self._max_connections)
        return session

    # -- the one request path ------------------------------------------------------

    def _options(
        self,
        *,
        retries: RetryConfig | int | None,
        server_url: str | None,
        timeout_ms: int | None,
        http_headers: Mapping[str, str] | None,
    ) -> CallOptions:
        if retries is None and server_url is None and timeout_ms is None and not http_headers:
            return self._defaults
        return CallOptions(
            self._server_url if server_url is None else _check_server_url(server_url),
            _timeout_from_ms(timeout_ms, self._timeout),
            _retry_config(retries, self._retry),
            _check_headers(http_headers),
        )

    def _url(self, server_url: str, path: str) -> URL:
        key = (server_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(server_url + path)
            self._warn_plain_http(url)
        return url

    def _warn_plain_http(self, url: URL) -> None:
        host = url.host or ""
        if self._token is None or url.scheme != "http" or host in self._plain_http_warned:
            return
        self._plain_http_warned.add(host)
        if _is_loopback(host):
            return
        warnings.warn(
            f"the API token is sent in clear text to http://{host}; use an https:// "
            "server_url unless this network is trusted",
            UserWarning,
            stacklevel=4,
        )

    def _env_route(self, url: URL) -> _EnvRoute:
        """The proxy and ``.netrc`` login for ``url`` when ``trust_env`` (cached per host)."""
        key = (url.scheme, url.host or "")
        route = self._env_routes.get(key)
        if route is None:
            route = self._env_routes[key] = _EnvRoute.from_env(url, self._token is None)
        return route

    async def request(
        self, path: str, request: GenerateRequest | EditRequest, options: CallOptions
    ) -> ImageResult:
        """Send one validated request and return its decoded image (retrying per policy)."""
        session = self._ready_session() or await self._open_session()
        started = time.monotonic()
        request_id = uuid.uuid4().hex
        timeout = options.timeout
        call = _Call(
            url=self._url(options.server_url, path),
            body=dumps_request(request),
            headers={**self._headers, **options.headers, "X-Request-ID": request_id},
            request_id=request_id,
            timeout=timeout,
            deadline=None if timeout.total is None else started + timeout.total,
            expect_jpeg=request.response_format == "jpeg",
            started=started,
        )
        config = options.retry
        # The first attempt runs outside tenacity: a controller costs ~15 µs per call, a
        # tenth of the SDK's own CPU for a small image. A failure enters the loop, which
        # replays it as attempt 1, so the policy sees the same history either way.
        try:
            return await self._attempt(session, call, 1)
        except FriendliAPIError as error:
            first_failure = error
        finally:
            # Credit the budget as first attempts complete, not as calls start: a burst
            # of queued calls would otherwise hit the cap at once and leave nothing for
            # the retries it later needs.
            self._budget.deposit(config)
        retry = CallRetry(config, self._budget, started, call.deadline, self._rng)
        attempt_number = 0
        resent_ambiguous = False
        try:
            async for attempt in retry.retrying():
                with attempt:
                    attempt_number += 1
                    if attempt_number == 1:
                        resent_ambiguous = first_failure.maybe_processed
                        raise first_failure
                    try:
                        result = await self._attempt(session, call, attempt_number)
                    except FriendliAPIError as error:
                        resent_ambiguous = resent_ambiguous or error.maybe_processed
                        raise
                    if resent_ambiguous:
                        result = attrs.evolve(result, maybe_duplicated=True)
                    return result
        except FriendliAPIError as error:
            error.attempts = attempt_number
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, session: aiohttp.ClientSession, call: _Call, attempt_number: int
    ) -> ImageResult:
        url, request_id = call.url, call.request_id
        headers = call.headers
        headers["X-Friendli-Attempt"] = str(attempt_number - 1)
        slots = self._slots
        assert slots is not None  # noqa: S101  (set with the session)
        trace = _AttemptTrace()
        route = self._env_route(url) if self._trust_env else _NO_ROUTE
        if route.authorization is not None:
            headers = {**headers, "Authorization": route.authorization}
        failure: FriendliConnectionError | None = None
        async with slots:
            attempt_started = time.monotonic()
            client_timeout = _client_timeout(call.timeout, call.deadline, attempt_started)
            try:
                async with session.post(
                    url,
                    # aiohttp sends large bytes in one write that blocks the loop (and
                    # warns); a fresh BytesIO per attempt streams the same buffer instead.
                    data=call.body if len(call.body) <= _INLINE_BODY_BYTES else BytesIO(call.body),
                    headers=headers,
                    timeout=client_timeout,
                    allow_redirects=False,
                    trace_request_ctx=trace,
                    proxy=route.proxy,
                    proxy_headers=route.proxy_headers,
                ) as response:
                    status = response.status
                    if status != 200:
                        raise await _status_error(response, request_id, self._token)
                    data = await _read_body(response, self._max_response_bytes, request_id)
            except FriendliAPIError as error:
                _log_failed_attempt(error, url, attempt_number, attempt_started)
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                failure = _transport_error(exc, trace, request_id, call.deadline, url)
                _log_failed_attempt(failure, url, attempt_number, attempt_started)
                if not isinstance(exc, aiohttp.ClientResponseError):
                    raise failure from exc
            if failure is not None:
                # Raised outside the except block: aiohttp's ClientResponseError carries
                # the request headers (the token), so it must not even be the __context__.
                raise failure
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "POST %s -> %d attempt=%d elapsed=%.3fs request_id=%s bytes=%d",
                url.path,
                status,
                attempt_number,
                time.monotonic() - attempt_started,
                request_id,
                len(data),
            )
        if len(data) > _OFFLOOP_DECODE_BYTES:
            image = await asyncio.get_running_loop().run_in_executor(
                None, _decode_image, data, status, request_id
            )
        else:
            image = _decode_image(data, status, request_id)
        del data
        fmt = sniff_format(image)
        if call.expect_jpeg and fmt != "jpeg":
            raise FriendliResponseError(
                f"asked for response_format='jpeg' but the image is {fmt}",
                status=status,
                body=excerpt(image[:32].hex()),
                request_id=request_id,
            )
        size = image_dimensions(image, fmt)
        return ImageResult(
            data=image,
            format=fmt,
            width=size[0] if size else None,
            height=size[1] if size else None,
            request_id=request_id,
            attempts=attempt_number,
            elapsed=time.monotonic() - call.started,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ssl_setting(verify: object) -> bool | ssl.SSLContext:
    """Turn the ``verify`` argument into aiohttp's ``ssl`` setting."""
    if isinstance(verify, ssl.SSLContext) or verify is True:
        return verify
    if verify is False:
        warnings.warn(
            "verify=False turns off TLS certificate verification: anyone on the network "
            "path can read the token and the images; pass verify='path/to/ca-bundle.pem' "
            "to trust a private CA instead",
            UserWarning,
            stacklevel=3,
        )
        return False
    if isinstance(verify, str | os.PathLike):
        path = os.fspath(verify)
        try:
            if os.path.isdir(path):
                return ssl.create_default_context(capath=path)
            return ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise FriendliValidationError(
                "verify", f"cannot load the CA bundle {path!r} ({exc})"
            ) from None
    raise FriendliValidationError(
        "verify",
        f"must be True, False, a CA bundle path or an ssl.SSLContext, got {type(verify).__name__}",
    )


def _basic(login: str, password: str) -> str:
    return "Basic " + pybase64.b64encode(f"{login}:{password}".encode()).decode("ascii")


class _EnvRoute:
    """Where ``trust_env`` sends requests for one host: proxy, proxy login, ``.netrc`` login."""

    __slots__ = ("authorization", "proxy", "proxy_headers")

    def __init__(
        self,
        proxy: URL | None = None,
        proxy_headers: dict[str, str] | None = None,
        authorization: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.proxy_headers = proxy_headers
        self.authorization = authorization

    @classmethod
    def from_env(cls, url: URL, use_netrc: bool) -> _EnvRoute:
        host = url.host or ""
        proxy = proxy_headers = authorization = None
        if not urllib.request.proxy_bypass(host):
            proxies = urllib.request.getproxies()
            found = proxies.get(url.scheme)
            if found:
                proxy = URL(found if "://" in found else f"http://{found}")
                if proxy.user is not None:
                    login = _basic(proxy.user, proxy.password or "")
                    proxy_headers = {"Proxy-Authorization": login}
                    proxy = proxy.with_user(None)
        if use_netrc:
            with contextlib.suppress(OSError, netrc.NetrcParseError):
                entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
                if entry is not None:
                    authorization = _basic(entry[0] or "", entry[2] or "")
        return cls(proxy, proxy_headers, authorization)


_NO_ROUTE: Final = _EnvRoute()


def _log_failed_attempt(
    error: FriendliAPIError, url: URL, attempt_number: int, started: float
) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        outcome = (
            str(error.status)
            if isinstance(error, FriendliAPIStatusError | FriendliResponseError)
            else type(error).__name__
        )
        logger.debug(
            "POST %s -> %s attempt=%d elapsed=%.3fs request_id=%s",
            url.path,
            outcome,
            attempt_number,
            time.monotonic() - started,
            error.request_id,
        )


def _client_timeout(timeout: Timeout, deadline: float | None, now: float) -> aiohttp.ClientTimeout:
    total = timeout.attempt
    if deadline is not None:
        remaining = max(0.001, deadline - now)
        total = remaining if total is None else min(total, remaining)
    return aiohttp.ClientTimeout(
        total=total, connect=None, sock_connect=timeout.connect, sock_read=timeout.read
    )


async def _read_body(
    response: aiohttp.ClientResponse, limit: int, request_id: str
) -> bytes | bytearray:
    length = response.content_length
    if length is not None and length > limit:
        response.close()
        raise FriendliResponseTooLarge(
            f"the response is {length:,} bytes, over max_response_bytes={limit:,}",
            status=response.status,
            request_id=request_id,
        )
    compressed = "Content-Encoding" in response.headers
    if length is not None and length <= _OFFLOOP_DECODE_BYTES and not compressed:
        return await response.read()
    # Larger or unsized bodies: keep aiohttp's chunks and join them once. Above 1 MiB
    # bytes.join copies without holding the GIL, so on a worker thread it never stalls
    # the loop, where bytearray(length) zeroes and faults in tens of MiB in one step
    # (30+ ms per body) and a growing bytearray is copied again on every realloc.
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            raise FriendliResponseTooLarge(
                f"the response exceeded max_response_bytes={limit:,} while streaming",
                status=response.status,
                request_id=request_id,
            )
        chunks.append(chunk)
    if size <= _OFFLOOP_DECODE_BYTES:
        return b"".join(chunks)
    return await asyncio.get_running_loop().run_in_executor(None, b"".join, chunks)


def _decode_image(data: bytes | bytearray, status: int, request_id: str) -> bytes:
    """Parse ``{"image": "<base64>"}`` and decode it; raise FriendliResponseError if not."""
    head = _PREFIX.match(data, 0, 32)
    if head is not None:
        tail = _SUFFIX.search(data, max(head.end(), len(data) - 16))
        if tail is not None:
            # Base64 has no quote or backslash, so when the bytes between the prefix and
            # the suffix decode as strict base64, the body is exactly this JSON object:
            # decode in place, without building the JSON string first.
            with memoryview(data) as view:
                try:
                    image = pybase64.b64decode(view[head.end() : tail.start()], validate=True)
                except (binascii.Error, ValueError):
                    image = None
            if image:
                return image
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FriendliResponseError(
            "the server answered 200 with a body that is not JSON",
            status=status,
            body=excerpt(data),
            request_id=request_id,
        ) from None
    if not isinstance(parsed, dict):
        raise FriendliResponseError(
            f"expected a JSON object with an 'image' field, got a JSON {type(parsed).__name__}",
            status=status,
            body=excerpt(data),
            request_id=request_id,
        )
    encoded = parsed.get("image")
    if not isinstance(encoded, str) or not encoded:
        what = "is missing" if "image" not in parsed else f"is {type(encoded).__name__}"
        raise FriendliResponseError(
            f"the response's 'image' field {what}; expected base64 text",
            status=status,
            body=excerpt(data),
            request_id=request_id,
        )
    try:
        image = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FriendliResponseError(
            "the response's 'image' field is not valid base64",
            status=status,
            body=excerpt(encoded),
            request_id=request_id,
        ) from None
    if not image:
        raise FriendliResponseError(
            "the response's image is empty", status=status, request_id=request_id
        )
    return image


async def _status_error(
    response: aiohttp.ClientResponse, request_id: str, token: _Secret | None
) -> FriendliAPIStatusError:
    status = response.status
    raw = b""
    # The status alone is the error; a broken error body only loses the excerpt.
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
        raw = await response.content.read(_ERROR_BODY_LIMIT)
    headers = dict(response.headers)
    if token is not None:
        # A server (or a proxy) that echoes the request must not put the token into an
        # error that gets logged or pickled.
        secret = token.reveal()
        raw = raw.replace(secret.encode(), b"***")
        headers = {name: value.replace(secret, "***") for name, value in headers.items()}
    retry_after = parse_retry_after(response.headers)
    detail: Any = None
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        detail = parsed.get("detail", parsed.get("error", parsed.get("message")))
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    cls = status_error_class(status)
    if 300 <= status < 400:
        message = "the server redirected the request and redirects are not followed"
    elif isinstance(detail, str) and detail:
        message = excerpt(detail)
    else:
        message = response.reason or "request failed"
    kwargs: dict[str, Any] = {
        "status": status,
        "headers": headers,
        "body": raw.decode("utf-8", "replace"),
        "request_id": request_id,
        "retry_after": retry_after,
    }
    if cls is FriendliUnprocessableEntityError:
        details = (
            [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []
        )
        return FriendliUnprocessableEntityError(message, details=details, **kwargs)
    return cls(message, **kwargs)


def _transport_error(
    exc: BaseException,
    trace: _AttemptTrace,
    request_id: str,
    deadline: float | None,
    url: URL,
) -> FriendliConnectionError:
    target = f"{url.scheme}://{url.host}:{url.port}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return FriendliTimeoutError(
            f"timed out connecting to {target}; is the server up and reachable?",
            kind="connect",
            request_id=request_id,
        )
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return FriendliTimeoutError(
            f"the server at {target} went silent past the read timeout",
            kind="read",
            request_id=request_id,
            maybe_processed=True,
        )
    if isinstance(exc, asyncio.TimeoutError):
        past_deadline = deadline is not None and time.monotonic() >= deadline - 0.005
        kind = "deadline" if past_deadline else "attempt"
        return FriendliTimeoutError(
            f"the call to {target} timed out ({kind} timeout); raise timeout_ms or Timeout "
            "if generations legitimately take longer",
            kind=kind,
            request_id=request_id,
            maybe_processed=trace.connected,
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        error = FriendliConnectionError(
            f"TLS failed for {target}: {exc}; check the certificate or pass a CA bundle",
            request_id=request_id,
        )
        error._permanent = True  # type: ignore[attr-defined]
        return error
    if isinstance(exc, aiohttp.ClientConnectorError):
        return FriendliConnectionError(
            f"cannot connect to {target} ({exc.os_error.strerror or exc.os_error}); is the "
            "server running? Check server_url or FRIENDLI_SERVER_URL",
            request_id=request_id,
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return FriendliConnectionError(f"invalid URL {url}", request_id=request_id)
    reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
    error = FriendliConnectionError(
        f"the connection to {target} broke before a complete answer ({reason})",
        request_id=request_id,
        maybe_processed=trace.connected,
    )
    if trace.reused and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        error._stale_connection = True  # type: ignore[attr-defined]
    return error
