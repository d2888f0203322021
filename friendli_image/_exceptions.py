"""The one error tree of friendli_image.

Every failure a user can meet is one of these; aiohttp, JSON and base64 exceptions are
translated at the request path and never escape on their own. ``asyncio.CancelledError``
is never wrapped.

::

    FriendliError
    ├── FriendliStatusCodeError  [S]       a failure with an HTTP status code (models.SDKError)
    ├── FriendliUsageError                 the SDK was used wrongly (closed client, wrong loop, ...)
    │   └── FriendliValidationError        bad input, caught before anything was sent
    │       └── FriendliInvalidValueError [S]  a value the server would refuse with 422
    ├── FriendliBatchAborted               a batch item not attempted: the batch had stopped
    └── FriendliAPIError                   talking to the server failed
        ├── FriendliConnectionError        no usable answer: refused, reset, DNS, ... [C]
        │   └── FriendliTimeoutError       connect, read, attempt or deadline timeout [C, T]
        ├── FriendliAPIStatusError [S]     the server answered with a non-2xx status
        │   ├── FriendliHTTPValidationError        the official 422 type; never raised
        │   ├── FriendliBadRequestError            400
        │   ├── FriendliAuthenticationError        401
        │   ├── FriendliPermissionDeniedError      403
        │   ├── FriendliNotFoundError              404
        │   ├── FriendliPayloadTooLargeError       413
        │   ├── FriendliUnprocessableEntityError   422 (``details`` by field)
        │   ├── FriendliRateLimitError             429
        │   └── FriendliServerError                5xx
        └── FriendliResponseError [S]      a 2xx whose body is not a usable image
            └── FriendliResponseTooLarge   the body exceeded ``max_response_bytes``

[S]: also a ``FriendliStatusCodeError``; [C]: also the builtin ``ConnectionError``;
[T]: also the builtin ``TimeoutError``.

``FriendliUsageWarning`` (a ``RuntimeWarning``) flags a call that works but is misused,
such as a blocking ``SyncFriendli`` call inside a running event loop.

``FriendliStatusCodeError`` is what the official SDK calls ``SDKError``
(``friendli_image.models.SDKError``): every answer with a 4xx/5xx status, and every value
of the right type that the server would refuse with 422 but that is refused here before
sending (``FriendliInvalidValueError``, ``status_code`` 422). Both carry ``status_code``,
``body`` (str), ``headers``, ``message`` and ``raw_response`` (status code, headers, text),
so a ported ``except models.SDKError`` clause catches what it caught before. A wrong *type*
(which the official SDK refuses client-side with a pydantic error) is a plain
``FriendliValidationError``. ``FriendliHTTPValidationError`` (``models.HTTPValidationError``)
exists for ported ``except`` clauses and is never raised: container image calls report a
422 as ``SDKError`` in the official SDK too.

``FriendliConnectionError`` is also the builtin ``ConnectionError``: code that caught
``httpx.ConnectError`` (or ``httpx.TransportError``) from the official SDK catches
``ConnectionError`` (or ``models.NoResponseError``, its alias here) instead.

The ``API*`` names (``APIConnectionError``, ``APITimeoutError``, ``APIStatusError``,
``ResponseError``) are aliases of the same classes.

No error carries the token: errors keep only response data (status, response headers, a
short body excerpt), and aiohttp exceptions that embed request headers are not chained.
"""

from __future__ import annotations

import http
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "FriendliAPIError",
    "FriendliAPIStatusError",
    "FriendliArgumentError",
    "FriendliAuthenticationError",
    "FriendliBadRequestError",
    "FriendliBatchAborted",
    "FriendliConnectionError",
    "FriendliError",
    "FriendliHTTPValidationError",
    "FriendliInvalidValueError",
    "FriendliNotFoundError",
    "FriendliPayloadTooLargeError",
    "FriendliPermissionDeniedError",
    "FriendliRateLimitError",
    "FriendliResponseError",
    "FriendliResponseTooLarge",
    "FriendliServerError",
    "FriendliStatusCodeError",
    "FriendliTimeoutError",
    "FriendliUnprocessableEntityError",
    "FriendliUsageError",
    "FriendliUsageWarning",
    "FriendliValidationError",
    "RawResponse",
    "status_error_class",
    "warn_at_caller",
]

EXCERPT_CHARS = 200


def excerpt(body: bytes | bytearray | memoryview | str | None, limit: int = EXCERPT_CHARS) -> str:
    """Return at most ``limit`` characters of a response body, for error messages."""
    if not body:
        return ""
    if isinstance(body, bytes | bytearray | memoryview):
        text = bytes(body[: limit * 4]).decode("utf-8", "replace")
    else:
        text = body[: limit * 4]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FriendliError(Exception):
    """Base class of every error raised by friendli_image."""


