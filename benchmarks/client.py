"""One benchmark cell: one client, N requests, C in flight, in this process alone.

Run as ``python benchmarks/client.py CLIENT --url URL --n N --c C --size BYTES``; prints
one JSON object: requests/s, p50/p99 latency, client CPU µs per request and peak RSS.
The fleet clients take several comma-separated URLs.

CPU is ``getrusage(RUSAGE_SELF)`` user + sys (all threads) over the timed part only,
after imports and a warm-up of C requests that opens the connections. Every client
decodes the image to bytes and the cell fails if any image has the wrong size, so each
client does the same useful work. Latency is measured from when a request gets one of
the C slots to when its decoded image is in hand (batch: the result's own ``elapsed``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PATH = "/v1/images/generations"
PROMPT = "a lighthouse at dawn, volumetric light, 35mm"

Timed = Callable[[int], Awaitable[list[float]]]


class Cell:
    """What a client needs to know, and where it records what it saw."""

    def __init__(self, url: str, n: int, c: int, size: int) -> None:
        self.url = url
        self.n = n
        self.c = c
        self.size = size

    def check(self, image: bytes | bytearray) -> None:
        if len(image) != self.size:
            raise RuntimeError(f"decoded {len(image)} bytes, expected {self.size}")


async def _fan_out(n: int, c: int, one: Callable[[int], Awaitable[float]]) -> list[float]:
    """C at a time: a plain sequential loop at C=1, else gather over N behind a semaphore."""
    if c == 1:
        return [await one(i) for i in range(n)]
    slots = asyncio.Semaphore(c)

    async def guarded(i: int) -> float:
        async with slots:
            return await one(i)

    return list(await asyncio.gather(*(guarded(i) for i in range(n))))


def _threaded(n: int, c: int, one: Callable[[int], float]) -> list[float]:
    """C at a time: a sequential loop at C=1, else a pool of C threads."""
    if c == 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=c) as pool:
        return list(pool.map(one, range(n)))


# -- the clients ----------------------------------------------------------------------------


async def run_raw(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """Raw aiohttp as PERFORMANCE.md defines it: what a careful user writes by hand."""
    import aiohttp

    url = cell.url + PATH
    connector = aiohttp.TCPConnector(limit=cell.c)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> float:
            started = time.perf_counter()
            async with session.post(url, json={"prompt": PROMPT, "seed": i}) as resp:
                resp.raise_for_status()
                payload = await resp.json()
            cell.check(base64.b64decode(payload["image"]))
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


async def run_expert(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """What an expert writes by hand: one session, orjson on the raw body, pybase64.

    No validation, no retries, no typed errors, no request ids: the floor an SDK on
    aiohttp can approach. The status check is one integer compare (a client that skips
    it would decode error bodies as images).
    """
    import aiohttp
    import orjson
    import pybase64

    url = cell.url + PATH
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=cell.c)
    async with aiohttp.ClientSession(connector=connector) as session:
        post = session.post

        async def one(i: int) -> float:
            started = time.perf_counter()
            body = orjson.dumps({"prompt": PROMPT, "seed": i})
            async with post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                payload = orjson.loads(await resp.read())
            cell.check(pybase64.b64decode(payload["image"]))
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


async def run_friendli(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """AsyncFriendli: gather + semaphore over ``generate`` (pool size C)."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        generate = client.container.image.generate

        async def one(i: int) -> float:
            started = time.perf_counter()
            result = await generate(prompt=PROMPT, seed=i)
            cell.check(result.data)
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


