"""One attempt: wait for a connection slot, POST the prepared body, follow redirects, read.

`Transport` sends one prepared call once: it waits for a connection slot (so every
timer starts only once a connection is ours), posts the body, hands a non-200 status to
the error mapping (``_errors``) and a 200's body to the decoder (``_decode``), and builds
the `ImageResult`. `Connector` tells the attempt's trace whether its connection was fresh.
Retrying is the client's job (``_client``); nothing here sleeps or loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import aiohttp
import attrs
from yarl import URL

from friendli_image._blocking import Lookups, run_blocking
from friendli_image._clock import monotonic
from friendli_image._config import CallOptions, ClientSettings, Timeout
from friendli_image._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    warn_at_caller,
)
from friendli_image._formats import image_dimensions, sniff_format
from friendli_image._requests import RequestModel
from friendli_image._results import ImageResult
from friendli_image._secrets import AUTHORIZATION, Redactor
from friendli_image._serde import dumps_request

from ._decode import OFFLOOP_DECODE_BYTES, BodyBuffers, decode_image, read_body, settle_allocator
from ._errors import status_error, transport_error
from ._proxy import (
    MAX_REDIRECTS,
    NO_ROUTE,
    EnvRoute,
    bearer,
    is_loopback,
    keeps_credentials,
    redirect_target,
)
from ._trace import AttemptTrace

if TYPE_CHECKING:
    # For the connector's signatures only: aiohttp exports none of these three.
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = [
    "Call",
    "Connector",
    "Transport",
]

#: Request bodies above this are streamed (aiohttp's own threshold for a bytes body).
_INLINE_BODY_BYTES: Final = 1024 * 1024

_T = TypeVar("_T")


@attrs.define(slots=True)
class Call:
    """The fixed parts of one call, shared by all of its attempts.

    ``headers`` carries the ``Authorization`` header and ``redactor`` the call's
    credentials for the length of the call: neither is shown by the repr, and nothing
    of either is kept on the client between calls.
    """

    url: URL
    body: bytes
    headers: dict[str, str] = attrs.field(repr=False)
    request_id: str
    timeout: Timeout
    expect_jpeg: bool
    redactor: Redactor = attrs.field(repr=False)


#: The attempt being sent in this task, for the connector to report on.
_CURRENT_ATTEMPT: Final[contextvars.ContextVar[AttemptTrace | None]] = contextvars.ContextVar(
    "friendli_image_attempt", default=None
)


class Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the attempt in flight whether its connection is new.

    Whether a request got a connection at all (it may have reached the server) and
    whether that connection was reused (the keep-alive race) decide what a failure means.
    aiohttp's public ``TraceConfig`` would tell too, but once installed it fires six
    signals per request: 9 µs (timeit) to 23 µs (profile) of the ~275 µs of client CPU
    of a 64 KiB request (benchmarks/profile_small.py); this costs one context variable
    lookup. The price is overriding ``_create_connection``, aiohttp's private step that
    makes a new connection: the same ``(req, traces, timeout)`` from 3.10 (our floor) to
    3.14, and tests/reliability/test_connections.py fails if it stops being called.

    When aiohttp resolves host names on threads (its default without aiodns), its
    resolver asks the loop through `Lookups`, so a host name resolves at interpreter
    exit too (`run_blocking`).
    """

    def __init__(self, **options: Any) -> None:
        if "resolver" not in options and aiohttp.DefaultResolver is aiohttp.ThreadedResolver:
            # ThreadedResolver only calls the loop's getaddrinfo and getnameinfo.
            lookups = cast("asyncio.AbstractEventLoop", Lookups(asyncio.get_running_loop()))
            options["resolver"] = aiohttp.ThreadedResolver(loop=lookups)
        super().__init__(**options)

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        attempt = _CURRENT_ATTEMPT.get()
        if attempt is not None:
            attempt.connected = True
        return connection

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        attempt = _CURRENT_ATTEMPT.get()
        if attempt is not None:
            attempt.created = True
        return protocol


class _CountedBody(BytesIO):
    """A streamed request body that counts what aiohttp has read of it to send."""

    def __init__(self, body: bytes, trace: AttemptTrace) -> None:
        super().__init__(body)
        self._trace = trace

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self._trace.body_sent += len(chunk)
        return chunk


