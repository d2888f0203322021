"""How ``friendli_image._transport`` maps aiohttp and OS failures onto the error tree.

A table over constructed exceptions and attempt traces: no socket. What reaches the
wire (and what a real refused port or dropped connection gives) is tests/test_errors.py's
and tests/reliability's; here each row is one failure and what the caller is told.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ssl
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_exceptions import ContentEncodingError, ContentLengthError, HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from friendli_image import FriendliConnectionError, FriendliTimeoutError, RetryConfig
from friendli_image._retry import is_retryable
from friendli_image._secrets import Redactor
from friendli_image._transport._errors import transport_error
from friendli_image._transport._trace import AttemptTrace

URL_ = URL("http://gpu.example:8000/v1/images/generations")
BODY = 100
SECRET = "sk-transport-table-5e1f"
# Its fields vary across aiohttp versions (the floor, 3.10, has one fewer): only the
# host and port matter to the messages, the rest are None or their safe defaults.
_FIELDS = len(inspect.signature(ConnectionKey).parameters)  # a dataclass there, a tuple now
KEY = ConnectionKey(*("gpu.example", 8000, False, True), *(None,) * (_FIELDS - 4))


def _trace(*, connected: bool, created: bool = True, sent: int = 0) -> AttemptTrace:
    trace = AttemptTrace()
    trace.connected, trace.created, trace.body_sent = connected, created, sent
    return trace


#: Where the attempt got to when it failed.
UNSENT = {"connected": False}
FRESH_SENT = {"connected": True, "created": True, "sent": BODY}
FRESH_HALF = {"connected": True, "created": True, "sent": BODY // 2}
REUSED_SENT = {"connected": True, "created": False, "sent": BODY}


def _ssl_error(reason: str) -> aiohttp.ClientSSLError:
    os_error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    os_error.reason = reason
    return aiohttp.ClientSSLError(KEY, os_error)


def _certificate_error() -> aiohttp.ClientConnectorCertificateError:
    certificate = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    return aiohttp.ClientConnectorCertificateError(KEY, certificate)


def _refused() -> aiohttp.ClientConnectorError:
    return aiohttp.ClientConnectorError(
        KEY, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    )


def _reset() -> aiohttp.ClientOSError:
    return aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer")


def _payload_cut() -> aiohttp.ClientPayloadError:
    return aiohttp.ClientPayloadError("Response payload is not completed")


def _payload_reset() -> aiohttp.ClientPayloadError:
    """aiohttp's text for a body cut by a reset, quoting its parser's error."""
    cut = ContentLengthError("Not enough data to satisfy content length header")
    return aiohttp.ClientPayloadError(f"Response payload is not completed: {cut!r}")


def _malformed_answer() -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL_, "POST", CIMultiDictProxy(CIMultiDict()), URL_)
    return aiohttp.ClientResponseError(
        info, (), status=400, message=f"Bad status line 'Bearer {SECRET}'"
    )


def _undecodable_answer() -> aiohttp.ClientResponseError:
    """What aiohttp raises when a body arriving with its head fails its content coding."""
    error = _malformed_answer()
    parsed = HttpProcessingError(code=400, message="deflate")
    parsed.__cause__ = ContentEncodingError("deflate")
    error.__cause__ = parsed
    return error


def _undecodable_body() -> aiohttp.ClientPayloadError:
    """What aiohttp raises when a body arriving after its head fails its content coding."""
    cause = ContentEncodingError("Can not decode content-encoding: gzip")
    error = aiohttp.ClientPayloadError(str(cause))
    error.__cause__ = cause
    return error


class Mapped(NamedTuple):
    """What the caller is told: the error type and its flags, and words of its message."""

    cls: type[FriendliConnectionError]
    words: str
    kind: str | None = None
    processed: bool = False
    stale: bool = False
    permanent: bool = False


T, C = FriendliTimeoutError, FriendliConnectionError
_ROWS: list[tuple[Callable[[], BaseException], dict[str, Any], Mapped]] = [
    (aiohttp.ConnectionTimeoutError, UNSENT, Mapped(T, "timed out connecting to", "connect")),
    (aiohttp.SocketTimeoutError, FRESH_SENT, Mapped(T, "went silent", "read", processed=True)),
    (asyncio.TimeoutError, FRESH_SENT, Mapped(T, "attempt timeout", "attempt", processed=True)),
    (asyncio.TimeoutError, FRESH_HALF, Mapped(T, "raise timeout_ms", "attempt")),
    (asyncio.TimeoutError, UNSENT, Mapped(T, "attempt timeout", "attempt")),
    (
        lambda: _ssl_error("WRONG_VERSION_NUMBER"),
        UNSENT,
        Mapped(C, "may not speak TLS", permanent=True),
    ),
    (
        lambda: _ssl_error("RECORD_LAYER_FAILURE"),
        UNSENT,
        Mapped(C, "use an http:// server_url", permanent=True),
    ),
    (
        lambda: _ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"),
        UNSENT,
        Mapped(C, "check the certificate", permanent=True),
    ),
    (
        _certificate_error,
        UNSENT,
        Mapped(C, "TLS failed for http://gpu.example:8000", permanent=True),
    ),
    (_refused, UNSENT, Mapped(C, "cannot connect to http://gpu.example:8000 (Connection refused)")),
    (lambda: aiohttp.InvalidURL("http://[::1"), UNSENT, Mapped(C, "invalid URL", permanent=True)),
    (
        aiohttp.ServerDisconnectedError,
        FRESH_SENT,
        Mapped(C, "ServerDisconnectedError", processed=True),
    ),
    (aiohttp.ServerDisconnectedError, FRESH_HALF, Mapped(C, "broke before a complete answer")),
    (
        aiohttp.ServerDisconnectedError,
        REUSED_SENT,
        Mapped(C, "Server disconnected", processed=True, stale=True),
    ),
    (_reset, REUSED_SENT, Mapped(C, "reset by peer", processed=True, stale=True)),
    (_reset, UNSENT, Mapped(C, "ClientOSError")),
    (_payload_cut, REUSED_SENT, Mapped(C, "payload is not completed", processed=True)),
    (
        _payload_reset,
        FRESH_SENT,
        Mapped(C, "completed: ContentLengthError: Not enough data to satisfy", processed=True),
    ),
    (
        lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
        FRESH_SENT,
        Mapped(C, "ConnectionResetError", processed=True),
    ),
    (_malformed_answer, FRESH_SENT, Mapped(C, "Bearer ***", processed=True)),
    (
        _malformed_answer,
        FRESH_SENT,
        Mapped(C, "is not valid HTTP (Bad status line", processed=True),
    ),
    (
        _undecodable_answer,
        FRESH_SENT,
        Mapped(C, "does not decode under its Content-Encoding", processed=True),
    ),
    (
        _undecodable_body,
        FRESH_SENT,
        Mapped(C, "does not decode under its Content-Encoding", processed=True),
    ),
]


@pytest.mark.parametrize(
    ("make", "where", "mapped"),
    _ROWS,
    ids=[f"{i}-{row[0]().__class__.__name__}" for i, row in enumerate(_ROWS)],
)
def test_a_transport_failure_becomes_a_typed_error(
    make: Callable[[], BaseException], where: dict[str, Any], mapped: Mapped
) -> None:
    """Each aiohttp / OS failure maps to one typed error that says whether the server may
    have read the request, whether the connection was a reused one, and what to do."""
    error = transport_error(make(), _trace(**where), "req-1", None, URL_, BODY, Redactor((SECRET,)))
    assert type(error) is mapped.cls
    assert error.request_id == "req-1"
    assert (error.maybe_processed, error.stale_connection, error.permanent) == (
        mapped.processed,
        mapped.stale,
        mapped.permanent,
    )
    assert mapped.words in str(error)
    assert SECRET not in str(error)
    assert getattr(error, "kind", None) == mapped.kind


def test_a_timeout_at_the_deadline_says_deadline() -> None:
    """A timeout when Timeout.total has run out is kind="deadline", not "attempt"."""
    error = transport_error(
        asyncio.TimeoutError(),
        _trace(**FRESH_SENT),
        "req-1",
        time.monotonic(),
        URL_,
        BODY,
        Redactor(),
    )
    assert isinstance(error, FriendliTimeoutError)
    assert error.kind == "deadline"
    assert "deadline timeout" in str(error)


@pytest.mark.parametrize(
    ("make", "where", "retried"),
    [
        (_refused, UNSENT, True),
        (aiohttp.ConnectionTimeoutError, UNSENT, True),
        (aiohttp.SocketTimeoutError, FRESH_SENT, False),
        (aiohttp.ServerDisconnectedError, FRESH_SENT, False),
        (aiohttp.ServerDisconnectedError, FRESH_HALF, True),
        (aiohttp.ServerDisconnectedError, REUSED_SENT, True),
        (_certificate_error, UNSENT, False),
        (lambda: _ssl_error("WRONG_VERSION_NUMBER"), UNSENT, False),
    ],
)
def test_what_the_default_policy_does_with_each_mapped_failure(
    make: Callable[[], BaseException], where: dict[str, Any], retried: bool
) -> None:
    """Never-sent and half-sent requests are retried, a reused connection's break is
    reconnected, a request the server may have read is not, TLS failures are final."""
    error = transport_error(make(), _trace(**where), "r", None, URL_, BODY, Redactor())
    assert is_retryable(error, RetryConfig()) is retried


def test_the_body_counts_as_sent_only_when_all_of_it_was_handed_over() -> None:
    """maybe_processed needs a connection and the whole body; a part, or none, is unsent."""
    assert _trace(connected=True, sent=BODY).may_have_been_processed(BODY)
    assert not _trace(connected=True, sent=BODY - 1).may_have_been_processed(BODY)
    assert not _trace(connected=False, sent=BODY).may_have_been_processed(BODY)
    assert _trace(connected=True, created=False).reused
    assert not _trace(connected=True, created=True).reused