class RawResponse:
    """The parts of an HTTP answer that code ported from the official SDK reads.

    The official SDK hands out its ``httpx.Response`` as ``error.raw_response``; this
    offers the same names for what such code reads: ``status_code``, ``headers`` (case
    insensitive), ``text``, ``content``, ``json()``, ``reason_phrase``, ``is_error``.
    """

    __slots__ = ("headers", "status_code", "text")

    def __init__(self, status_code: int, headers: Mapping[str, str], text: str) -> None:
        self.status_code = status_code
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(headers))
        self.text = text

    @property
    def content(self) -> bytes:
        """The body as bytes (UTF-8)."""
        return self.text.encode()

    @property
    def reason_phrase(self) -> str:
        """The standard reason phrase of the status code ("" if it has none)."""
        try:
            return http.HTTPStatus(self.status_code).phrase
        except ValueError:
            return ""

    @property
    def is_error(self) -> bool:
        """True for a 4xx or 5xx status."""
        return self.status_code >= 400

    @property
    def is_success(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.text)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


class FriendliStatusCodeError(FriendliError):
    """A failure with an HTTP status code; the official SDK's ``SDKError``.

    Raised as `FriendliAPIStatusError` when the server answered 4xx/5xx, and as
    `FriendliInvalidValueError` (``status_code`` 422) when a value the server refuses was
    caught before sending.

    Attributes:
        status: the HTTP status code (also ``status_code``).
        headers: the response headers, case insensitive (empty if nothing was sent).
        body: the response body text (the would-be 422 details if nothing was sent).
        message: the error message without the status.
    """

    status: int
    headers: CIMultiDict[str]
    body: str
    message: str

    @property
    def status_code(self) -> int:
        """The HTTP status code (the official SDK's name for ``status``)."""
        return self.status

    @property
    def raw_response(self) -> RawResponse:
        """Status code, headers and text, under the names of an ``httpx.Response``."""
        return RawResponse(self.status, self.headers, self.body)


class FriendliUsageError(FriendliError):
    """The SDK was used in a way that cannot work; the message says what to do instead."""


class FriendliUsageWarning(RuntimeWarning):
    """The SDK works as called, but not as intended; the message says what to do instead.

    Raised as a warning (``warnings.warn``), never as an exception: for example, a
    ``SyncFriendli`` call made inside a running event loop blocks that loop.
    """


class FriendliValidationError(FriendliUsageError, ValueError):
    """An argument is invalid; raised before any request is sent.

    Attributes:
        field: the name of the offending argument (e.g. ``"num_inference_steps"``,
            ``"control_images[1]"``).
        reason: what is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid {self.field}: {self.reason}"


class FriendliArgumentError(FriendliValidationError, TypeError):
    """A keyword the method does not take; the message names the method that takes it.

    A `TypeError` too, as Python raises for an unexpected keyword argument, so code
    catching either keeps working.
    """


class FriendliAPIError(FriendliError):
    """A request was attempted and did not produce an image.

    Attributes:
        request_id: the ``X-Request-ID`` of the call (the same on every attempt).
        attempts: how many HTTP attempts were made before giving up.
        maybe_processed: True when the server may have read and acted on the request
            (the connection broke or timed out after the request was sent, or it answered
            2xx without a usable image), so the generation may have run even though no
            image came back.
        endpoint: the endpoint of the last attempt, when the client has several
            (None: the client's or the call's ``server_url``).
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        attempts: int = 1,
        maybe_processed: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.attempts = attempts
        self.maybe_processed = maybe_processed
        self.endpoint: str | None = None

    def __str__(self) -> str:
        notes = []
        if self.endpoint:
            notes.append(f"endpoint {self.endpoint}")
        if self.attempts > 1:
            notes.append(f"after {self.attempts} attempts")
        if self.request_id:
            notes.append(f"request id {self.request_id}")
        if self.maybe_processed:
            notes.append("the server may have processed the request")
        return f"{self.message} ({'; '.join(notes)})" if notes else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours carry keyword-only state, so restore it
        # through __dict__ (which holds only response-side data, never the token).
        return (_rebuild, (type(self), self.args, self.__dict__))


