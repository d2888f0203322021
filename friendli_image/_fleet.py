"""A fleet of endpoints behind one client: routing, adaptive limits, ejection, failover.

The client's retry loop asks the `Fleet` for an endpoint before each attempt and tells
it how the attempt went; everything else is decided here:

- **Routing**: of two endpoints drawn at random among those with a free slot, the one
  with the smaller share of its slots in use per unit of weight (P2C least-utilised, as
  Envoy's and SGLang's least-request with the slots as the denominator). Only when no
  endpoint has a slot it knows to be free does a request go to one that is probing for
  another; when none can take it, it waits here, in the client, for the first slot that
  frees anywhere (work-conserving: no request queues in a server while a slot is idle).
- **Limits learned from latency** (``FleetConfig.learn_limits``): a GPU container queues
  what it cannot start, so queueing shows as latency above the endpoint's no-load
  latency. Each endpoint keeps the latency of requests by the number in flight on it
  when they were sent (its *level*); the lowest is its no-load latency. The level at its
  limit is judged: within ``_TOLERANCE`` of the no-load latency, the limit rises (it
  doubles until queueing is first seen, then one more slot is probed every few rounds);
  above it, the limit falls at once to ``limit * no_load / latency`` (Little's law: the
  slots that serve that latency). This is the gradient of Netflix's concurrency-limits
  (``Gradient2Limit``) and Envoy's adaptive concurrency filter, with a Vegas-style
  probe of one slot (TCP Vegas; ``VegasLimit``), tuned to keep a queue of zero rather
  than a few: an image takes seconds of GPU, a queued one doubles its latency.
  On 429/503 the limit shrinks by 0.7 at most once per round (AIMD); a ``Retry-After``
  holds only the endpoint that sent it. ``Endpoint.max_connections`` caps the limit.
- **Ejection**: ``failures_to_eject`` consecutive failures that are the endpoint's
  doing (a connection failure, a reset, a timeout, a 5xx, a 200 whose body is not an
  image) eject an endpoint for ``base_ejection * 2**(n-1)`` seconds (n: its recent
  ejections, capped at ``max_ejection``), never more than ``max_ejected_share`` of the
  fleet at once. When the time is up one request probes it; a success returns it to
  full load. An endpoint ejected because it refused connections is checked with a TCP
  connect every ``_REVIVE_CHECK`` seconds: once it accepts, its ejection ends early and
  the next request probes it (no request is spent on a dead endpoint, none waits long
  for a revived one).
- **Failover** (`failover_kind`): what may go to another endpoint at once, and why.

The decisions are plain functions (`failover_kind`, `failure_kind`, `ejection_time`,
`ejectable`, `choose`) so they are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import aiohttp
import attrs
from yarl import URL

from ._batch_models import EndpointStats
from ._config import RetryConfig, check_count, check_server_url
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliTimeoutError,
    FriendliValidationError,
)

__all__ = [
    "Endpoint",
    "EndpointState",
    "Failover",
    "Fleet",
    "FleetConfig",
    "choose",
    "ejectable",
    "ejection_time",
    "failover_kind",
    "failure_kind",
    "parse_servers",
]

#: Multiplicative decrease of an endpoint's limit on 429/503 (as the batch gate's).
_DECREASE: Final = 0.7
#: Latencies kept per endpoint for the percentiles.
_LATENCY_WINDOW: Final = 512
#: Dead-endpoint checks are shared by the failures that arrive within this window.
_DEAD_CHECK_REUSE: Final = 0.5
#: The latency at an endpoint's limit may exceed its no-load latency by this share before
#: it counts as queueing (above the jitter of a GPU's step time; one request queued
#: behind 4 slots adds 25 %, behind 8 adds 12.5 %).
_TOLERANCE: Final = 0.15
#: Weight of a new sample in a level's moving average of latency.
_SMOOTHING: Final = 0.25
#: Samples that judge a level: half the level, up to this many.
_JUDGE_SAMPLES: Final = 8
#: Rounds (limit-many successes) between probes of one more slot: the first after a
#: failed probe, doubled per failed probe up to the last.
_PROBE_ROUNDS: Final = (2, 32)
#: Seconds between TCP checks of an endpoint ejected for refusing connections.
_REVIVE_CHECK: Final = 0.25


def _positive_number(name: str, *, allow_zero: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(_instance: object, _attribute: object, value: object) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not allow_zero)
        ):
            raise FriendliValidationError(name, f"must be a positive number, got {value!r}")

    return check


def _count(name: str, *, optional: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(_instance: object, _attribute: object, value: object) -> None:
        if value is None and optional:
            return
        check_count(name, value)

    return check


def _flag(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: object, _attribute: object, value: object) -> None:
        if not isinstance(value, bool):
            raise FriendliValidationError(name, f"must be True or False, got {value!r}")

    return check


def _url(value: object) -> str:
    return check_server_url(value, "server_url")


@attrs.frozen
class Endpoint:
    """One server of a fleet, with its routing weight and its own connection limit.

    Pass a list of these (or of URL strings) as ``server_url=``.

    Attributes:
        url: the server's base URL.
        weight: its share of the load relative to the others (2.0 takes twice the
            requests of 1.0 at equal latency).
        max_connections: the most requests in flight on it at once (default: the
            client's ``max_connections``).
    """

    url: str = attrs.field(converter=_url)
    weight: float = attrs.field(default=1.0, validator=_positive_number("weight"))
    max_connections: int | None = attrs.field(
        default=None, validator=_count("max_connections", optional=True)
    )


@attrs.frozen(kw_only=True)
class FleetConfig:
    """How a client with several endpoints balances, ejects and probes them.

    Attributes:
        failures_to_eject: consecutive failures of the endpoint's doing (connection
            failures, resets, timeouts, 5xx, 2xx bodies that are not an image) that eject
            it.
        base_ejection: seconds of the first ejection; each further ejection of the same
            endpoint doubles it, up to ``max_ejection``.
        max_ejection: the longest ejection, in seconds.
        max_ejected_share: the largest share of the fleet ejected at once (0.5 of 4
            endpoints: 2); an endpoint over the share stays in rotation.
        start_limit: each endpoint's first in-flight limit; it doubles per round of
            successes without queueing up to the endpoint's ``max_connections``.
        learn_limits: learn each endpoint's in-flight limit from its latency (the
            default): the limit settles where the endpoint runs everything it gets at
            once, and requests beyond it wait in the client for the first free slot. Set
            ``max_connections`` per `Endpoint` to bound it. False: limits move only on
            429/503 (for servers whose latency grows with load even when not full, such
            as those that batch requests together).
        health_path: a path to ``GET`` on every endpoint every ``health_interval``
            seconds (e.g. ``"/health"``); any status but 200, or no answer within
            ``health_timeout``, ejects the endpoint, and a 200 returns an ejected one
            to rotation, unless it was ejected for answers that were no image (its
            health route says nothing of those: that ejection runs its time). None
            (the default): no active probe; the container's API has no documented
            health route.
        health_interval: seconds between two active probes of an endpoint.
        health_timeout: seconds an active probe may take.
    """

    failures_to_eject: int = attrs.field(default=5, validator=_count("failures_to_eject"))
    base_ejection: float = attrs.field(default=1.0, validator=_positive_number("base_ejection"))
    max_ejection: float = attrs.field(default=30.0, validator=_positive_number("max_ejection"))
    max_ejected_share: float = attrs.field(
        default=0.5,
        validator=_positive_number("max_ejected_share", allow_zero=True),
    )
    start_limit: int = attrs.field(default=4, validator=_count("start_limit"))
    learn_limits: bool = attrs.field(default=True, validator=_flag("learn_limits"))
    health_path: str | None = None
    health_interval: float = attrs.field(default=5.0, validator=_positive_number("health_interval"))
    health_timeout: float = attrs.field(default=2.0, validator=_positive_number("health_timeout"))

    def __attrs_post_init__(self) -> None:
        if self.max_ejected_share > 1:
            raise FriendliValidationError(
                "max_ejected_share", f"must be within [0, 1], got {self.max_ejected_share!r}"
            )
        if self.health_path is not None and not (
            isinstance(self.health_path, str) and self.health_path.startswith("/")
        ):
            raise FriendliValidationError(
                "health_path", f"must be a path starting with '/', got {self.health_path!r}"
            )


def parse_servers(value: str | Sequence[str | Endpoint]) -> list[Endpoint]:
    """The endpoints ``server_url=`` names: a URL, a comma-separated list, or a sequence."""
    if isinstance(value, str):
        parts: Sequence[str | Endpoint] = [part for part in value.split(",") if part.strip()]
        if not parts:
            raise FriendliValidationError("server_url", f"must name a URL, got {value!r}")
    elif isinstance(value, Sequence):
        parts = value
        if not parts:
            raise FriendliValidationError("server_url", "must name at least one URL, got []")
    else:
        raise FriendliValidationError(
            "server_url",
            f"must be a URL, a comma-separated list of URLs or a list of URLs and Endpoints, "
            f"got {type(value).__name__}",
        )
    endpoints = [part if isinstance(part, Endpoint) else Endpoint(part) for part in parts]
    urls = [endpoint.url for endpoint in endpoints]
    if len(set(urls)) != len(urls):
        raise FriendliValidationError("server_url", f"names an endpoint twice: {urls}")
    return endpoints


# -- the pure decisions ------------------------------------------------------------------

Failover: TypeAlias = Literal["unsent", "busy", "maybe_dead", "bad_answer"]


def failover_kind(error: FriendliAPIError, config: RetryConfig) -> Failover | None:
    """May this failure go to another endpoint at once, before the retry policy?

    - ``"unsent"``: the request never reached the server (refused, DNS, connect
      timeout): any other endpoint may take it, at once, free of the retry budget.
    - ``"busy"``: 429 or 503 (when retried at all): another endpoint with capacity may
      take it at once; the budget is spent as for any retry.
    - ``"maybe_dead"``: the connection broke after the request was sent. If the
      endpoint now refuses connections, it died and the work died with it: another
      endpoint takes the request (flagged ``maybe_duplicated``). If it still accepts
      them, a live server dropped one connection and the retry policy decides, as
      for a single server (not resent unless ``retry_ambiguous``).
    - ``"bad_answer"``: the endpoint answered 2xx with a body that is not an image (not
      JSON, no ``image``, bad base64, over the size cap). It finished the request and
      holds nothing back, so another endpoint takes it at once (the result is flagged
      ``maybe_duplicated``: the work ran where the answer broke). When every endpoint
      was tried in the round (one was full a moment ago), the policy's next attempt goes
      to one that has not answered the call so. Resending it to the same server would
      get the same answer, so a single server does not.
    - None: the retry policy decides (other 5xx, timeouts after sending, 4xx).
    """
    if isinstance(error, FriendliResponseError):
        return "bad_answer"
    if isinstance(error, FriendliConnectionError):
        if error.permanent:
            return None
        if not error.maybe_processed:
            return "unsent"
        if isinstance(error, FriendliTimeoutError):
            return None  # a slow server is not a dead one
        return "maybe_dead"
    if (
        isinstance(error, FriendliAPIStatusError)
        and error.status in (429, 503)
        and error.status in config.retry_statuses
    ):
        return "busy"
    return None


def failure_kind(error: FriendliAPIError) -> str:
    """The key ``EndpointStats.failures`` counts ``error`` under."""
    if isinstance(error, FriendliConnectionError):
        if not error.maybe_processed:
            return "connect"
        return "timeout" if isinstance(error, FriendliTimeoutError) else "dropped"
    if isinstance(error, FriendliAPIStatusError):
        if error.status in (429, 503):
            return f"status_{error.status}"
        return "status_5xx" if error.status >= 500 else "status_4xx"
    return "response"


def _ejects(kind: str) -> bool:
    """Does a failure of this kind count toward ejecting its endpoint?"""
    return kind in ("connect", "timeout", "dropped", "status_503", "status_5xx", "response")


def ejection_time(ejections: int, config: FleetConfig) -> float:
    """How long ejection number ``ejections`` (1 = the first) lasts."""
    return float(min(config.max_ejection, config.base_ejection * 2 ** max(0, ejections - 1)))


def ejectable(ejected: int, size: int, config: FleetConfig) -> bool:
    """May one more endpoint be ejected while ``ejected`` of ``size`` are?"""
    return ejected + 1 <= math.floor(size * config.max_ejected_share + 1e-9)


def choose(candidates: Sequence[EndpointState], rng: random.Random) -> EndpointState | None:
    """Of two random candidates, the one with the smaller share of its slots in use per
    weight (with one more request on each)."""
    count = len(candidates)
    if count == 0:
        return None
    if count == 1:
        return candidates[0]
    first, second = rng.sample(range(count), 2)
    a, b = candidates[first], candidates[second]
    load_a = (a.taken + 1) / (a.weight * a.capacity)
    load_b = (b.taken + 1) / (b.weight * b.capacity)
    return a if load_a <= load_b else b


# -- the state -----------------------------------------------------------------------------


class EndpointState:
    """One endpoint's live state: in flight, limit, counters, ejection (loop-confined).

    ``limit`` is the most requests in flight on it; ``capacity`` the part of it known to
    run at once (the rest is a probe of one more slot, taken only by requests that would
    otherwise wait). Without ``learn``, both move only on 429/503.
    """

    __slots__ = (
        "_urls",
        "cap",
        "capacity",
        "consecutive",
        "counts",
        "dead_check",
        "dead_checked_at",
        "decreased",
        "ejected_until",
        "ejections",
        "epoch",
        "failures",
        "healthy_since",
        "hold_until",
        "in_flight",
        "latencies",
        "learn",
        "levels",
        "limit",
        "probe_after",
        "probe_rounds",
        "probing",
        "queueing_seen",
        "refused",
        "reserved",
        "spread",
        "successes",
        "url",
        "weight",
        "wrong_answers",
    )

    def __init__(
        self, endpoint: Endpoint, cap: int, start_limit: int, *, learn: bool = True
    ) -> None:
        self.url = endpoint.url
        self.weight = float(endpoint.weight)
        self.cap = cap
        self.limit = float(min(cap, start_limit))
        self.capacity = int(self.limit)
        self.learn = learn
        self.decreased = False
        self.in_flight = 0
        #: Slots handed to waiting requests that have not resumed to send yet.
        self.reserved = 0
        self.epoch = 0
        self.successes = 0
        self.failures: dict[str, int] = {}
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        #: Moving average of latency by the number in flight when the request was sent.
        self.levels: dict[int, float] = {}
        self.counts: dict[int, int] = {}  # samples per level since it was last forgotten
        self.spread = 0.0
        self.queueing_seen = False  # False: slow start (the limit doubles)
        self.probe_after = 0  # successes before the next probe of one more slot
        self.probe_rounds = _PROBE_ROUNDS[0]
        self.consecutive = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy_since = 0.0
        self.probing = False
        self.refused = False  # ejected for refusing connections: checked for revival
        self.wrong_answers = False  # ejected for answers with no image: no probe ends it
        self.hold_until = 0.0
        self.dead_check: asyncio.Future[bool] | None = None
        self.dead_checked_at = 0.0
        self._urls: dict[str, URL] = {}

    def learn_from(self, level: int, latency: float) -> bool:
        """Learn from a success sent with ``level`` in flight here (itself included).

        Returns True when the limit rose (waiting requests may now go here).
        """
        levels, counts = self.levels, self.counts
        count = counts[level] = counts.get(level, 0) + 1
        known = levels.get(level)
        if known is None:
            levels[level] = latency
        else:
            # The spread of latencies about their level's mean (a share of it): how far
            # one sample may stray without meaning anything.
            self.spread += _SMOOTHING * (abs(latency - known) / known - self.spread)
            # A plain mean of a level's first samples, then a moving one.
            levels[level] = known + max(_SMOOTHING, 1 / count) * (latency - known)
        top = max(1, int(self.limit))
        if level > top or count < min(_JUDGE_SAMPLES, max(1, level // 2)):
            return False  # sent before the limit fell, or not enough seen at this level yet
        # The judged level's latency at its least and the no-load latency at its most,
        # given the spread: one lucky or unlucky draw neither raises nor lowers a limit.
        at_level = levels[level] * (1 - self.spread / math.sqrt(count))
        no_load = min(mean * (1 + self.spread / math.sqrt(counts[n])) for n, mean in levels.items())
        if at_level > no_load * (1 + _TOLERANCE):
            # Queueing: back to the slots that serve this latency (Little's law), and
            # the next probe later, each failed probe twice as late.
            slots = max(1, min(level - 1, int(level * no_load / levels[level] + 0.5)))
            if self.queueing_seen and level == self.capacity + 1:
                # A failed probe says only that this one slot more queues.
                slots = self.capacity
                self.probe_rounds = min(_PROBE_ROUNDS[1], self.probe_rounds * 2)
            self.queueing_seen = True
            self._settle(slots)
            return False
        if level < top:
            return False  # only a request sent at the limit says the limit is right
        if top > self.capacity:
            self.probe_rounds = _PROBE_ROUNDS[0]  # a probe found one more slot
        self.capacity = top  # no queue at the limit: it is all capacity
        if top >= self.cap:
            return False
        if not self.queueing_seen:
            raised = min(self.cap, top * 2)
        elif self.successes >= self.probe_after:
            raised = top + 1
        else:
            return False
        self.limit = float(raised)
        self._forget(above=top)  # the new limit is measured afresh
        return True

    def _settle(self, slots: int) -> None:
        """Set the limit and the capacity to ``slots``; probe again some rounds later."""
        self.limit = float(slots)
        self.capacity = slots
        self.probe_after = self.successes + self.probe_rounds * slots
        self._forget(above=slots)

    def _forget(self, *, above: int | None = None, below: int | None = None) -> None:
        """Drop what was measured at the levels above or below one."""
        for stale in [
            n
            for n in self.levels
            if (above is not None and n > above) or (below is not None and n < below)
        ]:
            del self.levels[stale]
            del self.counts[stale]

    def slow_down(self) -> None:
        """A 429/503 in the current round: the limit shrinks (at most once per round)."""
        self.limit = max(1.0, self.limit * _DECREASE)
        self.decreased = True
        self.epoch += 1
        if self.learn:
            self.queueing_seen = True
            self._settle(max(1, int(self.limit)))
        else:
            self.capacity = max(1, int(self.limit))

    def speed_up(self) -> None:
        """A success without learning: +1 per success (doubling per round) until the
        first 429/503, then +1 per round."""
        if self.limit < self.cap:
            step = 1.0 if not self.decreased else 1.0 / self.limit
            self.limit = min(float(self.cap), self.limit + step)
            self.capacity = max(1, int(self.limit))

    def url_for(self, path: str, build: Callable[[str, str], URL] | None = None) -> URL:
        """The URL of ``path`` on this endpoint, made once (by ``build``, if given)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = (
                URL(self.url + path) if build is None else build(self.url, path)
            )
        return url

    def ejected(self, now: float) -> bool:
        """Is the endpoint out of rotation at ``now``?"""
        return now < self.ejected_until

    def room(self, now: float) -> int:
        """How many more requests it can take at ``now``."""
        if now < self.ejected_until or now < self.hold_until:
            return 0
        if self.probing:
            return 1 if self.taken == 0 else 0
        return max(0, max(1, int(self.limit)) - self.taken)

    def available(self, now: float) -> bool:
        """Can it take one more request at ``now``?"""
        return self.room(now) > 0

    def free(self, now: float) -> bool:
        """Has it a slot known to run a request at once (not only a probe's)?"""
        return self.available(now) and (self.probing or self.taken < self.capacity)

    @property
    def taken(self) -> int:
        """Its slots in use: requests in flight and slots handed to waiting ones."""
        return self.in_flight + self.reserved

    def stats(self, now: float) -> EndpointStats:
        """A snapshot of this endpoint."""
        ordered = sorted(self.latencies)
        return EndpointStats(
            url=self.url,
            weight=self.weight,
            in_flight=self.in_flight,
            limit=max(1, int(self.limit)),
            max_connections=self.cap,
            successes=self.successes,
            failures=dict(self.failures),
            latency_p50=_percentile(ordered, 0.50),
            latency_p95=_percentile(ordered, 0.95),
            ejected_until=self.ejected_until if now < self.ejected_until else None,
            ejections=self.ejections,
        )

    def __repr__(self) -> str:
        return f"<endpoint {self.url} in_flight={self.in_flight} limit={int(self.limit)}>"


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@attrs.define(eq=False)
class _Waiter:
    """A request waiting for a slot, and where it may go."""

    handed: asyncio.Future[EndpointState]
    exclude: Collection[EndpointState]
    strict: bool


