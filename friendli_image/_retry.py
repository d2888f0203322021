"""The retry policy: pure decisions, driven by tenacity.

The decisions (is this failure retryable, how long to wait, when to stop) are plain
functions of the failure, the attempt number and the clock, so they are tested without
sleeping. ``CallRetry`` adapts them to tenacity's ``retry`` / ``wait`` / ``stop`` hooks
for one call. tenacity stays private: no tenacity type is part of the public API.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from ._config import RetryConfig
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
)

if TYPE_CHECKING:
    import tenacity as _t

__all__ = [
    "CallRetry",
    "RetryBudget",
    "backoff_delay",
    "is_retryable",
    "parse_retry_after",
]

logger = logging.getLogger("friendli_image")

#: A Retry-After beyond this is junk (or a date centuries away), not a hint to honour.
_ABSURD_SECONDS: Final = 10.0 * 365 * 24 * 3600


def _finite_seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0 or value > _ABSURD_SECONDS:
        return None
    return value


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Return the server's retry hint in seconds, or None when absent or unusable.

    Reads ``retry-after-ms`` (milliseconds) first, then ``Retry-After`` as seconds or an
    HTTP-date. Negative, NaN, infinite, absurdly large, past or unparsable values give
    None (the caller then uses its own backoff); nothing here raises.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = _finite_seconds(millis.strip())
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    seconds = _finite_seconds(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        delta = when.timestamp() - (time.time() if now is None else now)
    except (OverflowError, OSError, ValueError):
        return None
    if delta <= 0 or delta > _ABSURD_SECONDS:
        return None
    return delta


def is_retryable(error: BaseException, config: RetryConfig) -> bool:
    """Decide from the failure alone whether another attempt may help (and is safe)."""
    if isinstance(error, FriendliAPIStatusError):
        return error.status in config.retry_statuses
    if isinstance(error, FriendliConnectionError):
        if getattr(error, "_permanent", False):
            return False  # e.g. a TLS verification failure: the same again next time
        return (
            not error.maybe_processed
            or config.retry_ambiguous
            or (config.reconnect_reused and is_stale(error))
        )
    return False


def is_stale(error: BaseException) -> bool:
    """True for the benign keep-alive race: a reused idle connection the server had closed."""
    return bool(getattr(error, "_stale_connection", False))


def backoff_delay(retry_number: int, config: RetryConfig, rng: random.Random) -> float:
    """The wait before retry ``retry_number`` (1 = first retry): capped exponential + jitter."""
    base = config.initial_delay * (config.multiplier ** (retry_number - 1))
    return min(config.max_delay, base) + rng.uniform(0.0, config.jitter)


class RetryBudget:
    """A client-wide allowance of retries, so an outage does not multiply the load.

    Every call deposits ``budget_ratio`` tokens (up to ``budget_cap``) when its first
    attempt completes; every retry of a request the server answered or may have read
    spends one. During a full outage the
    server therefore sees about ``(1 + budget_ratio)`` requests per call instead of
    ``max_attempts``. Retries of connections that never reached the server are free.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: float) -> None:
        self._tokens = tokens

    def deposit(self, config: RetryConfig) -> None:
        """Credit one call."""
        self._tokens = min(config.budget_cap, self._tokens + config.budget_ratio)

    def try_spend(self) -> bool:
        """Take one retry token; False when the budget is exhausted."""
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class CallRetry:
    """tenacity hooks for one call: the shared policy plus this call's clock and budget."""

    __slots__ = ("_budget", "_config", "_deadline", "_rng", "_stale_retry_used", "_started")

    def __init__(
        self,
        config: RetryConfig,
        budget: RetryBudget,
        started: float,
        deadline: float | None,
        rng: random.Random,
    ) -> None:
        self._config = config
        self._budget = budget
        self._started = started
        self._deadline = deadline
        self._rng = rng
        self._stale_retry_used = False

    def retrying(self) -> _t.AsyncRetrying:
        """A tenacity controller for this call."""
        # Imported here, not at the top: only a failed first attempt gets this far, and
        # tenacity is a tenth of what `import friendli_image` adds to `import aiohttp`.
        import tenacity as _t  # noqa: PLC0415

        return _t.AsyncRetrying(
            retry=_t.retry_if_exception(self.retry),
            wait=self.wait,
            stop=self.stop,
            reraise=True,
            before_sleep=self._log_retry,
        )

    def retry(self, error: BaseException) -> bool:
        """tenacity ``retry``: is the failure of a retryable kind."""
        return is_retryable(error, self._config)

    def wait(self, state: _t.RetryCallState) -> float:
        """tenacity ``wait``: the server's hint when it gave one, else our backoff."""
        error = _failure(state)
        if self._config.reconnect_reused and is_stale(error) and not self._stale_retry_used:
            return 0.0
        hint = getattr(error, "retry_after", None)
        if hint is not None:
            return float(hint) + self._rng.uniform(0.0, min(self._config.jitter, 0.25))
        return backoff_delay(self._counted(state), self._config, self._rng)

    def _counted(self, state: _t.RetryCallState) -> int:
        """Attempts that count against ``max_attempts``: the keep-alive reconnect is free."""
        return state.attempt_number - (1 if self._stale_retry_used else 0)

    def stop(self, state: _t.RetryCallState) -> bool:
        """tenacity ``stop``: out of attempts, time or budget, or the hint is too long."""
        error = _failure(state)
        if self._config.reconnect_reused and is_stale(error) and not self._stale_retry_used:
            # One reconnect for the keep-alive race, outside attempts and budget, as
            # the request never reached a live server.
            self._stale_retry_used = True
            return False
        config = self._config
        if self._counted(state) >= config.max_attempts:
            return True
        hint = getattr(error, "retry_after", None)
        if hint is not None and hint > config.max_retry_after:
            return True
        wake = time.monotonic() + state.upcoming_sleep
        if config.max_elapsed is not None and wake - self._started > config.max_elapsed:
            return True
        if self._deadline is not None and wake >= self._deadline:
            return True
        needs_budget = not isinstance(error, FriendliConnectionError) or error.maybe_processed
        return needs_budget and not self._budget.try_spend()

    @staticmethod
    def _log_retry(state: _t.RetryCallState) -> None:
        error = _failure(state)
        request_id = getattr(error, "request_id", None)
        if isinstance(error, FriendliAPIError):  # its str names the request id
            logger.warning(
                "retrying in %.2fs after attempt %d failed: %s",
                state.upcoming_sleep,
                state.attempt_number,
                error,
            )
        else:  # pragma: no cover - only FriendliAPIError is retryable
            logger.warning(
                "retrying in %.2fs after attempt %d failed: %s (request id %s)",
                state.upcoming_sleep,
                state.attempt_number,
                type(error).__name__,
                request_id,
            )


def _failure(state: _t.RetryCallState) -> BaseException:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    if error is None:  # pragma: no cover - tenacity only consults us after a failure
        raise RuntimeError("retry hook called without a failure")
    return error
