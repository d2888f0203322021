"""The retry policy of ``friendli_image._retry`` as tables of values: no socket, no sleep."""

from __future__ import annotations

import logging
import math
import random

import pytest
from multidict import CIMultiDict

from friendli_image import FriendliRateLimitError
from friendli_image._config import RetryConfig
from friendli_image._exceptions import (
    FriendliConnectionError,
    FriendliServerError,
    FriendliTimeoutError,
)
from friendli_image._retry import (
    RetryBudget,
    RetryState,
    backoff_delay,
    is_retryable,
    parse_retry_after,
    retry_wait,
    spends_budget,
    stop_reason,
)

#: Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date): "now" for the HTTP-date rows.
NOW = 784111777.0
#: A bound far beyond any sensible ``max_retry_after``: a hint this large stops retrying.
FAR = 1e6

# -- parse_retry_after against hostile headers -------------------------------------------

_HINTS: list[tuple[dict[str, str], float | None]] = [
    # delay-seconds: RFC 9110's 1*DIGIT, nothing else
    ({"Retry-After": "120"}, 120.0),
    ({"Retry-After": "0"}, 0.0),
    ({"Retry-After": "007"}, 7.0),
    ({"Retry-After": "0" * 60 + "5"}, 5.0),  # leading zeros are not a huge number
    ({"Retry-After": " 5\t"}, 5.0),
    ({"Retry-After": "-1"}, None),
    ({"Retry-After": "-0"}, None),
    ({"Retry-After": "+10"}, None),
    ({"Retry-After": "1e1"}, None),
    ({"Retry-After": "1E1"}, None),
    ({"Retry-After": "1e309"}, None),
    ({"Retry-After": "1_0"}, None),
    ({"Retry-After": "10.0"}, None),
    ({"Retry-After": "0.5"}, None),
    ({"Retry-After": ".5"}, None),
    ({"Retry-After": "0x10"}, None),
    ({"Retry-After": "5s"}, None),
    ({"Retry-After": "5 5"}, None),
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "NaN"}, None),
    ({"Retry-After": "inf"}, None),
    ({"Retry-After": "Infinity"}, None),
    ({"Retry-After": "\u0661\u0660"}, None),  # Arabic-Indic "10": float() reads it
    ({"Retry-After": "\uff11\uff10"}, None),  # fullwidth "10"
    ({"Retry-After": "\u00b2"}, None),  # superscript two
    ({"Retry-After": ""}, None),
    ({"Retry-After": "   "}, None),
    ({"Retry-After": "soon"}, None),
    ({"Retry-After": "x" * 10_000}, None),
    ({}, None),
    # HTTP-date: IMF-fixdate, the obsolete RFC 850 form, any case, any zone
    ({"Retry-After": "Sun, 06 Nov 1994 08:50:07 GMT"}, 30.0),
    ({"Retry-After": "sun, 06 nov 1994 08:50:07 gmt"}, 30.0),
    ({"Retry-After": "Sun, 06 Nov 1994 09:50:07 +0100"}, 30.0),
    ({"Retry-After": "Sunday, 06-Nov-94 08:50:07 GMT"}, 30.0),
    ({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}, None),  # now: nothing to wait
    ({"Retry-After": "Mon, 01 Jan 2001 00:00:00 GMT"}, 194195423.0),  # ahead of NOW
    ({"Retry-After": "Sat, 05 Nov 1994 08:49:37 GMT"}, None),  # a day past
    ({"Retry-After": "Sat, 01 Jan 100000 00:00:00 GMT"}, None),
    ({"Retry-After": "Mon, 32 Jan 2001 00:00:00 GMT"}, None),
    ({"Retry-After": "Sun, 06 Nov 1994 25:00:00 GMT"}, None),
    ({"Retry-After": "Sun, 99 Xyz 1994 08:50:07 GMT"}, None),
    ({"Retry-After": "Sun, 06 Nov 1994 08:50:07.5 GMT"}, None),
    ({"Retry-After": "Sun"}, None),
    # retry-after-ms: milliseconds with an optional fraction; read first
    ({"retry-after-ms": "150"}, 0.15),
    ({"retry-after-ms": "150.5"}, 0.1505),
    ({"retry-after-ms": " 250 "}, 0.25),
    ({"retry-after-ms": "0"}, 0.0),
    ({"retry-after-ms": "100", "Retry-After": "5"}, 0.1),
    ({"retry-after-ms": "1e4"}, None),
    ({"retry-after-ms": "1e4", "Retry-After": "2"}, 2.0),  # junk ms: Retry-After decides
    ({"retry-after-ms": "inf", "Retry-After": "junk"}, None),
    ({"retry-after-ms": "-5"}, None),
    ({"retry-after-ms": "-0"}, None),
    ({"retry-after-ms": ".5"}, None),
    ({"retry-after-ms": "5."}, None),
    ({"retry-after-ms": "250ms"}, None),
    ({"retry-after-ms": "\u0662\u0665\u0660"}, None),
    ({"retry-after-ms": "nan"}, None),
]


