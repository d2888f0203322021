"""The retry policy: pure decisions, and the tenacity controller that applies them.

The decisions (is this failure retryable, how long to wait, when to stop, does a retry
spend the budget) are plain functions of the failure, the policy and the clock, so they
are tested without sleeping. `RetryState` is one call's side of it (its clock, its
budget, its history) and `RetryState.after_failure` hands each failure to tenacity,
which calls the decisions through its ``retry`` / ``wait`` / ``stop`` hooks. tenacity
stays private: no tenacity type is part of the public API.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ._clock import monotonic, pause
from ._config import RetryConfig
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
)

if TYPE_CHECKING:
    import tenacity as _t

__all__ = [
    "RetryBudget",
    "RetryState",
    "backoff_delay",
    "is_retryable",
    "parse_retry_after",
    "retry_wait",
    "server_wait",
    "spends_budget",
    "stop_reason",
]

#: Hints beyond this are clamped to it: a number of any size means "not soon", and it
#: then stops retrying like any hint over ``max_retry_after`` (about 31 years).
_HINT_CEILING: Final = 1e9
#: RFC 9110 10.2.3: delay-seconds = 1*DIGIT. ``retry-after-ms`` may have a fraction.
_DELAY_SECONDS: Final = re.compile(r"[0-9]+")
_DELAY_MILLIS: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _digits(text: str, pattern: re.Pattern[str]) -> float | None:
    if not pattern.fullmatch(text):
        return None
    whole = text.partition(".")[0]
    if len(whole.lstrip("0")) > 12:  # beyond the ceiling, however many digits follow
        return _HINT_CEILING
    return min(float(text), _HINT_CEILING)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Return the server's retry hint in seconds, or None when absent or unusable.

    Reads ``retry-after-ms`` (milliseconds, digits with an optional fraction) first,
    then ``Retry-After`` as delay-seconds (digits only: ``1e1``, ``1_0``, ``-1``, ``nan``
    are junk) or an HTTP-date. Junk and past dates give None (the caller then uses its
    own backoff); a hint too large to mean anything is clamped, so every hint beyond
    ``max_retry_after`` stops retrying the same way. Nothing here raises.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = _digits(millis.strip(), _DELAY_MILLIS)
        if value is not None:
            return min(value / 1000.0, _HINT_CEILING)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    seconds = _digits(raw, _DELAY_SECONDS)
    if seconds is not None:
        return seconds
    if not raw or raw[0].isdigit():
        return None  # not a date (dates start with the day name)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        delta = when.timestamp() - (time.time() if now is None else now)
    except (OverflowError, OSError, ValueError):
        return None
    if delta <= 0:
        return None
    return min(delta, _HINT_CEILING)


def is_retryable(error: BaseException, config: RetryConfig) -> bool:
    """Decide from the failure alone whether another attempt may help (and is safe)."""
    if isinstance(error, FriendliAPIStatusError):
        return error.status in config.retry_statuses
    if isinstance(error, FriendliConnectionError):
        if error.permanent:
            return False  # e.g. a TLS verification failure: the same again next time
        return (
            not error.maybe_processed
            or config.retry_ambiguous
            or (config.reconnect_reused and error.stale_connection)
        )
    return False


def server_wait(error: BaseException) -> float | None:
    """The wait the server asked for with this failure (``Retry-After``), if any."""
    if isinstance(error, FriendliAPIStatusError):
        return error.retry_after
    return None


def spends_budget(error: BaseException) -> bool:
    """Does retrying this failure take a token from the client's retry budget?

    No for a request that never reached a server (resending it costs no server work),
    and no when the server itself asked for the retry with a ``Retry-After``: it is
    alive and paces the retries. Everything else (5xx without a hint, a request the
    server may have read) spends one, so a full outage does not multiply the load.
    """
    if isinstance(error, FriendliConnectionError) and not error.maybe_processed:
        return False
    return server_wait(error) is None


def backoff_delay(retry_number: int, config: RetryConfig, rng: random.Random) -> float:
    """The wait before retry ``retry_number`` (1 = first retry): capped exponential + jitter."""
    base = config.initial_delay * (config.multiplier ** (retry_number - 1))
    return min(config.max_delay, base) + rng.uniform(0.0, config.jitter)


def retry_wait(
    error: BaseException, retry_number: int, config: RetryConfig, rng: random.Random
) -> float:
    """The wait before the next attempt: the server's hint when it gave one, else backoff."""
    hint = server_wait(error)
    if hint is not None:
        return hint + rng.uniform(0.0, min(config.jitter, 0.25))
    return backoff_delay(retry_number, config, rng)