async def run_friendli_batch(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """AsyncFriendli ``generate_batch`` over N prompts at concurrency C."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        image = client.container.image
        if not hasattr(image, "generate_batch"):
            raise SystemExit(3)  # not built yet: the harness skips this client

        async def batch(n: int) -> list[float]:
            specs = [{"prompt": PROMPT, "seed": i} for i in range(n)]
            latencies = []
            # Items as they complete; each item's elapsed runs from dispatch to outcome.
            async for item in image.generate_batch(specs, concurrency=cell.c):
                if item.result is None:
                    raise RuntimeError(f"batch item failed: {item!r}")
                cell.check(item.result.data)
                latencies.append(item.elapsed)
            return latencies

        await timed(batch)


def run_friendli_sync(
    cell: Cell, timed_sync: Callable[[Callable[[int], list[float]]], None]
) -> None:
    """SyncFriendli: sequential at C=1, else one shared client used from C threads."""
    try:
        from friendli_image import SyncFriendli  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit(3) from None

    with SyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        generate = client.container.image.generate

        def one(i: int) -> float:
            started = time.perf_counter()
            result = generate(prompt=PROMPT, seed=i)
            cell.check(result.data)
            return time.perf_counter() - started

        timed_sync(lambda n: _threaded(n, cell.c, one))


async def run_official_async(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """The official ``friendli`` SDK's AsyncFriendli (httpx + pydantic), gather + semaphore."""
    try:
        from friendli import AsyncFriendli as OfficialAsync
    except ImportError:
        raise SystemExit(3) from None

    # The official SDK ignores a client-level server_url for container operations, and
    # needs some token (the benchmark server checks none).
    async with OfficialAsync(token="x", server_url=cell.url) as client:  # noqa: S106
        generate = client.container.image.generate

        async def one(i: int) -> float:
            started = time.perf_counter()
            result = await generate(prompt=PROMPT, seed=i, server_url=cell.url)
            cell.check(base64.b64decode(result.image))
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


def run_official_sync(
    cell: Cell, timed_sync: Callable[[Callable[[int], list[float]]], None]
) -> None:
    """The official SyncFriendli: sequential at C=1, else one client used from C threads."""
    try:
        from friendli import SyncFriendli as OfficialSync
    except ImportError:
        raise SystemExit(3) from None

    with OfficialSync(token="x", server_url=cell.url) as client:  # noqa: S106
        generate = client.container.image.generate

        def one(i: int) -> float:
            started = time.perf_counter()
            result = generate(prompt=PROMPT, seed=i, server_url=cell.url)
            cell.check(base64.b64decode(result.image))
            return time.perf_counter() - started

        timed_sync(lambda n: _threaded(n, cell.c, one))


def _fleet_client(urls: list[str], c: int) -> Any:
    """``AsyncFriendli(server_url=urls)``, or exit 3 when this version takes one URL only."""
    from friendli_image import AsyncFriendli, FriendliError

    try:
        return AsyncFriendli(server_url=urls, token="", max_connections=c)  # type: ignore[arg-type]
    except (TypeError, ValueError, FriendliError):
        raise SystemExit(3) from None


async def run_fleet(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """One AsyncFriendli over every endpoint of ``--url`` (comma-separated): its own routing."""
    async with _fleet_client(cell.url.split(","), cell.c) as client:
        generate = client.container.image.generate

        async def one(i: int) -> float:
            started = time.perf_counter()
            result = await generate(prompt=PROMPT, seed=i)
            cell.check(result.data)
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


async def run_fleet_round_robin(cell: Cell, timed: Callable[[Timed], Awaitable[None]]) -> None:
    """The hand-split baseline: one AsyncFriendli per endpoint, request i to endpoint i mod k."""
    from friendli_image import AsyncFriendli

    async with contextlib.AsyncExitStack() as stack:
        generates = []
        for url in cell.url.split(","):
            client = AsyncFriendli(server_url=url, token="", max_connections=cell.c)
            await stack.enter_async_context(client)
            generates.append(client.container.image.generate)

        async def one(i: int) -> float:
            started = time.perf_counter()
            result = await generates[i % len(generates)](prompt=PROMPT, seed=i)
            cell.check(result.data)
            return time.perf_counter() - started

        await timed(lambda n: _fan_out(n, cell.c, one))


ASYNC_CLIENTS = {
    "expert": run_expert,
    "raw_aiohttp": run_raw,
    "friendli": run_friendli,
    "friendli_batch": run_friendli_batch,
    "official_async": run_official_async,
    "fleet": run_fleet,
    "fleet_round_robin": run_fleet_round_robin,
}
SYNC_CLIENTS = {"friendli_sync": run_friendli_sync, "official_sync": run_official_sync}
CLIENTS = (*ASYNC_CLIENTS, *SYNC_CLIENTS)


# -- measuring ------------------------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry a parent's peak across exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _figures(n: int, wall: float, cpu: float, latencies: list[float]) -> dict[str, float]:
    return {
        "n": n,
        "rps": n / wall,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "cpu_us": cpu / n * 1e6,
        "rss_mib": _peak_rss_mib(),
    }


def measure(name: str, cell: Cell) -> dict[str, float]:
    """Warm up with C requests, then time N; return the cell's figures."""
    figures: dict[str, float] = {}
    warmup = max(cell.c, 8)

    async def timed(run: Timed) -> None:
        await run(warmup)
        cpu, started = _cpu(), time.perf_counter()
        latencies = await run(cell.n)
        wall, cpu = time.perf_counter() - started, _cpu() - cpu
        figures.update(_figures(cell.n, wall, cpu, latencies))

    def timed_sync(run: Callable[[int], list[float]]) -> None:
        run(warmup)
        cpu, started = _cpu(), time.perf_counter()
        latencies = run(cell.n)
        wall, cpu = time.perf_counter() - started, _cpu() - cpu
        figures.update(_figures(cell.n, wall, cpu, latencies))

    if name in ASYNC_CLIENTS:
        asyncio.run(ASYNC_CLIENTS[name](cell, timed))
    else:
        SYNC_CLIENTS[name](cell, timed_sync)
    return figures


def main() -> None:
    """Parse the command line, run the cell, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--c", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    args = parser.parse_args()
    figures = measure(args.client, Cell(args.url, args.n, args.c, args.size))
    json.dump({"client": args.client, "c": args.c, "size": args.size, **figures}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
