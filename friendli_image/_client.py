"""AsyncFriendli: the client, its session lifecycle, and the one retry loop.

Every call, single or batch item, takes the same path: the resources build a validated
request model, `AsyncFriendli` resolves the call's options and runs the retry loop, and
each attempt goes through the transport (``_transport``), which owns everything about
one HTTP exchange. The retry decisions are ``_retry``'s pure functions, applied by
tenacity; a batch's adaptive gate admits each attempt through the `AttemptGate` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
import attrs

from ._batch_models import EndpointStats
from ._config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RESPONSE_BYTES,
    ENV_DEBUG,
    ENV_LOG,
    NO_OVERRIDES,
    UNSET,
    CallOptions,
    CallOverrides,
    ClientSettings,
    DebugLogger,
    RetryConfig,
    Timeout,
    Unset,
    as_logger,
    check_count,
    check_headers,
    check_server_url,
    env_server_url,
    env_token,
    resolve_retries,
    ssl_setting,
    timeout_from_ms,
)
from ._exceptions import (
    FriendliAPIError,
    FriendliRateLimitError,
    FriendliResponseError,
    FriendliUsageError,
    FriendliUsageWarning,
    FriendliValidationError,
    warn_at_caller,
)
from ._fleet import (
    Endpoint,
    EndpointState,
    Fleet,
    FleetConfig,
    failover_kind,
    parse_servers,
)
from ._request_path import AttemptGate, AttemptOutcome, RequestPath
from ._requests import RequestModel
from ._resources import Container
from ._results import ImageResult
from ._retry import RetryBudget, RetryState, server_wait
from ._secrets import check_token, split_authorization, token_source
from ._telemetry import Hooks, Instrumentation, Telemetry
from ._transport import Call, Connector, Transport
from ._version import __version__

if TYPE_CHECKING:
    from yarl import URL

    _DropFinalizer = weakref.finalize[
        [asyncio.AbstractEventLoop, AsyncIterator[None]], "AsyncFriendli"
    ]

__all__ = ["AsyncFriendli", "describe"]

logger = logging.getLogger("friendli_image")

_USER_AGENT = f"friendli-image/{__version__} (python; aiohttp/{aiohttp.__version__})"


def _configure_logging_from_env(*, official: bool = False) -> None:
    level = os.environ.get(ENV_LOG, "").strip().upper()
    if not level and official and os.environ.get(ENV_DEBUG):
        # The official SDK's switch, read when a client is made (as there): every
        # request is logged to the stderr of that moment.
        level = "DEBUG"
    if not level:
        return
    known = logging.getLevelName(level)
    logger.setLevel(known if isinstance(known, int) else logging.DEBUG)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


_configure_logging_from_env()


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    # Registered with the loop as an async generator: asyncio.run() (and every loop
    # runner calling shutdown_asyncgens) closes it at shutdown, and the loop's finalizer
    # closes it when the client is dropped, so a forgotten client leaves no unclosed
    # session or transport behind.
    try:
        yield
    finally:
        await session.close()


_closing: set[asyncio.Task[None]] = set()


def _close_dropped(loop: asyncio.AbstractEventLoop, guard: AsyncIterator[None]) -> None:
    def start() -> None:
        task = loop.create_task(guard.aclose())  # type: ignore[attr-defined]
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    if not loop.is_closed():
        # Any thread may run the collector; RuntimeError: the loop closed meanwhile
        # (its shutdown_asyncgens has closed the guard already).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(start)


class AsyncFriendli:
    """The asyncio client for the Friendli Container image API.

    Create one per event loop and reuse it: it owns a pool of keep-alive connections.
    The aiohttp session is created on first use (or in ``async with``) on the running
    loop, never in ``__init__``, so constructing a client is free and safe anywhere.

    Args:
        token: the API token (the one argument that may be positional, as in the
            official SDK); default ``FRIENDLI_TOKEN``. None or ``""`` sends no
            ``Authorization`` header. A callable is called for every call, for tokens
            that rotate.
        server_url: the server's base URL; default ``FRIENDLI_SERVER_URL``, else
            ``http://localhost:8000``. A per-call ``server_url`` overrides it. Several
            servers (a list of URLs and `Endpoint` objects, or a comma-separated string)
            make a fleet: each attempt goes to one of them by load, and failures go to
            another where that is safe (see ``fleet``).
        timeout_ms: the per-attempt timeout in milliseconds (shorthand for
            ``timeout=Timeout(attempt=...)``).
        retries: a ``RetryConfig``, a number of retries (0 disables retrying), or None
            for the default policy.
        http_headers: extra headers sent with every request. Names must be HTTP tokens
            and values visible ASCII; the framing and hop-by-hop headers
            (``Content-Length``, ``Transfer-Encoding``, ``Host``, ``Connection``, ``TE``,
            ``Upgrade``, ...) are refused. An ``Authorization`` header here (or in a
            call's ``http_headers``) replaces the ``Bearer <token>`` header, for a gateway
            with another scheme; it is kept and redacted like the token.
        max_connections: the most requests in flight at once (the connection pool size).
        timeout: connect / read / attempt / total timeouts (see ``Timeout``).
        max_response_bytes: responses larger than this raise ``FriendliResponseTooLarge``
            before they are buffered.
        verify: TLS certificate verification: True (the system's CAs), a path to a CA
            bundle file (or directory), an ``ssl.SSLContext``, or False to turn it off
            (warns: anyone on the path can then read the token and the images).
        trust_env: None (the default) honours ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
            ``ALL_PROXY`` / ``NO_PROXY`` as httpx (the official SDK's client) does, read
            once per host, and never reads ``.netrc``; True also sends a ``.netrc`` login
            when no token is set; False ignores the environment.
        x_friendli_team: sent as ``X-Friendli-Team`` (the official SDK's argument).
        retry_config: the official SDK's name for ``retries`` (a ``RetryConfig``, ours or
            ``friendli_image.utils.RetryConfig``); pass one of the two. As there,
            ``retry_config=None`` means no retries.
        debug_logger: a ``logging.Logger`` (or, as in the official SDK, any object with a
            ``debug(msg, *args)`` method) that receives the client's log records instead
            of the ``friendli_image`` logger (the token never appears in them). Without
            it, ``FRIENDLI_DEBUG=1`` (the official switch) or ``FRIENDLI_LOG=<level>``
            log to stderr.
        fleet: how a client with several endpoints routes, ejects and probes them (a
            `FleetConfig`); giving one makes a fleet even of one `Endpoint`.
        telemetry: OpenTelemetry options (a `Telemetry`): spans and metrics go to the
            global providers by default, once the application sets them up (extra
            ``otel``).
        hooks: plain callbacks on each attempt's request, response, retry and error
            (a `Hooks`), for people without OpenTelemetry.
        server_idx: accepted for code written for the official SDK, where it picks a
            hosted server; it means nothing for a container, and warns.
        url_params: accepted and warned about, as ``server_idx``.
        client: refused: it takes an httpx client, and this SDK sends with aiohttp.
        async_client: refused, as ``client``.

    Redirects are followed as httpx (the official SDK's client) follows them: 307/308
    resend the request, 301/302/303 become a GET, up to 20; ``Authorization`` (the
    token's or yours) is dropped when one leaves the origin, so the token never goes to
    another host. Any other 3xx raises ``FriendliAPIStatusError`` with ``location``
    set. A token sent over plain ``http://`` to a host other than loopback
    warns once per host.
    """

    def __init__(
        self,
        token: str | Callable[[], str | None] | None = None,
        *,
        server_url: str | Sequence[str | Endpoint] | None = None,
        timeout_ms: int | None = None,
        retries: RetryConfig | int | None = None,
        http_headers: Mapping[str, str] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: Timeout | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        trust_env: bool | None = None,
        x_friendli_team: str | None = None,
        retry_config: RetryConfig | Unset | None = UNSET,
        debug_logger: DebugLogger | None = None,
        fleet: FleetConfig | None = None,
        telemetry: Telemetry | None = None,
        hooks: Hooks | None = None,
        server_idx: int | None = None,
        url_params: Mapping[str, str] | None = None,
        client: object = None,
        async_client: object = None,
    ) -> None:
        check_count("max_connections", max_connections)
        check_count("max_response_bytes", max_response_bytes)
        if timeout is not None and not isinstance(timeout, Timeout):
            raise FriendliValidationError("timeout", "must be a friendli_image.Timeout")
        if trust_env is not None and not isinstance(trust_env, bool):
            raise FriendliValidationError(
                "trust_env", f"must be True, False or None, got {trust_env!r}"
            )
        if client is not None or async_client is not None:
            raise FriendliUsageError(
                "client= / async_client= take httpx clients, and this SDK sends with aiohttp; "
                "drop the argument (set max_connections=, verify=, trust_env= or timeout= "
                "for what the httpx client configured)"
            )
        if retry_config is not UNSET and retries is not None:
            raise FriendliValidationError(
                "retry_config", "is the official SDK's name for retries=; pass only one of them"
            )
        if debug_logger is None:
            # Read at construction, as the official SDK reads it (not only at import).
            _configure_logging_from_env(official=True)
        if server_idx is not None or url_params:
            warn_at_caller(
                "server_idx= and url_params= choose among Friendli's hosted servers and mean "
                "nothing for a container; pass server_url= (or set FRIENDLI_SERVER_URL)",
                FriendliUsageWarning,
            )
        extra_headers = check_headers(http_headers)
        if x_friendli_team is not None:
            extra_headers["X-Friendli-Team"] = check_headers({"X-Friendli-Team": x_friendli_team})[
                "X-Friendli-Team"
            ]
        extra_headers, authorization = split_authorization(extra_headers)
        if fleet is not None and not isinstance(fleet, FleetConfig):
            raise FriendliValidationError("fleet", "must be a friendli_image.FleetConfig or None")
        servers = env_server_url() if server_url is None else server_url
        endpoints: tuple[Endpoint, ...] = ()
        if isinstance(servers, str) and "," not in servers and fleet is None:
            base_url = check_server_url(servers)
        else:
            endpoints = tuple(parse_servers(servers))
            if len(endpoints) == 1 and fleet is None and not isinstance(servers[0], Endpoint):
                base_url, endpoints = endpoints[0].url, ()
            else:
                base_url = ",".join(endpoint.url for endpoint in endpoints)
        token = env_token() if token is None else token
        self._setup(
            ClientSettings(
                token=None if callable(token) else check_token(token),
                token_source=token_source(token) if callable(token) else None,
                server_url=base_url,
                timeout=timeout_from_ms(timeout_ms, timeout or Timeout()),
                retry=_client_retry(retries, retry_config),
                headers={
                    "User-Agent": _USER_AGENT,
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    **extra_headers,
                },
                max_connections=max_connections,
                max_response_bytes=max_response_bytes,
                ssl=ssl_setting(verify),
                trust_env=trust_env is not False,
                netrc=trust_env is True,
                logger=logger if debug_logger is None else as_logger(debug_logger),
                authorization=authorization,
            ),
            endpoints,
            fleet or FleetConfig(),
            (telemetry, hooks),
        )

    def _setup(
        self,
        settings: ClientSettings,
        endpoints: tuple[Endpoint, ...] = (),
        fleet: FleetConfig | None = None,
        observe: tuple[Telemetry | None, Hooks | None] = (None, None),
    ) -> None:
        self._settings = settings
        self._observe = observe
        self._instrumentation = Instrumentation(
            *observe, settings.logger, self._snapshot if endpoints else None
        )
        self._endpoints = endpoints
        self._fleet_config = fleet or FleetConfig()
        # No fleet for one URL: that path stays exactly as cheap as it always was.
        self._fleet = (
            Fleet(endpoints, settings.max_connections, self._fleet_config) if endpoints else None
        )
        self._transport = Transport(settings)
        self._defaults = settings.call_options(CallOverrides())
        # What a fleet call prepares with: the URL is chosen per attempt.
        self._fleet_defaults = (
            attrs.evolve(self._defaults, server_url=endpoints[0].url) if endpoints else None
        )
        self._session: aiohttp.ClientSession | None = None
        self._session_guard: AsyncIterator[None] | None = None
        self._dropped: _DropFinalizer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bind_lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._budget = RetryBudget(settings.retry.budget_floor)
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._closed = False

    # -- public surface ------------------------------------------------------------

    @cached_property
    def container(self) -> Container:
        """The Friendli Container API: ``client.container.image.generate(...)``."""
        return Container(
            RequestPath(
                send=self._send,
                resolve=self._resolve,
                endpoints=self._snapshot,
                monitor_batch=self._instrumentation.monitor_batch,
            )
        )

    @property
    def server_url(self) -> str:
        """The base URL calls go to unless a call names another (a fleet's, comma-separated)."""
        return self._settings.server_url

    @property
    def endpoints(self) -> tuple[EndpointStats, ...]:
        """A snapshot of each endpoint of a fleet: in flight, limit, counts, latency, ejection.

        Empty for a client with a single ``server_url``, which keeps no such state.
        """
        return self._snapshot()

    def _snapshot(self) -> tuple[EndpointStats, ...]:
        return () if self._fleet is None else self._fleet.snapshot()

    @property
    def max_connections(self) -> int:
        """The most requests this client has in flight at once."""
        return self._settings.max_connections

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    def copy(self) -> AsyncFriendli:
        """A new client with the same settings and its own, not yet opened, session.

        For another event loop, thread or process: a client's session belongs to the
        loop that opened it. Nothing is validated or read from the environment again.
        """
        clone = AsyncFriendli.__new__(AsyncFriendli)
        clone._setup(self._settings, self._endpoints, self._fleet_config, self._observe)
        return clone

    async def __aenter__(self) -> AsyncFriendli:
        await self._open_session()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool. Idempotent; the client cannot be used afterwards."""
        self._closed = True
        if self._fleet is not None:
            await self._fleet.stop_health()
        if self._dropped is not None:
            self._dropped.detach()
        guard, self._session_guard = self._session_guard, None
        self._session = None
        if guard is not None:
            await guard.aclose()  # type: ignore[attr-defined]

    aclose = close

    def __repr__(self) -> str:
        return f"AsyncFriendli({describe(self)})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "AsyncFriendli holds a connection pool and a token and cannot be pickled; "
            "create a client in each process"
        )

    # -- the session -----------------------------------------------------------------

    def _ready_session(self) -> aiohttp.ClientSession | None:
        """The session for the running loop, or None when one must be opened first."""
        if self._closed:
            raise FriendliUsageError(
                "this client is closed; create a new AsyncFriendli (or use `async with`)"
            )
        session = self._session
        if session is None or session.closed:
            return None
        if self._loop is not asyncio.get_running_loop():
            if self._loop is not None and not self._loop.is_closed():
                raise FriendliUsageError(
                    "this AsyncFriendli is in use on another event loop; aiohttp sessions "
                    "belong to one loop, so create one client per loop (or per thread)"
                )
            return None
        return session

    def _claim_loop(self) -> asyncio.AbstractEventLoop:
        """Bind the client to the running loop, or raise if another live loop has it.

        Under a lock, before any await: two threads racing to the first call would
        otherwise both open a session, and one would close the other's mid-request.
        """
        loop = asyncio.get_running_loop()
        with self._bind_lock:
            bound = self._loop
            if bound is not None and bound is not loop and not bound.is_closed():
                raise FriendliUsageError(
                    "this AsyncFriendli is in use on another event loop; aiohttp sessions "
                    "belong to one loop, so create one client per loop (or per thread, "
                    "e.g. with client.copy())"
                )
            self._loop = loop
        return loop

    async def _open_session(self) -> aiohttp.ClientSession:
        session = self._ready_session()
        if session is not None:
            return session
        loop = self._claim_loop()
        session = aiohttp.ClientSession(
            connector=Connector(
                limit=self._settings.max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                ssl=self._settings.ssl,
            ),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=True,
            read_bufsize=256 * 1024,
        )
        guard = _close_on_loop_shutdown(session)
        # The first step registers the generator with the loop's shutdown hooks.
        await guard.__anext__()
        if self._dropped is not None:
            self._dropped.detach()
        # A client dropped without close() is often collected by the cycle collector,
        # which would finalize the session and connector along with it (and aiohttp
        # warns "Unclosed ..."). The finalizer holds the guard, so the session stays
        # reachable until the guard closes it on its loop.
        self._dropped = weakref.finalize(self, _close_dropped, loop, guard)
        # At interpreter exit the loop's own shutdown (or the sync facade's atexit hook)
        # closes the session; a task scheduled from here then could outlive its loop.
        self._dropped.atexit = False
        self._session, self._session_guard = session, guard
        self._slots = asyncio.Semaphore(self._settings.max_connections)
        if self._fleet is not None:
            self._fleet.start_health(session, lambda: self._transport.client_headers()[0])
        return session

    # -- the one request path ------------------------------------------------------

    def _resolve(self, overrides: CallOverrides) -> CallOptions:
        if overrides is NO_OVERRIDES or (
            overrides.retries is UNSET
            and overrides.server_url is None
            and overrides.timeout_ms is None
            and not overrides.http_headers
        ):
            return self._defaults
        return self._settings.call_options(overrides)

    async def _send(
        self,
        path: str,
        request: RequestModel,
        options: CallOptions,
        gate: AttemptGate | None = None,
    ) -> ImageResult:
        """Send one validated request and return its image: THE retry loop.

        Every attempt, the first included, runs the same steps: admission by ``gate``
        (a batch's in-flight limit, told how each attempt went), the route picks the
        endpoint, the transport makes the attempt, the route and the gate are told how
        it went, and the route (fail over at once) or the call's `RetryState` (sleep
        until the next attempt is due, or raise with the number of attempts made)
        decides what follows.
        """
        session = self._ready_session() or await self._open_session()
        slots = self._slots
        assert slots is not None  # noqa: S101  (set with the session)
        route: _Route = _ONE_URL
        fleet = self._fleet
        # A call that names its own server is sent there: the fleet is not asked.
        if fleet is not None and options.server_url == self._settings.server_url:
            route = _FleetRoute(fleet, path, self._transport.url)
            options = (
                self._fleet_defaults
                if options is self._defaults and self._fleet_defaults is not None
                else attrs.evolve(options, server_url=self._endpoints[0].url)
            )
        call = self._transport.prepare(path, request, options)
        observed = None
        retry: RetryState | None = None
        attempt_number = 0
        while True:
            attempt_number += 1
            try:
                ticket = 0 if gate is None else await gate.acquire()
            except BaseException as stopped:
                if observed is not None:  # a batch stopped while this call waited to retry
                    observed.abandoned(stopped, in_attempt=False)
                raise
            if retry is None:
                # The call's clock starts once the gate admits it, as its timers start
                # once a connection slot is its own.
                retry = RetryState(
                    options.retry,
                    self._budget,
                    self._rng,
                    options.timeout.total,
                    self._settings.logger,
                )
                # Observed from here: a call the gate never admits made no request.
                observed = self._instrumentation.start(request, call.request_id)
                if observed is not None:
                    retry.on_retry = observed.retrying
            try:
                await route.pick(call)
            except BaseException as stopped:
                if gate is not None:
                    gate.release(ticket, "other")
                if observed is not None:
                    observed.abandoned(stopped, in_attempt=False)
                raise
            if observed is not None:
                observed.attempt(attempt_number, call.url, route.server_url(options), call.headers)
            try:
                result = await self._transport.send(
                    session,
                    slots,
                    call,
                    attempt_number,
                    started=retry.started,
                    deadline=retry.deadline,
                )
            except FriendliAPIError as error:
                if observed is not None:
                    observed.failed(error)
                outcome = route.failed(error, _outcome(error))
                if gate is not None:
                    gate.release(ticket, outcome, server_wait(error))
                if await route.fail_over(error, options, retry):
                    if observed is not None:
                        observed.retrying(error, 0.0, failover=True)
                    continue
                try:
                    await retry.after_failure(error, elsewhere=route.retries_elsewhere(error))
                except FriendliAPIError as final:
                    final.attempts = attempt_number
                    if observed is not None:
                        observed.gave_up(final)
                    raise
                except BaseException as stopped:
                    if observed is not None:
                        observed.abandoned(stopped, in_attempt=False)
                    raise
                route.new_round()
                continue
            except BaseException as stopped:
                if gate is not None:
                    gate.release(ticket, "other")
                route.abandoned()
                if observed is not None:
                    observed.abandoned(stopped, in_attempt=True)
                raise
            if gate is not None:
                gate.release(ticket, "ok")
            # Credited as calls succeed, not as they start: a burst of queued calls
            # would otherwise fill the budget at once, and an outage would refill it.
            retry.succeeded()
            result = route.succeeded(result, retry)
            if observed is not None:
                observed.succeeded(result)
            return result


class _Route(Protocol):
    """Where a call's attempts go: one URL, or the endpoint a fleet picks per attempt.

    The retry loop tells the route about every attempt; the route learns (a fleet's
    limits and health) and may move a failed call to another endpoint at once.
    """

    async def pick(self, call: Call) -> None:
        """Point ``call`` at this attempt's endpoint (may wait for one to have room)."""

    def server_url(self, options: CallOptions) -> str:
        """The server this attempt goes to, for telemetry."""

    def failed(self, error: FriendliAPIError, outcome: AttemptOutcome) -> AttemptOutcome:
        """The attempt failed with ``error``: learn from it; the outcome for the gate."""

    async def fail_over(
        self, error: FriendliAPIError, options: CallOptions, retry: RetryState
    ) -> bool:
        """Send the call again at once, elsewhere? (False: the retry policy decides.)"""

    def retries_elsewhere(self, error: FriendliAPIError) -> bool:
        """May the policy retry ``error``, which the same server would repeat, because
        another server takes the next attempt?"""

    def new_round(self) -> None:
        """The retry policy waited: every endpoint may be tried again."""

    def abandoned(self) -> None:
        """The attempt was cancelled (or failed outside the error tree)."""

    def succeeded(self, result: ImageResult, retry: RetryState) -> ImageResult:
        """The attempt's image came back: learn from it; the result the caller gets."""


class _OneUrl:
    """The route of a call to one URL: the URL was set when the call was prepared.

    Stateless and shared by every such call, so the single-server path costs a few
    method calls per attempt.
    """

    __slots__ = ()

    async def pick(self, call: Call) -> None:
        return

    def server_url(self, options: CallOptions) -> str:
        return options.server_url

    def failed(self, error: FriendliAPIError, outcome: AttemptOutcome) -> AttemptOutcome:
        return outcome

    async def fail_over(
        self, error: FriendliAPIError, options: CallOptions, retry: RetryState
    ) -> bool:
        return False

    def retries_elsewhere(self, error: FriendliAPIError) -> bool:
        return False

    def new_round(self) -> None:
        return

    def abandoned(self) -> None:
        return

    def succeeded(self, result: ImageResult, retry: RetryState) -> ImageResult:
        if retry.resent_ambiguous:
            return attrs.evolve(result, maybe_duplicated=True)
        return result


_ONE_URL: Final = _OneUrl()


class _FleetRoute:
    """The route of one call through a fleet: an endpoint per attempt, fail-over between."""

    __slots__ = (
        "_answered_badly",
        "_began",
        "_build",
        "_endpoint",
        "_epoch",
        "_fleet",
        "_level",
        "_moving",
        "_path",
        "_resent_elsewhere",
        "_tried",
    )

    def __init__(self, fleet: Fleet, path: str, build: Callable[[str, str], URL]) -> None:
        self._fleet = fleet
        self._path = path
        self._build = build
        self._endpoint: EndpointState | None = None
        self._epoch = 0
        self._level = 0  # requests in flight on the endpoint as this attempt was sent
        self._began = 0.0
        self._tried: list[EndpointState] = []
        self._moving = False  # failing over: the next attempt must go to an untried endpoint
        self._resent_elsewhere = False
        #: Endpoints that answered this call with something that is not an image: the
        #: call does not go back to them.
        self._answered_badly: list[EndpointState] = []

    async def pick(self, call: Call) -> None:
        fleet, bad = self._fleet, self._answered_badly
        if self._moving:
            endpoint = await fleet.acquire(self._tried, strict=True)
        elif bad and fleet.has_other(bad):
            endpoint = await fleet.acquire(bad, strict=True)
        else:
            endpoint = await fleet.acquire(self._tried)
        self._endpoint = endpoint
        self._epoch, self._level = endpoint.epoch, endpoint.in_flight
        call.url = endpoint.url_for(self._path, self._build)
        self._began = time.monotonic()

    def server_url(self, options: CallOptions) -> str:
        return options.server_url if self._endpoint is None else self._endpoint.url

    def failed(self, error: FriendliAPIError, outcome: AttemptOutcome) -> AttemptOutcome:
        endpoint = self._endpoint
        if endpoint is None:
            return outcome
        error.endpoint = endpoint.url
        self._fleet.failed(endpoint, self._epoch, error)
        self._tried.append(endpoint)
        if isinstance(error, FriendliResponseError):
            self._answered_badly.append(endpoint)
        if outcome == "rate_limited" and self._fleet.has_unheld(self._tried):
            # One endpoint's 429 is that endpoint's limit (lowered above),
            # not a reason to slow the whole batch down.
            return "other"
        return outcome

    async def fail_over(
        self, error: FriendliAPIError, options: CallOptions, retry: RetryState
    ) -> bool:
        endpoint = self._endpoint
        if endpoint is None:
            return False
        moved = await self._move(endpoint, error, options, retry)
        if moved is None:
            self._moving = False
            return False
        self._resent_elsewhere = self._resent_elsewhere or moved
        self._moving = True
        return True

    async def _move(
        self,
        endpoint: EndpointState,
        error: FriendliAPIError,
        options: CallOptions,
        retry: RetryState,
    ) -> bool | None:
        """Send the call to another endpoint at once? None: no, the retry policy decides.

        True: yes, and the request may have run on the endpoint it leaves (its
        server died with it, or answered with something that is not an image), so the
        result is flagged ``maybe_duplicated``. Such moves
        do not count toward ``max_attempts``; only a 429/503 move spends the budget
        (when a retry of it would), see `failover_kind`.
        """
        fleet, tried = self._fleet, self._tried
        kind = failover_kind(error, options.retry)
        if kind is None:
            return None
        if kind == "busy":
            if not fleet.has_capacity(tried):
                return None  # the policy waits (the server's Retry-After, else backoff)
            if not retry.spend_for(error):
                return None
            return False
        if not fleet.has_other(tried):
            return None
        if kind in ("unsent", "bad_answer"):
            return kind == "bad_answer"
        connect = options.timeout.connect
        dead = await fleet.is_dead(endpoint, min(1.0, connect) if connect else 1.0)
        return True if dead else None

    def retries_elsewhere(self, error: FriendliAPIError) -> bool:
        # Every endpoint was tried this round, but one that has not answered this call
        # badly may serve it (a 503 a moment ago): the policy's next attempt goes there.
        return isinstance(error, FriendliResponseError) and self._fleet.has_other(
            self._answered_badly
        )

    def new_round(self) -> None:
        # Every endpoint may be tried again, the last one last.
        del self._tried[:-1]

    def abandoned(self) -> None:
        if self._endpoint is not None:
            self._fleet.abandoned(self._endpoint)

    def succeeded(self, result: ImageResult, retry: RetryState) -> ImageResult:
        endpoint = self._endpoint
        if endpoint is None:
            return result
        self._fleet.succeeded(endpoint, time.monotonic() - self._began, self._level)
        return attrs.evolve(
            result,
            endpoint=endpoint.url,
            maybe_duplicated=retry.resent_ambiguous or self._resent_elsewhere,
        )


def _client_retry(
    retries: RetryConfig | int | None, retry_config: RetryConfig | Unset | None
) -> RetryConfig:
    """The client's policy: ``retries`` (None: the default), or the official
    ``retry_config`` (None: no retries, as the official SDK reads it)."""
    if retry_config is UNSET:
        return resolve_retries(retries, RetryConfig())
    if retry_config is None:
        return RetryConfig.disabled()
    return resolve_retries(retry_config, RetryConfig())


def _outcome(error: FriendliAPIError) -> AttemptOutcome:
    if isinstance(error, FriendliRateLimitError):
        return "rate_limited"
    return "other"


def describe(client: AsyncFriendli) -> str:
    """The client's settings as its repr shows them (the token as ``'***'``)."""
    settings = client._settings
    token = "'***'" if settings.has_token else "None"
    return (
        f"server_url={settings.server_url!r}, token={token}, "
        f"max_connections={settings.max_connections}, closed={client.closed}"
    )
