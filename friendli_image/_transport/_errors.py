"""Error mapping: every outcome of an attempt that is not an image, as its `FriendliError`.

A non-200 status becomes its `FriendliAPIStatusError` (with a short, redacted excerpt of
the body and a hint when the cause is likely on our side); aiohttp's exceptions become
`FriendliConnectionError` or `FriendliTimeoutError`, marked with what the retry policy reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from friendli_image._clock import monotonic
from friendli_image._config import ENV_TOKEN
from friendli_image._exceptions import (
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    status_error_class,
)
from friendli_image._retry import parse_retry_after
from friendli_image._secrets import Redactor

from ._proxy import MAX_REDIRECTS
from ._trace import AttemptTrace

__all__ = ["body_text", "status_error", "transport_error"]


def body_text(data: bytes | memoryview, redactor: Redactor) -> str:
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


async def status_error(
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
            f"or more than {MAX_REDIRECTS} redirects)"
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


def transport_error(  # noqa: PLR0917
    exc: BaseException,
    trace: AttemptTrace,
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
    undecodable = _caused_by(exc, "ContentEncodingError")
    if undecodable or isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's HTTP parser refused the answer. The status it reports (400) is its
        # own, not the server's: whatever status the server sent is lost with the answer.
        what = (
            "its body does not decode under its Content-Encoding"
            if undecodable
            else redactor.text(" ".join(getattr(exc, "message", "").split()))[:300]
        )
        return FriendliConnectionError(
            f"the answer from {target} is not valid HTTP ({what}); the server or a proxy "
            "before it sent a malformed response",
            request_id=request_id,
            maybe_processed=processed,
        )
    # aiohttp's text about a malformed answer quotes it (a status line, a header).
    said = redactor.text(_PARSER_CODE.sub(r"\1: \3", str(exc)))
    reason = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    return FriendliConnectionError(
        f"the connection to {target} broke before a complete answer ({reason})",
        request_id=request_id,
        maybe_processed=processed,
        stale_connection=trace.reused
        and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError),
    )


#: How aiohttp shows an error of its HTTP parser inside another one's text
#: (``<ContentLengthError: 400, message='Not enough data ...'>``): the code is the
#: parser's, not a status the server sent, so only the name and the message are kept.
_PARSER_CODE: Final = re.compile(r"<(\w+): \d{3}, message=(['\"])(.*?)\2>", re.DOTALL)


def _caused_by(exc: BaseException, name: str) -> bool:
    """True if an exception of class ``name`` is in the chain of causes of ``exc``.

    By name: aiohttp's parser errors (``aiohttp.http_exceptions``) are not among its
    public names, and it wraps them twice before they reach us.
    """
    seen: BaseException | None = exc.__cause__
    for _ in range(4):
        if seen is None:
            return False
        if type(seen).__name__ == name:
            return True
        seen = seen.__cause__
    return False


#: Error bodies are read up to this size, for the excerpt and the 422 details.
_ERROR_BODY_LIMIT: Final = 64 * 1024
