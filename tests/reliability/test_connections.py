"""Scenarios 16-18 and 39 (plus the async half of 24): connection lifecycle and idempotency.

Scenarios 19-24 (sync facade, Ctrl-C, fork, exit without close) belong to the sync facade
and are tested in ``tests/test_sync_lifecycle.py``; they are listed here as skips so the
report shows where they live.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliConnectionError,
    FriendliRateLimitError,
    FriendliTimeoutError,
    FriendliUsageError,
    RetryConfig,
    Timeout,
)
from friendli_image.server import Action, LocalServer, ServerConfig
from friendli_image.testing import no_wait

from .harness import (
    TINY_PNG,
    TOKEN,
    Figures,
    RawHandler,
    RawServer,
    SecretProbe,
    gen,
    http_response,
    image_body,
    python_flags,
    read_request,
    reset,
)

MakeClient = Callable[..., AsyncFriendli]
StartRaw = Callable[[RawHandler], Awaitable[RawServer]]


@pytest.fixture
def threaded_server() -> Iterator[LocalServer]:
    """The bundled server on its own thread, for clients running in a subprocess."""
    config = ServerConfig(static_image=TINY_PNG, max_concurrency=64, record_requests=False)
    with LocalServer(config) as srv:
        yield srv


_HYGIENE = """
import asyncio, gc, json, os, resource, sys, threading, tracemalloc
from friendli_image import AsyncFriendli

URL, TOKEN, N = sys.argv[1], sys.argv[2], int(sys.argv[3])

def fds():
    return len(os.listdir("/proc/self/fd"))

async def run(client, count, concurrency):
    sem = asyncio.Semaphore(concurrency)
    async def one(i):
        async with sem:
            result = await client.container.image.generate(prompt=f"p{i}")
            assert result.data
    await asyncio.gather(*(one(i) for i in range(count)))

