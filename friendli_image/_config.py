"""Configuration: defaults, timeouts, the retry policy, client settings and call options.

Every argument a user passes is checked here, once, into a frozen value object:
`ClientSettings` (the constructor), `CallOverrides` (the per-call options),
`BatchOptions` (the batch options). Higher layers only read them.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import attrs

from ._exceptions import FriendliValidationError, warn_at_caller
from ._secrets import AUTHORIZATION, Secret, hide_credentials, split_authorization

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_SERVER_URL",
    "ENV_DEBUG",
    "ENV_LOG",
    "ENV_SERVER_URL",
    "ENV_TOKEN",
    "MAX_IMAGE_BYTES",
    "NO_OVERRIDES",
    "UNSET",
    "CallOptions",
    "CallOverrides",
    "ClientSettings",
    "DebugLogger",
    "RetryConfig",
    "Timeout",
    "Unset",
    "as_logger",
    "check_count",
    "check_headers",
    "check_server_url",
    "env_server_url",
    "env_token",
    "resolve_retries",
    "ssl_setting",
    "timeout_from_ms",
]

DEFAULT_SERVER_URL = "http://localhost:8000"
ENV_TOKEN = "FRIENDLI_TOKEN"  # noqa: S105  (the variable name, not a secret)
ENV_SERVER_URL = "FRIENDLI_SERVER_URL"
ENV_LOG = "FRIENDLI_LOG"
#: The official SDK's switch for debug logs to stderr.
ENV_DEBUG = "FRIENDLI_DEBUG"

#: The most connections (and so requests in flight) one client opens at once.
DEFAULT_MAX_CONNECTIONS = 64
#: Responses larger than this are refused while streaming, before they are buffered.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
#: The largest input image the API accepts (decoded bytes).
MAX_IMAGE_BYTES = 50 * 1024 * 1024


def env_token() -> str | None:
    """Return ``FRIENDLI_TOKEN`` from the environment, or None when unset or empty."""
    return os.environ.get(ENV_TOKEN) or None


def env_server_url() -> str:
    """Return ``FRIENDLI_SERVER_URL`` from the environment, else the default URL."""
    return os.environ.get(ENV_SERVER_URL) or DEFAULT_SERVER_URL


@runtime_checkable
class DebugLogger(Protocol):
    """What ``debug_logger=`` takes: anything with ``debug`` (the official ``utils.Logger``)."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Receive one debug message, %-formatted with ``args`` as ``logging`` does."""


class _Forward(logging.Handler):
    def __init__(self, target: DebugLogger) -> None:
        super().__init__(logging.DEBUG)
        self._target = target

    def emit(self, record: logging.LogRecord) -> None:
        self._target.debug(record.getMessage())


def as_logger(value: object) -> logging.Logger:
    """``debug_logger=`` as a `logging.Logger`: itself, or one forwarding to its ``debug``."""
    if isinstance(value, logging.Logger):
        return value
    if not isinstance(value, DebugLogger) or not callable(value.debug):
        raise FriendliValidationError(
            "debug_logger", "must be a logging.Logger or an object with a debug() method"
        )
    # Not registered with logging's manager: it lives and dies with the client.
    forward = logging.Logger("friendli_image.debug_logger", logging.DEBUG)
    forward.propagate = False
    forward.addHandler(_Forward(value))
    return forward