@pytest.mark.scenario(5)
@pytest.mark.parametrize(("headers", "seconds"), _HINTS, ids=lambda v: repr(v)[:48])
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    """Digits and dates give the wait in seconds; anything else gives None (use backoff)."""
    parsed = parse_retry_after(CIMultiDict(headers), now=NOW)
    if seconds is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(seconds)


_FAR_HINTS = [
    {"Retry-After": "300000000"},
    {"Retry-After": "1000000000"},
    {"Retry-After": "1000000000000"},
    {"Retry-After": "9" * 400},
    {"retry-after-ms": "1" + "0" * 30},
    {"retry-after-ms": "9" * 400 + ".5"},
    {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
]


@pytest.mark.scenario(5)
@pytest.mark.parametrize("headers", _FAR_HINTS, ids=lambda h: repr(h)[:40])
def test_every_hint_beyond_the_cap_stops_the_same_way(headers: dict[str, str]) -> None:
    """Hints of years, of 400 digits or of the year 9999 are finite, far, and stop the
    retries for the hint cap (once, 1000000000 counted as junk and was retried)."""
    hint = parse_retry_after(CIMultiDict(headers), now=NOW)
    assert hint is not None
    assert math.isfinite(hint)
    assert hint >= FAR
    error = FriendliRateLimitError("x", status=429, retry_after=hint)
    reason = stop_reason(
        error, counted_attempts=1, wake=0.0, started=0.0, deadline=None, config=RetryConfig()
    )
    assert reason == "retry_after"


# -- which failures are retried -----------------------------------------------------------


def _status(status: int, retry_after: float | None = None) -> FriendliServerError:
    return FriendliServerError("x", status=status, retry_after=retry_after)


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (_status(503), True),
        (_status(502), True),
        (_status(504), True),
        (FriendliServerError("x", status=408), False),  # as the official SDK: not retried
        (_status(500), False),
        (FriendliRateLimitError("x", status=429), True),
        (FriendliConnectionError("refused"), True),
        (FriendliConnectionError("tls", permanent=True), False),
        (FriendliConnectionError("dropped", maybe_processed=True), False),
        (FriendliConnectionError("idle", maybe_processed=True, stale_connection=True), True),
        (FriendliTimeoutError("connect", kind="connect"), True),
        (FriendliTimeoutError("read", kind="read", maybe_processed=True), False),
        (ValueError("not ours"), False),
    ],
)
def test_retryable_per_status_and_error(error: BaseException, retryable: bool) -> None:
    """Which failures the default policy retries."""
    assert is_retryable(error, RetryConfig()) is retryable


def test_ambiguous_failures_are_retried_only_when_asked() -> None:
    """retry_ambiguous resends a request the server may have read; reconnect_reused=False not."""
    dropped = FriendliConnectionError("x", maybe_processed=True)
    stale = FriendliConnectionError("x", maybe_processed=True, stale_connection=True)
    assert is_retryable(dropped, RetryConfig(retry_ambiguous=True))
    assert not is_retryable(stale, RetryConfig(reconnect_reused=False))


def test_retry_statuses_replace_the_default_set() -> None:
    """retry_statuses={500} retries a 500 and no longer a 503."""
    config = RetryConfig(retry_statuses={500})
    assert is_retryable(_status(500), config)
    assert not is_retryable(_status(503), config)


# -- how long to wait -------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered_within_bounds() -> None:
    """Backoff doubles from initial_delay, stops at max_delay, adds at most jitter."""
    config = RetryConfig(initial_delay=0.5, max_delay=4.0, jitter=0.25)
    rng = random.Random(1)
    for retry_number, floor in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        for _ in range(50):
            assert floor <= backoff_delay(retry_number, config, rng) <= floor + 0.25


