"""A fleet of endpoints behind one client: routing, adaptive limits, ejection, failover.

The client's retry loop asks the `Fleet` for an endpoint before each attempt and tells
it how the attempt went; everything else is decided here:

- **Routing**: of two endpoints drawn at random among those that can take a request,
  the one with fewer requests outstanding per unit of weight (P2C least-request, as in
  Envoy and SGLang's router).
- **Limits**: each endpoint has an in-flight limit that starts small and doubles per
  round of successes up to its cap (slow start), shrinks by 0.7 at most once per round
  on 429/503 and then grows back by one per round (AIMD). A ``Retry-After`` holds only
  the endpoint that sent it.
- **Ejection**: ``failures_to_eject`` consecutive failures that are the endpoint's
  doing (a connection failure, a reset, a timeout, a 5xx, a 200 whose body is not an
  image) eject an endpoint for ``base_ejection * 2**(n-1)`` seconds (n: its recent
  ejections, capped at ``max_ejection``), never more than ``max_ejected_share`` of the
  fleet at once. When the time is up one request probes it; a success returns it to
  full load.
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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import aiohttp
import attrs
from yarl import URL

from ._config import RetryConfig, check_count, check_server_url
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliTimeoutError,
    FriendliValidationError,
)
from ._models import EndpointStats

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
            successes up to the endpoint's ``max_connections``.
        health_path: a path to ``GET`` on every endpoint every ``health_interval``
            seconds (e.g. ``"/health"``); any status but 200, or no answer within
            ``health_timeout``, ejects the endpoint, and a 200 returns an ejected one
            to rotation. None (the default): no active probe; the container's API has
            no documented health route.
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
      ``maybe_duplicated``: the work ran where the answer broke). Resending it to the
      same server would get the same answer, so a single server does not.
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
    """Of two random candidates, the one with fewer requests outstanding per weight."""
    count = len(candidates)
    if count == 0:
        return None
    if count == 1:
        return candidates[0]
    first, second = rng.sample(range(count), 2)
    a, b = candidates[first], candidates[second]
    load_a = (a.in_flight + 1) / a.weight
    load_b = (b.in_flight + 1) / b.weight
    return a if load_a <= load_b else b


# -- the state -----------------------------------------------------------------------------


class EndpointState:
    """One endpoint's live state: in flight, limit, counters, ejection (loop-confined)."""

    __slots__ = (
        "_urls",
        "cap",
        "consecutive",
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
        "limit",
        "probing",
        "successes",
        "url",
        "weight",
    )

    def __init__(self, endpoint: Endpoint, cap: int, start_limit: int) -> None:
        self.url = endpoint.url
        self.weight = float(endpoint.weight)
        self.cap = cap
        self.limit = float(min(cap, start_limit))
        self.decreased = False
        self.in_flight = 0
        self.epoch = 0
        self.successes = 0
        self.failures: dict[str, int] = {}
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.consecutive = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy_since = 0.0
        self.probing = False
        self.hold_until = 0.0
        self.dead_check: asyncio.Future[bool] | None = None
        self.dead_checked_at = 0.0
        self._urls: dict[str, URL] = {}

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

    def available(self, now: float) -> bool:
        """Can it take one more request at ``now``?"""
        if now < self.ejected_until or now < self.hold_until:
            return False
        if self.probing:
            return self.in_flight == 0
        return self.in_flight < max(1, int(self.limit))

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