class Fleet:
    """The endpoints of one client and the decisions about them (one event loop at a time)."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        default_cap: int,
        config: FleetConfig,
        rng: random.Random | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        connects: Callable[[URL, float], Awaitable[bool | None]] | None = None,
    ) -> None:
        """``clock`` and ``connects`` (does a TCP connection to a URL succeed: True, get
        refused: False, or neither: None) are the fleet's view of time and of the network;
        a simulation replaces both."""
        self.config = config
        self.endpoints = [
            EndpointState(
                endpoint,
                endpoint.max_connections if endpoint.max_connections is not None else default_cap,
                config.start_limit,
                learn=config.learn_limits,
            )
            for endpoint in endpoints
        ]
        self._rng = rng or random.Random()  # noqa: S311  (load balancing, not secrets)
        self._clock = clock
        self._connects = connects or _connects
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._health: asyncio.Task[None] | None = None
        self._revival: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.endpoints)

    def snapshot(self) -> tuple[EndpointStats, ...]:
        """Every endpoint's stats, in the order they were given."""
        now = self._clock()
        return tuple(endpoint.stats(now) for endpoint in self.endpoints)

    # -- routing ---------------------------------------------------------------------

    def _choose(self, now: float, exclude: Collection[EndpointState]) -> EndpointState | None:
        free = [e for e in self.endpoints if e not in exclude and e.free(now)]
        if free:
            return choose(free, self._rng)
        # Only a probe's slot is left: a request that would otherwise wait takes it.
        return choose(
            [e for e in self.endpoints if e not in exclude and e.available(now)], self._rng
        )

    def pick(
        self, exclude: Collection[EndpointState] = (), *, strict: bool = False
    ) -> EndpointState | None:
        """An endpoint that can take a request now, preferring those not in ``exclude``
        (``strict``: only those)."""
        now = self._clock()
        found = self._choose(now, exclude)
        if found is None and exclude and not strict:
            found = self._choose(now, ())
        return found

    def has_capacity(self, exclude: Collection[EndpointState]) -> bool:
        """Can an endpoint not in ``exclude`` take a request now?"""
        now = self._clock()
        return any(e not in exclude and e.available(now) for e in self.endpoints)

    def has_other(self, exclude: Collection[EndpointState]) -> bool:
        """Is an endpoint not in ``exclude`` in rotation (busy or not)?"""
        now = self._clock()
        return any(e not in exclude and not e.ejected(now) for e in self.endpoints)

    def has_unheld(self, exclude: Collection[EndpointState]) -> bool:
        """Is an endpoint not in ``exclude`` in rotation and not held by a ``Retry-After``?"""
        now = self._clock()
        return any(
            e not in exclude and not e.ejected(now) and now >= e.hold_until for e in self.endpoints
        )

    async def acquire(
        self, exclude: Collection[EndpointState] = (), *, strict: bool = False
    ) -> EndpointState:
        """Wait for an endpoint that can take the request; count it in flight there.

        Endpoints in ``exclude`` are taken only when no other can take it now, and never
        when ``strict`` (a failover: the request must go elsewhere). When none can take
        it, it waits for the first slot that frees on any endpoint. Waiting requests are
        served first come, first served: a freed slot goes to the oldest one that may
        take it before a request that arrives later can pick it (a failover bound to a
        few endpoints is not starved by new requests).
        """
        if not self._waiters:
            endpoint = self.pick(exclude, strict=strict)
            if endpoint is not None:
                endpoint.in_flight += 1
                return endpoint
        waiter: asyncio.Future[EndpointState] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(waiter, exclude, strict))
        self._hand_over()  # behind waiters that cannot take the free slot it can
        try:
            endpoint = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                waiter.result().reserved -= 1
                self._hand_over()  # its slot goes to the next one
            else:
                self._waiters = deque(w for w in self._waiters if w.handed is not waiter)
            raise
        # Counted in flight only now, as it is sent: a request that took a slot
        # meanwhile and is sent first must not count it among those ahead of it.
        endpoint.reserved -= 1
        endpoint.in_flight += 1
        return endpoint

    def _next_change(self) -> float | None:
        """Seconds until an ejection or a ``Retry-After`` hold ends, if one is pending."""
        now = self._clock()
        ends = [end for e in self.endpoints for end in (e.ejected_until, e.hold_until) if end > now]
        return min(ends) - now + 0.001 if ends else None

    def _hand_over(self) -> None:
        """Give free slots to the waiting requests, oldest first, each where it may go;
        one that can go nowhere yet keeps its place and holds up none behind it."""
        for waiter in list(self._waiters):
            if not self.has_capacity(()):
                break
            endpoint = self.pick(waiter.exclude, strict=waiter.strict)
            if endpoint is not None:
                endpoint.reserved += 1
                self._waiters.remove(waiter)
                waiter.handed.set_result(endpoint)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # No slot frees when an ejection or a hold ends: a timer hands over then.
        wake = self._next_change() if self._waiters else None
        if wake is not None:
            self._timer = asyncio.get_running_loop().call_later(wake, self._hand_over)

    # -- outcomes --------------------------------------------------------------------

    def succeeded(self, endpoint: EndpointState, latency: float, level: int) -> None:
        """An attempt on ``endpoint`` returned an image after ``latency`` seconds; it was
        sent with ``level`` requests in flight there (itself included)."""
        endpoint.in_flight -= 1
        endpoint.successes += 1
        endpoint.latencies.append(latency)
        endpoint.consecutive = 0
        endpoint.probing = False
        endpoint.refused = False
        endpoint.wrong_answers = False
        if endpoint.learn:
            endpoint.learn_from(level, latency)
        else:
            endpoint.speed_up()
        if endpoint.ejections:
            now = self._clock()
            # A long healthy stretch forgives one ejection: repeat offenders grow,
            # an endpoint that recovered for good does not keep its long ejections.
            if now - endpoint.healthy_since > ejection_time(endpoint.ejections, self.config) * 4:
                endpoint.ejections -= 1
                endpoint.healthy_since = now
        self._hand_over()

    def failed(self, endpoint: EndpointState, epoch: int, error: FriendliAPIError) -> None:
        """An attempt on ``endpoint`` (admitted in ``epoch``) failed with ``error``."""
        endpoint.in_flight -= 1
        kind = failure_kind(error)
        endpoint.failures[kind] = endpoint.failures.get(kind, 0) + 1
        now = self._clock()
        if kind in ("status_429", "status_503"):
            if epoch == endpoint.epoch and now >= endpoint.hold_until:
                endpoint.slow_down()
            hint = error.retry_after if isinstance(error, FriendliAPIStatusError) else None
            if hint:
                endpoint.hold_until = max(endpoint.hold_until, now + hint)
        if _ejects(kind):
            endpoint.consecutive += 1
            if endpoint.probing or endpoint.consecutive >= self.config.failures_to_eject:
                self.eject(endpoint, now, refused=kind == "connect", wrong=kind == "response")
        else:
            endpoint.consecutive = 0
        self._hand_over()

    def abandoned(self, endpoint: EndpointState) -> None:
        """An attempt on ``endpoint`` was cancelled: no outcome to learn from."""
        endpoint.in_flight -= 1
        self._hand_over()

    def eject(
        self,
        endpoint: EndpointState,
        now: float | None = None,
        *,
        refused: bool = False,
        wrong: bool = False,
    ) -> bool:
        """Take ``endpoint`` out of rotation (unless the ejected share is full).

        ``refused``: it refuses connections; it is checked for revival meanwhile.
        ``wrong``: it answered with no image; the health probe does not end this
        ejection.
        """
        now = self._clock() if now is None else now
        if endpoint.ejected(now):
            if refused:
                endpoint.refused = True
                self._watch_revival()
            return True
        ejected = sum(1 for e in self.endpoints if e.ejected(now))
        if not ejectable(ejected, len(self.endpoints), self.config):
            return False
        endpoint.ejections += 1
        endpoint.ejected_until = now + ejection_time(endpoint.ejections, self.config)
        endpoint.healthy_since = endpoint.ejected_until
        endpoint.probing = True
        endpoint.consecutive = 0
        endpoint.refused = refused
        endpoint.wrong_answers = wrong
        if refused:
            self._watch_revival()
        return True

    def restore(self, endpoint: EndpointState) -> None:
        """A check found ``endpoint`` healthy: one request probes it now."""
        endpoint.refused = False
        if endpoint.ejected_until > self._clock():
            endpoint.ejected_until = 0.0
            self._hand_over()

    def _watch_revival(self) -> None:
        """Check endpoints ejected for refusing connections, on the running loop."""
        if self._revival is not None and not self._revival.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a decision tested alone): the ejection simply runs out
        self._revival = loop.create_task(self._revive())

    async def _revive(self) -> None:
        """Until none is left: every `_REVIVE_CHECK` s, a TCP connect to each endpoint
        ejected for refusing connections; one that accepts is probed by the next request.

        A connect is no request: a dead endpoint costs no call a failover, and a revived
        one gets work a fraction of a second after it listens again, however long its
        ejection had grown.
        """
        while True:
            now = self._clock()
            watched = [e for e in self.endpoints if e.refused and e.ejected(now)]
            if not watched:
                return
            answers = await asyncio.gather(
                *(self._connects(e.url_for(""), _REVIVE_CHECK * 2) for e in watched)
            )
            for endpoint, accepts in zip(watched, answers, strict=True):
                if accepts and endpoint.refused:
                    self.restore(endpoint)
            await asyncio.sleep(_REVIVE_CHECK)

    async def is_dead(self, endpoint: EndpointState, timeout: float) -> bool:
        """Does ``endpoint`` refuse new connections (checked once for concurrent callers)?"""
        loop = asyncio.get_running_loop()
        check = endpoint.dead_check
        if check is None or (
            check.done() and self._clock() - endpoint.dead_checked_at > _DEAD_CHECK_REUSE
        ):
            check = endpoint.dead_check = loop.create_future()
            endpoint.dead_checked_at = self._clock()
            dead = False
            try:
                dead = await self._connects(endpoint.url_for(""), timeout) is False
            finally:
                endpoint.dead_checked_at = self._clock()
                # Set even when this caller is cancelled: others wait on the result.
                check.set_result(dead)
            if dead:
                self.eject(endpoint, refused=True)
            return dead
        return await asyncio.shield(check)

    # -- the active health probe ---------------------------------------------------------

    def start_health(
        self, session: aiohttp.ClientSession, headers: Callable[[], Mapping[str, str]]
    ) -> None:
        """Start the active probe on the running loop, when ``health_path`` is set.

        Each probe sends ``headers()`` (the client's own headers and credentials: an
        endpoint behind an authenticating proxy answers its health route only with them).
        """
        if self.config.health_path is None or (self._health and not self._health.done()):
            return
        self._health = asyncio.get_running_loop().create_task(self._probe_forever(session, headers))

    async def stop_health(self) -> None:
        """Stop the active probe and the revival checks (idempotent)."""
        for task in (self._health, self._revival):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._health = self._revival = None

    async def _probe_forever(
        self, session: aiohttp.ClientSession, headers: Callable[[], Mapping[str, str]]
    ) -> None:
        config = self.config
        assert config.health_path is not None  # noqa: S101  (started only with one)
        timeout = aiohttp.ClientTimeout(total=config.health_timeout)
        while not session.closed:
            sent = headers()
            await asyncio.gather(
                *(
                    self._probe(session, e, config.health_path, timeout, sent)
                    for e in self.endpoints
                )
            )
            await asyncio.sleep(config.health_interval)

    async def _probe(
        self,
        session: aiohttp.ClientSession,
        endpoint: EndpointState,
        path: str,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
    ) -> None:
        healthy = False
        # RuntimeError: the session closed under the probe (the client is closing).
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError):
            async with session.get(
                endpoint.url_for(path), headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                healthy = response.status == 200
        key = "health"
        if healthy:
            # A 200 says the process is up, which its wrong answers showed already.
            if not endpoint.wrong_answers:
                self.restore(endpoint)
        else:
            endpoint.failures[key] = endpoint.failures.get(key, 0) + 1
            self.eject(endpoint)


async def _connects(url: URL, timeout: float) -> bool | None:
    """Does a TCP connection to ``url``'s host and port succeed (True), get refused
    (False), or neither (None: unreachable for another reason, not proof it died)?"""
    host, port = url.host, url.port
    if host is None or port is None:
        return None
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), port), timeout
        )
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    except (OSError, asyncio.TimeoutError):
        return None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
