"""One attempt on the wire: POST, status check, capped read, decode, error translation.

`Transport` sends one prepared call once: it waits for a connection slot (so every
timer starts only once a connection is ours), posts the body, turns a non-200 status
into its `FriendliAPIStatusError`, reads the body under ``max_response_bytes``, decodes
the base64 image and builds the `ImageResult`. aiohttp, JSON and base64 exceptions are
translated here, and only here, into the ``FriendliError`` tree. Retrying is the
client's job (``_client``); nothing here sleeps or loops.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import contextvars
import ipaddress
import logging
import netrc
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import Coroutine, Mapping
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp
import attrs
import orjson
import pybase64
from yarl import URL

from ._clock import monotonic
from ._config import ENV_TOKEN, CallOptions, ClientSettings, Timeout
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliResponseTooLarge,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    status_error_class,
    warn_at_caller,
)
from ._formats import image_dimensions, sniff_format
from ._requests import RequestModel
from ._results import ImageResult
from ._retry import parse_retry_after
from ._secrets import AUTHORIZATION, Redactor, Secret
from ._serde import dumps_request

if TYPE_CHECKING:
    # For the connector's signatures only: aiohttp exports none of these three.
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = ["BodyBuffers", "Call", "Connector", "Transport"]

#: Error bodies are read up to this size, for the excerpt and the 422 details.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: Bodies above this are joined, parsed and decoded on a worker thread (the loop stays free).
_OFFLOOP_DECODE_BYTES: Final = 4 * 1024 * 1024
#: Request bodies above this are streamed (aiohttp's own threshold for a bytes body).
_INLINE_BODY_BYTES: Final = 1024 * 1024
_PREFIX: Final = re.compile(rb'\s*\{\s*"image"\s*:\s*"')
_SUFFIX: Final = re.compile(rb'"\s*\}\s*$')
#: A 200 body that is not the fast-path shape is parsed in full only when small, or
#: when it holds at most this many JSON members (``,`` and ``:``; base64 has neither):
#: an image response is one key plus the few fields a server may add, and a body of
#: millions of small keys would cost gigabytes to parse.
_MAX_JSON_MEMBERS: Final = 1024
_SMALL_BODY_BYTES: Final = 64 * 1024

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


class _AttemptTrace:
    """What the connector and the body reader saw of one attempt."""

    __slots__ = ("body_sent", "connected", "created")

    def __init__(self) -> None:
        self.connected = False
        self.created = False
        self.body_sent = 0

    @property
    def reused(self) -> bool:
        """The attempt went out on a pooled keep-alive connection."""
        return self.connected and not self.created

    def may_have_been_processed(self, body_size: int) -> bool:
        """Could the server have acted on the request? Not unless it got the whole body.

        The body is counted as it is handed to the connection, just *before* each write,
        so the count can only run ahead of the wire: below ``body_size`` the body was
        certainly not all sent.
        """
        return self.connected and self.body_sent >= body_size


#: The attempt being sent in this task, for the connector to report on.
_CURRENT_ATTEMPT: Final[contextvars.ContextVar[_AttemptTrace | None]] = contextvars.ContextVar(
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
    """

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

    def __init__(self, body: bytes, trace: _AttemptTrace) -> None:
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
        self._env_routes: dict[tuple[str, str], _EnvRoute] = {}
        self._plain_http_warned: set[str] = set()
        self._format_mismatch_logged = False
        self._buffers = BodyBuffers()

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
            headers[AUTHORIZATION] = _bearer(token)
        return headers, secrets

    def prepare(self, path: str, request: RequestModel, options: CallOptions) -> Call:
        """The parts of a call that stay the same across its attempts."""
        request_id = uuid.uuid4().hex
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
        if _is_loopback(host):
            return
        warn_at_caller(
            f"the API token is sent in clear text to http://{host}; use an https:// "
            "server_url unless this network is trusted"
        )

    def _env_route(self, url: URL) -> _EnvRoute:
        """The proxy (and, with ``trust_env=True``, the ``.netrc`` login) for ``url``.

        Read once per host, as httpx reads the environment once per client.
        """
        key = (url.scheme, url.host or "")
        route = self._env_routes.get(key)
        if route is None:
            use_netrc = self._settings.netrc and not self._settings.has_token
            route = self._env_routes[key] = _EnvRoute.from_env(url, use_netrc)
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
        trace = _AttemptTrace()
        redactor = call.redactor
        route = self._env_route(url) if self._settings.trust_env else _NO_ROUTE
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
                if len(data) > _OFFLOOP_DECODE_BYTES:
                    image = await asyncio.get_running_loop().run_in_executor(
                        None, _decode_image, data, status, request_id, redactor, answer_headers
                    )
                else:
                    image = _decode_image(data, status, request_id, redactor, answer_headers)
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
        trace: _AttemptTrace,
        redactor: Redactor,
        *,
        deadline: float | None,
        started: float,
        route: _EnvRoute,
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
            failure = _transport_error(
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
        trace: _AttemptTrace,
        redactor: Redactor,
        route: _EnvRoute,
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
            for hop in range(_MAX_REDIRECTS + 1):
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
                        data, pooled = await _read_body(
                            response,
                            self._settings.max_response_bytes,
                            call.request_id,
                            self._buffers,
                        )
                        return status, data, pooled, response.headers
                    target = _redirect_target(response, hop)
                    if target is None:
                        raise await _status_error(
                            response, call.request_id, redactor, self._settings.has_token
                        )
                # Followed as httpx (the official SDK's client) follows it: 307/308
                # resend the body, 301/302/303 become a GET; the credentials stay with
                # their origin.
                if status in (307, 308):
                    sent = call.body if isinstance(body, bytes) else _CountedBody(call.body, trace)
                else:
                    method, sent = "GET", None
                if not _keeps_credentials(url, target):
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


#: Redirects followed within one attempt, as httpx follows them (and as many).
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS: Final = 20


def _redirect_target(response: aiohttp.ClientResponse, hop: int) -> URL | None:
    """Where a redirect sends the request, or None when it is not followed."""
    location = response.headers.get("Location")
    if response.status not in _REDIRECT_STATUSES or not location or hop >= _MAX_REDIRECTS:
        return None
    try:
        target = response.url.join(URL(location))
    except ValueError:
        return None
    return target if target.scheme in ("http", "https") and target.host else None


def _keeps_credentials(origin: URL, target: URL) -> bool:
    """httpx's rule: ``Authorization`` goes along to the same origin, or to its https."""
    if (origin.scheme, origin.host, origin.port) == (target.scheme, target.host, target.port):
        return True
    return (
        origin.host == target.host
        and origin.scheme == "http"
        and origin.port == 80
        and target.scheme == "https"
        and target.port == 443
    )


def _bearer(token: Secret) -> str:
    return f"Bearer {token.reveal()}"


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _basic(login: str, password: str) -> str:
    return "Basic " + pybase64.b64encode(f"{login}:{password}".encode()).decode("ascii")


class _EnvRoute:
    """Where the environment sends requests for one host: proxy, proxy login, ``.netrc`` login.

    The logins are kept as `Secret`: a route is cached on the client between calls.
    """

    __slots__ = ("authorization", "proxy", "proxy_authorization")

    def __init__(
        self,
        proxy: URL | None = None,
        proxy_authorization: Secret | None = None,
        authorization: Secret | None = None,
    ) -> None:
        self.proxy = proxy
        self.proxy_authorization = proxy_authorization
        self.authorization = authorization

    @classmethod
    def from_env(cls, url: URL, use_netrc: bool) -> _EnvRoute:
        host = url.host or ""
        proxy = proxy_authorization = authorization = None
        if not urllib.request.proxy_bypass(host):
            proxies = urllib.request.getproxies()
            found = proxies.get(url.scheme) or proxies.get("all")
            if found:
                proxy = URL(found if "://" in found else f"http://{found}")
                if proxy.user is not None:
                    proxy_authorization = Secret(_basic(proxy.user, proxy.password or ""))
                    proxy = proxy.with_user(None)
        if use_netrc:
            with contextlib.suppress(OSError, netrc.NetrcParseError):
                entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
                if entry is not None:
                    authorization = Secret(_basic(entry[0] or "", entry[2] or ""))
        return cls(proxy, proxy_authorization, authorization)


_NO_ROUTE: Final = _EnvRoute()


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


def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    """aiohttp's socket timers only: the attempt and the deadline are `_run_until`'s."""
    found = _CLIENT_TIMEOUTS.get(timeout)
    if found is None:
        if len(_CLIENT_TIMEOUTS) > 256:
            _CLIENT_TIMEOUTS.clear()
        found = _CLIENT_TIMEOUTS[timeout] = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout.connect, sock_read=timeout.read
        )
    return found


