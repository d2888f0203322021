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
import ipaddress
import logging
import netrc
import os
import re
import time
import urllib.request
import uuid
from io import BytesIO
from typing import Any, Final

import aiohttp
import attrs
import orjson
import pybase64
from yarl import URL

from ._config import CallOptions, ClientSettings, Secret, Timeout
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliResponseTooLarge,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    excerpt,
    status_error_class,
    warn_at_caller,
)
from ._formats import image_dimensions, sniff_format
from ._models import ImageResult, RequestModel
from ._retry import parse_retry_after
from ._serde import dumps_request

__all__ = ["Call", "Transport", "make_trace_config"]

#: Error bodies are read up to this size, for the excerpt and the 422 details.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: Bodies above this are joined, parsed and decoded on a worker thread (the loop stays free).
_OFFLOOP_DECODE_BYTES: Final = 4 * 1024 * 1024
#: Request bodies above this are streamed (aiohttp's own threshold for a bytes body).
_INLINE_BODY_BYTES: Final = 1024 * 1024
_PREFIX: Final = re.compile(rb'\s*\{\s*"image"\s*:\s*"')
_SUFFIX: Final = re.compile(rb'"\s*\}\s*$')


@attrs.define(slots=True)
class Call:
    """The fixed parts of one call, shared by all of its attempts."""

    url: URL
    body: bytes
    headers: dict[str, str]
    request_id: str
    timeout: Timeout
    expect_jpeg: bool


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


def make_trace_config() -> aiohttp.TraceConfig:
    """Tracing hooks that tell an attempt whether its connection was new or reused."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(_on_connection_created)
    trace.on_connection_reuseconn.append(_on_connection_reused)
    trace.freeze()
    return trace


class Transport:
    """Sends the attempts of a client's calls (one client, one transport)."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._urls: dict[tuple[str, str], URL] = {}
        self._env_routes: dict[tuple[str, str], _EnvRoute] = {}
        self._plain_http_warned: set[str] = set()

    def prepare(self, path: str, request: RequestModel, options: CallOptions) -> Call:
        """The parts of a call that stay the same across its attempts."""
        request_id = uuid.uuid4().hex
        settings = self._settings
        headers = dict(settings.headers)
        token = settings.token if settings.token_source is None else settings.token_source()
        if token is not None:
            headers["Authorization"] = _bearer(token)
        if options.headers:
            headers.update(options.headers)
        headers["X-Request-ID"] = request_id
        return Call(
            url=self._url(options.server_url, path),
            body=dumps_request(request),
            headers=headers,
            request_id=request_id,
            timeout=options.timeout,
            expect_jpeg=request.response_format == "jpeg",
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
        """The proxy and ``.netrc`` login for ``url`` when ``trust_env`` (cached per host)."""
        key = (url.scheme, url.host or "")
        route = self._env_routes.get(key)
        if route is None:
            route = self._env_routes[key] = _EnvRoute.from_env(url, not self._settings.has_token)
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
        ends (``time.monotonic()`` values, None: no deadline).
        """
        url, request_id = call.url, call.request_id
        logger = self._settings.logger
        headers = call.headers
        headers["X-Friendli-Attempt"] = str(attempt_number - 1)
        trace = _AttemptTrace()
        route = self._env_route(url) if self._settings.trust_env else _NO_ROUTE
        if route.authorization is not None:
            headers = {**headers, "Authorization": route.authorization}
        failure: FriendliConnectionError | None = None
        async with slots:
            attempt_started = time.monotonic()
            client_timeout = _client_timeout(call.timeout, deadline, attempt_started)
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
                        raise await _status_error(response, request_id, self._settings.token)
                    data = await _read_body(response, self._settings.max_response_bytes, request_id)
            except FriendliAPIError as error:
                _log_failed_attempt(logger, error, url, attempt_number, attempt_started)
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                failure = _transport_error(exc, trace, request_id, deadline, url)
                _log_failed_attempt(logger, failure, url, attempt_number, attempt_started)
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
            elapsed=time.monotonic() - started,
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
    response: aiohttp.ClientResponse, request_id: str, token: Secret | None
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
        return FriendliConnectionError(
            f"TLS failed for {target}: {exc}; check the certificate or pass a CA bundle",
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
    reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
    return FriendliConnectionError(
        f"the connection to {target} broke before a complete answer ({reason})",
        request_id=request_id,
        maybe_processed=trace.connected,
        stale_connection=trace.reused
        and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError),
    )
