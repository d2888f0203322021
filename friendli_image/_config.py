"""Configuration values and defaults: timeouts, retry policy, environment lookup."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ._exceptions import FriendliValidationError

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_SERVER_URL",
    "ENV_LOG",
    "ENV_SERVER_URL",
    "ENV_TOKEN",
    "MAX_IMAGE_BYTES",
    "BackoffStrategy",
    "OfficialRetryConfig",
    "RetryConfig",
    "Timeout",
    "env_server_url",
    "env_token",
]

DEFAULT_SERVER_URL = "http://localhost:8000"
ENV_TOKEN = "FRIENDLI_TOKEN"  # noqa: S105  (the variable name, not a secret)
ENV_SERVER_URL = "FRIENDLI_SERVER_URL"
ENV_LOG = "FRIENDLI_LOG"

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


def _attempts(_instance: object, _attribute: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FriendliValidationError("max_attempts", f"must be an int >= 1, got {value!r}")


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
    DNS, connect timeout: always safe), ``408``, ``429``, ``502``, ``503`` and ``504``.
    Not ``500``: on an inference server it usually means this very input failed, and
    sending it again repeats paid GPU work for the same error. Failures after the server
    may have read the request (a drop before the answer, a read timeout) are not resent
    unless ``retry_ambiguous=True``: a resent generation can run twice.

    One exception, the keep-alive race: when a *reused* pooled connection breaks before
    any byte of the answer, the server may simply have closed it while it sat idle, and
    nothing on the client can tell that apart from "read the request, then dropped it".
    Such a failure gets one immediate reconnect (outside ``max_attempts`` and the budget),
    and a result obtained that way has ``maybe_duplicated=True``; ``reconnect_reused=False``
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
        budget_ratio: the client-wide retry budget; each call adds this many retry tokens
            (so during an outage retries stay near this fraction of the calls).
        budget_floor: retry tokens a client starts with (and keeps up to ``budget_cap``).
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
        default=frozenset({408, 429, 502, 503, 504}), converter=_statuses
    )
    max_retry_after: float = attrs.field(default=60.0, validator=_non_negative("max_retry_after"))
    retry_ambiguous: bool = False
    reconnect_reused: bool = True
    budget_ratio: float = attrs.field(default=0.1, validator=_non_negative("budget_ratio"))
    budget_floor: float = attrs.field(default=10.0, validator=_non_negative("budget_floor"))
    budget_cap: float = attrs.field(default=50.0, validator=_non_negative("budget_cap"))

    @classmethod
    def disabled(cls) -> RetryConfig:
        """A policy that never retries (one attempt per call)."""
        return cls(max_attempts=1)


class BackoffStrategy:
    """The official SDK's backoff settings, in milliseconds (``friendli_image.utils``).

    Args:
        initial_interval: the first backoff, in milliseconds.
        max_interval: the longest backoff, in milliseconds.
        exponent: the growth factor of the backoff on each retry.
        max_elapsed_time: no retry sleep ends later than this many milliseconds after
            the call started.
        jitter_ms: random delay added to each backoff, in milliseconds (default 1000,
            as in the official SDK).
    """

    __slots__ = ("exponent", "initial_interval", "jitter_ms", "max_elapsed_time", "max_interval")

    def __init__(
        self,
        initial_interval: int,
        max_interval: int,
        exponent: float,
        max_elapsed_time: int,
        jitter_ms: int | None = None,
    ) -> None:
        for name, value in (
            ("initial_interval", initial_interval),
            ("max_interval", max_interval),
            ("exponent", exponent),
            ("max_elapsed_time", max_elapsed_time),
            ("jitter_ms", 0 if jitter_ms is None else jitter_ms),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FriendliValidationError(name, f"must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise FriendliValidationError(name, f"must be finite and >= 0, got {value!r}")
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self.exponent = exponent
        self.max_elapsed_time = max_elapsed_time
        self.jitter_ms = jitter_ms

    def __repr__(self) -> str:
        return (
            f"BackoffStrategy({self.initial_interval}, {self.max_interval}, {self.exponent}, "
            f"{self.max_elapsed_time}, jitter_ms={self.jitter_ms})"
        )


_OFFICIAL_STRATEGIES = ("backoff", "none")


def _status_codes(codes: Iterable[str | int]) -> frozenset[int]:
    """Expand the official SDK's status patterns (``"503"``, ``"5XX"``) into statuses."""
    statuses: set[int] = set()
    for code in codes:
        text = str(code).strip().upper()
        if len(text) == 3 and text[0] in "12345" and text[1:] == "XX":
            first = int(text[0]) * 100
            statuses.update(range(first, first + 100))
        elif text.isdigit():
            statuses.add(int(text))
        else:
            raise FriendliValidationError(
                "status_codes_override", f"{code!r} is not a status code or a pattern like '5XX'"
            )
    return _statuses(statuses)