class Fleet:
    """The endpoints of one client and the decisions about them (one event loop at a time)."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        default_cap: int,
        config: FleetConfig,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.endpoints = [
            EndpointState(
                endpoint,
                endpoint.max_connections if endpoint.max_connections is not None else default_cap,
                config.start_limit,
            )
            for endpoint in endpoints
        ]
        self._rng = rng or random.Random()  # noqa: S311  (load balancing, not secrets)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._health: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.endpoints)

    def snapshot(self) -> tuple[EndpointStats, ...]:
        """Every endpoint's stats, in the order they were given."""
        now = time.monotonic()
        return tuple(endpoint.stats(now) for endpoint in self.endpoints)

    # -- routing ---------------------------------------------------------------------

    def _candidates(self, now: float, exclude: Collection[EndpointState]) -> list[EndpointState]:
        return [e for e in self.endpoints if e not in exclude and e.available(now)]

    def pick(
        self, exclude: Collection[EndpointState] = (), *, strict: bool = False
    ) -> EndpointState | None:
        """An endpoint that can take a request now, preferring those not in ``exclude``
        (``strict``: only those)."""
        now = time.monotonic()
        found = choose(self._candidates(now, exclude), self._rng)
        if found is None and exclude and not strict:
            found = choose(self._candidates(now, ()), self._rng)
        return found

    def has_capacity(self, exclude: Collection[EndpointState]) -> bool:
        """Can an endpoint not in ``exclude`` take a request now?"""
        now = time.monotonic()
        return any(e not in exclude and e.available(now) for e in self.endpoints)

    def has_other(self, exclude: Collection[EndpointState]) -> bool:
        """Is an endpoint not in ``exclude`` in rotation (busy or not)?"""
        now = time.monotonic()
        return any(e not in exclude and not e.ejected(now) for e in self.endpoints)

    def has_unheld(self, exclude: Collection[EndpointState]) -> bool:
        """Is an endpoint not in ``exclude`` in rotation and not held by a ``Retry-After``?"""
        now = time.monotonic()
        return any(
            e not in exclude and not e.ejected(now) and now >= e.hold_until for e in self.endpoints
        )

    async def acquire(
        self, exclude: Collection[EndpointState] = (), *, strict: bool = False
    ) -> EndpointState:
        """Wait for an endpoint that can take the request; count it in flight there.

        Endpoints in ``exclude`` are taken only when no other can take it now, and never
        when ``strict`` (a failover: the request must go elsewhere).
        """
        loop: asyncio.AbstractEventLoop | None = None
        while True:
            endpoint = self.pick(exclude, strict=strict)
            if endpoint is not None:
                endpoint.in_flight += 1
                return endpoint
            loop = loop or asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            wake = self._next_change()
            timer = None if wake is None else loop.call_later(wake, _wake, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _next_change(self) -> float | None:
        """Seconds until an ejection or a ``Retry-After`` hold ends, if one is pending."""
        now = time.monotonic()
        ends = [end for e in self.endpoints for end in (e.ejected_until, e.hold_until) if end > now]
        return min(ends) - now + 0.001 if ends else None

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- outcomes --------------------------------------------------------------------

    def succeeded(self, endpoint: EndpointState, latency: float) -> None:
        """An attempt on ``endpoint`` returned an image after ``latency`` seconds."""
        endpoint.in_flight -= 1
        endpoint.successes += 1
        endpoint.latencies.append(latency)
        endpoint.consecutive = 0
        endpoint.probing = False
        if endpoint.limit < endpoint.cap:
            step = 1.0 if not endpoint.decreased else 1.0 / endpoint.limit
            endpoint.limit = min(float(endpoint.cap), endpoint.limit + step)
        if endpoint.ejections:
            now = time.monotonic()
            # A long healthy stretch forgives one ejection: repeat offenders grow,
            # an endpoint that recovered for good does not keep its long ejections.
            if now - endpoint.healthy_since > ejection_time(endpoint.ejections, self.config) * 4:
                endpoint.ejections -= 1
                endpoint.healthy_since = now
        self._wake_one()

    def failed(self, endpoint: EndpointState, epoch: int, error: FriendliAPIError) -> None:
        """An attempt on ``endpoint`` (admitted in ``epoch``) failed with ``error``."""
        endpoint.in_flight -= 1
        kind = failure_kind(error)
        endpoint.failures[kind] = endpoint.failures.get(kind, 0) + 1
        now = time.monotonic()
        if kind in ("status_429", "status_503"):
            if epoch == endpoint.epoch and now >= endpoint.hold_until:
                endpoint.limit = max(1.0, endpoint.limit * _DECREASE)
                endpoint.decreased = True
                endpoint.epoch += 1
            hint = error.retry_after if isinstance(error, FriendliAPIStatusError) else None
            if hint:
                endpoint.hold_until = max(endpoint.hold_until, now + hint)
        if _ejects(kind):
            endpoint.consecutive += 1
            if endpoint.probing or endpoint.consecutive >= self.config.failures_to_eject:
                self.eject(endpoint, now)
        else:
            endpoint.consecutive = 0
        self._wake_one()

    def abandoned(self, endpoint: EndpointState) -> None:
        """An attempt on ``endpoint`` was cancelled: no outcome to learn from."""
        endpoint.in_flight -= 1
        self._wake_one()

    def eject(self, endpoint: EndpointState, now: float | None = None) -> bool:
        """Take ``endpoint`` out of rotation (unless the ejected share is full)."""
        now = time.monotonic() if now is None else now
        if endpoint.ejected(now):
            return True
        ejected = sum(1 for e in self.endpoints if e.ejected(now))
        if not ejectable(ejected, len(self.endpoints), self.config):
            return False
        endpoint.ejections += 1
        endpoint.ejected_until = now + ejection_time(endpoint.ejections, self.config)
        endpoint.healthy_since = endpoint.ejected_until
        endpoint.probing = True
        endpoint.consecutive = 0
        return True

    def restore(self, endpoint: EndpointState) -> None:
        """An active probe found ``endpoint`` healthy: one request probes it now."""
        if endpoint.ejected_until > time.monotonic():
            endpoint.ejected_until = 0.0
            self._wake_one()

    async def is_dead(self, endpoint: EndpointState, timeout: float) -> bool:
        """Does ``endpoint`` refuse new connections (checked once for concurrent callers)?"""
        loop = asyncio.get_running_loop()
        check = endpoint.dead_check
        if check is None or (
            check.done() and time.monotonic() - endpoint.dead_checked_at > _DEAD_CHECK_REUSE
        ):
            check = endpoint.dead_check = loop.create_future()
            endpoint.dead_checked_at = time.monotonic()
            dead = False
            try:
                dead = await _refuses_connections(endpoint.url_for(""), timeout)
            finally:
                endpoint.dead_checked_at = time.monotonic()
                # Set even when this caller is cancelled: others wait on the result.
                check.set_result(dead)
            if dead:
                self.eject(endpoint)
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
        """Stop the active probe (idempotent)."""
        task, self._health = self._health, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
            self.restore(endpoint)
        else:
            endpoint.failures[key] = endpoint.failures.get(key, 0) + 1
            self.eject(endpoint)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _refuses_connections(url: URL, timeout: float) -> bool:
    """True when a TCP connection to ``url``'s host and port is refused (or unroutable)."""
    host, port = url.host, url.port
    if host is None or port is None:
        return False
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), port), timeout
        )
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except (OSError, asyncio.TimeoutError):
        return False  # unreachable for another reason: not proof that it died
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False
