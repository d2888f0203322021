"""Scenarios 9-15: read, deadline, attempt and connect timeouts; cancellation."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliError,
    FriendliTimeoutError,
    RetryConfig,
    Timeout,
)
from friendli_image.server import Action, LocalServer, ServerConfig

from .harness import (
    TINY_PNG,
    Figures,
    RawHandler,
    RawServer,
    SecretProbe,
    gen,
    pool,
    read_request,
)

MakeClient = Callable[..., AsyncFriendli]
Late = Callable[[float], float]
StartRaw = Callable[[RawHandler], Awaitable[RawServer]]


async def _wait_until(predicate: Callable[[], bool], limit: float = 3.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


@pytest.mark.scenario(9)
async def test_read_timeout_fires_and_discards_the_connection(  # noqa: PLR0917
    server: LocalServer,
    make_client: MakeClient,
    tid: str,
    figures: Figures,
    secrets: SecretProbe,
    late: Late,
) -> None:
    """A 3 s silence against read=1 s: FriendliTimeoutError(read) at 1.0-1.5 s, pool empty."""
    server.script(tid, [Action.delay(3.0)])
    client = make_client(server.url, timeout=Timeout(read=1.0))
    started = time.monotonic()
    with pytest.raises(FriendliTimeoutError) as caught:
        await gen(client)
    elapsed = time.monotonic() - started
    figures.add("inject.timeout")
    figures.add("fail.expected")
    figures.high("timeout.read", elapsed - 1.0)
    error = caught.value
    assert error.kind == "read"
    assert 1.0 <= elapsed <= late(1.0) < 3.0  # fired, long before the silence ended
    # The server may have started generating: not resent by default, and it says so.
    assert error.maybe_processed
    assert server.stats.total_requests == 1
    assert pool(client) == (0, 0)
    figures.add("fail.typed")
    figures.add("ambiguous.flagged")
    secrets.check(error)


@pytest.mark.scenario(10)
async def test_trickle_keeps_the_read_timer_quiet_until_the_deadline(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures, late: Late
) -> None:
    """1 KiB every 0.4 s, read=1 s, total=3 s: only the deadline fires, at 3.0-3.5 s."""
    server.script(tid, [Action.trickle(chunk_size=1024, interval_s=0.4, total_chunks=20)])
    client = make_client(server.url, timeout=Timeout(read=1.0, total=3.0))
    started = time.monotonic()
    with pytest.raises(FriendliTimeoutError) as caught:
        await gen(client)
    elapsed = time.monotonic() - started
    figures.add("inject.timeout")
    figures.high("timeout.deadline", elapsed - 3.0)
    assert caught.value.kind == "deadline"
    assert 3.0 <= elapsed <= late(3.0) < 20 * 0.4  # long before the trickle ended
    assert server.stats.total_requests == 1


@pytest.mark.scenario(11)
async def test_timers_start_after_a_pool_slot_is_acquired(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures, late: Late
) -> None:
    """One connection, three 1 s calls, attempt timeout 1.5 s: all succeed in about 3 s."""
    server.script(tid, [Action.delay(1.0)] * 3)
    client = make_client(server.url, max_connections=1, timeout=Timeout(attempt=1.5))
    started = time.monotonic()
    results = await asyncio.gather(*(gen(client) for _ in range(3)))
    elapsed = time.monotonic() - started
    figures.add("recover.expected", 3)
    figures.add("recover.ok", len(results))
    assert all(r.attempts == 1 for r in results)
    assert 3.0 <= elapsed <= late(3.0)
    assert server.stats.max_in_flight == 1


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: SYNs are dropped, so connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs")
@pytest.mark.scenario(12)
async def test_connect_timeout_is_never_sent_and_retried(
    full_backlog: int, make_client: MakeClient, figures: Figures, secrets: SecretProbe, late: Late
) -> None:
    """A listener that never accepts: connect timeouts at the set value, each one retried."""
    policy = RetryConfig(max_attempts=3, initial_delay=0.05, max_delay=0.05, jitter=0.0)
    client = make_client(
        f"http://127.0.0.1:{full_backlog}", retries=policy, timeout=Timeout(connect=0.5)
    )
    started = time.monotonic()
    with pytest.raises(FriendliTimeoutError) as caught:
        await gen(client)
    elapsed = time.monotonic() - started
    figures.add("inject.timeout", 3)
    figures.add("fail.expected")
    error = caught.value
    assert error.kind == "connect"
    assert not error.maybe_processed
    assert error.attempts == 3
    per_attempt = (elapsed - 2 * 0.05) / 3
    figures.high("timeout.connect", per_attempt - 0.5)
    # Each attempt ends at connect=0.5 s, not at the 10 s attempt timeout (the factory's).
    assert 0.9 * 0.5 <= per_attempt <= late(0.5)
    figures.add("fail.typed")
    secrets.check(error)


@pytest.mark.scenario(13)
async def test_cancel_in_flight_propagates_and_releases(
    server: LocalServer, make_client: MakeClient, tid: str
) -> None:
    """Cancelling 0.2 s after receipt: CancelledError, the server sees it, no further attempt."""
    server.script(tid, [Action.delay(5.0)])
    client = make_client(server.url)
    task = asyncio.ensure_future(gen(client))
    assert await _wait_until(lambda: server.stats.total_requests == 1)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_until(lambda: server.records[0].disconnected)
    assert pool(client)[0] == 0
    await asyncio.sleep(2 * 0.1)  # twice FAST's largest backoff
    assert server.stats.total_requests == 1


@pytest.mark.scenario(13)
async def test_cancel_during_backoff_stops_retrying(
    server: LocalServer, make_client: MakeClient, tid: str
) -> None:
    """Cancelling during the backoff sleep: CancelledError, and the retry is never sent."""
    server.script(tid, [Action.status(503)] * 3)
    policy = RetryConfig(max_attempts=3, initial_delay=0.5, max_delay=0.5, jitter=0.0)
    client = make_client(server.url, retries=policy)
    task = asyncio.ensure_future(gen(client))
    assert await _wait_until(lambda: server.stats.total_requests == 1)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool(client)[0] == 0
    await asyncio.sleep(2 * 0.5)
    assert server.stats.total_requests == 1


async def _outer_timeout(seconds: float, client: AsyncFriendli) -> None:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            await gen(client)
    else:  # pragma: no cover - 3.10 has no asyncio.timeout
        await asyncio.wait_for(gen(client), seconds)


@pytest.mark.scenario(14)
async def test_outer_timeout_wins_and_is_not_converted(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures, late: Late
) -> None:
    """asyncio.timeout(0.5) around a 10 s-timeout call: the outer TimeoutError at 0.5 s."""
    server.script(tid, [Action.delay(3.0)])
    client = make_client(server.url, timeout=Timeout(attempt=10.0))
    started = time.monotonic()
    with pytest.raises((TimeoutError, asyncio.TimeoutError)) as caught:
        await _outer_timeout(0.5, client)
    elapsed = time.monotonic() - started
    assert not isinstance(caught.value, FriendliError)
    figures.high("timeout.outer asyncio.timeout", elapsed - 0.5)
    assert 0.5 <= elapsed <= late(0.5) < 3.0  # long before the server answered
    assert server.stats.total_requests == 1
    assert pool(client)[0] == 0


@pytest.fixture
async def slow_server() -> AsyncIterator[LocalServer]:
    """A server with 5 ms per inference step (50 ms for 10 steps)."""
    config = ServerConfig(static_image=TINY_PNG, step_latency_ms=5, max_concurrency=64)
    async with LocalServer(config) as srv:
        yield srv


@pytest.mark.scenario(15)
async def test_random_cancellations_leave_the_pool_clean(
    slow_server: LocalServer, make_client: MakeClient, late: Late
) -> None:
    """Five rounds of 40 calls on 5 connections, half cancelled: nothing stays acquired."""
    client = make_client(slow_server.url, max_connections=5)
    rng = random.Random(15)
    for _ in range(5):
        tasks = [asyncio.ensure_future(gen(client, num_inference_steps=10)) for _ in range(40)]
        doomed = rng.sample(tasks, 20)
        for task in doomed:
            asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.3), task.cancel)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, asyncio.CancelledError), outcome
                assert task in doomed
        assert pool(client)[0] == 0
    started = time.monotonic()
    await gen(client, num_inference_steps=10)
    assert time.monotonic() - started < late(0.05)  # a leaked slot would block it


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await read_request(reader):
        pass  # read every request, answer none: only the client's timers end an attempt


async def _cancel_at_the_deadline(
    client: AsyncFriendli, offset: float
) -> tuple[bool, BaseException | None]:
    """One call with a 30 ms attempt timeout, cancelled ``offset`` s after it started."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(gen(client, timeout_ms=30))
    accepted: asyncio.Future[bool] = loop.create_future()
    loop.call_later(offset, lambda: accepted.set_result(task.cancel()))
    try:
        await task
    except BaseException as exc:  # the outcome is what is measured
        outcome: BaseException | None = exc
    else:
        outcome = None
    return await accepted, outcome


