"""Scenario 51: the bundled server flooded with refused requests carrying large headers.

``friendli-image serve --token`` once kept the full headers of every request, refused ones
included, for the last 100,000 requests: 20,000 requests without a token and 12 KiB of
headers each took it from 65 to 302 MiB. Here the real command runs in a subprocess, is
flooded the same way, and its resident memory is read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .harness import GENERATE, Figures

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads resident memory from /proc"
)

FLOOD = 20_000
HEADER_BYTES = 12 * 1024
CONCURRENCY = 16


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None, status
    return int(match.group(1)) / 1024


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``friendli-image serve`` with a token, on a free port, as a user starts it."""
    env = {**os.environ, "FRIENDLI_SERVER_TOKEN": "sk-server-flood-token"}
    command = [sys.executable, "-m", "friendli_image", "serve", "--port", "0"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            match = re.search(r"(http://\S+)", process.stdout.readline())
            assert match is not None, "the server printed no URL"
            yield process, match.group(1)
        finally:
            process.terminate()  # SIGTERM stops `serve` cleanly; the with block waits


async def _flood(url: str, count: int) -> dict[int, int]:
    """``count`` requests without a token, each with ``HEADER_BYTES`` of headers."""
    pad = {f"x-pad-{i}": chr(97 + i) * (HEADER_BYTES // 4 - 10) for i in range(4)}
    statuses: dict[int, int] = {}
    queue = iter(range(count))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                async with session.post(url + GENERATE, data=b"{}", headers=pad) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


@pytest.mark.slow  # a memory ceiling over 20,000 requests: once, on the default Python
@pytest.mark.scenario(51)
def test_refused_flood_with_large_headers_keeps_server_memory_flat(
    served: tuple[subprocess.Popen[str], str], figures: Figures
) -> None:
    """20,000 unauthenticated requests with 12 KiB of headers: all 401, RSS stays flat."""
    process, url = served
    # Warm up: the first requests import and allocate what every later one reuses.
    asyncio.run(_flood(url, 1_000))
    before = _rss_mib(process.pid)
    started = time.monotonic()
    statuses = asyncio.run(_flood(url, FLOOD))
    elapsed = time.monotonic() - started
    after = _rss_mib(process.pid)
    assert statuses == {401: FLOOD}
    growth = after - before
    # Recording them would hold FLOOD * HEADER_BYTES = 234 MiB; flat means a few MiB of
    # allocator noise.
    assert growth < 16, f"RSS grew {growth:.1f} MiB ({before:.1f} -> {after:.1f})"
    assert process.poll() is None
    figures.set(
        "server.flood",
        f"{FLOOD:,} refused requests with {HEADER_BYTES // 1024} KiB of headers each to "
        f"`friendli-image serve --token` in {elapsed:.1f} s: RSS {before:.1f} -> "
        f"{after:.1f} MiB ({growth:+.1f} MiB; before the fix 57 -> 319 MiB here); 0 records "
        "kept (refused requests leave none, `serve` keeps none)",
    )