async def main():
    gc.collect()
    base_fds, base_threads = fds(), threading.active_count()
    client = AsyncFriendli(server_url=URL, token=TOKEN)
    traced = []
    for fifth in range(5):  # each fifth: half one at a time, half at C=64
        if fifth == 2:
            tracemalloc.start()
        await run(client, N // 10, 1)
        await run(client, N // 10, 64)
        # A finished gather stays referenced until the next one completes: end with
        # a one-call run so no fifth's tasks are counted as growth.
        await run(client, 1, 1)
        gc.collect()
        traced.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    # Two fifths fill the pool, caches and set tables (which keep their size), the
    # third starts tracing; growth is measured over each of the last two. A leak grows
    # in both; what a busy machine leaves in flight at one measurement (a connection
    # closing, a larger set table) shows in one only, so the smaller counts.
    growth = min(traced[3] - traced[2], traced[4] - traced[3]) / (N // 5)
    open_fds = fds()
    await client.close()
    await asyncio.sleep(0.05)
    gc.collect()
    # VmHWM: ru_maxrss would include the parent's peak, carried across exec.
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({
        "calls": N,
        "fds_during": open_fds - base_fds,
        "fds": fds() - base_fds,
        "threads": threading.active_count() - base_threads,
        "growth_per_call": growth,
        "traced": traced[2:],
        "rss_mib": peak_kib / 1024,
    }))

# -X dev turns on asyncio debug mode, which is ~10x slower and only adds slow-callback
# logging here: keep dev mode (warnings, ResourceWarning tracking) without it.
asyncio.run(main(), debug=False)
"""


@pytest.mark.slow
@pytest.mark.scenario(16)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds via /proc")
def test_ten_thousand_calls_leave_nothing_behind(
    threaded_server: LocalServer, figures: Figures
) -> None:
    """10k calls (half at C=64) then close under -X dev: fds and threads back, no warnings."""
    completed = subprocess.run(
        [*python_flags(), "-c", _HYGIENE, threaded_server.url, TOKEN, "10000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stderr == ""
    numbers = json.loads(completed.stdout)
    figures.set(
        "hygiene",
        f"{numbers['calls']} calls: Δ fds {numbers['fds']:+d} after close, Δ threads "
        f"{numbers['threads']:+d}, ResourceWarnings 0 (-X dev -W error::ResourceWarning), "
        f"tracemalloc growth {numbers['growth_per_call']:.1f} B/call, max RSS "
        f"{numbers['rss_mib']:.0f} MiB",
    )
    assert abs(numbers["fds"]) <= 2
    assert numbers["threads"] == 0
    assert numbers["growth_per_call"] < 32, f"traced bytes after fifths 3-5: {numbers['traced']}"


@pytest.mark.scenario(17)
async def test_reused_connection_dropped_after_read_reconnects_once(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures
) -> None:
    """A keep-alive connection dropped after the server read the POST: one reconnect, flagged."""
    requests: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        while request := await read_request(reader):
            requests.append(request)
            if first and len(requests) == 2:
                writer.close()  # read, then gone without a reply
                return
            writer.write(http_response(image_body()))
            await writer.drain()

    raw = await raw_server(handler)
    client = make_client(raw.url, retries=RetryConfig.disabled())
    assert (await gen(client)).attempts == 1
    result = await gen(client)
    figures.add("inject.reset")
    figures.add("recover.expected")
    figures.add("recover.ok")
    assert result.attempts == 2
    assert result.maybe_duplicated
    assert connections == 2
    assert len(requests) == 3
    ids = [r.split(b"x-request-id: ", 1)[-1][:32] for r in (x.lower() for x in requests[1:])]
    assert ids[0] == ids[1]  # the reconnect resends the same request id


@pytest.mark.scenario(17)
async def test_reconnect_of_reused_connections_can_be_turned_off(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures
) -> None:
    """With reconnect_reused=False a reused connection dropped after the read is an error."""
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            requests.append(request)
            if len(requests) == 2:
                writer.close()  # read, then gone without a reply
                return
            writer.write(http_response(image_body()))
            await writer.drain()

    raw = await raw_server(handler)
    client = make_client(
        raw.url, retries=RetryConfig(max_attempts=3, initial_delay=0.01, reconnect_reused=False)
    )
    assert (await gen(client)).attempts == 1
    with pytest.raises(FriendliConnectionError) as caught:
        await gen(client)
    figures.add("inject.reset")
    figures.add("fail.expected")
    figures.add("fail.typed")
    assert caught.value.maybe_processed
    assert len(requests) == 2


@pytest.mark.scenario(17)
async def test_a_server_closing_after_each_429_still_gets_every_attempt(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures
) -> None:
    """Each connection answers one 429 and is closed when the next request comes on it
    (the keep-alive race, met by every retry): each retry reconnects, so the call ends
    with the 429 after max_attempts answers. Found by the generated byte-level responses,
    where the call ended with a connection error instead."""
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        if await read_request(reader):
            answered += 1
            writer.write(http_response(b'{"detail":"slow down"}', status="429 Too Many Requests"))
            await writer.drain()
            await read_request(reader)  # the retry, on the pooled connection: dropped

    raw = await raw_server(handler)
    client = make_client(raw.url, retries=RetryConfig(max_attempts=3))
    with no_wait() as waits, pytest.raises(FriendliRateLimitError) as caught:
        await gen(client)
    figures.add("inject.reset")
    figures.add("fail.expected")
    figures.add("fail.typed")
    assert answered == 3
    assert caught.value.attempts == 5  # three answered, two free reconnects
    assert len([delay for delay in waits.delays if delay > 0]) == 2  # two backoffs


@pytest.mark.scenario(17)
async def test_server_restart_between_calls_is_survived(
    server: LocalServer, make_client: MakeClient, figures: Figures
) -> None:
    """The server restarts on the same port between two calls: the next call just works."""
    client = make_client(server.url)
    await gen(client)
    await server.restart()
    figures.add("inject.reset")
    figures.add("recover.expected")
    result = await gen(client)
    assert result.attempts <= 2
    figures.add("recover.ok")


@pytest.mark.scenario(39)
async def test_benign_stale_keep_alive_race_is_not_a_failure(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures
) -> None:
    """An idle pooled connection reset just as it is reused: the call succeeds anyway."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        served = 0
        while True:
            if first and served == 1:
                await reader.read(1)  # the reuse arrives: reset before reading it
                reset(writer)
                return
            if not await read_request(reader):
                return
            writer.write(http_response(image_body()))
            await writer.drain()
            served += 1

    raw = await raw_server(handler)
    client = make_client(raw.url, retries=RetryConfig.disabled())
    await gen(client)
    result = await gen(client)
    figures.add("inject.reset")
    figures.add("recover.expected")
    figures.add("recover.ok")
    assert result.attempts == 2
    assert connections == 2


@pytest.mark.scenario(39)
async def test_fresh_connection_dropped_after_read_is_not_resent(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures, secrets: SecretProbe
) -> None:
    """The server reads the POST and hangs up: 1 request, a typed error with maybe_processed."""
    server.script(tid, [Action.drop_after_read()])
    client = make_client(server.url)
    with pytest.raises(FriendliConnectionError) as caught:
        await gen(client)
    figures.add("inject.reset")
    figures.add("fail.expected")
    assert caught.value.maybe_processed
    assert caught.value.attempts == 1
    assert server.stats.total_requests == 1
    figures.add("fail.typed")
    figures.add("ambiguous.flagged")
    secrets.check(caught.value)


@pytest.mark.scenario(39)
async def test_read_then_timeout_is_not_resent(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures, secrets: SecretProbe
) -> None:
    """The server reads the POST and stalls past the attempt timeout: 1 request, flagged."""
    server.script(tid, [Action.delay(2.0)])
    client = make_client(server.url, timeout=Timeout(attempt=0.5))
    with pytest.raises(FriendliTimeoutError) as caught:
        await gen(client)
    figures.add("inject.timeout")
    figures.add("fail.expected")
    assert caught.value.kind == "attempt"
    assert caught.value.maybe_processed
    assert server.stats.total_requests == 1
    figures.add("fail.typed")
    figures.add("ambiguous.flagged")
    secrets.check(caught.value)


@pytest.mark.scenario(39)
async def test_opted_in_resend_keeps_the_request_id(
    server: LocalServer, make_client: MakeClient, tid: str, figures: Figures
) -> None:
    """With retry_ambiguous=True the dropped POST is resent under the same request id."""
    server.script(tid, [Action.drop_after_read(), Action.drop_after_read()])
    client = make_client(server.url, retries=RetryConfig(retry_ambiguous=True, initial_delay=0.02))
    result = await gen(client)
    figures.add("inject.reset", 2)
    figures.add("recover.expected")
    figures.add("recover.ok")
    figures.add("ambiguous.resent.optin", 2)
    assert result.attempts == 3
    assert result.maybe_duplicated
    records = server.records
    assert len(records) == 3
    assert len({r.headers["X-Request-ID"] for r in records}) == 1
    assert [r.headers["X-Friendli-Attempt"] for r in records] == ["0", "1", "2"]


_LOOPS = """
import asyncio, gc, sys
from friendli_image import AsyncFriendli

URL = sys.argv[1]
AT_IMPORT = AsyncFriendli(server_url=URL, token="sk-x")  # built outside any loop

async def call(client):
    return (await client.container.image.generate(prompt="loops")).attempts

shared = AsyncFriendli(server_url=URL, token="sk-x")
print("run1", asyncio.run(call(shared)))
print("run2", asyncio.run(call(shared)))
print("import-time", asyncio.run(call(AT_IMPORT)))

async def dropped():
    client = AsyncFriendli(server_url=URL, token="sk-x")
    await call(client)
    del client
    gc.collect()
    await asyncio.sleep(0.05)
    return "ok"

print("dropped", asyncio.run(dropped()))
"""


@pytest.mark.scenario(18)
def test_clients_across_event_loops(
    threaded_server: LocalServer, dev_mode_stderr: Callable[[str], str]
) -> None:
    """Clients reused across asyncio.run calls, built at import, or dropped: no loop errors."""
    completed = subprocess.run(
        [*python_flags(), "-W", "error", "-c", _LOOPS, threaded_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert dev_mode_stderr(completed.stderr) == ""
    assert completed.stdout.split() == [
        "run1",
        "1",
        "run2",
        "1",
        "import-time",
        "1",
        "dropped",
        "ok",
    ]


@pytest.mark.scenario(24)
async def test_close_twice_then_call_raises_usage_error(
    server: LocalServer, make_client: MakeClient
) -> None:
    """close() twice is a no-op; a call after close raises FriendliUsageError, sends nothing."""
    client = make_client(server.url)
    await gen(client)
    await client.close()
    await client.close()
    with pytest.raises(FriendliUsageError):
        await gen(client)
    assert server.stats.total_requests == 1


@pytest.mark.scenario(17)
async def test_keep_alive_reconnect_does_not_use_up_an_attempt() -> None:
    """The free reconnect after a dropped reused connection leaves max_attempts intact."""
    config = ServerConfig(static_image=b"\x89PNG\r\n\x1a\n" + bytes(64))
    policy = RetryConfig(max_attempts=2, initial_delay=0.01, jitter=0.0)
    async with LocalServer(config) as srv, AsyncFriendli(server_url=srv.url, retries=policy) as c:
        await c.container.image.generate(prompt="warm up the keep-alive connection")
        srv.script("t", [Action.drop_after_read(), Action.status(503), Action.ok()])
        result = await c.container.image.generate(prompt="p", http_headers={"x-test-id": "t"})
    assert result.attempts == 3
    assert result.maybe_duplicated


_RACE = """
import asyncio, json, sys, threading
from friendli_image import AsyncFriendli, FriendliUsageError

URL, TRIALS = sys.argv[1], int(sys.argv[2])

def trial():
    client = AsyncFriendli(server_url=URL, token="sk-x", retries=0)
    barrier, done = threading.Barrier(2), threading.Barrier(2)
    outcomes = []

    async def call():
        barrier.wait()  # both loops reach the first use together
        try:
            await client.container.image.generate(prompt="race")
        except FriendliUsageError:
            return "usage"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            done.wait()  # and both stay alive until both calls ended: they overlap
        return "ok"

    def run():
        outcomes.append(asyncio.run(call()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes)

print(json.dumps([trial() for _ in range(TRIALS)]))
"""


@pytest.mark.slow
@pytest.mark.scenario(18)
def test_two_loops_racing_to_first_use_get_a_usage_error(figures: Figures) -> None:
    """50 trials, two threads' loops make one fresh client's first call at once: one call
    succeeds and the other is FriendliUsageError, every time (before: "Connector is
    closed" FriendliConnectionError(maybe_processed=True) in 16-35 of 50 under -X dev)."""
    config = ServerConfig(
        static_image=TINY_PNG, max_concurrency=64, record_requests=False, step_latency_ms=5
    )
    with LocalServer(config) as srv:
        completed = subprocess.run(
            [*python_flags(), "-c", _RACE, srv.url, "50"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert completed.returncode == 0, completed.stderr[-2000:]
    trials = json.loads(completed.stdout)
    wrong = [t for t in trials if t != ["ok", "usage"]]
    figures.set(
        "loop_race",
        f"{len(trials)} trials of two loops racing to one client's first call: "
        f"{len(trials) - len(wrong)} ended ok + FriendliUsageError, {len(wrong)} otherwise "
        "(target 0)",
    )
    assert not wrong, wrong[:3]