@pytest.mark.scenario(44)
@pytest.mark.scenario(15)
async def test_a_cancel_at_the_attempt_deadline_stays_a_cancel(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures
) -> None:
    """1,000 cancels at 30 +- 4 ms of a timeout_ms=30 call: every accepted one is a
    CancelledError (none swallowed into FriendliTimeoutError), and without a cancel the
    attempt timeout still fires on time."""
    raw = await raw_server(_never_answer)
    client = make_client(raw.url, retries=RetryConfig.disabled())
    rng = random.Random(12)
    accepted = swallowed = timed_out = 0
    for _wave in range(20):
        outcomes = await asyncio.gather(
            *(_cancel_at_the_deadline(client, rng.uniform(0.026, 0.034)) for _ in range(50))
        )
        for was_accepted, outcome in outcomes:
            if was_accepted:
                accepted += 1
                if not isinstance(outcome, asyncio.CancelledError):
                    swallowed += 1
            else:
                assert isinstance(outcome, FriendliTimeoutError), outcome
                timed_out += 1
    figures.set(
        "cancel.boundary",
        f"1000 cancels at 30 +- 4 ms of a 30 ms attempt: {accepted} accepted, {swallowed} "
        f"swallowed into FriendliTimeoutError (target 0; before: 17-24 %), {timed_out} "
        "came after the timeout had already ended the call",
    )
    figures.add("inject.cancel", 1000)
    assert swallowed == 0
    assert accepted > 100  # the offsets straddle the deadline

    async def timed() -> tuple[float, float]:
        """(lateness of the attempt timeout, lateness of a plain 30 ms sleep beside it)."""
        started = time.monotonic()

        async def control() -> float:
            await asyncio.sleep(0.030)
            return time.monotonic() - started - 0.030

        beside = asyncio.ensure_future(control())
        with pytest.raises(FriendliTimeoutError) as caught:
            await gen(client, timeout_ms=30)
        assert caught.value.kind == "attempt"
        return time.monotonic() - started - 0.030, await beside

    timings = [await timed() for _ in range(20)]
    late = max(t for t, _ in timings)
    # A loaded machine delays every timer; the SDK's own share is the excess over a
    # plain sleep started at the same moment. A timeout that fires late does so every
    # time, so the median is held to the bound: the largest of 20 excesses also holds one
    # scheduling stall of the busy machine (CI's floors lane once saw 157 ms).
    excesses = sorted(t - control for t, control in timings)
    figures.high("timeout.attempt (30 ms)", late)
    figures.high("timeout.attempt (30 ms), beyond a plain sleep", excesses[-1])
    assert statistics.median(excesses) < 0.05, excesses