@pytest.mark.parametrize(
    ("config", "waits"),
    [
        (RetryConfig(initial_delay=0.2, max_delay=1.0, jitter=0.0), [0.2, 0.4, 0.8, 1.0, 1.0]),
        (RetryConfig(initial_delay=0.05, max_delay=0.2, jitter=0.0), [0.05, 0.1, 0.2, 0.2, 0.2]),
        (RetryConfig(initial_delay=1.0, multiplier=3.0, jitter=0.0), [1.0, 3.0, 8.0, 8.0, 8.0]),
        (RetryConfig(initial_delay=0.0, jitter=0.0), [0.0] * 5),
    ],
)
def test_backoff_without_jitter_is_exact(config: RetryConfig, waits: list[float]) -> None:
    """Without jitter the waits are initial_delay x multiplier^n, capped at max_delay."""
    rng = random.Random(0)
    assert [backoff_delay(n, config, rng) for n in range(1, 6)] == pytest.approx(waits)


def test_a_server_hint_replaces_the_backoff() -> None:
    """With a Retry-After, the wait is the hint plus at most 0.25 s of jitter."""
    config = RetryConfig(jitter=1.0)
    wait = retry_wait(_status(503, retry_after=3.0), 1, config, random.Random(2))
    assert 3.0 <= wait <= 3.25


def test_a_server_hint_of_zero_is_honoured_not_backed_off() -> None:
    """Retry-After: 0 means "now": the wait is the jitter alone, not the backoff."""
    config = RetryConfig(initial_delay=5.0, jitter=0.0)
    assert retry_wait(_status(503, retry_after=0.0), 3, config, random.Random(0)) == 0.0


# -- when to stop -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"counted_attempts": 5}, "attempts"),
        ({"counted_attempts": 4}, None),
        ({"error": _status(503, retry_after=61.0)}, "retry_after"),
        ({"error": _status(503, retry_after=60.0)}, None),
        ({"wake": 121.0}, "max_elapsed"),
        ({"wake": 120.0}, None),
        ({"deadline": 10.0, "wake": 10.0}, "deadline"),
        ({"deadline": 10.0, "wake": 9.9}, None),
        ({"config": RetryConfig(max_elapsed=None), "wake": 1e6}, None),
        ({}, None),
    ],
)
def test_stop_reasons(kwargs: dict[str, object], reason: str | None) -> None:
    """Attempts, the hint cap, max_elapsed and Timeout.total each stop the retries."""
    arguments: dict[str, object] = {
        "error": _status(503),
        "counted_attempts": 1,
        "wake": 1.0,
        "started": 0.0,
        "deadline": None,
        "config": RetryConfig(),
    }
    arguments.update(kwargs)
    error = arguments.pop("error")
    assert stop_reason(error, **arguments) == reason  # type: ignore[arg-type]


# -- the retry budget -------------------------------------------------------------------


def test_budget_arithmetic() -> None:
    """Each call adds budget_ratio up to budget_cap; each spend takes one whole token."""
    config = RetryConfig(budget_ratio=0.5, budget_cap=2.0)
    budget = RetryBudget(1.0)
    assert budget.try_spend()
    assert not budget.try_spend()
    budget.deposit(config)
    assert not budget.try_spend()
    budget.deposit(config)
    assert budget.try_spend()
    for _ in range(10):
        budget.deposit(config)
    assert budget.tokens == 2.0


def test_a_successful_call_gets_its_retry_tokens_back() -> None:
    """botocore's refund: the retries of a call that succeeds cost the budget nothing."""
    config = RetryConfig(budget_ratio=0.0, budget_cap=3.0)
    budget = RetryBudget(3.0)
    state = RetryState(config, budget, random.Random(0), None, logging.getLogger("t"))
    resend = _status(503)
    assert state.spend_for(resend)
    assert state.spend_for(resend)
    assert budget.tokens == 1.0
    state.succeeded()
    assert budget.tokens == 3.0
    state.succeeded()  # nothing left to refund
    assert budget.tokens == 3.0


def test_an_empty_budget_refuses_a_paid_resend_but_not_a_free_one() -> None:
    """With no tokens, a 503 without a hint is not resent; a refused connection still is."""
    state = RetryState(
        RetryConfig(), RetryBudget(0.0), random.Random(0), None, logging.getLogger("t")
    )
    assert not state.spend_for(_status(503))
    assert state.spend_for(FriendliConnectionError("refused"))
    assert state.spend_for(_status(429, retry_after=1.0))


@pytest.mark.parametrize(
    ("error", "spends"),
    [
        (FriendliConnectionError("refused"), False),
        (_status(503, retry_after=1.0), False),
        (_status(503), True),
        (FriendliConnectionError("x", maybe_processed=True), True),
        (FriendliTimeoutError("read", kind="read", maybe_processed=True), True),
        (FriendliTimeoutError("connect", kind="connect"), False),
    ],
)
def test_what_spends_the_budget(error: BaseException, spends: bool) -> None:
    """Unsent requests and server-paced retries are free; other resends cost a token."""
    assert spends_budget(error) is spends