class FriendliInvalidValueError(FriendliValidationError, FriendliStatusCodeError):
    """A value of the right type that the server refuses (422), caught before sending.

    Out-of-range numbers, too many or too few ControlNet weights, an empty image list,
    image text that does not decode. The official SDK sends such values and raises
    ``SDKError`` 422, so this is an ``SDKError`` too: ``status_code`` is 422 and ``body``
    holds the details as the server's pydantic writes them (``msg`` and ``kind`` give
    the detail's ``msg`` and ``type``; the reason is what ``str()`` shows).
    """

    def __init__(
        self, field: str, reason: str, *, msg: str | None = None, kind: str = "value_error"
    ) -> None:
        super().__init__(field, reason)
        self.status = 422
        self.headers = CIMultiDict({"content-type": "application/json"})
        loc = ["body", *(int(part) if part.isdigit() else part for part in _loc(field))]
        # The body the server's pydantic writes: compact JSON, keys loc, msg, type.
        detail = {"loc": loc, "msg": reason if msg is None else msg, "type": kind}
        self.body = json.dumps({"detail": [detail]}, separators=(",", ":"), ensure_ascii=False)
        self.message = str(self)


def _loc(field: str) -> list[str]:
    """``controlnet_weights[1]`` -> ``["controlnet_weights", "1"]``."""
    return [part for part in field.replace("]", "").replace("[", ".").split(".") if part]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class FriendliConnectionError(FriendliAPIError, ConnectionError):
    """No usable HTTP response: connection refused or reset, DNS, TLS, dropped mid-body.

    Check ``server_url`` and that the server is up; when ``maybe_processed`` is False the
    request never reached the server and is always safe to send again. It is also the
    builtin ``ConnectionError`` (what replaces the official SDK's ``httpx.ConnectError``).

    Attributes:
        permanent: the same attempt would fail the same way again (a TLS verification
            failure, an invalid URL), so it is not retried.
        stale_connection: a reused keep-alive connection broke before any byte of the
            answer: most likely the server had closed it while it sat idle.
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        attempts: int = 1,
        maybe_processed: bool = False,
        permanent: bool = False,
        stale_connection: bool = False,
    ) -> None:
        super().__init__(
            message, request_id=request_id, attempts=attempts, maybe_processed=maybe_processed
        )
        self.permanent = permanent
        self.stale_connection = stale_connection


class FriendliTimeoutError(FriendliConnectionError, TimeoutError):
    """A connect, read, per-attempt or per-call timeout expired.

    Attributes:
        kind: ``"connect"``, ``"read"``, ``"attempt"`` or ``"deadline"``.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        request_id: str | None = None,
        attempts: int = 1,
        maybe_processed: bool = False,
    ) -> None:
        super().__init__(
            message, request_id=request_id, attempts=attempts, maybe_processed=maybe_processed
        )
        self.kind = kind


class FriendliAPIStatusError(FriendliAPIError, FriendliStatusCodeError):
    """The server answered with a status that is not 2xx.

    Attributes:
        status: the HTTP status code (also ``status_code``).
        headers: the response headers (case insensitive).
        body: the response body text (read up to 64 KiB; messages show 200 characters).
        retry_after: the server's ``Retry-After`` hint in seconds, if it sent a valid one.
        location: the ``Location`` header of a redirect that was not followed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        headers: Mapping[str, str] | None = None,
        body: str = "",
        request_id: str | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, attempts=attempts)
        self.status = status
        self.headers = CIMultiDict(headers or {})
        self.body = body
        self.retry_after = retry_after
        self.location = self.headers.get("Location")

    def __str__(self) -> str:
        text = f"HTTP {self.status}: {super().__str__()}"
        if self.retry_after is not None:
            text += f" [Retry-After {self.retry_after:g} s]"
        if self.location:
            text += f" [Location {self.location}]"
        if self.body and _says_more(self.body, self.message):
            text += f" — server said: {excerpt(self.body)}"
        return text


def _says_more(body: str, message: str) -> bool:
    """False when the body is one JSON field whose text the message already quotes."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return True
    if isinstance(parsed, dict) and len(parsed) == 1:
        (value,) = parsed.values()
        return not (isinstance(value, str) and excerpt(value) in message)
    return True


class FriendliBadRequestError(FriendliAPIStatusError):
    """400: the server rejected the request; fix the arguments named in the body."""


class FriendliAuthenticationError(FriendliAPIStatusError):
    """401: the token is missing or wrong; pass ``token=`` or set ``FRIENDLI_TOKEN``."""


class FriendliPermissionDeniedError(FriendliAPIStatusError):
    """403: the token is valid but not allowed to use this endpoint or model."""


class FriendliNotFoundError(FriendliAPIStatusError):
    """404: no such route or model; check ``server_url`` and ``model``."""


