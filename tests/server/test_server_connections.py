"""Connection limits of the bundled server: slowloris, stalled bodies, the fd cap, stuck stderr.

The figures these tests measure are printed as ``FIGURE name=value`` lines (see them with
``pytest -s`` or ``-rP``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from friendli_image.server import LocalServer, ServerConfig

from .helpers import GENERATE, figure, free_port, wait_for_announcement

REPO = Path(__file__).resolve().parents[2]
Late = Callable[[float], float]
# A request head that never ends: one more byte of a header value every interval.
SLOW_HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def _slowloris(port: int, interval: float) -> float | None:
    """Hold one connection that trickles a request head; seconds until the server closed it.

    None when the connection could not be opened.
    """
    loop = asyncio.get_running_loop()
    # Timed from before the connect: the server's clock cannot start earlier.
    opened = loop.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, asyncio.TimeoutError):
        return None
    reading = asyncio.ensure_future(reader.read(1))
    try:
        writer.write(SLOW_HEAD)
        while not reading.done():
            await asyncio.wait({reading}, timeout=interval)
            if not reading.done() and not writer.is_closing():
                writer.write(b"a")
        if reading.exception() is None:
            assert reading.result() == b""  # closed, never answered
        return loop.time() - opened
    finally:
        reading.cancel()
        writer.close()


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _timed_post(url: str, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(url + GENERATE, json={"prompt": "p"}) as resp,
    ):
        await resp.read()
        return resp.status, time.monotonic() - started


@pytest.mark.scenario(48)
# Slow: run once, alone, in CI. Under parallel test load, opening the 200 connections
# took longer than the header timeout, and the first ones were closed before the last
# was open.
@pytest.mark.slow
async def test_slowloris_heads_time_out_while_real_requests_are_served(late: Late) -> None:
    """200 connections trickling a request head are closed after header_timeout_s; a real
    request made while they hang on is answered at once."""
    # 3 s: opening 200 connections can take over a second on a loaded machine, and none
    # may time out before the last is open.
    header_timeout = 3.0
    config = ServerConfig(image_size=16, header_timeout_s=header_timeout)
    with LocalServer(config) as srv:
        holders = [asyncio.ensure_future(_slowloris(srv.port, 0.2)) for _ in range(200)]
        await _until(lambda: srv.stats.open_connections == 200, timeout=header_timeout)
        status, latency = await _timed_post(srv.url, timeout=5)
        assert status == 200
        # Served beside them: had it queued behind them it would have waited for their
        # header timeout (the soonest the server frees anything).
        assert latency < header_timeout / 2
        closed_after = await asyncio.wait_for(asyncio.gather(*holders), 15)
        stats = srv.stats
    assert None not in closed_after
    times = [t for t in closed_after if t is not None]
    assert min(times) >= header_timeout
    assert max(times) <= late(header_timeout)
    assert stats.timed_out_connections == 200
    figure("slowloris.connections", len(times))
    figure("slowloris.header_timeout_s", header_timeout)
    figure("slowloris.real_request_s", round(latency, 3))
    figure("slowloris.closed_after_max_s", round(max(times), 3))


async def test_idle_keep_alive_connection_is_closed(late: Late) -> None:
    """A connection left idle after a response is closed after idle_timeout_s."""
    idle_timeout = 0.5
    config = ServerConfig(image_size=16, idle_timeout_s=idle_timeout)
    with LocalServer(config) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        assert await asyncio.wait_for(reader.read(), 2 * late(idle_timeout)) == b""
        idle = time.monotonic() - answered
        writer.close()
        assert srv.stats.timed_out_connections == 1
    assert 0.9 * idle_timeout <= idle <= late(idle_timeout)


async def test_stalled_body_gets_408(late: Late) -> None:
    """A body that stops arriving is answered 408 after idle_timeout_s, and the connection
    closes; the request never reaches a GPU slot."""
    idle_timeout = 0.5
    config = ServerConfig(image_size=16, idle_timeout_s=idle_timeout)
    with LocalServer(config) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        writer.write(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"prompt": "'
        )
        answer = await asyncio.wait_for(reader.read(), 15)
        elapsed = time.monotonic() - started
        writer.close()
        assert srv.stats.responses_by_status == {408: 1}
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"stalled" in answer
    assert 0.9 * idle_timeout <= elapsed <= late(idle_timeout)


async def test_slow_body_gets_408_at_the_total_deadline(late: Late) -> None:
    """A body trickled fast enough to dodge the gap limit is cut off at body_timeout_s."""
    body_timeout = 1.0
    config = ServerConfig(image_size=16, idle_timeout_s=0.5, body_timeout_s=body_timeout)
    with LocalServer(config) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        writer.write(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        )
        reading = asyncio.ensure_future(reader.read())
        while not reading.done() and time.monotonic() - started < 10:
            writer.write(b" ")
            await asyncio.wait({reading}, timeout=0.1)
        answer = await reading
        elapsed = time.monotonic() - started
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert 0.9 * body_timeout <= elapsed <= late(body_timeout)


async def test_connection_cap_evicts_the_oldest_idle_connection() -> None:
    """At max_connections a new connection is admitted by closing the oldest idle one."""
    header_timeout = 10.0  # what the sixth connection would wait for without an eviction
    config = ServerConfig(image_size=16, max_connections=5, header_timeout_s=header_timeout)
    with LocalServer(config) as srv:
        holders = [asyncio.ensure_future(_slowloris(srv.port, 0.2)) for _ in range(5)]
        await _until(lambda: srv.stats.open_connections == 5)
        status, latency = await _timed_post(srv.url, timeout=5)
        first = await asyncio.wait_for(asyncio.shield(holders[0]), 5)
        stats = srv.stats
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    assert status == 200
    assert latency < header_timeout / 2
    assert first is not None
    assert first < header_timeout / 2
    assert stats.evicted_connections == 1
    assert stats.max_open_connections == 6


@pytest.fixture
def stuck_stderr() -> Iterator[int]:
    """The write end of a pipe that is full and never read: any write to it blocks."""
    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    # Blocking again: the flag belongs to the open file, which the child shares.
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
    try:
        yield write_end
    finally:
        os.close(write_end)
        os.close(read_end)


@pytest.mark.long
@pytest.mark.scenario(48)
@pytest.mark.subprocess
async def test_flood_beyond_the_fd_limit_with_stuck_stderr(stuck_stderr: int, late: Late) -> None:
    """run_server at a 256-descriptor limit with stderr on a full, unread pipe: 400 slowloris
    connections neither exhaust its descriptors nor wedge it; real requests are answered."""
    port = free_port()
    header_timeout = 5.0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))\n"
        "from friendli_image.server import run_server, ServerConfig\n"
        f"run_server(ServerConfig(image_size=8, header_timeout_s={header_timeout}), port={port})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(  # noqa: ASYNC220 -- started once; its pipes are read after
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stuck_stderr, env=env
    ) as proc:
        try:
            wait_for_announcement(proc)
            url = f"http://127.0.0.1:{port}"
            holders = [asyncio.ensure_future(_slowloris(port, 0.2)) for _ in range(400)]
            await asyncio.sleep(1.5)
            latencies = []
            for _ in range(5):
                status, latency = await _timed_post(url, timeout=5)
                assert status == 200
                latencies.append(latency)
            closed_after = await asyncio.wait_for(asyncio.gather(*holders), 20)
            status, _latency = await _timed_post(url, timeout=5)
            assert status == 200
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
    opened = [t for t in closed_after if t is not None]
    assert len(opened) >= 300
    assert max(opened) <= late(header_timeout)
    # Not queued behind the held connections, which free nothing before their timeout.
    assert max(latencies) < header_timeout / 2
    figure("flood.connections_opened", len(opened))
    figure("flood.real_request_max_s", round(max(latencies), 3))
