"""One benchmark cell: one client, N requests, C in flight, in this process alone.

Run as ``python benchmarks/client.py CLIENT --url URL --n N --c C --size BYTES``; prints
one JSON object: requests/s, p50/p99 latency, client CPU µs per request and peak RSS.
The fleet clients take several comma-separated URLs.

Each client supplies only what its user would write: a function that makes one request
and returns the decoded image (the expert's: post, ``orjson.loads(await resp.read())``,
``pybase64.b64decode``, nothing else). The harness around it is the same for every
client and stays out of what is measured:

1. a warm-up of C requests (opens the connections), each image checked;
2. **the measured pass**: N requests through C workers that take request numbers in
   turn and drop each image; CPU is the process's user + sys time (``getrusage``, all
   threads) and wall time around this pass alone: no per-request timing, no checks;
3. a latency pass of N/3 requests at the same C, each timed and its image checked
   against the expected size (the cell fails on any mismatch): p50/p99 come from here.

C workers (not a task per request behind a semaphore) is the cheapest way asyncio has
to keep C requests in flight, so the fan-out adds as little as it can to every client.
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
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PATH = "/v1/images/generations"
PROMPT = "a lighthouse at dawn, volumetric light, 35mm"

#: One request of an async client: request number -> the decoded image.
One = Callable[[int], Awaitable[bytes]]
#: One request of a sync client.
OneSync = Callable[[int], bytes]
#: A client that fans out by itself (generate_batch): (N, sink) where the sink gets each
#: image and the latency the client reports for it, or is None in the measured pass.
Sink = Callable[[bytes, float], None]
Many = Callable[[int, Sink | None], Awaitable[None]]


class Cell:
    """What a client needs to know."""

    def __init__(self, url: str, n: int, c: int, size: int) -> None:
        self.url = url
        self.n = n
        self.c = c
        self.size = size


# -- the clients: each returns its per-request function, and nothing else -----------------


@contextlib.asynccontextmanager
async def expert(cell: Cell) -> Any:
    """What an expert writes by hand: one session, orjson on the raw body, pybase64.

    No checks at all (not even the status), no retries, no typed errors, no request ids:
    the floor an SDK on aiohttp can approach.
    """
    import aiohttp
    import orjson
    import pybase64

    url = cell.url + PATH
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cell.c)) as session:
        post, dumps, loads, b64decode = session.post, orjson.dumps, orjson.loads, pybase64.b64decode

        async def one(i: int) -> bytes:
            async with post(url, data=dumps({"prompt": PROMPT, "seed": i}), headers=headers) as r:
                return b64decode(loads(await r.read())["image"])

        yield one


@contextlib.asynccontextmanager
async def raw_aiohttp(cell: Cell) -> Any:
    """Raw aiohttp as PERFORMANCE.md defines it: what a careful user writes by hand."""
    import aiohttp

    url = cell.url + PATH
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cell.c)) as session:

        async def one(i: int) -> bytes:
            async with session.post(url, json={"prompt": PROMPT, "seed": i}) as resp:
                resp.raise_for_status()
                payload = await resp.json()
            return base64.b64decode(payload["image"])

        yield one


@contextlib.asynccontextmanager
async def friendli(cell: Cell) -> Any:
    """AsyncFriendli: ``generate`` per request (pool size C)."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        generate = client.container.image.generate

        async def one(i: int) -> bytes:
            return (await generate(prompt=PROMPT, seed=i)).data

        yield one


@contextlib.asynccontextmanager
async def friendli_batch(cell: Cell) -> Any:
    """AsyncFriendli ``generate_batch`` over N prompts at concurrency C (it fans out itself)."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        image = client.container.image
        if not hasattr(image, "generate_batch"):
            raise SystemExit(3)  # not built yet: the harness skips this client

        async def many(n: int, sink: Sink | None) -> None:
            specs = [{"prompt": PROMPT, "seed": i} for i in range(n)]
            async for item in image.generate_batch(specs, concurrency=cell.c):
                if sink is not None:
                    if item.result is None:
                        raise RuntimeError(f"batch item failed: {item!r}")
                    sink(item.result.data, item.elapsed)

        yield many


@contextlib.asynccontextmanager
async def official_async(cell: Cell) -> Any:
    """The official ``friendli`` SDK's AsyncFriendli (httpx + pydantic)."""
    try:
        from friendli import AsyncFriendli as OfficialAsync
    except ImportError:
        raise SystemExit(3) from None

    # The official SDK ignores a client-level server_url for container operations, and
    # needs some token (the benchmark server checks none).
    async with OfficialAsync(token="x", server_url=cell.url) as client:  # noqa: S106
        generate = client.container.image.generate

        async def one(i: int) -> bytes:
            result = await generate(prompt=PROMPT, seed=i, server_url=cell.url)
            return base64.b64decode(result.image)

        yield one


def _fleet_client(urls: list[str], c: int) -> Any:
    """``AsyncFriendli(server_url=urls)``, or exit 3 when this version takes one URL only."""
    from friendli_image import AsyncFriendli, FriendliError

    try:
        return AsyncFriendli(server_url=urls, token="", max_connections=c)  # type: ignore[arg-type]
    except (TypeError, ValueError, FriendliError):
        raise SystemExit(3) from None


@contextlib.asynccontextmanager
async def fleet(cell: Cell) -> Any:
    """One AsyncFriendli over every endpoint of ``--url`` (comma-separated): its own routing."""
    async with _fleet_client(cell.url.split(","), cell.c) as client:
        generate = client.container.image.generate

        async def one(i: int) -> bytes:
            return (await generate(prompt=PROMPT, seed=i)).data

        yield one