def official_policy(
    strategy: str,
    backoff: BackoffStrategy | None,
    retry_connection_errors: bool,
    status_codes_override: Iterable[str | int] | None = None,
) -> dict[str, Any]:
    """Map the official SDK's retry settings onto ``RetryConfig`` fields.

    ``"none"`` makes one attempt; ``"backoff"`` keeps our attempt cap (5), the statuses
    retried by default (not 500) unless ``status_codes_override`` names others, and
    the rule that a request the server may have processed is not resent.
    ``retry_connection_errors`` is accepted for its meaning there: failures where nothing
    reached the server are always retried, as they are safe.
    """
    if strategy not in _OFFICIAL_STRATEGIES:
        raise FriendliValidationError("strategy", f"must be 'backoff' or 'none', got {strategy!r}")
    if not isinstance(retry_connection_errors, bool):
        raise FriendliValidationError(
            "retry_connection_errors", f"must be True or False, got {retry_connection_errors!r}"
        )
    fields: dict[str, Any] = {}
    if strategy == "none":
        fields["max_attempts"] = 1
    if backoff is not None:
        if not isinstance(backoff, BackoffStrategy):
            raise FriendliValidationError(
                "backoff", f"must be a BackoffStrategy, got {type(backoff).__name__}"
            )
        fields["initial_delay"] = backoff.initial_interval / 1000
        fields["max_delay"] = backoff.max_interval / 1000
        fields["multiplier"] = float(backoff.exponent)
        fields["max_elapsed"] = backoff.max_elapsed_time / 1000 or None
        fields["jitter"] = (1000 if backoff.jitter_ms is None else backoff.jitter_ms) / 1000
    if status_codes_override:
        fields["retry_statuses"] = _status_codes(status_codes_override)
    return fields


class OfficialRetryConfig(RetryConfig):
    """The official SDK's ``RetryConfig``, positional and in milliseconds.

    ``friendli_image.utils.RetryConfig`` is this class: a `RetryConfig` built from the
    official arguments (see `official_policy` for the mapping), so ``retries=`` and
    ``retry_config=`` take it wherever they take ours. The official arguments stay
    readable as attributes. Keyword arguments of `RetryConfig` (``max_attempts=``, ...)
    are applied on top.
    """

    strategy: str
    backoff: BackoffStrategy | None
    retry_connection_errors: bool
    status_codes_override: list[str] | None

    def __init__(
        self,
        strategy: str = "backoff",
        backoff: BackoffStrategy | None = None,
        retry_connection_errors: bool = True,
        status_codes_override: list[str] | None = None,
        **policy: Any,
    ) -> None:
        fields = official_policy(strategy, backoff, retry_connection_errors, status_codes_override)
        super().__init__(**{**fields, **policy})
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "retry_connection_errors", retry_connection_errors)
        object.__setattr__(self, "status_codes_override", status_codes_override)
