"""The zero-wait testing mode: every retry decision kept, no wait slept, each one recorded.

Against the bundled server over loopback, so the decisions come from real answers
(statuses, ``Retry-After`` headers) through the real retry loop. Wall-clock bounds here
are about the mode's point (nothing was slept) and are an order of magnitude from the
delays that would have been.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliAPIStatusError,
    FriendliServerError,
    RetryConfig,
    SyncFriendli,
    Timeout,
)
from friendli_image.server import Action, LocalServer, ServerConfig
from friendli_image.testing import RecordedWaits, no_wait

NO_JITTER = RetryConfig(jitter=0.0)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(step_latency_ms=0, image_size=16)) as running:
        yield running


@pytest.fixture
def test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid


def _client(server: LocalServer, test_id: str, retries: RetryConfig = NO_JITTER) -> AsyncFriendli:
    return AsyncFriendli(
        server_url=server.url, retries=retries, http_headers={"x-test-id": test_id}
    )


async def test_backoff_is_recorded_not_slept(server: LocalServer, test_id: str) -> None:
    server.script(test_id, [Action.status(503), Action.status(503), Action.status(503)])
    began = time.monotonic()
    with no_wait() as waits:
        async with _client(server, test_id) as client:
            res = await client.container.image.generate(prompt="x")
    assert res.attempts == 4
    # The default policy: 0.5 s, doubled each retry.
    assert waits.delays == [0.5, 1.0, 2.0]
    assert waits.total == 3.5
    assert time.monotonic() - began < 3.5  # 3.5 s would have been slept


async def test_retry_after_is_honoured_and_capped(server: LocalServer, test_id: str) -> None:
    server.script(
        test_id,
        [Action.status(429, {"Retry-After": "7"}), Action.status(503, {"retry-after-ms": "1500"})],
    )
    with no_wait() as waits:
        async with _client(server, test_id) as client:
            await client.container.image.generate(prompt="x")
    assert waits.delays == [7.0, 1.5]

    # A hint over max_retry_after stops at once, as it would in production.
    server.script(test_id, [Action.status(429, {"Retry-After": "120"})])
    with no_wait() as waits:
        async with _client(server, test_id) as client:
            with pytest.raises(FriendliAPIStatusError) as caught:
                await client.container.image.generate(prompt="x")
    assert caught.value.status == 429
    assert waits.delays == []


async def test_max_elapsed_and_the_deadline_run_on_the_skipped_time(
    server: LocalServer, test_id: str
) -> None:
    # Retry-After 3 s twice would wake at 6 s, past max_elapsed=5: a second attempt only.
    server.script(test_id, [Action.status(503, {"Retry-After": "3"})] * 3)
    config = RetryConfig(jitter=0.0, max_elapsed=5.0)
    with no_wait() as waits:
        async with _client(server, test_id, config) as client:
            with pytest.raises(FriendliServerError) as caught:
                await client.container.image.generate(prompt="x")
    assert caught.value.attempts == 2
    assert waits.delays == [3.0]

    # Timeout.total likewise: backoff 0.5, 1.0, 2.0 crosses a 3 s call deadline at the third.
    server.script(test_id, [Action.status(503)] * 5)
    async with AsyncFriendli(
        server_url=server.url,
        retries=NO_JITTER,
        timeout=Timeout(total=3.0),
        http_headers={"x-test-id": test_id},
    ) as client:
        with no_wait() as waits, pytest.raises(FriendliServerError) as caught:
            await client.container.image.generate(prompt="x")
    assert waits.delays == [0.5, 1.0]
    assert caught.value.attempts == 3


async def test_the_retry_budget_is_spent_as_in_production(server: LocalServer) -> None:
    # A budget of 2 retries for the whole client: the third failing call is not retried.
    config = RetryConfig(jitter=0.0, max_attempts=2, budget_floor=2.0, budget_cap=2.0)
    async with AsyncFriendli(server_url=server.url, retries=config) as client:
        with no_wait() as waits:
            for number in range(3):
                call_id = f"budget-{number}"
                server.script(call_id, [Action.status(502)] * 2)
                with pytest.raises(FriendliAPIStatusError) as caught:
                    await client.container.image.generate(
                        prompt="x", http_headers={"x-test-id": call_id}
                    )
                assert caught.value.attempts == (2 if number < 2 else 1)
    assert waits.delays == [0.5, 0.5]


def test_the_blocking_facade_is_covered(server: LocalServer, test_id: str) -> None:
    # SyncFriendli runs its calls on a loop thread of its own: the mode is process-wide.
    server.script(test_id, [Action.status(503), Action.status(502)])
    with (
        no_wait() as waits,
        SyncFriendli(
            server_url=server.url, retries=NO_JITTER, http_headers={"x-test-id": test_id}
        ) as client,
    ):
        res = client.container.image.generate(prompt="x")
    assert res.attempts == 3
    assert waits.delays == [0.5, 1.0]


async def test_the_mode_ends_with_its_block_even_on_an_error(
    server: LocalServer, test_id: str
) -> None:
    with pytest.raises(RuntimeError), no_wait():
        raise RuntimeError("a failing test")
    # Out of the block, a retry waits for real again.
    config = RetryConfig(jitter=0.0, initial_delay=0.3)
    server.script(test_id, [Action.status(503)])
    began = time.monotonic()
    async with _client(server, test_id, config) as client:
        await client.container.image.generate(prompt="x")
    assert time.monotonic() - began >= 0.29


async def test_nested_blocks_record_into_the_innermost(server: LocalServer, test_id: str) -> None:
    server.script(test_id, [Action.status(503), Action.status(503)])
    with no_wait() as outer:
        async with _client(server, test_id) as client:
            with no_wait() as inner:
                await client.container.image.generate(prompt="x")
    assert inner.delays == [0.5, 1.0]
    assert outer.delays == []


async def test_the_fixture(
    server: LocalServer, test_id: str, friendli_no_wait: RecordedWaits
) -> None:
    server.script(test_id, [Action.status(503)])
    async with _client(server, test_id) as client:
        await client.container.image.generate(prompt="x")
    assert friendli_no_wait.delays == [0.5]


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_a_forked_child_starts_with_the_mode_off() -> None:
    # In a fresh interpreter: forking this test process (which runs server threads)
    # would be unsafe, and is not the point.
    script = """
import asyncio, os, time
from friendli_image._clock import pause
from friendli_image.testing import no_wait

async def slept() -> float:
    began = time.monotonic()
    await pause(0.05)
    return time.monotonic() - began

with no_wait() as waits:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if asyncio.run(slept()) >= 0.045 else 3)
    _, status = os.waitpid(pid, 0)
    assert asyncio.run(slept()) < 0.045 and len(waits) == 1
print(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "0", done.stderr