def stop_reason(
    error: BaseException,
    *,
    counted_attempts: int,
    wake: float,
    started: float,
    deadline: float | None,
    config: RetryConfig,
) -> str | None:
    """Why no further attempt is made after ``error`` (None: retry, at ``wake``).

    ``counted_attempts`` are the attempts so far that count against ``max_attempts``;
    ``wake`` is when the next attempt would start, ``started`` when the call started,
    ``deadline`` the end of ``Timeout.total`` (all `_clock.monotonic` values).
    """
    if counted_attempts >= config.max_attempts:
        return "attempts"
    hint = server_wait(error)
    if hint is not None and hint > config.max_retry_after:
        return "retry_after"
    if config.max_elapsed is not None and wake - started > config.max_elapsed:
        return "max_elapsed"
    if deadline is not None and wake >= deadline:
        return "deadline"
    return None


class RetryBudget:
    """A client-wide allowance of retries: generous in a brownout, tight in an outage.

    The client starts with ``budget_floor`` tokens and holds at most ``budget_cap``.
    A retry that `spends_budget` takes one. When the call then succeeds, the retry
    worked and its tokens come back (botocore's standard mode), and every success adds
    ``budget_ratio``. Calls that fail for good keep their tokens spent. In a brownout,
    where retries succeed, the budget therefore stays near full and no call that a
    second try would save is failed by it; in a full outage, where nothing succeeds, the
    whole client makes at most ``budget_floor`` retries in all (plus what successes
    before it had added, up to ``budget_cap``) until the server answers again.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: float) -> None:
        self._tokens = tokens

    @property
    def tokens(self) -> float:
        """The retry tokens left."""
        return self._tokens

    def deposit(self, config: RetryConfig, refund: int = 0) -> None:
        """Credit one successful call, and give back the ``refund`` tokens it spent."""
        self._tokens = min(config.budget_cap, self._tokens + config.budget_ratio + refund)

    def try_spend(self) -> bool:
        """Take one retry token; False when the budget is exhausted."""
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class RetryState:
    """One call's retry state: its policy, clock, budget and history.

    The call makes its attempts; after each failure it awaits `after_failure`, which
    either waits until the next attempt is due or raises the failure. The decisions are
    this module's functions; tenacity applies them through its public iteration API
    (``AsyncRetrying`` as an async iterator of attempts, with our ``retry`` / ``stop`` /
    ``wait`` hooks and our clock's ``sleep``). The controller is built at the first
    failure, so a call that succeeds at once costs none.
    """

    __slots__ = (
        "_attempt",
        "_attempts",
        "_budget",
        "_config",
        "_decision",
        "_elsewhere",
        "_failures",
        "_logger",
        "_reconnecting",
        "_reconnects",
        "_rng",
        "_spent",
        "deadline",
        "on_retry",
        "resent_ambiguous",
        "started",
    )

    def __init__(
        self,
        config: RetryConfig,
        budget: RetryBudget,
        rng: random.Random,
        total: float | None,
        logger: logging.Logger,
    ) -> None:
        self._logger = logger
        self._config = config
        self._budget = budget
        self._rng = rng
        self._attempts: _t.AsyncRetrying | None = None
        self._attempt: _t.AttemptManager | None = None
        #: The decision on the latest failure: the wait before the next attempt, or None
        #: to stop. Made once, in the ``retry`` hook, which tenacity consults first.
        self._decision: float | None = None
        #: The latest failure may be retried because the next attempt goes elsewhere.
        self._elsewhere = False
        self._failures = 0
        self._spent = 0
        self.started = monotonic()
        self.deadline = None if total is None else self.started + total
        self.resent_ambiguous = False
        #: Free reconnects made (`_is_free_reconnect`), and whether the latest attempt was one.
        self._reconnects = 0
        self._reconnecting = False
        #: Told of each retry as it is decided, before its wait: (the failure, the delay).
        self.on_retry: Callable[[FriendliAPIError, float], None] | None = None

    async def after_failure(self, error: FriendliAPIError, *, elsewhere: bool = False) -> None:
        """Wait for the next attempt, or raise ``error`` when the policy says stop.

        ``elsewhere``: the next attempt goes to another server, which may not fail as
        this one did, so a failure the same server would repeat is retried too (within
        the attempts, the budget and the deadline).
        """
        self.resent_ambiguous = self.resent_ambiguous or error.maybe_processed
        self._elsewhere = elsewhere
        self._failures += 1
        attempts = self._attempts
        if attempts is None:
            attempts = self._start()
            self._attempt = await attempts.__anext__()  # attempt 1: the one just made
        assert self._attempt is not None  # noqa: S101  (set with the controller)
        self._attempt.retry_state.set_exception((type(error), error, error.__traceback__))
        # Decides through the hooks; waits through `pause`; raises ``error``
        # itself (reraise=True) when the policy says stop.
        self._attempt = await attempts.__anext__()

    def succeeded(self) -> None:
        """The call got its image: credit the budget and refund the tokens it spent."""
        self._budget.deposit(self._config, self._spent)
        self._spent = 0

    @property
    def counted_attempts(self) -> int:
        """Attempts made so far that count against ``max_attempts``."""
        return self._failures - self._reconnects

    def _start(self) -> _t.AsyncRetrying:
        # Imported here: only a failed attempt gets this far, and tenacity is a tenth of
        # what `import friendli_image` adds to `import aiohttp`.
        import tenacity as _t  # noqa: PLC0415

        self._attempts = _t.AsyncRetrying(
            sleep=pause,
            retry=self._retry,
            stop=self._stop,
            wait=self._wait,
            reraise=True,
            before_sleep=self._log_retry,
        ).__aiter__()
        return self._attempts

    def _is_free_reconnect(self, error: BaseException) -> bool:
        """A reused connection broke before any answer, and the attempt was not itself a
        reconnect: one per attempt, since a connection that carried an answer (a 429 the
        call retries, say) may be the one the server has closed meanwhile."""
        return (
            self._config.reconnect_reused
            and isinstance(error, FriendliConnectionError)
            and error.stale_connection
            and not self._reconnecting
        )

    def _decide(self, error: BaseException) -> float | None:
        """The wait before the next attempt after ``error``, or None: stop."""
        if self._is_free_reconnect(error):
            # A reconnect for the keep-alive race, outside attempts and budget, as the
            # request most likely never reached a live server.
            self._reconnects += 1
            self._reconnecting = True
            return 0.0
        self._reconnecting = False
        delay = retry_wait(error, self.counted_attempts, self._config, self._rng)
        reason = stop_reason(
            error,
            counted_attempts=self.counted_attempts,
            wake=monotonic() + delay,
            started=self.started,
            deadline=self.deadline,
            config=self._config,
        )
        if reason is not None or not self.spend_for(error):
            return None
        return delay

    # -- tenacity hooks (each takes tenacity's RetryCallState) ---------------------------

    def _retry(self, retry_state: _t.RetryCallState) -> bool:
        error = _failure(retry_state)
        if not (self._elsewhere or is_retryable(error, self._config)):
            return False
        self._decision = self._decide(error)
        return True

    def _stop(self, _retry_state: _t.RetryCallState) -> bool:
        return self._decision is None

    def _wait(self, _retry_state: _t.RetryCallState) -> float:
        return self._decision or 0.0

    def spend_for(self, error: BaseException) -> bool:
        """May a resend of ``error`` go out? Takes a budget token when it needs one.

        The tokens taken are remembered, so that `succeeded` gives them back.
        """
        if not spends_budget(error):
            return True
        if self._budget.try_spend():
            self._spent += 1
            return True
        return False

    def _log_retry(self, retry_state: _t.RetryCallState) -> None:
        if self.on_retry is not None:
            error = _failure(retry_state)
            assert isinstance(error, FriendliAPIError)  # noqa: S101  (after_failure takes only these)
            self.on_retry(error, self._decision or 0.0)
        if self._logger.isEnabledFor(logging.INFO):
            # The error's str names the status and the request id, never the token.
            self._logger.info(
                "retrying in %.2fs after attempt %d failed: %s",
                self._decision or 0.0,
                self._failures,
                _failure(retry_state),
            )


def _failure(state: _t.RetryCallState) -> BaseException:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    if error is None:  # pragma: no cover - tenacity only consults us after a failure
        raise RuntimeError("retry hook called without a failure")
    return error