class BodyBuffers:
    """Buffers for large response bodies, reused while such bodies are in flight.

    A fresh buffer of tens of MiB is page-faulted in by the kernel on first touch; with
    many large bodies in flight that costs more CPU than decoding them. A buffer is kept
    for the next body only while another large body is still being read, so an idle
    client holds none: the memory held is bounded by the peak number of large bodies in
    flight, and returned when the burst ends.
    """

    __slots__ = ("_busy", "_free")

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._busy = 0

    async def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (a new one is zeroed on a worker thread)."""
        self._busy += 1
        fitting = [buffer for buffer in self._free if len(buffer) >= size]
        if fitting:
            buffer = min(fitting, key=len)
            self._free.remove(buffer)
            return buffer
        try:
            return await asyncio.get_running_loop().run_in_executor(None, bytearray, size)
        except BaseException:
            self._busy -= 1
            raise

    def give(self, buffer: bytearray) -> None:
        """Hand a buffer back once its body is decoded."""
        self._busy -= 1
        if self._busy > 0:
            self._free.append(buffer)
        else:
            self._free.clear()


async def _read_body(
    response: aiohttp.ClientResponse, limit: int, request_id: str, buffers: BodyBuffers
) -> tuple[bytes | memoryview, bytearray | None]:
    """The body, and the pooled buffer holding it (to give back once decoded) if any."""
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
        return await response.read(), None
    if length is not None and not compressed:
        # Sized large bodies go into a reused buffer (see BodyBuffers); aiohttp's framing
        # stops the body at Content-Length, so it cannot overflow.
        buffer = await buffers.take(length)
        try:
            with memoryview(buffer) as view:
                position = 0
                async for chunk in response.content.iter_any():
                    end = position + len(chunk)
                    view[position:end] = chunk
                    position = end
            return memoryview(buffer)[:position], buffer
        except BaseException:
            buffers.give(buffer)
            raise
    # Unsized or compressed bodies: keep aiohttp's chunks and join them once. Above 1 MiB
    # bytes.join copies without holding the GIL, so on a worker thread it never stalls
    # the loop.
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
        return b"".join(chunks), None
    return await asyncio.get_running_loop().run_in_executor(None, b"".join, chunks), None


def _decode_image(
    data: bytes | memoryview,
    status: int,
    request_id: str,
    redactor: Redactor,
    headers: Mapping[str, str] | None = None,
) -> bytes:
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
    if isinstance(data, memoryview):
        data = data.tobytes()  # only a body off the fast path pays for this copy
    if len(data) > _SMALL_BODY_BYTES:
        members = data.count(b",") + data.count(b":")
        if members > _MAX_JSON_MEMBERS:
            # Refused before parsing: see _MAX_JSON_MEMBERS.
            raise FriendliResponseError(
                f"the server answered 200 with {len(data):,} bytes holding about "
                f"{members:,} JSON members; an image response is one object "
                '{"image": "<base64>"} (plus a few fields), so it was not parsed',
                status=status,
                body=_body_text(data, redactor),
                headers=headers,
                request_id=request_id,
            )
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FriendliResponseError(
            "the server answered 200 with a body that is not JSON",
            status=status,
            body=_body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        ) from None
    if not isinstance(parsed, dict):
        raise FriendliResponseError(
            f"expected a JSON object with an 'image' field, got a JSON {type(parsed).__name__}",
            status=status,
            body=_body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    encoded = parsed.get("image")
    if not isinstance(encoded, str) or not encoded:
        what = "is missing" if "image" not in parsed else f"is {type(encoded).__name__}"
        raise FriendliResponseError(
            f"the response's 'image' field {what}; expected base64 text",
            status=status,
            body=_body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    try:
        image = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FriendliResponseError(
            "the response's 'image' field is not valid base64",
            status=status,
            body=_body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        ) from None
    if not image:
        raise FriendliResponseError(
            "the response's image is empty",
            status=status,
            body=_body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    return image


def _body_text(data: bytes | memoryview, redactor: Redactor) -> str:
    """The start of a body as text for an error (64 KiB), with the credentials removed.

    Redacted before it is cut, with a margin, so no credential shows half.
    """
    window = bytes(data[: _ERROR_BODY_LIMIT + 4096])
    return redactor.data(window).decode("utf-8", "replace")[:_ERROR_BODY_LIMIT]


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """An error body up to ``limit`` bytes, however many chunks it arrives in.

    (``StreamReader.read(n)`` returns what has arrived so far: one chunk of a body that
    trickles in.) The status alone is the error: a body that breaks off keeps the part
    that came.
    """
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
        while size < limit:
            chunk = await response.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


async def _status_error(
    response: aiohttp.ClientResponse, request_id: str, redactor: Redactor, token_sent: bool
) -> FriendliAPIStatusError:
    status = response.status
    raw = b""
    # The status alone is the error; a broken error body only loses the excerpt.
    raw = await _read_up_to(response, _ERROR_BODY_LIMIT)
    headers: dict[str, str] = dict(response.headers)
    reason = response.reason or ""
    if redactor:
        # A server (or a proxy) that echoes the request must not put the token into an
        # error that gets logged or pickled: the body, the headers (Location too) and
        # the reason phrase are cleaned before anything is built from them.
        raw = redactor.data(raw)
        headers = {redactor.text(name): redactor.text(value) for name, value in headers.items()}
        reason = redactor.text(reason)
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
        message = (
            "the server answered a redirect that is not followed (no http(s) Location, "
            f"or more than {_MAX_REDIRECTS} redirects)"
        )
    elif isinstance(detail, str) and detail:
        message = redactor.excerpt(detail)
    else:
        message = reason or "request failed"
    message += _status_hint(status, response.url, token_sent)
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


#: OpenSSL's reasons when a TLS handshake meets an answer that is not TLS (plain HTTP).
_NOT_TLS_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"}
)


def _status_hint(status: int, url: URL, token_sent: bool) -> str:
    """What to do about a status whose usual cause is on the caller's side."""
    if status == 401:
        if not token_sent:
            return f"; no token was sent: pass token= or set {ENV_TOKEN}"
        return f"; the server refused the token: check token= or {ENV_TOKEN}"
    if status == 404 and "/v1/v1/" in url.path:
        root = url.with_path(url.path.split("/v1/v1/", 1)[0] or "/").with_query(None)
        return f"; server_url is the server's root, without /v1: use {str(root).rstrip('/')}"
    return ""


