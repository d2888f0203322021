"""Scenarios 53-54: the fleet judges endpoints by what their answers are worth.

Each endpoint is a small aiohttp app on loopback with one behaviour: healthy, slow,
flapping (503 in runs), garbage (200 whose body is not an image), 429 forever, black
hole (reads the request, never answers) or dying mid-body (sends the headers and half the
body, then closes). Every request it sees is logged as it arrives, with its
``X-Request-ID``, and then marked with what the server did, which is the oracle's view of
the wire. The endpoints run on a loop of their own, in their own thread, so a client busy
on its loop does not delay their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Literal

import attrs
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from friendli_image import (
    AsyncFriendli,
    Endpoint,
    FleetConfig,
    FriendliAPIError,
    FriendliTimeoutError,
    ImageResult,
    RetryConfig,
)

from .harness import GENERATE, Figures, image_body

Kind = Literal["healthy", "slow", "flapping", "garbage", "rate_limited", "black_hole", "dying"]
#: What a server has done with a request once it answered or read it: later sends of the
#: same request id are resends, and must be flagged unless the first was refused.
PROCESSED = frozenset({"image", "garbage", "black_hole", "dying", "abandoned"})
#: The server read the request and gave no usable answer: a resend may duplicate work.
#: ``abandoned``: the client went away (its attempt timed out) before the server answered.
AMBIGUOUS = frozenset({"black_hole", "dying", "abandoned"})
GARBAGE_BODIES = (
    (b"<html><body>502 upstream</body></html>", "text/html"),
    (b'{"image": null}', "application/json"),
    (b'{"image": "@@@ not base64"}', "application/json"),
    (b'{"data": [{"b64_json": "aGk="}]}', "application/json"),
)


@attrs.frozen
class Behaviour:
    """How one endpoint answers."""

    kind: Kind
    latency: float = 0.0
    period: int = 2
    """Flapping: this many 503 answers, then this many images, and so on."""


@attrs.define
class Event:
    """One request as an endpoint saw it: logged on arrival, then marked with what the
    endpoint did (``abandoned`` until it answers)."""

    where: int
    rid: str
    what: str = "abandoned"


@attrs.define
class Endpoints:
    """The running endpoints and the log of what each did with each request id, in the
    order the requests arrived."""

    behaviours: Sequence[Behaviour]
    urls: list[str] = attrs.field(factory=list)
    log: list[Event] = attrs.field(factory=list)
    runners: list[web.AppRunner] = attrs.field(factory=list)

    def calls_to(self, index: int) -> int:
        return sum(1 for event in self.log if event.where == index)


def _app(index: int, behaviour: Behaviour, endpoints: Endpoints) -> web.Application:
    seen = 0
    image = image_body()

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        event = Event(index, request.headers.get("X-Request-ID", ""))
        endpoints.log.append(event)
        await request.read()
        if behaviour.latency:
            await asyncio.sleep(behaviour.latency)
        kind = behaviour.kind
        if kind == "flapping":
            kind = "healthy" if (seen - 1) // behaviour.period % 2 else "busy"  # type: ignore[assignment]
        if kind in ("healthy", "slow"):
            event.what = "image"
            return web.Response(body=image, content_type="application/json")
        if kind == "busy":
            event.what = "503"
            return web.json_response({"detail": "busy"}, status=503)
        if kind == "rate_limited":
            event.what = "429"
            return web.json_response(
                {"detail": "slow down"}, status=429, headers={"retry-after-ms": "50"}
            )
        if kind == "garbage":
            event.what = "garbage"
            body, content_type = GARBAGE_BODIES[seen % len(GARBAGE_BODIES)]
            return web.Response(body=body, content_type=content_type.split(";")[0])
        event.what = kind
        transport = request.transport
        if kind == "black_hole":
            await asyncio.Event().wait()  # until the client gives up and the task is cancelled
        assert transport is not None
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(image)}\r\n\r\n"
        ).encode()
        transport.write(head + image[: len(image) // 2])
        transport.close()
        return web.Response()  # aiohttp finds the transport closing and sends nothing

    app = web.Application()
    app.router.add_post(GENERATE, handle)
    return app


async def _start(endpoints: Endpoints) -> None:
    for index, behaviour in enumerate(endpoints.behaviours):
        runner = web.AppRunner(
            _app(index, behaviour, endpoints),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=0.05,
        )
        await runner.setup()
        endpoints.runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        endpoints.urls.append(f"http://127.0.0.1:{port}")


async def _stop(endpoints: Endpoints) -> None:
    for runner in endpoints.runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _running(behaviours: Sequence[Behaviour]) -> AsyncIterator[Endpoints]:
    """The endpoints, serving from a thread of their own for the block."""
    endpoints = Endpoints(behaviours)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="endpoints", daemon=True)
    thread.start()

    async def on_their_loop(step: Callable[[Endpoints], Coroutine[Any, Any, None]]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step(endpoints), loop))

    try:
        await on_their_loop(_start)
        yield endpoints
    finally:
        try:
            await on_their_loop(_stop)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()


#: Fast, bounded retries; a black hole costs one 0.3 s attempt timeout.
POLICY = RetryConfig(max_attempts=3, initial_delay=0.01, max_delay=0.05, jitter=0.01)
TIMEOUT_MS = 300


async def _run_calls(
    client: AsyncFriendli, gaps: Sequence[float], concurrency: int
) -> list[ImageResult | FriendliAPIError]:
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> ImageResult | FriendliAPIError:
        async with slots:
            try:
                return await client.container.image.generate(prompt=f"call {index}", seed=index)
            except FriendliAPIError as error:
                return error

    tasks = []
    for index, gap in enumerate(gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(index)))
    return list(await asyncio.gather(*tasks))


def _request_id(outcome: ImageResult | FriendliAPIError) -> str:
    rid = outcome.request_id
    assert rid
    return rid


def _check_outcomes(
    endpoints: Endpoints,
    outcomes: Sequence[ImageResult | FriendliAPIError],
    *,
    retry_ambiguous: bool = False,
) -> int:
    """The oracle: failures only where the policy forbids a resend; resends flagged.

    Returns how many calls timed out at an endpoint that answers (late answers).
    """
    healthy = {
        url
        for url, behaviour in zip(endpoints.urls, endpoints.behaviours, strict=True)
        if behaviour.kind in ("healthy", "slow")
    }
    trails: dict[str, list[Event]] = {}
    for event in endpoints.log:
        trails.setdefault(event.rid, []).append(event)
    late = 0
    for outcome in outcomes:
        trail = trails.get(_request_id(outcome), [])
        whats = [event.what for event in trail]
        if isinstance(outcome, FriendliTimeoutError):
            # No answer within the attempt's 0.3 s: a black hole's, or any endpoint's on
            # a machine loaded enough to delay it (CI). Either way the server may have
            # read the request, so the policy does not resend it.
            assert outcome.maybe_processed, (outcome, trail)
            if trail:
                assert endpoints.urls[trail[-1].where] == outcome.endpoint, (outcome, trail)
            late += whats[-1:] != ["black_hole"]
        elif isinstance(outcome, FriendliAPIError):
            # A healthy endpoint could have served it unless the policy forbids the
            # resend: the request was read by a server that then gave no answer.
            assert outcome.maybe_processed, (outcome, trail)
            assert outcome.endpoint not in healthy, (outcome, trail)
            assert whats, (outcome, trail)
            assert whats[-1] in AMBIGUOUS, (outcome, trail)
        else:
            assert whats[-1] == "image", trail
        # Nothing unsafe resent: after an ambiguous event nothing follows (unless the
        # policy resends those), and a request that ran before its last attempt is flagged.
        if not retry_ambiguous:
            for earlier in whats[:-1]:
                assert earlier not in AMBIGUOUS, trail
        ran_before = any(what in PROCESSED for what in whats[:-1])
        if ran_before and isinstance(outcome, ImageResult):
            assert outcome.maybe_duplicated, trail
    return late


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


async def _fleet_run(
    behaviours: Sequence[Behaviour], gaps: Sequence[float], concurrency: int, policy: RetryConfig
) -> tuple[Endpoints, list[ImageResult | FriendliAPIError], AsyncFriendli]:
    async with _running(behaviours) as endpoints:
        client = AsyncFriendli(
            server_url=[Endpoint(url, max_connections=16) for url in endpoints.urls],
            retries=policy,
            timeout_ms=TIMEOUT_MS,
            fleet=FleetConfig(base_ejection=0.5),
        )
        async with client:
            outcomes = await _run_calls(client, gaps, concurrency)
    return endpoints, outcomes, client


# -- scenario 53: the acceptance line -------------------------------------------------


@pytest.mark.scenario(53)
async def test_a_garbage_200_endpoint_is_ejected_and_calls_succeed(figures: Figures) -> None:
    """Three endpoints, one answering 200 with bodies that are not images: of 600 calls at
    C=32, at least 99 % succeed, and the bad endpoint is ejected after a few calls."""
    behaviours = [Behaviour("healthy", 0.01), Behaviour("healthy", 0.01), Behaviour("garbage")]
    calls = 600
    async with _running(behaviours) as endpoints:
        client = AsyncFriendli(
            server_url=[Endpoint(url, max_connections=16) for url in endpoints.urls],
            retries=POLICY,
        )
        async with client:
            outcomes = await _run_calls(client, [0.0] * calls, 32)
            bad = client.endpoints[2]
    succeeded = sum(1 for outcome in outcomes if isinstance(outcome, ImageResult))
    got = endpoints.calls_to(2)
    assert succeeded >= 0.99 * calls, Counter(type(o).__name__ for o in outcomes)
    assert bad.ejections >= 1
    assert bad.successes == 0
    assert bad.failures.get("response", 0) == got
    # Ejected at the 5th consecutive failure; then each probe after an ejection.
    assert got <= 0.05 * calls
    _check_outcomes(endpoints, outcomes)
    figures.set(
        "fleet.garbage",
        f"3 endpoints, one answering 200 with non-image bodies (HTML, `image: null`, bad "
        f"base64, another API's shape): {succeeded}/{calls} calls succeeded "
        f"(before: 53-90 % of calls went to it and failed; 408/600 succeeded here); the "
        f"bad endpoint got {got} calls, was ejected {bad.ejections} time(s), each of its "
        "calls failed over to a healthy endpoint (result flagged `maybe_duplicated`)",
    )


async def test_a_single_server_garbage_200_is_still_not_resent() -> None:
    """Without a fleet the same server would give the same answer: one request, typed error."""
    async with (
        _running([Behaviour("garbage")]) as endpoints,
        AsyncFriendli(server_url=endpoints.urls[0], retries=POLICY) as client,
    ):
        (outcome,) = await _run_calls(client, [0.0], 1)
    assert isinstance(outcome, FriendliAPIError)
    assert len(endpoints.log) == 1


@pytest.mark.scenario(53)
async def test_a_garbage_200_never_ends_a_call_another_endpoint_would_serve() -> None:
    """A flapping endpoint (503, image, 503, ...) beside one answering garbage: a call
    whose 503 moved it to the garbage endpoint goes back to the first with the policy's
    next attempt, as it would with the flapping endpoint alone. (It used to end with the
    garbage answer: both endpoints had been tried in the round.)"""
    behaviours = [Behaviour("flapping", period=1), Behaviour("garbage")]
    async with _running(behaviours) as endpoints:
        client = AsyncFriendli(
            server_url=[Endpoint(url, max_connections=4) for url in endpoints.urls],
            retries=POLICY,
            fleet=FleetConfig(failures_to_eject=1000),  # the garbage stays in rotation
        )
        async with client:
            outcomes = await _run_calls(client, [0.0] * 40, 1)
    failed = [o for o in outcomes if isinstance(o, FriendliAPIError)]
    assert not failed, failed
    assert endpoints.calls_to(1) >= 5  # the case was met, not routed around
    _check_outcomes(endpoints, outcomes)


# -- scenario 54: generated fleets and schedules --------------------------------------

_BAD: Sequence[Kind] = ("flapping", "garbage", "rate_limited", "black_hole", "dying")

behaviours_st = st.builds(
    Behaviour,
    kind=st.sampled_from(("healthy", "slow", *_BAD)),
    latency=st.sampled_from((0.0, 0.005, 0.03)),
    period=st.integers(1, 3),
)
healthy_st = st.builds(
    Behaviour, kind=st.sampled_from(("healthy", "slow")), latency=st.sampled_from((0.0, 0.02))
)


@st.composite
def fleets(draw: st.DrawFn) -> list[Behaviour]:
    """Two to four endpoints, at least one of them healthy, in any order."""
    others = draw(st.lists(behaviours_st, min_size=1, max_size=3))
    fleet = [draw(healthy_st), *others]
    return draw(st.permutations(fleet))


schedules = st.tuples(
    st.lists(st.sampled_from((0.0, 0.0, 0.002, 0.02)), min_size=8, max_size=40),
    st.integers(1, 16),
)
GENERATED: Counter[str] = Counter()


# Slow: run once, alone, in CI; its 0.3 s attempt timeouts are wall-clock behaviour.
@pytest.mark.slow
@pytest.mark.scenario(54)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    fleet=fleets(),
    schedule=schedules,
    retry_ambiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_generated_fleets_fail_only_what_the_policy_forbids_resending(
    fleet: list[Behaviour],
    schedule: tuple[list[float], int],
    retry_ambiguous: bool,
    seed: int,
    figures: Figures,
) -> None:
    """Any fleet with a healthy endpoint, any arrival schedule: every call succeeds or
    fails only after a server read it and gave no answer (the policy does not resend
    that); nothing read and unanswered is sent again; results that ran twice are flagged;
    no task or file descriptor outlives the client."""
    gaps, concurrency = schedule
    random.seed(seed)
    fds = _open_fds()

    async def scenario() -> tuple[Endpoints, list[ImageResult | FriendliAPIError]]:
        policy = attrs.evolve(POLICY, retry_ambiguous=retry_ambiguous)
        endpoints, outcomes, client = await _fleet_run(fleet, gaps, concurrency, policy)
        assert client.closed
        current = asyncio.current_task()
        assert {task for task in asyncio.all_tasks() if task is not current} == set()
        return endpoints, outcomes

    endpoints, outcomes = asyncio.run(scenario())
    late = _check_outcomes(endpoints, outcomes, retry_ambiguous=retry_ambiguous)
    assert _open_fds() <= fds + 2
    GENERATED["late"] += late
    GENERATED["examples"] += 1
    GENERATED["resending"] += retry_ambiguous
    GENERATED["calls"] += len(outcomes)
    GENERATED["failed"] += sum(1 for o in outcomes if isinstance(o, FriendliAPIError))
    GENERATED["endpoints"] += len(fleet)
    GENERATED.update(f"kind.{b.kind}" for b in fleet)
    kinds = ", ".join(
        f"{k.removeprefix('kind.')} {n}" for k, n in sorted(GENERATED.items()) if "." in k
    )
    figures.set(
        "fleet.generated",
        f"{GENERATED['examples']} generated fleets ({GENERATED['endpoints']} endpoints: "
        f"{kinds}; {GENERATED['resending']} with `retry_ambiguous=True`) under generated "
        f"schedules, {GENERATED['calls']} calls: {GENERATED['failed']} failed, every one "
        "after a server read the request and gave no answer (not resent by default, or "
        f"out of attempts; {GENERATED['late']} of them timed out at an endpoint that "
        "answers, late on a loaded machine); 0 unflagged resends, 0 leaked tasks or fds",
    )