if sys.version_info >= (3, 11):

    async def _run_until(coro: Coroutine[Any, Any, _T], when: float | None) -> _T:
        """Await ``coro``; past ``when`` (loop time) cancel it and raise TimeoutError.

        ``asyncio.timeout_at`` counts cancellations (``uncancel``): a cancel of the
        caller's task that lands on the very tick the deadline fires stays a
        ``CancelledError``, where aiohttp's ``ClientTimeout(total=)`` swallowed it.
        """
        async with asyncio.timeout_at(when):
            return await coro

else:  # pragma: no cover - Python 3.10 has neither asyncio.timeout nor uncancel()

    async def _run_until(coro: Coroutine[Any, Any, _T], when: float | None) -> _T:
        """Await ``coro``; past ``when`` (loop time) cancel it and raise TimeoutError.

        Without ``uncancel`` a timer that cancels the caller's own task cannot tell its
        cancel from the caller's, so the work runs as a child task: the deadline
        cancels the child, a cancel of the caller stays the caller's.
        """
        loop = asyncio.get_running_loop()
        inner = loop.create_task(coro)
        try:
            timeout = None if when is None else max(0.0, when - loop.time())
            await asyncio.wait((inner,), timeout=timeout)
            if not inner.done():
                inner.cancel()
                await asyncio.wait((inner,))
                if inner.cancelled():
                    raise asyncio.TimeoutError
        except asyncio.CancelledError:
            inner.cancel()
            await asyncio.wait((inner,))
            raise
        return inner.result()


def _credential_parts(value: str) -> tuple[str, ...]:
    """An ``Authorization`` value and its credentials without the scheme."""
    credentials = value.partition(" ")[2]
    return (value, credentials.strip()) if credentials.strip() else (value,)