def _transport_error(  # noqa: PLR0917
    exc: BaseException,
    trace: _AttemptTrace,
    request_id: str,
    deadline: float | None,
    url: URL,
    body_size: int,
    redactor: Redactor,
) -> FriendliConnectionError:
    target = f"{url.scheme}://{url.host}:{url.port}"
    processed = trace.may_have_been_processed(body_size)
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
        past_deadline = deadline is not None and monotonic() >= deadline - 0.005
        kind = "deadline" if past_deadline else "attempt"
        return FriendliTimeoutError(
            f"the call to {target} timed out ({kind} timeout); raise timeout_ms or Timeout "
            "if generations legitimately take longer",
            kind=kind,
            request_id=request_id,
            maybe_processed=processed,
        )
    # A certificate error means the server spoke TLS; its os_error is not read (up to
    # aiohttp 3.12.0 at least, reading it raises AttributeError).
    if (
        isinstance(exc, aiohttp.ClientSSLError)
        and not isinstance(exc, aiohttp.ClientConnectorCertificateError)
        and getattr(exc.os_error, "reason", None) in _NOT_TLS_REASONS
    ):
        return FriendliConnectionError(
            f"TLS failed for {target}: the server answered in plain text, so it may not "
            "speak TLS; if it serves plain HTTP, use an http:// server_url",
            request_id=request_id,
            permanent=True,
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return FriendliConnectionError(
            f"TLS failed for {target}: {redactor.text(str(exc))}; check the certificate or "
            "pass a CA bundle",
            request_id=request_id,
            permanent=True,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return FriendliConnectionError(
            f"cannot connect to {target} ({exc.os_error.strerror or exc.os_error}); is the "
            "server running? Check server_url or FRIENDLI_SERVER_URL",
            request_id=request_id,
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return FriendliConnectionError(f"invalid URL {url}", request_id=request_id, permanent=True)
    # aiohttp's text about a malformed answer quotes it (a status line, a header).
    said = redactor.text(str(exc))
    reason = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    return FriendliConnectionError(
        f"the connection to {target} broke before a complete answer ({reason})",
        request_id=request_id,
        maybe_processed=processed,
        stale_connection=trace.reused
        and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError),
    )