class FriendliPayloadTooLargeError(FriendliAPIStatusError):
    """413: the request body is larger than the server accepts; send smaller images."""


class FriendliUnprocessableEntityError(FriendliAPIStatusError):
    """422: the server refused the arguments.

    Attributes:
        details: the FastAPI validation details, each a dict with ``loc``, ``msg``, ``type``.
        fields: the offending argument names mapped to their messages.
    """

    def __init__(
        self,
        message: str,
        *,
        details: Sequence[Mapping[str, Any]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.details = [dict(item) for item in details]
        self.fields: dict[str, str] = {}
        for item in self.details:
            loc = [str(part) for part in item.get("loc", ()) if part != "body"]
            name = ".".join(loc) or "body"
            self.fields[name] = str(item.get("msg", ""))

    def __str__(self) -> str:
        if not self.fields:
            return super().__str__()
        listed = "; ".join(f"{name}: {msg}" for name, msg in self.fields.items())
        return f"HTTP {self.status}: the server rejected {listed} ({self.message})"


class FriendliRateLimitError(FriendliAPIStatusError):
    """429: too many requests; lower the concurrency or wait ``retry_after`` seconds."""


class FriendliServerError(FriendliAPIStatusError):
    """5xx: the server failed or is overloaded; retried by default for 502/503/504."""


class FriendliHTTPValidationError(FriendliAPIStatusError):
    """The official SDK's name for a 422 of other endpoints; never raised here.

    Container image calls report a 422 as ``SDKError`` (`FriendliStatusCodeError`) in the
    official SDK, and so they do here: a ported ``except HTTPValidationError`` clause keeps
    catching nothing, as before.
    """


class FriendliResponseError(FriendliAPIError, FriendliStatusCodeError):
    """A 2xx response whose body is not a JSON object with a valid base64 image.

    An HTML page from the wrong port or a proxy, a truncated or empty answer: also an
    ``SDKError`` (`FriendliStatusCodeError`), as the official SDK raises for a 200 that
    is not its API, with ``status_code``, ``headers``, ``body`` and ``raw_response``.

    Attributes:
        status: the HTTP status code.
        headers: the response headers (case insensitive).
        body: the response body text (read up to 64 KiB; messages show 200 characters).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        body: str = "",
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        # The server answered 2xx: it read the request and made something of it.
        super().__init__(message, request_id=request_id, attempts=attempts, maybe_processed=True)
        self.status = status
        self.body = body
        self.headers = CIMultiDict(headers or {})

    def __str__(self) -> str:
        text = f"HTTP {self.status}: {super().__str__()}"
        return f"{text} — body starts: {excerpt(self.body)}" if self.body else text

    @property
    def cause(self) -> BaseException | None:
        """The official ``ResponseValidationError.cause`` (``__cause__``: None here, the
        message says what was wrong)."""
        return self.__cause__


class FriendliBatchAborted(FriendliError):
    """A batch stopped early because an error would have failed every remaining item.

    Items that were not attempted carry this error with status ``"skipped"``.

    Attributes:
        cause: the error that stopped the batch (e.g. a 401, or the server unreachable
            after retries).
        index: the input index of the item that met it.
    """

    def __init__(self, cause: FriendliAPIError, index: int) -> None:
        super().__init__(cause, index)
        self.cause = cause
        self.index = index

    def __str__(self) -> str:
        return (
            f"not attempted: the batch stopped after item {self.index} failed with an error "
            f"every remaining item would meet ({self.cause}); fix it and run the batch again "
            "(with out_dir, finished items are kept and skipped)"
        )


class FriendliResponseTooLarge(FriendliResponseError):
    """The response body exceeded ``max_response_bytes``; raise the cap if it is expected."""


_STATUS_CLASSES: dict[int, type[FriendliAPIStatusError]] = {
    400: FriendliBadRequestError,
    401: FriendliAuthenticationError,
    403: FriendliPermissionDeniedError,
    404: FriendliNotFoundError,
    413: FriendliPayloadTooLargeError,
    422: FriendliUnprocessableEntityError,
    429: FriendliRateLimitError,
}


def status_error_class(status: int) -> type[FriendliAPIStatusError]:
    """Return the error class for an HTTP status."""
    if status >= 500:
        return FriendliServerError
    return _STATUS_CLASSES.get(status, FriendliAPIStatusError)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the first frame outside this package: the user's line.

    A fixed ``stacklevel`` points into the SDK whenever a public entry point reaches
    the warning through another layer (``SyncFriendli`` building its ``AsyncFriendli``).
    """
    frame: FrameType | None = sys._getframe(1)
    level = 2  # 1 is this function's own line
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