def _positive_or_none(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: object, _attribute: object, value: float | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FriendliValidationError(name, f"must be a number of seconds, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise FriendliValidationError(name, f"must be a positive finite number, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class Timeout:
    """Timeouts of one call, in seconds (None: no limit).

    Image generation takes seconds to minutes, so the defaults are generous where the
    server works and strict where it should answer at once. Every timer starts only once
    a connection slot is acquired: waiting behind ``max_connections`` is not a timeout.

    Attributes:
        connect: establishing a TCP (and TLS) connection. A connect timeout means the
            request never left, so it is always retried.
        read: the longest silence between two chunks of the response.
        attempt: one HTTP attempt, from sending to the last byte of the body.
        total: the whole call, across every retry and backoff sleep. No backoff sleep is
            started that would end past it.
    """

    connect: float | None = attrs.field(default=10.0, validator=_positive_or_none("connect"))
    read: float | None = attrs.field(default=None, validator=_positive_or_none("read"))
    attempt: float | None = attrs.field(default=300.0, validator=_positive_or_none("attempt"))
    total: float | None = attrs.field(default=None, validator=_positive_or_none("total"))


def check_count(name: str, value: object) -> int:
    """Return ``value``, or raise unless it is an int >= 1 (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FriendliValidationError(name, f"must be an int >= 1, got {value!r}")
    return value


def _attempts(_instance: object, _attribute: object, value: int) -> None:
    check_count("max_attempts", value)


def _non_negative(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: object, _attribute: object, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FriendliValidationError(name, f"must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise FriendliValidationError(name, f"must be finite and >= 0, got {value!r}")

    return check


def _statuses(values: Iterable[int]) -> frozenset[int]:
    statuses = frozenset(values)
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise FriendliValidationError("retry_statuses", f"{status!r} is not an HTTP status")
    return statuses


@attrs.frozen(kw_only=True)
class RetryConfig:
    """When and how a failed attempt is tried again.

    Retried by default: failures where nothing reached the server (connection refused,
    DNS, connect timeout: always safe), ``429``, ``502``, ``503`` and ``504`` (not ``408``,
    as in the official SDK: the server timed out on this very request).
    Not ``500``: on an inference server it usually means this very input failed, and
    sending it again repeats paid GPU work for the same error. Failures after the server
    may have read the request (a drop before the answer, a read timeout) are not resent
    unless ``retry_ambiguous=True``: a resent generation can run twice.

    One exception, the keep-alive race: when a *reused* pooled connection breaks before
    any byte of the answer, the server may simply have closed it while it sat idle, and
    nothing on the client can tell that apart from "read the request, then dropped it".
    Such a failure gets one immediate reconnect per attempt (outside ``max_attempts`` and
    the budget: the connection that carried a 429 the call retries may be the one the
    server closed since), and a result obtained that way has ``maybe_duplicated=True``;
    ``reconnect_reused=False``
    turns it off, for strict at-most-once sending (the drop then raises with
    ``maybe_processed=True``, like any other). A *fresh* connection
    that breaks after sending is never resent by default: the error has
    ``maybe_processed=True``. With ``retry_ambiguous=True`` both are retried like any
    transient failure, under the same ``X-Request-ID``.

    Attributes:
        max_attempts: attempts in all, the first included (1 disables retrying).
        initial_delay: the first backoff, multiplied by ``multiplier`` on each retry up
            to ``max_delay``.
        multiplier: the growth factor of the backoff (2: doubled on each retry).
        max_delay: the longest backoff between two attempts.
        jitter: up to this many seconds of random delay added to every backoff.
        max_elapsed: no retry sleep may end later than this many seconds after the
            call started (None: bounded only by attempts and ``Timeout.total``).
        retry_statuses: the HTTP statuses that are retried.
        max_retry_after: the longest server ``Retry-After`` hint honoured; a longer one
            stops retrying and raises with ``retry_after`` set.
        retry_ambiguous: resend requests the server may already have processed.
        reconnect_reused: reconnect once when a reused keep-alive connection breaks
            before any answer (see above); False never resends such a request.
        budget_ratio: retry tokens each successful call adds to the client-wide retry
            budget. A retry spends one token unless the server paced it with
            ``Retry-After`` or the request never reached it; a call that then succeeds
            gets its tokens back. A brownout (where retries work) thus keeps the budget
            full, and a full outage costs at most ``budget_cap`` extra requests in all.
        budget_floor: retry tokens a client starts with.
        budget_cap: the most retry tokens a client holds.
    """

    max_attempts: int = attrs.field(default=5, validator=_attempts)
    initial_delay: float = attrs.field(default=0.5, validator=_non_negative("initial_delay"))
    multiplier: float = attrs.field(default=2.0, validator=_non_negative("multiplier"))
    max_delay: float = attrs.field(default=8.0, validator=_non_negative("max_delay"))
    jitter: float = attrs.field(default=0.5, validator=_non_negative("jitter"))
    max_elapsed: float | None = attrs.field(
        default=120.0, validator=_positive_or_none("max_elapsed")
    )
    retry_statuses: frozenset[int] = attrs.field(
        default=frozenset({429, 502, 503, 504}), converter=_statuses
    )
    max_retry_after: float = attrs.field(default=60.0, validator=_non_negative("max_retry_after"))
    retry_ambiguous: bool = False
    reconnect_reused: bool = True
    budget_ratio: float = attrs.field(default=0.1, validator=_non_negative("budget_ratio"))
    budget_floor: float = attrs.field(default=50.0, validator=_non_negative("budget_floor"))
    budget_cap: float = attrs.field(default=50.0, validator=_non_negative("budget_cap"))

    @classmethod
    def disabled(cls) -> RetryConfig:
        """A policy that never retries (one attempt per call)."""
        return cls(max_attempts=1)


def check_server_url(value: object, field: str = "server_url") -> str:
    """Return the URL without a trailing slash, or raise unless it is an http(s) URL.

    A URL with credentials (``http://user:password@host``) is refused without echoing
    them: aiohttp would raise a bare ``ValueError`` beside a token, send them as
    ``Basic`` auth without one, and every repr would show the password.
    """
    if not isinstance(value, str) or not value.strip():
        raise FriendliValidationError(field, f"must be an http(s) URL string, got {value!r}")
    url = value.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] if sep else ""
    if "@" in authority:
        host = authority.rpartition("@")[2]
        raise FriendliValidationError(
            field,
            f"contains a user name or password before the host ({scheme}://…@{host}); "
            "credentials do not belong in the URL: pass the API token as token= (or set "
            "FRIENDLI_TOKEN) and drop the user:password@ part",
        )
    if not url.lower().startswith(("http://", "https://")):
        raise FriendliValidationError(field, f"must start with http:// or https://, got {url!r}")
    return url


def _check_timeout_ms(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FriendliValidationError("timeout_ms", f"must be milliseconds, got {value!r}")
    if not value > 0:
        raise FriendliValidationError("timeout_ms", f"must be positive, got {value!r}")


def timeout_from_ms(timeout_ms: float | None, base: Timeout) -> Timeout:
    """``base`` with its per-attempt timeout set to ``timeout_ms`` (None keeps ``base``)."""
    _check_timeout_ms(timeout_ms)
    if timeout_ms is None:
        return base
    return attrs.evolve(base, attempt=timeout_ms / 1000)


class Unset(enum.Enum):
    """The type of `UNSET`: an argument not given (where None has a meaning of its own)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: A per-call ``retries`` not given: the client's policy applies. (``retries=None`` on a
#: call means no retries, as in the official SDK.)
UNSET: Final = Unset.UNSET


def _check_retries(value: object) -> None:
    if value is None or value is UNSET or isinstance(value, RetryConfig):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    raise FriendliValidationError(
        "retries", f"must be a RetryConfig, a number of retries (int >= 0) or None, got {value!r}"
    )


def resolve_retries(value: RetryConfig | int | None, base: RetryConfig) -> RetryConfig:
    """The policy ``retries=`` asks for: a RetryConfig as is, N retries on top of ``base``."""
    _check_retries(value)
    if value is None:
        return base
    if isinstance(value, RetryConfig):
        return value
    return attrs.evolve(base, max_attempts=value + 1)


#: RFC 9110 5.6.2: a field name is a token.
_TOKEN_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Field values we send: visible ASCII, spaces and tabs (no obs-text, no controls).
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e]*")
#: Headers the HTTP client owns: set by hand they corrupt the framing of the request
#: (or of the connection), so they are refused with the reason.
_CLIENT_OWNED_HEADERS: Final = {
    "content-length": "the body's length is computed from the body; a different value "
    "truncates or pads the request on the wire",
    "transfer-encoding": "the framing is chosen by the client; a Transfer-Encoding beside "
    "Content-Length is the request-smuggling shape",
    "host": "the host comes from server_url; pass server_url= to talk to another host",
    "connection": "connection management (keep-alive, the pool) belongs to the client",
    "keep-alive": "connection management (keep-alive, the pool) belongs to the client",
    "proxy-connection": "connection management (keep-alive, the pool) belongs to the client",
    "te": "it is a hop-by-hop header the client does not negotiate",
    "trailer": "the request has no trailers",
    "upgrade": "the client speaks HTTP/1.1 only; a protocol upgrade is not supported",
}


def check_headers(value: object) -> dict[str, str]:
    """Return the extra headers as a dict, or raise unless they are safe to send.

    Names must be RFC 9110 tokens and values visible ASCII (spaces and tabs allowed);
    the framing and hop-by-hop headers (``Content-Length``, ``Transfer-Encoding``,
    ``Host``, ``Connection``, ``TE``, ``Upgrade``, ...) are refused with the reason.
    An ``Authorization`` header is kept under that exact name (it replaces the
    ``Bearer`` token header, see `AsyncFriendli`). Messages name the header, never its
    value: the value may be a secret.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str | Secret) for k, v in value.items()
    ):
        raise FriendliValidationError("http_headers", "must be a mapping of str to str")
    checked: dict[str, str] = {}
    seen: set[str] = set()
    for name, given in value.items():
        text = given.reveal() if isinstance(given, Secret) else given
        if not _TOKEN_NAME.fullmatch(name):
            what = "is empty" if not name else "is not a valid HTTP header name"
            raise FriendliValidationError(
                "http_headers",
                f"header name {name!r} {what}: use letters, digits and !#$%&'*+-.^_`|~ "
                "only (no spaces, colons, line breaks or non-ASCII characters)",
            )
        lower = name.lower()
        if lower in _CLIENT_OWNED_HEADERS:
            raise FriendliValidationError(
                "http_headers", f"header {name!r} cannot be set: {_CLIENT_OWNED_HEADERS[lower]}"
            )
        if lower in seen:
            raise FriendliValidationError(
                "http_headers", f"header {name!r} is given twice (names are case-insensitive)"
            )
        seen.add(lower)
        if not _FIELD_VALUE.fullmatch(text):
            raise FriendliValidationError(
                "http_headers",
                f"the value of header {name!r} contains a line break, a control character "
                "or a non-ASCII character; send visible ASCII (percent-encode or base64 "
                "anything else)",
            )
        checked[AUTHORIZATION if lower == "authorization" else name] = text
    return checked


def _hidden_headers(value: Mapping[str, str | Secret] | None) -> Mapping[str, str | Secret] | None:
    # Anything else is left for the validator to refuse with its message.
    return hide_credentials(value) if isinstance(value, Mapping) else value


def ssl_setting(verify: object) -> bool | ssl.SSLContext:
    """Turn the ``verify`` argument into aiohttp's ``ssl`` setting."""
    if isinstance(verify, ssl.SSLContext) or verify is True:
        return verify
    if verify is False:
        warn_at_caller(
            "verify=False turns off TLS certificate verification: anyone on the network "
            "path can read the token and the images; pass verify='path/to/ca-bundle.pem' "
            "to trust a private CA instead"
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


def _validated(check: Callable[[object], object]) -> Callable[[Any, Any, Any], None]:
    def validator(_instance: object, _attribute: object, value: object) -> None:
        check(value)

    return validator


def _optional_url(value: object) -> None:
    if value is not None:
        check_server_url(value)


@attrs.frozen(kw_only=True)
class CallOverrides:
    """The per-call options every operation takes, checked when they are given.

    Attributes:
        retries: this call's retry policy (a ``RetryConfig``, or a number of retries).
        server_url: this call's server, overriding the client's.
        timeout_ms: this call's per-attempt timeout in milliseconds.
        http_headers: extra headers for this call.
    """

    retries: RetryConfig | int | Unset | None = attrs.field(
        default=UNSET, validator=_validated(_check_retries)
    )
    server_url: str | None = attrs.field(default=None, validator=_validated(_optional_url))
    timeout_ms: float | None = attrs.field(default=None, validator=_validated(_check_timeout_ms))
    http_headers: Mapping[str, str | Secret] | None = attrs.field(
        default=None, converter=_hidden_headers, validator=_validated(check_headers)
    )
    """Held with the ``Authorization`` value as a `Secret` (see `hide_credentials`)."""

    def merged(self, item: CallOverrides) -> CallOverrides:
        """These options with ``item``'s set values on top (headers are merged)."""
        headers = (
            {**(self.http_headers or {}), **item.http_headers}
            if item.http_headers
            else self.http_headers
        )
        return CallOverrides(
            retries=self.retries if item.retries is UNSET else item.retries,
            server_url=self.server_url if item.server_url is None else item.server_url,
            timeout_ms=self.timeout_ms if item.timeout_ms is None else item.timeout_ms,
            http_headers=headers,
        )


#: No per-call option set.
NO_OVERRIDES: Final = CallOverrides()


@attrs.frozen
class CallOptions:
    """One call's settings, resolved against the client's: URL, timeouts, retries, headers."""

    server_url: str
    timeout: Timeout
    retry: RetryConfig
    headers: Mapping[str, str]
    """The call's extra headers, without ``Authorization`` (see ``authorization``)."""
    authorization: Secret | None = None
    """The call's own ``Authorization`` value: sent instead of the client's."""


@attrs.frozen(kw_only=True)
class ClientSettings:
    """A client's checked and resolved constructor arguments (see `AsyncFriendli`)."""

    token: Secret | None
    token_source: Callable[[], Secret | None] | None
    """Called for every call when the token was given as a callable (it may change)."""
    server_url: str
    timeout: Timeout
    retry: RetryConfig
    headers: Mapping[str, str]
    """Every request's headers: user agent, content type, token and ``http_headers``."""
    max_connections: int
    max_response_bytes: int
    ssl: bool | ssl.SSLContext
    trust_env: bool
    """Proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``."""
    logger: logging.Logger
    """Where the client logs (``debug_logger``, else the ``friendli_image`` logger)."""
    authorization: Secret | None = None
    """An ``Authorization`` value from ``http_headers``: sent instead of the token's."""
    netrc: bool = False
    """A ``.netrc`` login is sent when no token is set (``trust_env=True`` only)."""

    @property
    def has_token(self) -> bool:
        """True when requests carry an ``Authorization`` header (or may, from a callable)."""
        return self.token is not None or self.token_source is not None

    def call_options(self, overrides: CallOverrides) -> CallOptions:
        """The options of one call: the client's, with ``overrides`` on top."""
        headers, authorization = split_authorization(check_headers(overrides.http_headers))
        retries = overrides.retries
        if retries is UNSET:
            retry = self.retry
        elif retries is None:
            retry = attrs.evolve(self.retry, max_attempts=1)  # None: no retries (official)
        else:
            retry = resolve_retries(retries, self.retry)
        return CallOptions(
            server_url=self.server_url
            if overrides.server_url is None
            else check_server_url(overrides.server_url),
            timeout=timeout_from_ms(overrides.timeout_ms, self.timeout),
            retry=retry,
            headers=headers,
            authorization=authorization,
        )