class Transport:
    """Sends the attempts of a client's calls (one client, one transport)."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._urls: dict[tuple[str, str], URL] = {}
        self._env_routes: dict[tuple[str, str], EnvRoute] = {}
        self._plain_http_warned: set[str] = set()
        self._format_mismatch_logged = False
        self._buffers = BodyBuffers()
        settle_allocator()

    def client_headers(self) -> tuple[dict[str, str], tuple[str, ...]]:
        """The client's own headers with its credentials, and the secrets among them."""
        settings = self._settings
        headers = dict(settings.headers)
        token = settings.token if settings.token_source is None else settings.token_source()
        secrets: tuple[str, ...] = ()
        if token is not None:
            secrets = (token.reveal(),)
        # A user's Authorization (the call's, else the client's) replaces the token's.
        if settings.authorization is not None:
            headers[AUTHORIZATION] = settings.authorization.reveal()
        elif token is not None:
            headers[AUTHORIZATION] = bearer(token)
        return headers, secrets

    def prepare(self, path: str, request: RequestModel, options: CallOptions) -> Call:
        """The parts of a call that stay the same across its attempts."""
        # 128 random bits as 32 hex digits, as uuid4().hex was: 1 µs, against 2.4 for
        # building the UUID object.
        request_id = os.urandom(16).hex()
        headers, secrets = self.client_headers()
        if options.headers:
            headers.update(options.headers)
        if options.authorization is not None:
            headers[AUTHORIZATION] = options.authorization.reveal()
        authorization = headers.get(AUTHORIZATION)
        if authorization is not None:
            secrets += _credential_parts(authorization)
        headers["X-Request-ID"] = request_id
        return Call(
            url=self._url(options.server_url, path),
            body=dumps_request(request),
            headers=headers,
            request_id=request_id,
            timeout=options.timeout,
            expect_jpeg=request.response_format == "jpeg",
            redactor=Redactor(secrets),
        )

    def url(self, server_url: str, path: str) -> URL:
        """The URL of ``path`` on ``server_url`` (made once; warns once per plain-http host)."""
        return self._url(server_url, path)

    def _url(self, server_url: str, path: str) -> URL:
        key = (server_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(server_url + path)
            self._warn_plain_http(url)
        return url

    def _warn_plain_http(self, url: URL) -> None:
        host = url.host or ""
        if self._settings.token is None or url.scheme != "http" or host in self._plain_http_warned:
            return
        self._plain_http_warned.add(host)
        if is_loopback(host):
            return
        warn_at_caller(
            f"the API token is sent in clear text to http://{host}; use an https:// "
            "server_url unless this network is trusted"
        )

    def _env_route(self, url: URL) -> EnvRoute:
        """The proxy (and, with ``trust_env=True``, the ``.netrc`` login) for ``url``.

        Read once per host, as httpx reads the environment once per client.
        """
        key = (url.scheme, url.host or "")
        route = self._env_routes.get(key)
        if route is None:
            use_netrc = self._settings.netrc and not self._settings.has_token
            route = self._env_routes[key] = EnvRoute.from_env(url, use_netrc)
        return route

    async def send(
        self,
        session: aiohttp.ClientSession,
        slots: asyncio.Semaphore,
        call: Call,
        attempt_number: int,
        *,
        started: float,
        deadline: float | None,
    ) -> ImageResult:
        """Make attempt ``attempt_number`` of ``call``; return its image or raise its error.

        ``started`` is when the call started and ``deadline`` when ``Timeout.total``
        ends (`monotonic()` values, None: no deadline).
        """
        url, request_id = call.url, call.request_id
        logger = self._settings.logger
        headers = call.headers
        headers["X-Friendli-Attempt"] = str(attempt_number - 1)
        trace = AttemptTrace()
        redactor = call.redactor
        route = self._env_route(url) if self._settings.trust_env else NO_ROUTE
        proxy_headers = None
        if route.authorization is not None:
            login = route.authorization.reveal()
            headers = {**headers, AUTHORIZATION: login}
            redactor = redactor.with_secrets(*_credential_parts(login))
        if route.proxy_authorization is not None:
            login = route.proxy_authorization.reveal()
            proxy_headers = {"Proxy-Authorization": login}
            redactor = redactor.with_secrets(*_credential_parts(login))
        try:
            async with slots:
                attempt_started = monotonic()
                status, data, pooled, answer_headers = await self._attempt(
                    session,
                    call,
                    headers,
                    trace,
                    redactor,
                    deadline=deadline,
                    started=attempt_started,
                    route=route,
                    proxy_headers=proxy_headers,
                    attempt_number=attempt_number,
                )
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "POST %s -> %d attempt=%d elapsed=%.3fs request_id=%s bytes=%d",
                    url.path,
                    status,
                    attempt_number,
                    monotonic() - attempt_started,
                    request_id,
                    len(data),
                )
            try:
                if len(data) > OFFLOOP_DECODE_BYTES:
                    image = await run_blocking(
                        decode_image, data, status, request_id, redactor, answer_headers
                    )
                else:
                    image = decode_image(data, status, request_id, redactor, answer_headers)
            finally:
                if pooled is not None:
                    self._buffers.give(pooled)
        except FriendliAPIError as error:
            # Every error of an attempt leaves through here, cleaned of the credentials
            # whatever the status and wherever the server echoed them.
            redactor.error(error)
            raise
        del data
        fmt = sniff_format(image)
        if call.expect_jpeg and fmt != "jpeg":
            self._log_format_mismatch(fmt, request_id)
        size = image_dimensions(image, fmt)
        return ImageResult(
            data=image,
            format=fmt,
            width=size[0] if size else None,
            height=size[1] if size else None,
            request_id=request_id,
            attempts=attempt_number,
            elapsed=monotonic() - started,
        )

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        call: Call,
        headers: dict[str, str],
        trace: AttemptTrace,
        redactor: Redactor,
        *,
        deadline: float | None,
        started: float,
        route: EnvRoute,
        proxy_headers: dict[str, str] | None,
        attempt_number: int,
    ) -> tuple[int, bytes | memoryview, bytearray | None, Mapping[str, str]]:
        """The exchange under the attempt's timers: (status, body, pooled buffer, headers)."""
        url, request_id = call.url, call.request_id
        logger = self._settings.logger
        failure: FriendliConnectionError | None = None
        try:
            return await _run_until(
                self._exchange(session, call, headers, trace, redactor, route, proxy_headers),
                _attempt_end(call.timeout, deadline, started),
            )
        except FriendliAPIError as error:
            _log_failed_attempt(logger, error, url, attempt_number, started)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            failure = transport_error(
                exc, trace, request_id, deadline, url, len(call.body), redactor
            )
            _log_failed_attempt(logger, failure, url, attempt_number, started)
            if not isinstance(exc, aiohttp.ClientResponseError):
                raise failure from exc
        # Raised outside the except block: aiohttp's ClientResponseError carries the
        # request headers (the token), so it must not even be the __context__.
        raise failure

    async def _exchange(  # noqa: PLR0917
        self,
        session: aiohttp.ClientSession,
        call: Call,
        headers: dict[str, str],
        trace: AttemptTrace,
        redactor: Redactor,
        route: EnvRoute,
        proxy_headers: dict[str, str] | None,
    ) -> tuple[int, bytes | memoryview, bytearray | None, Mapping[str, str]]:
        body: bytes | BytesIO
        if len(call.body) <= _INLINE_BODY_BYTES:
            body = call.body
            trace.body_sent = len(body)  # one write, right after the headers
        else:
            # aiohttp sends large bytes in one write that blocks the loop (and warns); a
            # fresh reader per attempt streams the same buffer instead, and counts it.
            body = _CountedBody(call.body, trace)
        current = _CURRENT_ATTEMPT.set(trace)
        url, method = call.url, "POST"
        sent: bytes | BytesIO | None = body
        try:
            for hop in range(MAX_REDIRECTS + 1):
                async with session.request(
                    method,
                    url,
                    data=sent,
                    headers=headers,
                    timeout=_client_timeout(call.timeout),
                    allow_redirects=False,
                    proxy=route.proxy,
                    proxy_headers=proxy_headers,
                ) as response:
                    status = response.status
                    if status == 200:
                        data, pooled = await read_body(
                            response,
                            self._settings.max_response_bytes,
                            call.request_id,
                            self._buffers,
                        )
                        return status, data, pooled, response.headers
                    target = redirect_target(response, hop)
                    if target is None:
                        raise await status_error(
                            response, call.request_id, redactor, self._settings.has_token
                        )
                # Followed as httpx (the official SDK's client) follows it: 307/308
                # resend the body, 301/302/303 become a GET; the credentials stay with
                # their origin.
                if status in (307, 308):
                    sent = call.body if isinstance(body, bytes) else _CountedBody(call.body, trace)
                else:
                    method, sent = "GET", None
                if not keeps_credentials(url, target):
                    headers = {
                        name: value
                        for name, value in headers.items()
                        if name.lower() != "authorization"
                    }
                url = target
                if self._settings.trust_env:
                    route = self._env_route(url)
                    proxy_headers = (
                        None
                        if route.proxy_authorization is None
                        else {"Proxy-Authorization": route.proxy_authorization.reveal()}
                    )
        finally:
            _CURRENT_ATTEMPT.reset(current)
        raise AssertionError("unreachable: the last hop raises or returns")  # pragma: no cover

    def _log_format_mismatch(self, fmt: str, request_id: str) -> None:
        # The image cost GPU time and is valid: it is returned as the server sent it.
        if self._format_mismatch_logged:
            return
        self._format_mismatch_logged = True
        self._settings.logger.info(
            "asked for response_format='jpeg' but the server sent %s; returning it as sent "
            "(result.format says so; logged once per client) request_id=%s",
            fmt,
            request_id,
        )