@contextlib.asynccontextmanager
async def fleet_round_robin(cell: Cell) -> Any:
    """The hand-split baseline: one AsyncFriendli per endpoint, request i to endpoint i mod k."""
    from friendli_image import AsyncFriendli

    async with contextlib.AsyncExitStack() as stack:
        generates = []
        for url in cell.url.split(","):
            client = AsyncFriendli(server_url=url, token="", max_connections=cell.c)
            await stack.enter_async_context(client)
            generates.append(client.container.image.generate)

        async def one(i: int) -> bytes:
            return (await generates[i % len(generates)](prompt=PROMPT, seed=i)).data

        yield one


@contextlib.contextmanager
def friendli_sync(cell: Cell) -> Iterator[OneSync]:
    """SyncFriendli: one shared client (sequential at C=1, else used from C threads)."""
    try:
        from friendli_image import SyncFriendli  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit(3) from None

    with SyncFriendli(server_url=cell.url, token="", max_connections=cell.c) as client:
        generate = client.container.image.generate

        def one(i: int) -> bytes:
            return generate(prompt=PROMPT, seed=i).data

        yield one


@contextlib.contextmanager
def official_sync(cell: Cell) -> Iterator[OneSync]:
    """The official SyncFriendli (sequential at C=1, else one client used from C threads)."""
    try:
        from friendli import SyncFriendli as OfficialSync
    except ImportError:
        raise SystemExit(3) from None

    with OfficialSync(token="x", server_url=cell.url) as client:  # noqa: S106
        generate = client.container.image.generate

        def one(i: int) -> bytes:
            return base64.b64decode(generate(prompt=PROMPT, seed=i, server_url=cell.url).image)

        yield one


ASYNC_CLIENTS: dict[str, Callable[[Cell], Any]] = {
    "expert": expert,
    "raw_aiohttp": raw_aiohttp,
    "friendli": friendli,
    "official_async": official_async,
    "fleet": fleet,
    "fleet_round_robin": fleet_round_robin,
}
#: Clients that fan out by themselves.
MANY_CLIENTS: dict[str, Callable[[Cell], Any]] = {"friendli_batch": friendli_batch}
SYNC_CLIENTS: dict[str, Callable[[Cell], Any]] = {
    "friendli_sync": friendli_sync,
    "official_sync": official_sync,
}
CLIENTS = (*ASYNC_CLIENTS, *MANY_CLIENTS, *SYNC_CLIENTS)


# -- the harness: the same for every client ---------------------------------------------


async def _workers(n: int, c: int, one: One) -> None:
    """N requests, C in flight: C workers taking request numbers in turn, images dropped."""
    numbers = iter(range(n))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    if c == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(c)))


def _threads(n: int, c: int, one: OneSync) -> None:
    """N requests, C in flight: a sequential loop at C=1, else a pool of C threads."""
    if c == 1:
        for i in range(n):
            one(i)
        return
    with ThreadPoolExecutor(max_workers=c) as pool:
        for _ in pool.map(one, range(n)):
            pass


class _Checked:
    """The latency pass: times each request and checks its image (outside the measured pass)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.latencies: list[float] = []

    def sink(self, image: bytes, elapsed: float) -> None:
        if len(image) != self.size:
            raise RuntimeError(f"decoded {len(image)} bytes, expected {self.size}")
        self.latencies.append(elapsed)

    def wrap(self, one: One) -> One:
        async def timed(i: int) -> bytes:
            started = time.perf_counter()
            image = await one(i)
            self.sink(image, time.perf_counter() - started)
            return image

        return timed

    def wrap_sync(self, one: OneSync) -> OneSync:
        def timed(i: int) -> bytes:
            started = time.perf_counter()
            image = one(i)
            self.sink(image, time.perf_counter() - started)
            return image

        return timed


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
    """Warm up (checked), the measured pass, then the latency pass; the cell's figures."""
    warmup, n, c = max(cell.c, 8), cell.n, cell.c
    latency_n = max(c, 8, n // 3)
    checked, warm = _Checked(cell.size), _Checked(cell.size)

    async def run_async() -> tuple[float, float]:
        async with ASYNC_CLIENTS[name](cell) as one:
            await _workers(warmup, c, warm.wrap(one))
            cpu, started = _cpu(), time.perf_counter()
            await _workers(n, c, one)
            wall, cpu = time.perf_counter() - started, _cpu() - cpu
            await _workers(latency_n, c, checked.wrap(one))
        return wall, cpu

    async def run_many() -> tuple[float, float]:
        async with MANY_CLIENTS[name](cell) as many:
            await many(warmup, warm.sink)
            cpu, started = _cpu(), time.perf_counter()
            await many(n, None)
            wall, cpu = time.perf_counter() - started, _cpu() - cpu
            await many(latency_n, checked.sink)
        return wall, cpu

    def run_sync() -> tuple[float, float]:
        with SYNC_CLIENTS[name](cell) as one:
            _threads(warmup, c, warm.wrap_sync(one))
            cpu, started = _cpu(), time.perf_counter()
            _threads(n, c, one)
            wall, cpu = time.perf_counter() - started, _cpu() - cpu
            _threads(latency_n, c, checked.wrap_sync(one))
        return wall, cpu

    if name in ASYNC_CLIENTS:
        wall, cpu = asyncio.run(run_async())
    elif name in MANY_CLIENTS:
        wall, cpu = asyncio.run(run_many())
    else:
        wall, cpu = run_sync()
    if len(checked.latencies) != latency_n:
        raise RuntimeError(f"{len(checked.latencies)} checked images, expected {latency_n}")
    return _figures(n, wall, cpu, checked.latencies)


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