def _log_failed_attempt(
    logger: logging.Logger,
    error: FriendliAPIError,
    url: URL,
    attempt_number: int,
    started: float,
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
            monotonic() - started,
            error.request_id,
        )


def _attempt_end(timeout: Timeout, deadline: float | None, now: float) -> float | None:
    """When this attempt must end, in loop time: its own timeout or the call's deadline."""
    limit = timeout.attempt
    if deadline is not None:
        remaining = max(0.001, deadline - now)
        limit = remaining if limit is None else min(limit, remaining)
    if limit is None:
        return None
    # ``deadline`` and ``now`` are `monotonic()` values; the loop's clock (uvloop's
    # included) may count from another origin.
    return asyncio.get_running_loop().time() + limit - (monotonic() - now)


_CLIENT_TIMEOUTS: dict[Timeout, aiohttp.ClientTimeout] = {}
#: The last pair looked up: nearly every call of a client uses its one default `Timeout`,
#: found by identity without hashing the attrs instance (~1 µs).
_last_timeout: tuple[Timeout, aiohttp.ClientTimeout] | None = None


def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    """aiohttp's socket timers only: the attempt and the deadline are `_run_until`'s."""
    global _last_timeout  # noqa: PLW0603  (a one-entry cache in front of the dict)
    last = _last_timeout
    if last is not None and last[0] is timeout:
        return last[1]
    found = _CLIENT_TIMEOUTS.get(timeout)
    if found is None:
        if len(_CLIENT_TIMEOUTS) > 256:
            _CLIENT_TIMEOUTS.clear()
        found = _CLIENT_TIMEOUTS[timeout] = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout.connect, sock_read=timeout.read
        )
    _last_timeout = (timeout, found)
    return found
